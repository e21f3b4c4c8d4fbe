"""Algorithms, one module each, and their registry.

Importing this package imports no algorithm: :data:`ALGORITHMS` imports the module of an
entry when the configuration names it.
"""

from mpiopt.config import Registry

ALGORITHMS = Registry("algorithm", __name__, {
    "ad_psgd": "swarm",
    "allreduce": "allreduce",
    "asgd": "asgd",
    "d_psgd": "d_psgd",
    "dcasgd": "dcasgd",
    "dpsgd": "dpsgd",
    "ef_signsgd": "signum",
    "gsgm": "gsgm",
    "local_sgd": "local_sgd",
    "mll_sgd": "mll_sgd",
    "signsgd": "signum",
    "signum": "signum",
    "swarm": "swarm",
})
