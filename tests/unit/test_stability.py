"""The stability measures of ALGORITHMS.md section 3 on hand-made accuracy series."""

import numpy as np
import pytest

from mpiopt.io.stability import stability, tail_count, warmup_count


def test_steady_series_has_zero_measures():
    s = stability([0.9] * 10)
    assert s == {"mean_abs_change": 0.0, "tail_std": 0.0, "evaluations": 10, "warmup": 2,
                 "tail": 2}


def test_ten_evaluations_by_hand():
    acc = [0.1, 0.5, 0.7, 0.8, 0.8, 0.82, 0.78, 0.82, 0.78, 0.80]
    s = stability(acc)
    # Warm-up: the first 2 of 10 (20%); changes over 0.7 ... 0.80: .1, 0, .02, .04, .04, .04,
    # .02. Tail: the last 2 (20%, at least two): 0.78 and 0.80, standard deviation 0.01.
    assert (s["warmup"], s["tail"], s["evaluations"]) == (2, 2, 10)
    assert s["mean_abs_change"] == pytest.approx(0.26 / 7)
    assert s["tail_std"] == pytest.approx(0.01)


def test_oscillation_after_warm_up():
    # Twenty evaluations: four of warm-up climbing fast, then 0.8, 0.9, 0.8, ... around 0.85.
    acc = [0.1, 0.3, 0.5, 0.7] + [0.8, 0.9] * 8
    s = stability(acc, steps=np.arange(50, 1050, 50))
    assert (s["warmup"], s["tail"]) == (4, 4)
    assert s["mean_abs_change"] == pytest.approx(0.1)  # the climb is not counted
    assert s["tail_std"] == pytest.approx(0.05)  # population std of 0.8, 0.9, 0.8, 0.9


def test_noisier_run_scores_worse_on_both():
    rng = np.random.default_rng(0)
    base = 0.9 - 0.8 * np.exp(-np.arange(30) / 4)
    steady = stability(base + 0.002 * rng.standard_normal(30))
    noisy = stability(base + 0.03 * rng.standard_normal(30))
    assert noisy["mean_abs_change"] > 3 * steady["mean_abs_change"]
    assert noisy["tail_std"] > 3 * steady["tail_std"]


@pytest.mark.parametrize("acc", [[], [0.5], [0.4, 0.9]])
def test_fewer_than_three_evaluations_give_none(acc):
    assert stability(acc) == {"mean_abs_change": None, "tail_std": None,
                              "evaluations": len(acc), "warmup": 0, "tail": 0}


def test_three_evaluations_are_enough():
    s = stability([0.5, 0.7, 0.6])
    assert (s["warmup"], s["tail"]) == (0, 2)  # floor(0.6) = 0 of warm-up
    assert s["mean_abs_change"] == pytest.approx(0.15)
    assert s["tail_std"] == pytest.approx(0.05)


def test_learning_rate_warm_up_extends_the_warm_up():
    steps = np.arange(100, 1100, 100)  # ten evaluations
    acc = [0.1, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
    s = stability(acc, steps)
    assert s["warmup"] == 2 and s["mean_abs_change"] == pytest.approx(0.4 / 7)
    s = stability(acc, steps, warmup_steps=400)  # evaluations at 100 ... 400 are warm-up
    assert s["warmup"] == 4 and s["mean_abs_change"] == 0.0
    # A warm-up that leaves one evaluation: no change to measure; the tail is still there.
    s = stability(acc, steps, warmup_steps=900)
    assert s["warmup"] == 9 and s["mean_abs_change"] is None and s["tail_std"] == 0.0


def test_evaluations_without_accuracy_are_left_out():
    s = stability([0.5, np.nan, 0.7, 0.6, np.nan])
    assert s == stability([0.5, 0.7, 0.6])
    assert stability([np.nan, np.nan, np.nan])["tail_std"] is None


def test_counts():
    assert [warmup_count(np.arange(n)) for n in (0, 3, 4, 5, 9, 10, 50)] == \
        [0, 0, 0, 1, 1, 2, 10]
    assert [tail_count(n) for n in (2, 3, 10, 11, 50)] == [2, 2, 2, 3, 10]
