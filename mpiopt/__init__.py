"""mpiopt: communication-efficient distributed SGD over MPI."""

__version__ = "0.1.0"
