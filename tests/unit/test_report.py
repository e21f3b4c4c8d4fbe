"""Tests of mpiopt.report: loading run directories, labels, the markdown table and the plots."""

import copy
import json
import os

import h5py
import numpy as np
import pytest
import yaml

from mpiopt.errors import ConfigError
from mpiopt.report import (
    LABEL_MAX,
    assign_labels,
    load_run,
    make_report,
    mean_bytes_sent_at,
    mean_training_loss,
    metric_figure,
    moving_average,
    rank_bytes_sent,
    run_series,
    staleness_figure,
    training_loss_figure,
    updates_per_worker,
    workers_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

BASE_CONFIG = {
    "problem": {"name": "softmax", "l2": 0.0001},
    "data": {"name": "digits", "partition": "iid", "batch_size": 32},
    "algorithm": {"name": "signum", "lr": 0.001, "momentum": 0.9},
    "run": {"steps": 40, "eval_every": 10, "seed": 0, "out": "runs/x", "quiet": False},
}


def config_with(**changes):
    """Return a copy of BASE_CONFIG with ``section.key`` values changed ("a__b" for "a.b")."""
    config = copy.deepcopy(BASE_CONFIG)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


def write_run(path, config, world_size=2, steps=40, evals=None, wall=12.5, final=None,
              bytes_per_step=25000.0, compute=8.25, comm=3.5, time_to_target=None,
              rank_steps=None, rank_bytes=None, series=None, **extra):
    """Write a run directory exactly as ``mpiopt run`` does; return the summary.

    Rank r records ``rank_steps[r]`` steps (default ``steps``) of ``rank_bytes[r]`` bytes
    sent each (default ``bytes_per_step``, the summary's mean per rank per step) and the
    series ``series[r]`` (name -> values; none by default). ``extra`` goes into the summary.
    """
    os.makedirs(path)
    algorithm = config["algorithm"]["name"]
    final = final or {"loss": 0.4321, "accuracy": 0.8765}
    summary = {
        "algorithm": algorithm, "problem": config["problem"]["name"],
        "dataset": config["data"]["name"], "world_size": world_size, "steps": steps,
        "wall_time_s": wall, "final": final,
        "bytes_sent_total": int(bytes_per_step * steps * world_size),
        "bytes_recv_total": int(bytes_per_step * steps * world_size),
        "bytes_sent_per_rank_per_step": bytes_per_step, "compute_s": compute, "comm_s": comm,
        "peak_rss_mb": [100.0] * world_size, "seed": 0, "time_to_target": time_to_target,
        "config": config, **extra,
    }
    with open(os.path.join(path, "summary.json"), "w") as fh:
        json.dump(summary, fh)
    with open(os.path.join(path, "config.yaml"), "w") as fh:
        yaml.safe_dump(config, fh)
    with h5py.File(os.path.join(path, "metrics.h5"), "w") as h5:
        h5.attrs.update(algorithm=algorithm, problem=summary["problem"],
                        dataset=summary["dataset"], world_size=world_size,
                        config=yaml.safe_dump(config))
        for r in range(world_size):
            n = steps if rank_steps is None else rank_steps[r]
            sent = bytes_per_step if rank_bytes is None else rank_bytes[r]
            write_rank(h5.create_group(f"ranks/{r}"), n, r, sent)
        h5.create_group("series")
        for r, columns in (series or {}).items():
            for name, values in columns.items():
                h5.create_dataset(f"series/{r}/{name}", data=np.asarray(values))
        group = h5.create_group("eval")
        for name, values in (evals or {}).items():
            dtype = np.int64 if name == "step" else np.float64
            group.create_dataset(name, data=np.asarray(values, dtype=dtype))
    return summary


def write_rank(group, n, rank, bytes_per_step):
    """Write the per-step columns of one rank: loss = 2 - step/100 + rank/10."""
    step = np.arange(n, dtype=np.int64)
    group.create_dataset("step", data=step)
    group.create_dataset("time", data=step * 0.25)
    group.create_dataset("loss", data=(2.0 - step / 100 + rank / 10).astype(np.float32))
    group.create_dataset("lr", data=np.full(n, 0.001, dtype=np.float32))
    group.create_dataset("bytes_sent", data=np.full(n, int(bytes_per_step), dtype=np.int64))
    group.create_dataset("bytes_recv", data=np.full(n, int(bytes_per_step), dtype=np.int64))
    group.create_dataset("compute_s", data=np.full(n, 0.2))
    group.create_dataset("comm_s", data=np.full(n, 0.08))


# The eval group's bytes_sent is rank 0's cumulative count (run a: 20000 bytes a step).
EVALS_A = {"step": [0, 10, 20, 30, 40], "time": [0.0, 3.1, 6.2, 9.3, 12.4],
           "bytes_sent": [0.0, 2e5, 4e5, 6e5, 8e5], "loss": [2.3, 1.2, 0.8, 0.6, 0.5],
           "accuracy": [0.1, 0.55, 0.71, 0.83, 0.86]}
EVALS_B = {**EVALS_A, "accuracy": [0.1, 0.4, 0.5, 0.6, 0.65],
           "avg_accuracy": [0.1, 0.45, 0.55, 0.66, 0.7], "avg_loss": [2.3, 1.3, 1.0, 0.9, 0.8],
           "consensus_distance": [0.0, 0.1, 0.1, 0.05, 0.02]}


def table_rows(markdown):
    """Parse the first markdown table of ``markdown`` into dicts keyed by header, by run."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines]
    header = split[0]
    return {cells[0]: dict(zip(header, cells, strict=True)) for cells in split[2:]}


def is_png(path):
    with open(path, "rb") as fh:
        head = fh.read(8)
    return head == PNG_MAGIC and os.path.getsize(path) > 1000


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """Three runs differing in lr, partition and algorithm; the third has no evaluations.

    Ranks send different amounts: a's 20000 and 30000 bytes a step, b's ranks record 40 and
    25 steps, c's send 10000, 20000, 30000 and 40000 bytes a step.
    """
    root = tmp_path_factory.mktemp("runs")
    a = write_run(str(root / "a"), config_with(algorithm__lr=0.01, run__out="runs/a"),
                  evals=EVALS_A, rank_bytes=[20000, 30000])
    b = write_run(str(root / "b"), config_with(data__partition="dirichlet", run__out="runs/b"),
                  evals=EVALS_B, wall=20.75, final={"loss": 0.81234, "accuracy": 0.70004},
                  bytes_per_step=1234.5, compute=15.125, comm=4.0,
                  rank_steps=[40, 25])
    cfg_c = config_with(run__out="runs/c")
    cfg_c["algorithm"] = {"name": "allreduce", "lr": 0.001}
    c = write_run(str(root / "c"), cfg_c, world_size=4, steps=30, wall=7.0,
                  final={"loss": 0.3, "accuracy": 0.91},
                  time_to_target={"accuracy": 0.85, "step": 20, "time_s": 4.5},
                  rank_bytes=[10000, 20000, 30000, 40000])
    paths = [str(root / name) for name in "abc"]
    return paths, (a, b, c)


@pytest.fixture(scope="module")
def report(three_runs, tmp_path_factory):
    """The report of the three runs with target 0.85, written into a new nested directory."""
    out = str(tmp_path_factory.mktemp("report") / "nested" / "out")
    written = make_report(three_runs[0], out, target=0.85)
    with open(os.path.join(out, "report.md")) as fh:
        return out, written, fh.read()


# --------------------------------------------------------------------------- loading


def test_load_run_reads_summary_eval_and_ranks(three_runs):
    run = load_run(three_runs[0][1])
    assert run.summary["algorithm"] == "signum" and run.summary["world_size"] == 2
    assert set(run.eval) == set(EVALS_B)
    np.testing.assert_allclose(run.eval["avg_loss"], EVALS_B["avg_loss"])
    assert run.eval["step"].dtype == np.int64
    assert sorted(run.ranks) == [0, 1]
    assert len(run.ranks[0]["loss"]) == 40 and len(run.ranks[1]["loss"]) == 25
    assert set(run.ranks[0]) == {"step", "time", "loss", "lr", "bytes_sent", "bytes_recv",
                                 "compute_s", "comm_s"}
    assert run.label == "signum 2 ranks"


def test_load_run_of_run_without_evaluations_has_empty_eval(three_runs):
    run = load_run(three_runs[0][2])
    assert run.eval == {} and run.world_size == 4


def test_missing_directory_is_config_error(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="not found") as info:
        load_run(missing)
    assert missing in str(info.value)
    with pytest.raises(ConfigError, match="nope"):
        make_report([missing], str(tmp_path / "out"))


def test_missing_metrics_is_config_error(tmp_path):
    path = str(tmp_path / "run")
    write_run(path, config_with(), evals=EVALS_A)
    os.remove(os.path.join(path, "metrics.h5"))
    with pytest.raises(ConfigError, match="metrics.h5 is missing") as info:
        load_run(path)
    assert path in str(info.value)


def test_missing_summary_is_config_error(tmp_path):
    path = str(tmp_path / "run")
    write_run(path, config_with(), evals=EVALS_A)
    os.remove(os.path.join(path, "summary.json"))
    with pytest.raises(ConfigError, match="summary.json is missing"):
        load_run(path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"algorithm": "signum"}'])
def test_corrupt_summary_is_config_error(tmp_path, text):
    path = str(tmp_path / "run")
    write_run(path, config_with(), evals=EVALS_A)
    with open(os.path.join(path, "summary.json"), "w") as fh:
        fh.write(text)
    with pytest.raises(ConfigError, match="summary.json"):
        load_run(path)


def test_corrupt_metrics_is_config_error(tmp_path):
    path = str(tmp_path / "run")
    write_run(path, config_with(), evals=EVALS_A)
    with open(os.path.join(path, "metrics.h5"), "wb") as fh:
        fh.write(b"this is not HDF5" * 10)
    with pytest.raises(ConfigError, match="corrupt metrics.h5"):
        load_run(path)


def test_bad_target_and_no_runs_are_config_errors(three_runs, tmp_path):
    with pytest.raises(ConfigError, match="--target"):
        make_report(three_runs[0], str(tmp_path / "out"), target=85)
    with pytest.raises(ConfigError, match="no run"):
        make_report([], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------- labels


def test_labels_name_only_the_differing_keys(three_runs):
    runs = [load_run(p) for p in three_runs[0]]
    assign_labels(runs)
    # lr differs (0.01, 0.001, 0.001) and partition differs; momentum exists only in signum,
    # the algorithm names and run.out differ but are not settings of the computation.
    # World sizes differ (2, 2, 4), so every label names its ranks.
    assert [run.label for run in runs] == [
        "A: signum 2 ranks (lr=0.01, partition=iid)",
        "B: signum 2 ranks (lr=0.001, partition=dirichlet)",
        "C: allreduce 4 ranks (lr=0.001, partition=iid)"]
    assert [run.settings for run in runs] == [
        "algorithm.lr=0.01, data.partition=iid", "algorithm.lr=0.001, data.partition=dirichlet",
        "algorithm.lr=0.001, data.partition=iid"]
    for run in runs:
        for equal in ("problem", "batch_size", "momentum", "out", "steps", "seed", "name"):
            assert equal not in run.label and equal not in run.settings


def test_label_format_of_two_runs(tmp_path):
    paths = [str(tmp_path / "x"), str(tmp_path / "y")]
    write_run(paths[0], config_with(algorithm__lr=0.01, data__partition="dirichlet"))
    write_run(paths[1], config_with())
    runs = [load_run(p) for p in paths]
    assign_labels(runs)
    assert runs[0].label == "A: signum (lr=0.01, partition=dirichlet)"
    assert runs[1].label == "B: signum (lr=0.001, partition=iid)"


def test_single_run_label_is_algorithm_and_ranks(tmp_path, three_runs):
    runs = [load_run(three_runs[0][2])]
    assign_labels(runs)
    assert runs[0].label == "allreduce 4 ranks" and runs[0].settings == ""


def test_identical_configs_get_distinct_labels(tmp_path):
    paths = [str(tmp_path / "first"), str(tmp_path / "second")]
    for path in paths:
        write_run(path, config_with(), evals=EVALS_A)
    runs = [load_run(p) for p in paths]
    assign_labels(runs)
    assert [(run.label, run.settings) for run in runs] == [("A: signum", ""), ("B: signum", "")]


def many_settings(tmp_path, count):
    """Write ``count`` runs differing in six keys with long values; return their paths."""
    paths = []
    for i in range(count):
        config = config_with(algorithm__lr=0.001 * (i + 1), algorithm__momentum=0.5 + i / 100,
                             data__partition=f"dirichlet-with-a-long-name-{i}",
                             data__batch_size=32 + i, problem__l2=1e-4 * (i + 1),
                             run__seed=1000 + i)
        config["problem"]["hidden"] = [64 + i, 32]  # same last component as nothing else
        paths.append(str(tmp_path / f"run{i}"))
        write_run(paths[-1], config, evals=EVALS_A)
    return paths


def test_long_labels_are_capped_and_the_settings_kept_in_full(tmp_path):
    runs = [load_run(p) for p in many_settings(tmp_path, 28)]
    assign_labels(runs)
    tags = [chr(ord("A") + i) for i in range(26)] + ["AA", "AB"]
    for i, (tag, run) in enumerate(zip(tags, runs)):
        # Keys in sorted order; what does not fit in LABEL_MAX characters becomes one "…".
        assert run.label == (f"{tag}: signum (lr={0.001 * (i + 1):g}, momentum="
                             f"{0.5 + i / 100:g}, batch_size={32 + i}, …)")
        assert len(run.label) <= LABEL_MAX
        assert run.settings == (
            f"algorithm.lr={0.001 * (i + 1):g}, algorithm.momentum={0.5 + i / 100:g}, "
            f"data.batch_size={32 + i}, data.partition=dirichlet-with-a-long-name-{i}, "
            f"problem.hidden=[{64 + i}, 32], problem.l2={1e-4 * (i + 1):g}, "
            f"run.seed={1000 + i}")


def test_long_values_are_cut_in_labels_and_ambiguous_keys_kept_whole(tmp_path):
    paths = [str(tmp_path / "x"), str(tmp_path / "y")]
    write_run(paths[0], config_with(algorithm__lr=0.01, problem__lr=0.5,
                                    data__partition="dirichlet-with-a-long-name"))
    write_run(paths[1], config_with(problem__lr=0.25))
    runs = [load_run(p) for p in paths]
    assign_labels(runs)
    # Values are cut to 16 characters; two keys ending in "lr" keep their sections; the
    # first label is exactly LABEL_MAX = 60 characters long, the second would be 62.
    assert runs[0].label == "A: signum (algorithm.lr=0.01, partition=dirichlet-with-…, …)"
    assert runs[1].label == "B: signum (algorithm.lr=0.001, partition=iid, …)"
    assert runs[0].settings == ("algorithm.lr=0.01, data.partition=dirichlet-with-a-long-name, "
                                "problem.lr=0.5")
    assert runs[1].settings == "algorithm.lr=0.001, data.partition=iid, problem.lr=0.25"


# --------------------------------------------------------------------------- table


def test_report_table_has_a_row_per_run_with_its_numbers(report, three_runs):
    _, _, markdown = report
    rows = table_rows(markdown)
    assert len(rows) == 3
    for summary in three_runs[1]:
        label = next(k for k in rows if summary["algorithm"] in k
                     and rows[k]["wall time (s)"] == f"{summary['wall_time_s']:.2f}")
        row = rows[label]
        assert row["algorithm"] == summary["algorithm"]
        assert row["ranks"] == str(summary["world_size"])
        assert row["steps"] == str(summary["steps"])
        assert row["final test accuracy"] == f"{summary['final']['accuracy']:.4f}"
        assert row["final test loss"] == f"{summary['final']['loss']:.4f}"
        assert row["MB sent / rank / step"] == \
            f"{summary['bytes_sent_per_rank_per_step'] / 1e6:.4g}"
        assert row["compute (s)"] == f"{summary['compute_s']:.2f}"
        assert row["comm (s)"] == f"{summary['comm_s']:.2f}"


def test_report_table_bytes_come_from_every_rank(report, three_runs):
    rows = table_rows(report[2])
    for path, (label, row) in zip(three_runs[0], rows.items(), strict=True):
        with h5py.File(os.path.join(path, "metrics.h5")) as h5:
            sent = [h5[f"ranks/{r}/bytes_sent"][()].sum() / 1e6 for r in h5["ranks"]]
        spread = " / ".join(f"{v:.4g}" for v in (min(sent), np.mean(sent), max(sent)))
        assert row["MB sent / rank (min / mean / max)"] == spread, label
    # a: 40 steps of 20000 and 30000 bytes; b: 40 and 25 steps of 1234 bytes; c: 30 steps of
    # 10000, 20000, 30000 and 40000 bytes.
    assert [row["MB sent / rank (min / mean / max)"] for row in rows.values()] == \
        ["0.8 / 1 / 1.2", "0.03085 / 0.04011 / 0.04936", "0.3 / 0.75 / 1.2"]


def test_report_table_values_spelled_out(report):
    rows = table_rows(report[2])
    b = next(row for label, row in rows.items() if "dirichlet" in label)
    assert (b["final test accuracy"], b["final test loss"], b["wall time (s)"]) == \
        ("0.7000", "0.8123", "20.75")
    assert (b["MB sent / rank / step"], b["compute (s)"], b["comm (s)"]) == \
        ("0.001234", "15.12", "4.00")


def test_report_shows_short_labels_with_their_full_settings(report, three_runs):
    markdown = report[2]
    rows = table_rows(markdown)
    assert [(label, row["settings"]) for label, row in rows.items()] == [
        ("A: signum 2 ranks (lr=0.01, partition=iid)", "algorithm.lr=0.01, data.partition=iid"),
        ("B: signum 2 ranks (lr=0.001, partition=dirichlet)",
         "algorithm.lr=0.001, data.partition=dirichlet"),
        ("C: allreduce 4 ranks (lr=0.001, partition=iid)",
         "algorithm.lr=0.001, data.partition=iid")]
    # The legend key: each short label with its full settings and run directory.
    for (label, row), path in zip(rows.items(), three_runs[0], strict=True):
        assert f"- {label}: {row['settings']}; `{path}`" in markdown.splitlines()


def test_target_column_reached_and_not_reached(report):
    rows = table_rows(report[2])
    a, b, c = (next(row for label, row in rows.items() if key in label)
               for key in ("lr=0.01", "dirichlet", "allreduce"))
    time_key, step_key = "time to accuracy 0.85 (s)", "step at accuracy 0.85"
    first = int(np.argmax(np.asarray(EVALS_A["accuracy"]) >= 0.85))
    assert (a[time_key], a[step_key]) == (f"{EVALS_A['time'][first]:.2f}",
                                          str(EVALS_A["step"][first]))
    assert (a[time_key], a[step_key]) == ("12.40", "40")
    assert (b[time_key], b[step_key]) == ("not reached", "not reached")
    # No evaluations: the summary's time_to_target for the same target is used.
    assert (c[time_key], c[step_key]) == ("4.50", "20")


def test_no_target_no_target_columns(three_runs, tmp_path):
    make_report(three_runs[0][:1], str(tmp_path / "out"))
    markdown = (tmp_path / "out" / "report.md").read_text()
    row = next(iter(table_rows(markdown).values()))
    assert not any("target" in key or "at accuracy" in key for key in row)
    assert row["run"] == "signum 2 ranks"


def test_run_without_evals_falls_back_to_final_model(tmp_path):
    path = str(tmp_path / "run")
    write_run(path, config_with(), final={"loss": 0.2, "accuracy": 0.95})
    make_report([path], str(tmp_path / "out"), target=0.9)
    row = next(iter(table_rows((tmp_path / "out" / "report.md").read_text()).values()))
    assert row["time to accuracy 0.9 (s)"] == "<= 12.50"
    assert row["step at accuracy 0.9"] == "<= 40"
    assert row["final test accuracy"] == "0.9500"


# --------------------------------------------------------------------------- plots


def test_report_writes_valid_pngs(report):
    out, written, _ = report
    names = ["loss.png", "accuracy.png", "training_loss.png", "report.md"]
    assert written == [os.path.join(out, name) for name in names]
    import matplotlib.image

    for path in written[:3]:
        assert is_png(path), path
        height, width = matplotlib.image.imread(path).shape[:2]
        assert height > 200 and width > 200
    loss = matplotlib.image.imread(written[0])
    assert loss.shape[1] > 2 * loss.shape[0]  # three panels side by side


def labelled_runs(paths):
    """Load and label the runs at ``paths``."""
    runs = [load_run(p) for p in paths]
    assign_labels(runs)
    return runs


def test_bytes_panel_is_the_mean_over_ranks(three_runs):
    runs = labelled_runs(three_runs[0])
    fig = metric_figure(runs, "loss")
    ax = fig.axes[2]
    assert ax.get_xlabel() == "MB sent per rank (mean over ranks)"
    lines = {run.label: [line for line in ax.lines if line.get_label() == run.label]
             for run in runs}
    a, b, c = (lines[run.label] for run in runs)
    # a: ranks send 20000 and 30000 bytes a step, so 25000 on average (rank 0's eval
    # bytes_sent would give 20000).
    np.testing.assert_allclose(a[0].get_xdata(), np.array(EVALS_A["step"]) * 25000 / 1e6)
    np.testing.assert_allclose(a[0].get_ydata(), EVALS_A["loss"])
    # b: rank 1 recorded 25 steps only, and keeps what it sent after its last one.
    steps = np.array(EVALS_B["step"])
    np.testing.assert_allclose(b[0].get_xdata(), 1234 * (steps + np.minimum(steps, 25)) / 2e6)
    # c has no evaluations: one marker at its final model, the mean of 0.3 ... 1.2 MB.
    assert (list(c[0].get_xdata()), list(c[0].get_ydata())) == ([0.75], [0.3])


def test_mean_bytes_sent_at_steps(three_runs):
    run = load_run(three_runs[0][1])  # 1234 bytes a step; rank 0: 40 steps, rank 1: 25
    np.testing.assert_allclose(mean_bytes_sent_at(run, np.array([0, 1, 25, 30, 40, 99])),
                               [0, 1234, 25 * 1234, 27.5 * 1234, 32.5 * 1234, 32.5 * 1234])
    np.testing.assert_array_equal(rank_bytes_sent(run), [40 * 1234, 25 * 1234])
    run.ranks = {}
    assert mean_bytes_sent_at(run, np.array([1])) is None and rank_bytes_sent(run).size == 0


def test_legends_fit_inside_the_figures(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # The widest glyph in labels as long as they get: the worst case of the column estimate.
    paths = []
    for i in range(12):
        config = config_with(algorithm__lr=0.001 * (i + 1), data__partition="W" * 30)
        config["algorithm"]["name"] = "W" * 53
        paths.append(str(tmp_path / f"run{i}"))
        write_run(paths[-1], config, evals=EVALS_A)
    runs = labelled_runs(paths)
    assert all(len(run.label) >= LABEL_MAX - 1 for run in runs), [run.label for run in runs]
    for fig in (metric_figure(runs, "loss"), training_loss_figure(runs)):
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        (legend,) = fig.legends
        box, frame = legend.get_window_extent(canvas.get_renderer()), fig.bbox
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1, (box, frame)
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1, (box, frame)
        assert [text.get_text() for text in legend.get_texts()][:len(runs)] == \
            [run.label for run in runs]


def test_mean_training_loss_over_unequal_ranks(three_runs):
    run = load_run(three_runs[0][1])  # rank 0: 40 steps, rank 1: 25 steps
    steps, loss = mean_training_loss(run)
    np.testing.assert_array_equal(steps, np.arange(40))
    expected = np.where(steps < 25, 2.0 - steps / 100 + 0.05, 2.0 - steps / 100)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_moving_average():
    np.testing.assert_allclose(moving_average(np.arange(6.0), 3), [1, 2, 3, 4])
    np.testing.assert_allclose(moving_average(np.array([5.0, 7.0]), 1), [5, 7])
    np.testing.assert_allclose(moving_average(np.array([5.0, 7.0]), 10), [6])
    assert moving_average(np.zeros(0), 3).size == 0


# --------------------------------------------------------------------------- parameter server

# Run p's server applied ten gradients: their staleness and the worker each came from.
STALENESS_P = [0, 1, 0, 2, 1, 1, 3, 0, 1, 1]
WORKER_P = [0, 1, 1, 1, 0, 1, 1, 0, 1, 1]
STABILITY_P = {"mean_abs_change": 0.0123, "tail_std": 0.0045, "evaluations": 5, "warmup": 1,
               "tail": 2}


@pytest.fixture(scope="module")
def ps_runs(tmp_path_factory):
    """Three runs: p (asgd, series in metrics.h5 and stability in its summary), q (asgd of
    an older mpiopt: per-worker counts in its summary only, no series, no stability) and r
    (allreduce: neither)."""
    root = tmp_path_factory.mktemp("ps")
    cfg = config_with(algorithm__name="asgd")
    info = {"updates_applied": 10, "updates_per_worker": [3, 7],
            "staleness": {"mean": 1.0, "p50": 1.0, "p99": 2.91, "max": 3}}
    write_run(str(root / "p"), cfg, world_size=3, evals=EVALS_A, algorithm_info=info,
              series={0: {"staleness": STALENESS_P, "worker": WORKER_P}},
              stability=STABILITY_P)
    write_run(str(root / "q"), cfg, world_size=5, evals=EVALS_B,
              algorithm_info={"updates_per_worker": [4, 4, 2, 0]})
    write_run(str(root / "r"), config_with(algorithm__name="allreduce"), evals=EVALS_A)
    return [str(root / name) for name in "pqr"]


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_load_run_reads_series_apart_from_the_step_columns(ps_runs):
    p, q, _ = (load_run(path) for path in ps_runs)
    assert sorted(p.series) == [0] and sorted(p.series[0]) == ["staleness", "worker"]
    assert p.series[0]["staleness"].tolist() == STALENESS_P
    assert len(p.ranks[0]["step"]) == 40  # the step table keeps its own length
    assert q.series == {}


def test_series_and_updates_per_worker(ps_runs):
    p, q, r = (load_run(path) for path in ps_runs)
    assert run_series(p, "worker").tolist() == WORKER_P and run_series(q, "worker") is None
    assert updates_per_worker(p).tolist() == [3, 7]  # counted from the series
    assert updates_per_worker(q).tolist() == [4, 4, 2, 0]  # the summary's, for older runs
    assert updates_per_worker(r) is None
    # A worker whose gradients were never applied still has its (empty) bar.
    p.summary["algorithm_info"]["updates_per_worker"] = [3, 7, 0]
    assert updates_per_worker(p).tolist() == [3, 7, 0]


def test_staleness_histogram_per_run_that_has_it(ps_runs):
    runs = labelled_runs(ps_runs)
    fig = staleness_figure(runs)
    (ax,) = visible_axes(fig)  # only p recorded staleness
    assert ax.get_title() == runs[0].label
    heights = [patch.get_height() for patch in ax.patches]
    np.testing.assert_allclose(heights, np.bincount(STALENESS_P) / len(STALENESS_P))
    assert [patch.get_x() + patch.get_width() / 2 for patch in ax.patches] == [0, 1, 2, 3]
    mean, p99 = (line.get_xdata()[0] for line in ax.lines)
    assert mean == pytest.approx(1.0) and p99 == pytest.approx(np.percentile(STALENESS_P, 99))
    assert "10 applied gradients" in ax.get_xlabel()
    assert staleness_figure(runs[1:]) is None


def test_workers_bars_per_run_that_has_them(ps_runs):
    runs = labelled_runs(ps_runs)
    fig = workers_figure(runs)
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == [runs[0].label, runs[1].label]
    for ax, counts in zip(axes, ([3, 7], [4, 4, 2, 0]), strict=True):
        assert [patch.get_height() for patch in ax.patches] == counts
        assert ax.lines[0].get_ydata()[0] == pytest.approx(np.mean(counts))  # the even share
    assert workers_figure(runs[2:]) is None


def test_report_of_parameter_server_runs_adds_its_plots(ps_runs, tmp_path):
    out = str(tmp_path / "out")
    written = make_report(ps_runs, out)
    names = ["loss.png", "accuracy.png", "training_loss.png", "staleness.png", "workers.png",
             "report.md"]
    assert written == [os.path.join(out, name) for name in names]
    assert all(is_png(path) for path in written[:5])
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "![staleness](staleness.png)" in markdown
    assert "![gradients per worker](workers.png)" in markdown


def test_table_shows_stability(ps_runs, report):
    rows = list(table_rows(make_report_text(ps_runs)).values())
    keys = ("stability: mean abs change", "stability: tail std")
    # p: the summary's measures. q and r: no stability in their summaries (older runs), so
    # measured on their evaluations: B's accuracy 0.1, 0.4, 0.5, 0.6, 0.65 without the first
    # (warm-up) changes by 0.1, 0.1, 0.05; the last two (tail) are 0.6 and 0.65.
    assert [tuple(row[k] for k in keys) for row in rows] == [
        ("0.0123", "0.0045"), (f"{0.25 / 3:.4f}", "0.0250"), (f"{0.31 / 3:.4f}", "0.0150")]
    # The run without evaluations (c) has no measures.
    c = next(row for label, row in table_rows(report[2]).items() if "allreduce" in label)
    assert (c[keys[0]], c[keys[1]]) == ("n/a", "n/a")


def make_report_text(paths):
    """Return report.md of the runs at ``paths``, written in a temporary directory."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        make_report(paths, out)
        with open(os.path.join(out, "report.md")) as fh:
            return fh.read()


def test_stability_of_an_older_run_skips_its_learning_rate_warm_up(tmp_path):
    path = str(tmp_path / "run")
    write_run(path, config_with(algorithm__warmup_steps=20), evals=EVALS_A)
    row = next(iter(table_rows(make_report_text([path])).values()))
    # Evaluations at steps 0, 10 and 20 are warm-up: one change left, 0.83 to 0.86.
    assert row["stability: mean abs change"] == "0.0300"


def test_corrupt_series_is_config_error(tmp_path):
    path = str(tmp_path / "run")
    write_run(path, config_with(), evals=EVALS_A, series={"server": {"staleness": [1]}})
    with pytest.raises(ConfigError, match="corrupt metrics.h5 \\(group series/server\\)"):
        load_run(path)


def test_report_of_topic_model_runs_without_accuracy(tmp_path):
    """LDA runs report perplexity, no accuracy: the table and plots take them as they are."""
    cfg = config_with(problem__name="lda", data__name="reuters")
    evals = {"step": [10, 20, 30], "time": [1.0, 2.0, 3.0], "bytes_sent": [0.0, 0.0, 0.0],
             "loss": [7.6, 7.4, 7.3], "perplexity": [2000.0, 1636.0, 1480.3]}
    path = str(tmp_path / "lda")
    write_run(path, cfg, world_size=1, steps=30, evals=evals,
              final={"loss": 7.3, "perplexity": 1480.3})
    written = make_report([path], str(tmp_path / "out"))
    assert [os.path.basename(p) for p in written] == [
        "loss.png", "accuracy.png", "training_loss.png", "perplexity.png", "report.md"]
    assert is_png(written[3])
    row = next(iter(table_rows((tmp_path / "out" / "report.md").read_text()).values()))
    assert row["final test perplexity"] == "1480.3"
    assert row["final test accuracy"] == "n/a"
    assert row["stability: tail std"] == "n/a"  # the stability measures are of accuracy
