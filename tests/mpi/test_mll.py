"""Multi-Level Local SGD on real ranks: special cases equal the baselines; the shipped config."""

import pytest
from conftest import CONFIGS, run_check_script
from test_run import read_summary, run, write_config

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n", [3, 5])
def test_special_cases_equal_the_baselines(tmp_path, n):
    run_check_script(n, "check_mll.py", f"mll checks passed on {n} ranks",
                     args=[write_config(tmp_path), str(tmp_path)])


def test_two_subnetworks_of_three_reach_the_target(tmp_path):
    res = run(6, str(CONFIGS / "mll-digits.yaml"), tmp_path / "mll")
    assert res.returncode == 0, res.stderr
    s = read_summary(tmp_path / "mll")
    assert s["final"]["accuracy"] >= 0.90
    info = s["algorithm_info"]
    assert info["groups"] == [[0, 1, 2], [3, 4, 5]] and info["hubs"] == [0, 3]
    assert abs(sum(info["rates"]) / 6 - 0.55) < 0.2
    assert "consensus_within" in s["final"]


def test_a_rate_outside_0_1_is_refused(tmp_path):
    cfg = write_config(tmp_path, {"algorithm": {"name": "mll_sgd", "rates": 1.5}})
    res = run(1, cfg, tmp_path / "x")
    assert res.returncode == 2 and not (tmp_path / "x").exists()
    assert res.stderr == ("mpiopt: error: algorithm.rates: rate 1.5 is not a probability of "
                          "stepping; valid: 0 < p <= 1\n")
