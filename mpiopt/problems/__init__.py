"""Problems (objectives on a flat vector) and their registry.

Importing this package imports no problem: :data:`PROBLEMS` imports the module of an entry when
the configuration names it.
"""

from mpiopt.config import Registry

PROBLEMS = Registry("problem", __name__, {"a2c": "a2c", "lda": "lda", "mlp": "dense",
                                         "softmax": "dense"})
