"""Kernel throughput against the numpy references and a memory-copy bandwidth probe.

``run(size, threads, json_path)`` times, in one process, a copy of the input (the bandwidth
probe: numpy's single-threaded ``copyto`` and a parallel numba copy, the faster counts), the
numpy reference of every kernel and every available backend (numba; CuPy when a device is
there), and prints per kernel the GB/s of input, the speed-up over the numpy reference and
the fraction of copy bandwidth. Timings are the best of several runs after a warm-up call, so
compilation is never timed.

"Input" is the float32 vector of ``size`` elements for every kernel (for ``unpack_signs`` and
``lattice_decode`` it is the float32 output they produce; the packed side is 32x smaller),
except ``majority_vote``, whose input is the stack of 8 packed vectors (``size`` bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np

from mpiopt import kernels

VOTERS = 8
LEVELS, BUCKET = 4, 512
EPS, Q = 1e-3, 1 << 16


@dataclass
class Row:
    """One timed kernel on one backend."""

    kernel: str
    backend: str
    seconds: float
    nbytes: int
    gbps: float = 0.0
    vs_numpy: float | None = None
    vs_copy: float | None = None


def best_time(fn, sync=lambda: None, repeat: int = 5, budget: float = 4.0) -> float:
    """Return the best wall time of ``fn()`` over up to ``repeat`` runs after one warm-up."""
    fn()
    sync()
    best, spent = float("inf"), 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget:
            break
    return best


def _inputs(xp, size: int, seed: int = 0) -> dict:
    """Return the arrays the cases read and write, on the array module ``xp``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(size, dtype=np.float32)
    stack = np.stack([np.packbits(rng.standard_normal(size, dtype=np.float32) >= 0)
                      for _ in range(VOTERS)])
    host = {"x": x, "ref": x + np.float32(EPS), "err": np.zeros_like(x), "stack": stack}
    host["packed"] = np.packbits(x >= 0)
    host["codes"], host["norms"] = kernels.qsgd_quantize(x, LEVELS, BUCKET, 1)
    host["z"] = kernels.lattice_encode(x, EPS, Q)[0]
    return {k: (v if xp is np else xp.asarray(v)) for k, v in host.items()}


def _cases(a: dict, size: int, backend: str) -> dict:
    """Return ``{kernel: (nbytes, callable)}`` for one backend (``backend`` is a kernel's)."""
    xp = kernels.array_module(a["x"])
    f32, bb = xp.empty(size, np.float32), xp.empty(-(-size // 8), np.uint8)
    codes, norms = xp.empty(size, np.int8), xp.empty(-(-size // BUCKET), np.float32)
    z = xp.empty(size, np.uint16)
    kw = {"backend": backend}
    return {
        "pack_signs": (4 * size, lambda: kernels.pack_signs(a["x"], bb, **kw)),
        "unpack_signs": (4 * size, lambda: kernels.unpack_signs(a["packed"], size, 0.5, f32,
                                                                **kw)),
        f"majority_vote(n={VOTERS})": (VOTERS * bb.size,
                                       lambda: kernels.majority_vote(a["stack"], bb, **kw)),
        f"qsgd_quantize(s={LEVELS})": (4 * size, lambda: kernels.qsgd_quantize(
            a["x"], LEVELS, BUCKET, 7, out=codes, norms_out=norms, **kw)),
        "qsgd_dequantize": (4 * size, lambda: kernels.qsgd_dequantize(
            a["codes"], a["norms"], LEVELS, BUCKET, out=f32, **kw)),
        "lattice_encode": (4 * size, lambda: kernels.lattice_encode(a["x"], EPS, Q, z, **kw)),
        "lattice_decode": (4 * size, lambda: kernels.lattice_decode(a["z"], a["ref"], EPS, Q,
                                                                    f32, **kw)),
        "ef_sign_compress": (4 * size, lambda: kernels.ef_sign_compress(a["x"], a["err"], bb,
                                                                        **kw)),
        "all_finite": (4 * size, lambda: kernels.all_finite(a["x"], **kw)),
    }


def _numpy_baselines(a: dict, size: int) -> dict:
    """Return the numpy baselines: the reference kernels, and ``packbits(x >= 0)`` for pack."""
    cases = _cases(a, size, "numpy")
    cases["pack_signs"] = (4 * size, lambda: np.packbits(a["x"] >= 0))
    return cases


def _cupy_sync():
    import cupy

    return cupy.cuda.get_current_stream().synchronize


def _gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver or no device: the GPU rows are skipped
        return False


def _copy_rows(a: dict, size: int, gpu: bool) -> list[Row]:
    """Time the bandwidth probes: numpy copy and parallel numba copy (or a device copy)."""
    if gpu:
        import cupy

        y = cupy.empty_like(a["x"])
        t = best_time(lambda: cupy.copyto(y, a["x"]), _cupy_sync())
        return [Row("copy", "cupy", t, 4 * size)]
    y = np.empty_like(a["x"])
    rows = [Row("copy", "numpy", best_time(lambda: np.copyto(y, a["x"])), 4 * size)]
    from mpiopt.kernels import cpu

    rows.append(Row("copy", "numba", best_time(lambda: cpu.parallel_copy(a["x"], y)), 4 * size))
    return rows


def _finish(rows: list[Row], baseline: dict[str, float], copy_gbps: float) -> None:
    for r in rows:
        r.gbps = r.nbytes / r.seconds / 1e9
        if r.kernel in baseline and r.backend != "numpy":
            r.vs_numpy = baseline[r.kernel] / r.seconds
        r.vs_copy = r.gbps / copy_gbps


def measure(size: int, gpu: bool | None = None, log=None) -> list[Row]:
    """Return the timed rows: copy probes, numpy baselines, numba, and CuPy if available."""
    gpu = _gpu_available() if gpu is None else gpu
    host = _inputs(np, size)
    rows = _copy_rows(host, size, False)
    copy_cpu = max(r.nbytes / r.seconds / 1e9 for r in rows)
    cpu_rows, baseline = [], {}
    for name, (nb, fn) in _numpy_baselines(host, size).items():
        baseline[name] = best_time(fn, repeat=3, budget=8.0)
        cpu_rows.append(Row(name, "numpy", baseline[name], nb))
        if log:
            log(f"  timed {name} on numpy")
    for name, (nb, fn) in _cases(host, size, "numba").items():
        cpu_rows.append(Row(name, "numba", best_time(fn), nb))
    _finish(rows + cpu_rows, baseline, copy_cpu)
    rows += cpu_rows
    if gpu:
        dev = _inputs(__import__("cupy"), size)
        gpu_rows = _copy_rows(dev, size, True)
        gpu_rows += [Row(n, "cupy", best_time(fn, _cupy_sync(), repeat=20), nb)
                     for n, (nb, fn) in _cases(dev, size, "cupy").items()]
        _finish(gpu_rows, baseline, gpu_rows[0].nbytes / gpu_rows[0].seconds / 1e9)
        rows += gpu_rows
    return rows


def format_table(rows: list[Row]) -> str:
    """Return the rows as a markdown table."""
    lines = ["| kernel | backend | ms | GB/s | x numpy | % copy |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r.vs_numpy:.1f}" if r.vs_numpy is not None else ""
        lines.append(f"| {r.kernel} | {r.backend} | {r.seconds * 1e3:.2f} | {r.gbps:.1f} | "
                     f"{ratio} | {100 * r.vs_copy:.0f}% |")
    return "\n".join(lines)


def machine() -> dict:
    """Return a description of this machine and of the library versions."""
    import numba

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "numba_threads": kernels.get_num_threads(),
            "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__}


def run(size: int = 1 << 26, threads: int | None = None, json_path: str | None = None,
        out=print) -> dict:
    """Benchmark every kernel on ``size`` float32 elements; print and return the results."""
    if threads is not None:
        kernels.set_num_threads(threads)
    info = machine()
    out(f"# kernels, {size} float32 elements ({4 * size / 2**20:.0f} MiB), "
        f"{info['numba_threads']} numba threads, {info['cpu']}")
    rows = measure(size)
    out(format_table(rows))
    result = {"size": size, "machine": info, "rows": [asdict(r) for r in rows]}
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv=None) -> int:
    """Run the benchmark from the command line (``python -m mpiopt.bench.kernels``)."""
    p = argparse.ArgumentParser(prog="mpiopt bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1 << 26, help="float32 elements (default 64M)")
    p.add_argument("--threads", type=int, default=None, help="numba threads")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    args = p.parse_args(argv)
    run(args.size, args.threads, args.json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
