"""The metrics recorder (chunked, flat memory) and the fault-injection parser."""

import tracemalloc

import h5py
import numpy as np
import pytest

from mpiopt.errors import ConfigError
from mpiopt.faults import Fault, FaultInjector, InjectedFault, parse
from mpiopt.io.metrics import STEP_FIELDS, EvalLog, StepLog, merge, rank_log_path, read_metrics


def test_steplog_flushes_in_chunks_with_flat_memory(tmp_path):
    log = StepLog(str(tmp_path / "r.h5"), chunk=64)
    for i in range(1000):  # warm-up: h5py caches and the first resizes
        log.append(i, i * 0.1, 1.0, 0.1, 10, 10, 0.01, 0.02)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(1000, 20000):
        log.append(i, i * 0.1, 1.0, 0.1, 10, 10, 0.01, 0.02)
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert grown < 256 * 1024, grown  # 19k rows would be ~1 MB if they were kept
    log.close()
    with h5py.File(tmp_path / "r.h5") as f:
        assert np.array_equal(f["step"][()], np.arange(20000))


def test_steplog_totals_and_types_across_chunks(tmp_path):
    log = StepLog(str(tmp_path / "r.h5"), chunk=8)
    for i in range(21):  # two chunks written, five rows still buffered
        log.append(i, i * 0.5, np.float32(1.5), 0.1, 100 * i, 7, 0.25, 0.125)
    assert (log.rows, log.fill) == (16, 5)
    assert log.compute_s == 21 * 0.25 and log.comm_s == 21 * 0.125
    log.close()
    with h5py.File(tmp_path / "r.h5") as f:
        assert [f[name].dtype for name, _ in STEP_FIELDS] == [dtype for _, dtype in STEP_FIELDS]
        assert f["bytes_sent"][()].tolist() == [100 * i for i in range(21)]
        assert np.all(f["loss"][()] == 1.5) and f["time"][20] == 10.0


def test_merge_builds_the_contract_layout(tmp_path):
    (tmp_path / ".ranks").mkdir()
    for r in range(3):
        log = StepLog(rank_log_path(str(tmp_path), r), chunk=16)
        for i in range(5 + r):
            log.append(i, float(i), 0.5, 0.1, r, r, 0.0, 0.0)
        log.close()
    evals = EvalLog()
    evals.append({"step": 5, "time": 1.0, "bytes_sent": 3.0, "loss": 0.2, "accuracy": 0.9})
    evals.append({"step": 7, "time": 2.0, "bytes_sent": 4.0, "loss": 0.1, "accuracy": 0.95,
                  "consensus_distance": 0.5})
    merge(str(tmp_path), 3, evals, {"algorithm": "x", "world_size": 3})
    assert not (tmp_path / ".ranks").exists()
    m = read_metrics(str(tmp_path / "metrics.h5"))
    assert [len(r["step"]) for r in m["ranks"]] == [5, 6, 7]
    assert m["ranks"][2]["bytes_sent"].tolist() == [2] * 7
    assert m["eval"]["step"].tolist() == [5, 7]
    assert np.isnan(m["eval"]["consensus_distance"][0])
    assert m["attrs"]["world_size"] == 3


def test_merge_writes_each_ranks_series(tmp_path):
    (tmp_path / ".ranks").mkdir()
    for r in range(3):
        log = StepLog(rank_log_path(str(tmp_path), r), chunk=16)
        log.append(0, 0.0, 0.5, 0.1, 0, 0, 0.0, 0.0)
        if r != 1:  # rank 1 has no series of its own
            log.write_series({"staleness": (np.arange(4 + r), "updates between"),
                              "worker": (np.array([r] * (4 + r)), "who")})
        log.write_series({})
        log.close()
    merge(str(tmp_path), 3, EvalLog(), {"world_size": 3})
    with h5py.File(tmp_path / "metrics.h5") as f:
        assert sorted(f["series"]) == ["0", "2"]
        assert f["series/2/staleness"].attrs["doc"] == "updates between"
        assert list(f["ranks/0"]) == sorted(name for name, _ in STEP_FIELDS)
    m = read_metrics(str(tmp_path / "metrics.h5"))
    assert m["series"][0]["staleness"].tolist() == [0, 1, 2, 3]
    assert m["series"][2]["worker"].tolist() == [2] * 6 and 1 not in m["series"]


def test_fault_parsing():
    assert parse(None) == () and parse("") == ()
    assert parse("stall:rank=1:step=3:seconds=2.5") == (Fault("stall", 1, 3, 2.5),)
    assert parse("raise:rank=0:step=1,nan:rank=2:step=4") == (Fault("raise", 0, 1),
                                                              Fault("nan", 2, 4))
    for bad, text in [("boom:rank=1:step=1", "unknown fault 'boom'"),
                      ("raise:rank=1", "needs rank=R and step=S"),
                      ("raise:rank=x:step=1", "rank must be a number"),
                      ("raise:who=1:step=1", "expected rank=R")]:
        with pytest.raises(ConfigError, match=text):
            parse(bad)


def test_injector_fires_only_on_its_rank_and_step():
    faults = parse("raise:rank=1:step=3,nan:rank=1:step=2")
    FaultInjector(faults, 0).at_step(3)  # another rank: nothing
    inj = FaultInjector(faults, 1)
    inj.at_step(2)
    g = np.ones(4)
    inj.corrupt(1, g)
    assert np.all(g == 1)
    inj.corrupt(2, g)
    assert np.all(np.isnan(g))
    with pytest.raises(InjectedFault, match="rank 1 at step 3"):
        inj.at_step(3)
