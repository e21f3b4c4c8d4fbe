"""Device buffers through the transport (stream sync, host staging): needs CuPy and a GPU."""

import sys

import pytest

cupy = pytest.importorskip("cupy")
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("no CUDA device", allow_module_level=True)
except Exception:  # CuPy without a driver
    pytest.skip("no CUDA device", allow_module_level=True)

from conftest import launch  # noqa: E402

SCRIPT = r"""
import cupy as cp, numpy as np
from mpiopt import backend
from mpiopt.comm.transport import Channel, Transport
t = Transport(timeout=60)
aware, line = backend.decide_cuda_aware(t, "auto", "gpu")  # before touching the device
cp.cuda.Device(backend.device_index(backend.gpu_count())).use()
for mode in ([aware, False] if aware else [False]):
    t.cuda_aware = mode
    x = cp.full(1 << 20, t.rank + 1, dtype=cp.float32)
    t.allreduce(x, Channel.GRADIENT)
    assert float(x[0]) == t.size * (t.size + 1) / 2 and bool((x == x[0]).all())
    y, z = cp.zeros(8, cp.float32), cp.zeros(8, cp.float32)
    s = cp.cuda.Stream(non_blocking=True)
    with s:  # produced on another stream: passed explicitly before the send
        w = cp.full(8, t.rank + 0.5, cp.float32)
    backend.synchronize(w, stream=s)
    h = [t.irecv(y, (t.rank - 1) % t.size, Channel.MODEL),
         t.irecv(z, (t.rank + 1) % t.size, Channel.GOSSIP),
         t.isend(cp.full(8, t.rank, cp.float32), (t.rank + 1) % t.size, Channel.MODEL),
         t.isend(w, (t.rank - 1) % t.size, Channel.GOSSIP)]
    for handle in h:
        handle.wait()
    assert bool((y == (t.rank - 1) % t.size).all())
    assert bool((z == (t.rank + 1) % t.size + 0.5).all())
    v = cp.full(1000, t.rank + 1, dtype=cp.float32)
    t.iallreduce(v).wait()
    assert bool((v == t.size * (t.size + 1) / 2).all())
    q = cp.full(8, -1, cp.float32)  # a shorter message leaves the rest of the buffer alone
    h = [t.irecv(q, None, Channel.BENCH),
         t.isend(cp.full(3, t.rank, cp.float32), (t.rank + 1) % t.size, Channel.BENCH)]
    for handle in h:
        handle.wait()
    assert h[0].nbytes == 12 and bool((q[:3] == (t.rank - 1) % t.size).all())
    assert bool((q[3:] == -1).all())
    assert t.staging.leased == 0
t.free()
assert len(t.staging) == 0
if t.rank == 0:
    print("gpu transport ok;", line, flush=True)
"""


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 2])
def test_device_buffers_through_the_transport(tmp_path, n):
    script = tmp_path / "gpu_transport.py"
    script.write_text(SCRIPT)
    res = launch(n, [sys.executable, "-m", "mpi4py", str(script)], timeout=180)
    assert res.returncode == 0, res.stderr
    assert "gpu transport ok; CUDA-aware MPI: " in res.stdout


@pytest.mark.gpu
def test_gpu_training_reaches_quickstart_accuracy(tmp_path):
    from conftest import CONFIGS, mpiopt_cmd

    res = launch(2, [*mpiopt_cmd(), "run", str(CONFIGS / "quickstart.yaml"), "--set",
                     "run.device=gpu", "--out", str(tmp_path / "g"), "--quiet"], timeout=300)
    assert res.returncode == 0, res.stderr
    import json

    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["final"]["accuracy"] >= 0.93
