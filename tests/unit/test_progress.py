"""Progress lines: rate-limited, informative, silent for short or quiet runs."""

import io

from mpiopt.progress import Progress


def test_lines_are_rate_limited_and_complete(monkeypatch):
    clock = iter([0.0, 1.0, 2.5, 3.0, 5.1])
    monkeypatch.setattr("mpiopt.progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = Progress(100, every_s=2.0, stream=out)  # start at t=0
    p.update(9, 0.5, 1_000_000)  # t=1.0: too early
    p.update(24, 0.4, 2_000_000)  # t=2.5: printed
    p.note_eval({"accuracy": 0.875})
    p.update(29, 0.3, 3_000_000)  # t=3.0: too soon after the last
    p.update(49, 0.2, 5_000_000)  # t=5.1: printed, with the accuracy
    lines = out.getvalue().splitlines()
    assert lines[0] == ("step 25/100 (25%) | loss 0.4000 | 10.0 steps/s | 2.0 MB sent | "
                        "ETA 8s")
    assert lines[1].startswith("step 50/100 (50%) | loss 0.2000 | acc 0.8750 |")
    assert len(lines) == 2
    assert p.due == 7.1  # the step loop calls update only from then on
    p.update(60, 0.1, 6_000_000, now=7.0)  # the caller's own clock reading: too early
    assert len(out.getvalue().splitlines()) == 2


def test_disabled_prints_nothing():
    out = io.StringIO()
    p = Progress(10, every_s=1e-9, enabled=False, stream=out)
    p.update(5, 1.0, 0)
    assert out.getvalue() == "" and p.due == float("inf")


def test_perplexity_is_shown_without_accuracy(monkeypatch):
    clock = iter([0.0, 2.5])
    monkeypatch.setattr("mpiopt.progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = Progress(100, every_s=2.0, stream=out, metric="perplexity")
    p.note_eval({"loss": 7.0, "perplexity": 1096.63})  # a topic model: no accuracy
    p.update(24, 7.5, 0)
    assert out.getvalue().startswith("step 25/100 (25%) | loss 7.5000 | ppl 1096.6 |")


def test_lines_show_the_problems_own_metric():
    out = io.StringIO()
    p = Progress(10, every_s=1e-9, stream=out, metric="return")
    p.note_eval({"return": 487.5, "loss": -487.5})
    p.update(4, 0.25, 0)
    assert "| loss 0.2500 | return 487.5000 |" in out.getvalue()
