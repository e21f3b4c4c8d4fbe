"""Algorithms; importing this package registers every algorithm."""

from mpiopt.algorithms import allreduce, local_sgd  # noqa: F401
