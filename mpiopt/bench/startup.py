"""``mpiopt bench startup``: what a launch costs beyond its training, against a bare launch.

Run as a plain process: it launches ``mpiexec`` itself. Each round launches, in an order that
alternates from round to round so that drift in machine load hits all alike:

- ``bare``: ``mpiexec -n N python -c "import numpy, h5py; from mpi4py import MPI"``, the least
  any MPI program of this stack pays;
- a run: ``mpiexec -n N mpiopt run CONFIG --quiet`` of a shipped configuration.

For a run, ``wall`` is the process wall time and ``run`` its own ``wall_time_s`` (training,
from the first step to the last, read from ``summary.json``); ``wall - run`` is what start-up
and shutdown cost. Figures are medians over rounds. The targets: the quickstart's whole wall time
within 2x of the bare launch at 4 ranks; Signum's ``wall - run`` within 3x of the bare launch
at 5 ranks (it runs kernels: numba, where the sizes call for it, loads before the clock).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mpiopt.errors import ConfigError
from mpiopt.jobs import JOBS_DIR

BARE = "import numpy, h5py; from mpi4py import MPI"
# (config, ranks, steps or None for the config's own, what the ratio compares, target)
CASES = (("quickstart", 4, 300, "wall", 2.0), ("signum-digits", 5, None, "wall - run", 3.0))


def _mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else "mpiexec"


def _launch(cmd: list[str], timeout: float = 600) -> float:
    """Run ``cmd`` to completion; return its wall time, or raise naming the command."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stderr[-2000:]}")
    return wall


def _bare(n: int) -> float:
    return _launch([_mpiexec(), "-n", str(n), sys.executable, "-c", BARE])


def _run(n: int, config: str, steps: int | None, out: str) -> tuple[float, float]:
    """Launch one run; return (process wall time, the run's own wall_time_s)."""
    cmd = [_mpiexec(), "-n", str(n), sys.executable, "-m", "mpiopt", "run",
           str(JOBS_DIR / "configs" / f"{config}.yaml"), "--out", out, "--overwrite", "--quiet"]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    wall = _launch(cmd)
    with open(os.path.join(out, "summary.json")) as fh:
        return wall, float(json.load(fh)["wall_time_s"])


def measure(config: str, n: int, steps: int | None, rounds: int, tmp: str) -> dict:
    """Time ``rounds`` bare launches and runs of ``config`` on ``n`` ranks, alternating."""
    bare, wall, own = [], [], []
    for i in range(rounds):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            if which == 0:
                bare.append(_bare(n))
            else:
                w, r = _run(n, config, steps, os.path.join(tmp, f"{config}-{i}"))
                wall.append(w)
                own.append(r)
    wall_a, own_a = np.array(wall), np.array(own)
    return {"config": config, "ranks": n, "steps": steps, "rounds": rounds,
            "bare_s": float(np.median(bare)), "wall_s": float(np.median(wall_a)),
            "run_s": float(np.median(own_a)),
            "overhead_s": float(np.median(wall_a - own_a)),
            "wall_s_all": wall, "bare_s_all": bare}


def run(repeats: int | None = None, json_path: str | None = None, ranks: int | None = None,
        steps: int | None = None, out=print) -> list[dict]:
    """Measure every case and print one line each with its ratio and target."""
    if "PMI_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        raise ConfigError("run it as a plain process, not under mpiexec: it launches the "
                          "ranks itself", key="bench startup")
    rounds = repeats or 5
    rows = []
    out(f"launch cost against a bare launch ({BARE!r}); medians of {rounds} rounds, "
        "order alternated")
    out(f"{'config':>14} {'ranks':>5} {'bare':>7} {'wall':>7} {'run':>7} {'wall-run':>9} "
        f"{'ratio':>6}  target")
    with tempfile.TemporaryDirectory(prefix="mpiopt-startup-") as tmp:
        for config, n, own_steps, what, target in CASES:
            n = ranks or n
            r = measure(config, n, steps or own_steps, rounds, tmp)
            top = r["wall_s"] if what == "wall" else r["overhead_s"]
            r.update(compared=what, ratio=top / r["bare_s"], target=target)
            rows.append(r)
            out(f"{config:>14} {n:>5} {r['bare_s']:6.2f}s {r['wall_s']:6.2f}s "
                f"{r['run_s']:6.2f}s {r['overhead_s']:8.2f}s {r['ratio']:6.2f}  "
                f"{what} <= {target:g} x bare")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows
