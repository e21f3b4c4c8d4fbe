"""The CPU side of the GPU plumbing: probe environment, agreement, staging pool, stream sync.

Nothing here needs CuPy or a device: the probe's child is run for real (it fails to import
CuPy on a machine without it, which is an answer too), device arrays and the cupy module are
stand-ins where the logic only needs their shape.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types

import numpy as np
import pytest

from mpiopt import backend
from mpiopt.backend import Probe, StagingPool
from mpiopt.errors import ConfigError
from mpiopt.schema import config_from_dict

BASE = {"problem": {"name": "softmax"}, "data": {"name": "digits"},
        "algorithm": {"name": "allreduce"}}

# ------------------------------------------------------------------ the probe's environment

DROPPED = [
    "PMI_RANK", "PMI_SIZE", "PMI_FD", "PMI_PORT", "PMI_ID", "PMI2_INIT",
    "PMIX_RANK", "PMIX_NAMESPACE", "PMIX_SERVER_URI41", "PMIX_MCA_gds",
    "HYDRA_CONTROL_FD", "HYDI_CONTROL_FD", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_UNIVERSE_SIZE",
    "OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_hnp_uri", "OMPI_MCA_initial_wdir",
    "OMPI_MCA_pmix", "PRTE_MCA_prte_tmpdir_base", "SLURM_PROCID", "SLURM_STEP_ID",
    "SLURM_JOB_ID", "SLURM_LOCALID", "SRUN_DEBUG", "PALS_RANKID", "ALPS_APP_PE", "FLUX_URI",
    "FLUX_TASK_RANK", "JSM_NAMESPACE_RANK", "MV2_COMM_WORLD_RANK", "MPISPAWN_ID",
    "MPIRUN_RANK", "I_MPI_HYDRA_BOOTSTRAP",
]
KEPT = [
    "PATH", "HOME", "LD_LIBRARY_PATH", "PYTHONPATH", "CUDA_VISIBLE_DEVICES", "CUDA_HOME",
    "UCX_TLS", "FI_PROVIDER", "MPIR_CVAR_ENABLE_GPU", "MPIR_CVAR_CH4_OFI_ENABLE_HMEM",
    "MPICH_GPU_SUPPORT_ENABLED", "OMPI_MCA_pml", "OMPI_MCA_btl", "OMPI_MCA_opal_cuda_support",
    "OMPI_MCA_mpi_leave_pinned", "OMPI_MCA_coll_ucc_enable", "OMPI_MCA_accelerator",
    "MV2_USE_CUDA", "I_MPI_OFFLOAD", "MPI4PY_RC_THREADS", "OPAL_PREFIX",
]


def test_scrub_drops_the_launchers_variables_and_keeps_mpi_settings():
    env = {name: "1" for name in DROPPED + KEPT}
    clean = backend.scrub_env(env)
    assert sorted(clean) == sorted(KEPT)
    assert env == {name: "1" for name in DROPPED + KEPT}  # a copy: the input is untouched


def test_child_gets_the_scrubbed_environment():
    env = {**os.environ, "PMI_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "SLURM_PROCID": "3",
           "MPIR_CVAR_ENABLE_GPU": "1"}
    code, out, _ = backend.run_child(
        [sys.executable, "-c", "import json, os; print(json.dumps(sorted(os.environ)))"],
        timeout=30, env=env)
    seen = set(json.loads(out))
    assert code == 0
    assert "MPIR_CVAR_ENABLE_GPU" in seen and "PATH" in seen
    assert not seen & {"PMI_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID"}


def test_child_past_its_timeout_dies_with_its_grandchildren():
    # The grandchild holds the child's stdout: without killing the whole group, reading the
    # pipes to their end would wait for it, long past the timeout.
    grand = "import time; time.sleep(60)"
    child = ("import subprocess, sys, time; "
             f"p = subprocess.Popen([sys.executable, '-c', {grand!r}]); "
             "print(p.pid, flush=True); time.sleep(60)")
    t0 = time.monotonic()
    code, out, _ = backend.run_child([sys.executable, "-c", child], timeout=1.5)
    assert code is None and time.monotonic() - t0 < 10
    assert _gone(int(out.split()[0]))


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if _zombie(pid):
            return True
        time.sleep(0.05)
    return False


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_probe_without_cupy_says_no_with_the_reason():
    pytest.importorskip("mpi4py")
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed: the probe's answer depends on the machine")
    except ImportError:
        pass
    probe = backend.probe_cuda_aware(0, timeout=60)
    assert not probe.aware
    assert "exit status 1" in probe.detail and "cupy" in probe.detail


FAKE_CUPY = """
import numpy
from numpy import arange, float32, full, zeros, zeros_like
from types import SimpleNamespace as _NS

class _Device:
    def __init__(self, index):
        self.index = index
    def use(self):
        if self.index != 2:
            raise RuntimeError(f"bound device {self.index}, expected 2")

_stream = _NS(synchronize=lambda: None)
cuda = _NS(Device=_Device, get_current_stream=lambda: _stream)
"""


def test_probe_runs_its_checks_through_mpi(tmp_path):
    # A numpy stand-in for cupy: the probe's own code runs for real, Isend/Irecv and
    # Allreduce through a singleton MPI, and the answer comes back through the pipe.
    pytest.importorskip("mpi4py")
    (tmp_path / "cupy.py").write_text(FAKE_CUPY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
           "PMI_RANK": "1", "PMI_FD": "99"}  # must be scrubbed: MPI_Init would use them
    probe = backend.probe_cuda_aware(2, timeout=60, env=env)
    assert probe == Probe(True, "device buffers moved and reduced correctly")


# ------------------------------------------------------------------ reading the probe


@pytest.mark.parametrize("code,out,err,aware,words", [
    (0, 'noise\nmpiopt-probe: {"ok": true, "why": "fine"}\n[MPI banner]\n', "", True, "fine"),
    (0, 'mpiopt-probe: {"ok": false, "why": "Allreduce gave wrong data"}', "", False,
     "wrong data"),
    (0, '{"ok": true, "why": "no prefix: not the probe"}', "", False, "exit status 0"),
    (-11, "", "", False, "SIGSEGV"),
    (-6, "", "", False, "SIGABRT"),
    (1, "", "Traceback ...\nCUDARuntimeError: cudaErrorNoDevice", False,
     "exit status 1): CUDARuntimeError: cudaErrorNoDevice"),
    (0, "mpiopt-probe: not json", "", False, "exit status 0"),
    (0, "", "", False, "no output"),
    (None, "", "", False, "did not finish within 7 s"),
])
def test_read_probe(code, out, err, aware, words):
    probe = backend.read_probe(code, out, err, timeout=7)
    assert probe.aware is aware and words in probe.detail


@pytest.mark.parametrize("probes,aware,words", [
    ([Probe(True, "ok"), None, Probe(True, "ok"), None], True, "probed on 2 node(s)"),
    ([Probe(True, "ok"), None, Probe(False, "crashed (SIGSEGV)")], False,
     "rank 2: crashed (SIGSEGV)"),
    ([None, Probe(False, "timed out")], False, "rank 1: timed out"),
    ([None, None], False, "no rank probed"),
    ([], False, "no rank probed"),
])
def test_agreement_needs_every_probe_to_say_yes(probes, aware, words):
    result = backend.agree_cuda_aware(probes)
    assert result.aware is aware and words in result.detail


# ------------------------------------------------------------------ deciding for the job


class FakeTransport:
    """The two collectives the decision uses; the other ranks' probes are given."""

    def __init__(self, node_rank=0, others=(), timeout=5.0):
        self.node_rank, self.others, self.timeout = node_rank, list(others), timeout
        self.gathered, self.freed = None, False

    def split_shared(self):
        outer = self

        class Node:
            rank = self.node_rank

            def free(self):
                outer.freed = True
        return Node()

    def allgather_obj(self, obj):
        self.gathered = (obj, self.timeout)
        return [obj, *self.others]


class NoCollectives:
    timeout = 5.0

    def split_shared(self):
        raise AssertionError("no collective expected")

    allgather_obj = split_shared


@pytest.fixture
def gpu(monkeypatch):
    """Pretend a GPU is visible; record the devices probed."""
    probed = []
    monkeypatch.setattr(backend, "cupy_or_none", lambda: object())
    monkeypatch.setattr(backend, "gpu_count", lambda: 4)
    monkeypatch.setenv("SLURM_LOCALID", "6")
    for var in backend._LOCAL_RANK_VARS[:3]:
        monkeypatch.delenv(var, raising=False)

    def probe(device, timeout=backend.PROBE_TIMEOUT_S, env=None):
        probed.append(device)
        return Probe(True, "moved")
    monkeypatch.setattr(backend, "probe_cuda_aware", probe)
    return probed


def test_auto_probes_on_the_node_leader_and_agrees(gpu):
    t = FakeTransport(node_rank=0, others=[Probe(True, "moved"), None])
    aware, line = backend.decide_cuda_aware(t, "auto", "gpu")
    assert aware is True and line == "CUDA-aware MPI: yes (probed on 2 node(s))"
    assert gpu == [2]  # local rank 6 on 4 visible devices
    assert t.freed and t.gathered[0] == Probe(True, "moved")
    assert t.gathered[1] >= backend.PROBE_TIMEOUT_S and t.timeout == 5.0  # waited, restored


def test_auto_on_another_rank_of_the_node_only_agrees(gpu):
    t = FakeTransport(node_rank=1, others=[Probe(False, "crashed (SIGSEGV)")])
    aware, line = backend.decide_cuda_aware(t, "auto", "auto")
    assert gpu == [] and t.gathered[0] is None
    assert aware is False
    assert line == ("CUDA-aware MPI: no (rank 1: crashed (SIGSEGV)); device buffers are "
                    "staged through host memory")


@pytest.mark.parametrize("setting,aware,words", [
    (True, True, "yes (run.cuda_aware: true, not probed)"),
    (False, False, "no (run.cuda_aware: false, not probed); device buffers are staged"),
])
def test_explicit_setting_skips_the_probe(gpu, setting, aware, words):
    got, line = backend.decide_cuda_aware(NoCollectives(), setting, "gpu")
    assert got is aware and words in line and gpu == []


@pytest.mark.parametrize("device,where", [("cpu", "run.device is cpu"),
                                          ("auto", "no CUDA device is visible")])
def test_true_without_a_gpu_warns(monkeypatch, device, where):
    monkeypatch.setattr(backend, "cupy_or_none", lambda: None)
    aware, line = backend.decide_cuda_aware(NoCollectives(), True, device)
    assert aware is None
    assert line.startswith("warning: run.cuda_aware: true has no effect") and where in line


@pytest.mark.parametrize("setting", ["auto", False])
def test_host_memory_needs_no_decision(setting):
    assert backend.decide_cuda_aware(NoCollectives(), setting, "cpu") == (None, None)


def test_auto_without_a_gpu_still_joins_the_agreement(monkeypatch):
    # Another rank may have a GPU and probe: every rank takes part in the collective.
    monkeypatch.setattr(backend, "cupy_or_none", lambda: None)
    t = FakeTransport(node_rank=0, others=[Probe(True, "moved")])
    assert backend.decide_cuda_aware(t, "auto", "auto") == (None, None)
    assert t.gathered[0] is None


@pytest.mark.parametrize("env,count,index", [
    ({}, 4, 0), ({"SLURM_LOCALID": "5"}, 4, 1), ({"MPI_LOCALRANKID": "3"}, 1, 0),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "2", "SLURM_LOCALID": "7"}, 8, 2),
    ({"PALS_LOCAL_RANKID": "9"}, 4, 1), ({"SLURM_LOCALID": "3"}, 0, 0),
])
def test_device_index_is_local_rank_modulo_visible_devices(env, count, index):
    assert backend.device_index(count, env) == index


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("value,expected", [("auto", "auto"), (True, True), (False, False)])
def test_cuda_aware_setting(value, expected):
    assert config_from_dict({**BASE, "run": {"cuda_aware": value}}).run.cuda_aware == expected
    assert config_from_dict(BASE).run.cuda_aware == "auto"


@pytest.mark.parametrize("text,expected", [("true", True), ("false", False), ("auto", "auto")])
def test_cuda_aware_override(text, expected):
    assert config_from_dict(BASE, [f"run.cuda_aware={text}"]).run.cuda_aware == expected


@pytest.mark.parametrize("value", ["maybe", "probe", 1, None])
def test_bad_cuda_aware_names_the_key_and_the_choices(value):
    with pytest.raises(ConfigError) as exc:
        config_from_dict({**BASE, "run": {"cuda_aware": value}})
    message = str(exc.value)
    assert message.startswith("run.cuda_aware: ")
    assert "auto" in message or "true/false" in message


# ------------------------------------------------------------------ host staging


def counting_pool(keep=3):
    made = []

    def allocate(shape, dtype):
        made.append((tuple(shape), np.dtype(dtype)))
        return np.empty(shape, dtype)
    return StagingPool(allocate, keep=keep), made


def test_leases_in_flight_are_distinct_and_released_ones_are_reused():
    pool, made = counting_pool()
    a, b = pool.acquire((8,), np.float32), pool.acquire((8,), np.float32)
    assert a is not b and pool.leased == 2 and len(made) == 2
    pool.release(a)
    assert pool.acquire((8,), np.float32) is a and len(made) == 2
    pool.release(a)
    pool.release(b)
    assert pool.leased == 0 and len(pool) == 2 and pool.nbytes == 64


def test_keyed_by_shape_and_dtype_not_by_size():
    pool, made = counting_pool()
    pool.release(pool.acquire((4, 2), np.float32))
    flat = pool.acquire((8,), np.float32)  # same bytes (and maybe the same device address)
    assert flat.shape == (8,) and len(made) == 2
    pool.release(flat)
    assert pool.acquire((8,), np.int32).dtype == np.int32 and len(made) == 3


def test_free_arrays_are_bounded_least_recently_released_first():
    pool, _ = counting_pool(keep=3)
    held = [pool.acquire((n,), np.float32) for n in (1, 2, 3, 4, 5)]
    for h in held:
        pool.release(h)
    assert len(pool) == 3 and pool.leased == 0
    kept = sorted(pool.acquire((n,), np.float32).shape[0] for n in (3, 4, 5))
    assert kept == [3, 4, 5] and len(pool) == 0


def test_clear_drops_the_free_arrays_only():
    pool, made = counting_pool()
    busy = pool.acquire((2,), np.float64)
    pool.release(pool.acquire((3,), np.float64))
    pool.clear()
    assert len(pool) == 0 and pool.nbytes == 0 and pool.leased == 1
    pool.release(busy)
    assert len(pool) == 1


# ------------------------------------------------------------------ stream synchronisation


class FakeCupy:
    """A cupy module reduced to devices and their current streams, logging what is waited."""

    def __init__(self):
        self.current, self.waited = 0, []
        fake = self

        class Stream:
            def __init__(self, dev):
                self.dev = dev

            def synchronize(self):
                fake.waited.append(self.dev)

        class Device:
            def __init__(self, dev):
                self.dev, self.saved = dev, None

            def __enter__(self):
                self.saved, fake.current = fake.current, self.dev

            def __exit__(self, *exc):
                fake.current = self.saved

        self.Device, self.Stream = Device, Stream
        self.cuda = types.SimpleNamespace(get_current_stream=lambda: Stream(fake.current))


def test_synchronize_waits_on_the_stream_of_the_buffers_device(monkeypatch):
    cp = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    x = types.SimpleNamespace(device=cp.Device(3))
    backend.synchronize(x)
    assert cp.waited == [3] and cp.current == 0  # device 3's stream; current device restored


def test_synchronize_waits_on_the_stream_given(monkeypatch):
    cp = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    backend.synchronize(types.SimpleNamespace(device=cp.Device(1)), stream=cp.Stream(7))
    assert cp.waited == [7]


def test_singleton_tasks_of_an_srun_without_pmi():
    assert backend.singleton_tasks(1, {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"}) == 4
    # Wired up: the process manager gave MPI the size (srun --mpi=pmi2, hydra, Open MPI).
    assert backend.singleton_tasks(1, {"SLURM_STEP_NUM_TASKS": "4", "PMI_SIZE": "1"}) == 0
    assert backend.singleton_tasks(4, {"SLURM_STEP_NUM_TASKS": "4"}) == 0
    assert backend.singleton_tasks(1, {"SLURM_STEP_NUM_TASKS": "1"}) == 0
    assert backend.singleton_tasks(1, {}) == 0
