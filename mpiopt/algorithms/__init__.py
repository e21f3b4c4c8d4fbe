"""Algorithms; importing this package registers every algorithm."""

from mpiopt.algorithms import allreduce, d_psgd, local_sgd, signum, swarm  # noqa: F401
