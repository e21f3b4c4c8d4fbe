"""Algorithms; importing this package registers every algorithm."""

from mpiopt.algorithms import allreduce, dpsgd_sync, local_sgd, signum, swarm  # noqa: F401
