"""DC-ASGD on real ranks: the server's updates replayed by an oracle; where it is ASGD."""

import numpy as np
import pytest
from conftest import run_check_script
from test_run import read_model, read_summary, run, write_config

pytestmark = pytest.mark.mpi

ASGD = {"name": "asgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}


def test_every_update_equals_the_oracle_replay(tmp_path):
    # A server and two workers: most gradients are stale and compensated (DC-ASGD-c, then
    # DC-ASGD-a with momentum and weight decay), each update replayed bit for bit.
    cfg = write_config(tmp_path, {"algorithm": {"name": "dcasgd", "lr": 0.1, "momentum": None},
                                  "run": {"steps": 40}})
    run_check_script(3, "check_dcasgd.py", "dcasgd checks passed on 3 ranks",
                     args=[cfg, str(tmp_path)])


def test_lam_zero_or_one_worker_is_asgd_bit_for_bit(tmp_path):
    # lam = 0 removes the compensation; with one worker every gradient arrives at the model it
    # was computed at (w = backup), so even the adaptive rule adds nothing: both are asgd.
    cfg = write_config(tmp_path, {"algorithm": ASGD})
    runs = {"asgd": [], "lam0": ["--set", "algorithm.name=dcasgd", "--set", "algorithm.lam=0"],
            "adaptive": ["--set", "algorithm.name=dcasgd", "--set", "algorithm.adaptive=true"]}
    models = {}
    for name, sets in runs.items():
        res = run(2, cfg, tmp_path / name, *sets)
        assert res.returncode == 0, res.stderr
        models[name] = read_model(tmp_path / name)
        assert read_summary(tmp_path / name)["algorithm_info"]["staleness"]["max"] == 0
    assert np.array_equal(models["lam0"], models["asgd"])
    assert np.array_equal(models["adaptive"], models["asgd"])
