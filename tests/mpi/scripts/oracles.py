"""Numpy oracles shared by the check scripts and the unit tests (written from the papers).

The check scripts import this module from their own folder; unit tests put that folder on
``sys.path`` (``conftest.SCRIPTS``).
"""

import numpy as np


def dcasgd_step(w, g, b, lr, lam, ms=None, decay=0.95):
    """One DC-ASGD update as the publication writes it, evaluated by numpy in w's dtype.

    Returns the new model, the compensated gradient and the new mean square (adaptive when
    ``ms`` is given). Python floats enter as numpy does with them: cast to the array's dtype.
    """
    if ms is not None:
        ms = decay * ms + (1 - decay) * g * g
        c = g + lam / np.sqrt(ms + 1e-7) * g * g * (w - b)
    else:
        c = g + lam * g * g * (w - b)
    return w - lr * c, c, ms
