"""Problems; importing this package registers every problem."""

from mpiopt.problems import dense  # noqa: F401
