"""Datasets, partitions across ranks, and the registry of datasets.

Importing this package imports no dataset: :data:`DATASETS` imports the module of an entry
when the configuration names it.
"""

from mpiopt.config import Registry

DATASETS = Registry("data", __name__, {"bow": "bow", "digits": "datasets",
                                      "fashion_mnist": "fashion", "hdf5": "hdf5",
                                      "news": "corpora", "none": "datasets",
                                      "reuters": "corpora", "synthetic": "datasets",
                                      "synthetic_lda": "corpora"})
