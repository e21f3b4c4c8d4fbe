"""Datasets and partitions; importing this package registers every dataset."""

from mpiopt.data import datasets, hdf5  # noqa: F401  (registers synthetic, digits, hdf5)
from mpiopt.data.base import DataConfig, DataSource, Shard
from mpiopt.data.describe import describe
from mpiopt.data.partition import partition

__all__ = ["DataConfig", "DataSource", "Shard", "describe", "partition"]
