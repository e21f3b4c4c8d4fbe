"""Plots and tables from run directories (``mpiopt report``).

A run directory is what ``mpiopt run`` writes: ``summary.json``, ``metrics.h5`` and
``config.yaml``. :func:`load_run` reads one into a :class:`Run`; :func:`make_report` compares
several and writes ``loss.png``, ``accuracy.png`` (test metrics against steps, wall time and MB
sent per rank, the mean over ranks), ``training_loss.png`` (the smoothed minibatch loss, mean
over ranks), for runs of a parameter server ``staleness.png`` (a histogram per run of the
staleness of every applied gradient, ``series/<r>/staleness``) and ``workers.png`` (bars per
run of the gradients applied from each worker), for runs of a topic model ``perplexity.png``
(test perplexity, like the loss), for reinforcement-learning runs ``returns.png`` (the
training return against environment steps and wall time, with the greedy evaluations), and
``report.md`` (one table row per run, with
the MB each rank sent: min, mean and max over ranks, and the two stability measures of
:mod:`mpiopt.io.stability`). Bytes come from every rank's ``ranks/<r>/bytes_sent``, never rank
0's alone.

Runs being compared are told apart by the configuration keys whose values differ between them.
Plots show a short label: a letter, the algorithm and those values under their last key
component, at most ``LABEL_MAX`` characters (values that do not fit become ``…``); the table
shows the same label and the full differing settings. MB means 10**6 bytes throughout.

matplotlib is imported only when plots are drawn, and only its object-oriented API is used (no
pyplot), so that importing this module stays cheap and no global figure state is created.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpiopt.errors import ConfigError
from mpiopt.io.stability import stability

MB = 1e6
SUMMARY_REQUIRED = ("algorithm", "world_size", "steps", "wall_time_s", "final")
# Keys that never distinguish two runs in a label: the algorithm is the label's head, and these
# run settings change where or how the run is reported, not what it computes.
LABEL_IGNORED = frozenset({
    "algorithm.name", "run.out", "run.overwrite", "run.quiet", "run.progress_every_s",
    "run.metrics_chunk", "run.comm_timeout_s", "run.target_accuracy",
})
PANELS = (("step", "step"), ("time", "wall time (s)"),
          ("bytes_sent", "MB sent per rank (mean over ranks)"))
# Final metrics of problems without an accuracy, given a table column when some run has them.
FINAL_EXTRA = ("return",)
LABEL_MAX = 60  # characters of a plot label: at least two such fit side by side in 15 inches
VALUE_MAX = 16  # characters of one value inside a plot label


@dataclass
class Run:
    """One run directory, read into memory.

    Attributes:
        path: The run directory as given.
        summary: The parsed ``summary.json``.
        eval: Columns of the ``eval`` group of ``metrics.h5`` by name (empty if none).
        ranks: Per-rank columns of the ``ranks/<r>`` groups: ``ranks[r][name]``.
        series: The algorithm's own series of the ``series/<r>`` groups: ``series[r][name]``
            (a parameter server's ``staleness`` and ``worker`` of every applied gradient).
        label: The short name of the run in plots and tables.
        settings: The full settings that set the run apart from the others it is compared
            with (``""`` when none do).
    """

    path: str
    summary: dict
    eval: dict[str, np.ndarray] = field(default_factory=dict)
    ranks: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    series: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    label: str = ""
    settings: str = ""

    @property
    def algorithm(self) -> str:
        """Return the algorithm name from the summary."""
        return str(self.summary["algorithm"])

    @property
    def world_size(self) -> int:
        """Return the number of ranks of the run."""
        return int(self.summary["world_size"])


# --------------------------------------------------------------------------- loading


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory.

    Args:
        path: A directory written by ``mpiopt run``.

    Returns:
        The run, labelled ``"<algorithm> <world_size> ranks"``.

    Raises:
        ConfigError: The directory, ``summary.json`` or ``metrics.h5`` is missing or unreadable.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ConfigError(f"run directory not found: {path}")
    summary = _read_summary(path)
    evals, ranks, series = _read_metrics(path)
    run = Run(path=path, summary=summary, eval=evals, ranks=ranks, series=series)
    run.label = f"{run.algorithm} {run.world_size} ranks"
    return run


def _read_summary(path: str) -> dict:
    """Read and check ``summary.json`` of the run directory ``path``."""
    file = os.path.join(path, "summary.json")
    try:
        with open(file, encoding="utf-8") as fh:
            summary = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: summary.json is missing (not a run directory, "
                          "or the run did not finish)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{file}: corrupt summary.json ({exc})") from None
    if not isinstance(summary, dict):
        raise ConfigError(f"{file}: corrupt summary.json (not a JSON object)")
    missing = [key for key in SUMMARY_REQUIRED if key not in summary]
    if missing:
        raise ConfigError(f"{file}: summary.json lacks {', '.join(missing)}")
    if not isinstance(summary["final"], dict):
        raise ConfigError(f"{file}: corrupt summary.json ('final' is not an object)")
    for key in ("world_size", "steps"):
        if not isinstance(summary[key], int) or isinstance(summary[key], bool):
            raise ConfigError(f"{file}: corrupt summary.json ({key!r} is not an integer)")
    return summary


def _read_metrics(path: str) -> tuple[dict, dict, dict]:
    """Read the ``eval``, ``ranks/<r>`` and ``series/<r>`` groups of ``metrics.h5`` in ``path``."""
    import h5py

    file = os.path.join(path, "metrics.h5")
    if not os.path.isfile(file):
        raise ConfigError(f"{path}: metrics.h5 is missing")
    try:
        with h5py.File(file, "r") as h5:
            evals = _read_group(h5["eval"], file) if "eval" in h5 else {}
            ranks = _read_per_rank(h5, "ranks", file, _read_group)
            series = _read_per_rank(h5, "series", file, _read_series)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{file}: corrupt metrics.h5 ({exc})") from None
    return evals, ranks, series


def _read_per_rank(h5: Any, name: str, file: str, read) -> dict[int, dict[str, np.ndarray]]:
    """Read the groups ``name/<r>`` of ``h5`` with ``read``, by rank (empty if none)."""
    out = {}
    for rank, group in (h5[name].items() if name in h5 else ()):
        if not rank.isdigit():
            raise ConfigError(f"{file}: corrupt metrics.h5 (group {name}/{rank})")
        out[int(rank)] = read(group, file)
    return dict(sorted(out.items()))


def _read_series(group: Any, file: str) -> dict[str, np.ndarray]:
    """Return the 1-D datasets of one rank's series group (each of its own length)."""
    return {name: np.asarray(obj[()]) for name, obj in group.items()
            if getattr(obj, "ndim", None) == 1}


def _read_group(group: Any, file: str) -> dict[str, np.ndarray]:
    """Return the 1-D datasets of an HDF5 group, checked to have equal lengths."""
    columns = {}
    for name, obj in group.items():
        if getattr(obj, "ndim", None) == 1:
            columns[name] = np.asarray(obj[()])
    if len({len(col) for col in columns.values()}) > 1:
        raise ConfigError(f"{file}: corrupt metrics.h5 (columns of {group.name} differ in "
                          "length)")
    return columns


# --------------------------------------------------------------------------- labels


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into one dict with dotted keys (``{"a": {"b": 1}}`` -> ``a.b``)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Return the sorted flat keys that take more than one value among the configs having them.

    A key present in only some configs with a single value (a setting of one algorithm that
    the others lack) does not count as differing, nor do the keys in ``LABEL_IGNORED``.
    """
    seen: dict[str, set[str]] = {}
    for config in configs:
        for key, value in config.items():
            if key not in LABEL_IGNORED:
                seen.setdefault(key, set()).add(json.dumps(value, sort_keys=True, default=str))
    return sorted(key for key, values in seen.items() if len(values) > 1)


def format_value(value: Any) -> str:
    """Format a configuration value the way it would be written in YAML or ``--set``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def assign_labels(runs: list[Run]) -> None:
    """Give each run a short label and its full differing settings (in place).

    A single run is ``"<algorithm> <world_size> ranks"``. Several runs get a letter each (A, B,
    ..., Z, AA, ...), the algorithm, the world size when it differs between runs, and the values
    of the differing config keys under their last component, e.g.
    ``"B: signum (lr=0.01, partition=dirichlet)"``, cut to ``LABEL_MAX`` characters; their
    ``settings`` spell the keys out: ``"algorithm.lr=0.01, data.partition=dirichlet"``.
    """
    if len(runs) == 1:
        runs[0].label = f"{runs[0].algorithm} {runs[0].world_size} ranks"
        runs[0].settings = ""
        return
    flats = [flatten(run.summary.get("config") or {}) for run in runs]
    keys = differing_keys(flats)
    names = short_keys(keys)
    sizes_differ = len({run.world_size for run in runs}) > 1
    for i, (run, flat) in enumerate(zip(runs, flats, strict=True)):
        head = f"{run.algorithm} {run.world_size} ranks" if sizes_differ else run.algorithm
        shown = [key for key in keys if key in flat]
        run.settings = ", ".join(f"{key}={format_value(flat[key])}" for key in shown)
        parts = [f"{names[key]}={_clip(format_value(flat[key]), VALUE_MAX)}" for key in shown]
        run.label = short_label(f"{letters(i)}: {head}", parts)


def letters(i: int) -> str:
    """Return the ``i``-th run's letters: A..Z, then AA, AB, ... (spreadsheet columns)."""
    text = ""
    i += 1
    while i:
        i, rest = divmod(i - 1, 26)
        text = chr(ord("A") + rest) + text
    return text


def short_keys(keys: list[str]) -> dict[str, str]:
    """Map each dotted key to its last component, or to itself where that is ambiguous."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: name if last.count(name) == 1 else key
            for key, name in zip(keys, last, strict=True)}


def short_label(head: str, parts: list[str]) -> str:
    """Return ``head (part, part, ...)`` in at most LABEL_MAX characters.

    Trailing parts that do not fit are replaced by one ``…``; a head that alone is too long
    is cut.
    """
    for keep in range(len(parts), -1, -1):
        body = parts[:keep] + (["…"] if keep < len(parts) else [])
        text = f"{head} ({', '.join(body)})" if body else head
        if len(text) <= LABEL_MAX:
            return text
    return _clip(head, LABEL_MAX)


def _clip(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters, the last one ``…`` when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- numbers


def time_to_target(run: Run, target: float) -> tuple[str, str]:
    """Return the time (s) and step at which eval accuracy first reached ``target``, formatted.

    Uses the ``eval`` group; a run without evaluations falls back to the summary's
    ``time_to_target`` (when recorded for the same target) and then to the final model, whose
    time and step are upper bounds (shown with ``<=``). ``("not reached", "not reached")``
    otherwise.
    """
    acc = run.eval.get("accuracy")
    if acc is not None and len(acc):
        hits = np.flatnonzero(np.asarray(acc, dtype=float) >= target)
        if not hits.size:
            return "not reached", "not reached"
        i = hits[0]
        time = run.eval["time"][i] if "time" in run.eval else None
        step = run.eval["step"][i] if "step" in run.eval else None
        return _num(time, ".2f"), _num(step, "d")
    recorded = run.summary.get("time_to_target")
    if isinstance(recorded, dict) and _is_number(recorded.get("accuracy")) \
            and math.isclose(recorded["accuracy"], target):
        return _num(recorded.get("time_s"), ".2f"), _num(recorded.get("step"), "d")
    final = run.summary["final"].get("accuracy")
    if _is_number(final) and final >= target:
        return (f"<= {_num(run.summary['wall_time_s'], '.2f')}",
                f"<= {_num(run.summary['steps'], 'd')}")
    return "not reached", "not reached"


def _is_number(value: Any) -> bool:
    """Tell whether ``value`` is a real number (not a bool)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool)


def _num(value: Any, spec: str) -> str:
    """Format a number with ``spec``; ``n/a`` for a missing or non-numeric value."""
    if not _is_number(value):
        return "n/a"
    if spec == "d":
        return str(int(value))
    return format(float(value), spec)


def mean_training_loss(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Return the steps and the minibatch loss averaged over the ranks that recorded each step.

    Ranks may have recorded different numbers of steps (asynchronous algorithms, server
    ranks); non-finite losses are left out of the mean.
    """
    steps, losses = [], []
    for columns in run.ranks.values():
        if "step" in columns and "loss" in columns:
            steps.append(np.asarray(columns["step"]))
            losses.append(np.asarray(columns["loss"], dtype=np.float64))
    if not steps:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    step, loss = np.concatenate(steps), np.concatenate(losses)
    keep = np.isfinite(loss)
    step, loss = step[keep], loss[keep]
    unique, inverse = np.unique(step, return_inverse=True)
    sums = np.bincount(inverse, weights=loss, minlength=len(unique))
    counts = np.bincount(inverse, minlength=len(unique))
    return unique, sums / np.maximum(counts, 1)


def rank_bytes_sent(run: Run) -> np.ndarray:
    """Return the bytes each rank sent over its recorded steps, in rank order.

    Ranks without a ``bytes_sent`` column are left out; no per-rank data gives an empty array.
    """
    return np.array([float(np.sum(columns["bytes_sent"], dtype=np.float64))
                     for columns in run.ranks.values() if "bytes_sent" in columns])


def mean_bytes_sent_at(run: Run, steps: np.ndarray) -> np.ndarray | None:
    """Return the mean over ranks of the bytes each rank sent in its first ``s`` steps.

    One value per ``s`` in ``steps`` (an evaluation's ``step`` counts the steps done before
    it). A rank that recorded fewer steps contributes all it sent. None without per-rank data.
    """
    sent = []
    for columns in run.ranks.values():
        if "step" not in columns or "bytes_sent" not in columns:
            continue
        order = np.argsort(columns["step"], kind="stable")
        cumulative = np.concatenate(([0.0], np.cumsum(
            np.asarray(columns["bytes_sent"], dtype=np.float64)[order])))
        done = np.searchsorted(np.asarray(columns["step"])[order], steps, side="left")
        sent.append(cumulative[done])
    return np.mean(sent, axis=0) if sent else None


def run_series(run: Run, name: str) -> np.ndarray | None:
    """Return the series ``name`` of all ranks that recorded it, concatenated in rank order.

    None when no rank recorded it (a run of an algorithm without it, or an older run).
    """
    parts = [columns[name] for columns in run.series.values() if name in columns]
    return np.concatenate(parts) if parts else None


def updates_per_worker(run: Run) -> np.ndarray | None:
    """Return the gradients applied from each worker, by worker index (None: not recorded).

    Counted from the ``worker`` series of ``metrics.h5``; a run without it falls back to the
    summary's ``algorithm_info.updates_per_worker``.
    """
    info = run.summary.get("algorithm_info")
    recorded = info.get("updates_per_worker") if isinstance(info, dict) else None
    worker = run_series(run, "worker")
    if worker is not None:
        size = len(recorded) if isinstance(recorded, list) else 0
        return np.bincount(worker.astype(np.int64), minlength=size)
    if isinstance(recorded, list) and all(_is_number(v) for v in recorded):
        return np.asarray(recorded, dtype=np.int64)
    return None


def run_stability(run: Run) -> dict:
    """Return the stability measures of the run (``mean_abs_change``, ``tail_std``, ...).

    The summary's ``stability`` when it has one; for an older run, the same measures computed
    from the ``eval`` group's accuracy (with the run's ``algorithm.warmup_steps``).
    """
    recorded = run.summary.get("stability")
    if isinstance(recorded, dict):
        return recorded
    warmup = flatten(run.summary.get("config") or {}).get("algorithm.warmup_steps", 0)
    return stability(run.eval.get("accuracy", np.zeros(0)), run.eval.get("step"),
                     warmup if _is_number(warmup) else 0)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Return the trailing moving average of ``values`` over full windows (``len - window + 1``)."""
    values = np.asarray(values, dtype=np.float64)
    window = max(1, min(int(window), len(values)))
    if not len(values):
        return values
    cumsum = np.concatenate(([0.0], np.cumsum(values)))
    return (cumsum[window:] - cumsum[:-window]) / window


def smoothing_window(n: int) -> int:
    """Return the moving-average window for ``n`` points: about 2% of them, at least 1."""
    return max(1, n // 50)


# --------------------------------------------------------------------------- table


def _cell(text: str) -> str:
    """Escape ``text`` for a markdown table cell."""
    return text.replace("|", "\\|")


def _mb_spread(run: Run) -> str:
    """Return ``min / mean / max`` over ranks of the MB each rank sent (``n/a`` without data)."""
    sent = rank_bytes_sent(run) / MB
    if not sent.size:
        return "n/a"
    return " / ".join(format(value, ".4g") for value in (sent.min(), sent.mean(), sent.max()))


def has_perplexity(run: Run) -> bool:
    """Return whether a run was scored by perplexity (a topic model's evaluations)."""
    return "perplexity" in run.eval or _is_number(run.summary["final"].get("perplexity"))


def _row(run: Run, target: float | None, perplexity: bool = False,
         extra: tuple[str, ...] = ()) -> list[str]:
    """Return the table cells of one run (with its final perplexity if ``perplexity``;
    ``extra``: further final metrics, at the end)."""
    s, final = run.summary, run.summary["final"]
    per_step = s.get("bytes_sent_per_rank_per_step")
    cells = [
        _cell(run.label), _cell(run.settings or "-"), run.algorithm, str(run.world_size),
        str(s["steps"]), _num(final.get("accuracy"), ".4f"), _num(final.get("loss"), ".4f"),
        _num(s["wall_time_s"], ".2f"),
        _num(per_step / MB if _is_number(per_step) else None, ".4g"), _mb_spread(run),
        _num(s.get("compute_s"), ".2f"), _num(s.get("comm_s"), ".2f"),
    ]
    if perplexity:
        cells.insert(7, _num(final.get("perplexity"), ".1f"))
    measures = run_stability(run)
    cells += [_num(measures.get("mean_abs_change"), ".4f"), _num(measures.get("tail_std"), ".4f")]
    if target is not None:
        cells.extend(time_to_target(run, target))
    return cells + [_num(final.get(name), ".4g") for name in extra]


def format_table(runs: list[Run], target: float | None = None) -> str:
    """Return the markdown table comparing ``runs`` (one row each)."""
    header = ["run", "settings", "algorithm", "ranks", "steps", "final test accuracy",
              "final test loss", "wall time (s)", "MB sent / rank / step",
              "MB sent / rank (min / mean / max)", "compute (s)", "comm (s)",
              "stability: mean abs change", "stability: tail std"]
    perplexity = any(has_perplexity(run) for run in runs)
    if perplexity:
        header.insert(7, "final test perplexity")
    if target is not None:
        header += [f"time to accuracy {target:g} (s)", f"step at accuracy {target:g}"]
    extra = tuple(m for m in FINAL_EXTRA if any(m in run.summary["final"] for run in runs))
    header += [f"final {name}" for name in extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_row(run, target, perplexity, extra)) + " |" for run in runs]
    return "\n".join(lines) + "\n"


def write_markdown(runs: list[Run], out_dir: str, target: float | None,
                   extra_plots: tuple[tuple[str, str], ...] = ()) -> str:
    """Write ``report.md`` (table, run paths, plots) into ``out_dir``; return its path.

    ``extra_plots`` are ``(title, file name)`` pairs of plots written beside the usual three.
    """
    parts = ["# mpiopt report", "", format_table(runs, target),
             "MB = 10^6 bytes. MB sent / rank / step is the mean over ranks; min / mean / max "
             "are over ranks of the MB each sent in its steps. compute and comm are seconds "
             "per rank (mean over ranks). stability (lower is steadier): the mean absolute "
             "change of test accuracy between consecutive evaluations after the warm-up (the "
             "first 20% of evaluations, or those within algorithm.warmup_steps), and its "
             "standard deviation over the last 20% of evaluations; n/a with fewer than 3. "
             "settings: the configuration keys whose values differ between the runs.", "",
             "## Runs", ""]
    parts += [f"- {_cell(run.label)}: {_cell(run.settings or 'no differing settings')}; "
              f"`{run.path}`" for run in runs]
    parts += ["", "## Plots", "", "![test loss](loss.png)", "", "![test accuracy](accuracy.png)",
              "", "![training loss](training_loss.png)", ""]
    for title, name in extra_plots:
        parts += [f"![{title}]({name})", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(parts))
    return path


# --------------------------------------------------------------------------- plots


def _colour(i: int, n: int) -> Any:
    """Return the colour of run ``i`` of ``n``: the default cycle, or a colormap beyond 10."""
    if n <= 10:
        return f"C{i}"
    import matplotlib

    return matplotlib.colormaps["turbo"](i / (n - 1))


def _x_values(run: Run, xkey: str) -> np.ndarray | None:
    """Return the x values of the evaluations on panel ``xkey`` (None: cannot be placed).

    Bytes are the mean over ranks of what each had sent by the evaluation's step, in MB: the
    eval group's own ``bytes_sent`` is rank 0's alone.
    """
    ev = run.eval
    if xkey != "bytes_sent":
        return np.asarray(ev[xkey], dtype=np.float64) if xkey in ev else None
    if "step" not in ev:
        return None
    sent = mean_bytes_sent_at(run, np.asarray(ev["step"]))
    return None if sent is None else sent / MB


def _final_point(run: Run, xkey: str) -> float | None:
    """Return the x position of the final model on panel ``xkey``."""
    s = run.summary
    if xkey == "step":
        return float(s["steps"])
    if xkey == "time":
        return float(s["wall_time_s"]) if _is_number(s["wall_time_s"]) else None
    sent = rank_bytes_sent(run)
    if sent.size:
        return float(sent.mean()) / MB
    per_step = s.get("bytes_sent_per_rank_per_step")  # already a mean over ranks
    return per_step * s["steps"] / MB if _is_number(per_step) else None


def _draw_run(ax: Any, run: Run, metric: str, xkey: str, colour: Any) -> bool:
    """Draw one run's eval ``metric`` against ``xkey``; return whether a dashed average was.

    A run without evaluations is drawn as one marker at its final model (from the summary).
    """
    ev, y = run.eval, run.eval.get(metric)
    if y is None or not len(y):
        x, value = _final_point(run, xkey), run.summary["final"].get(metric)
        if x is not None and _is_number(value):
            ax.plot([x], [value], color=colour, marker="o", linestyle="none", label=run.label)
        return False
    x = _x_values(run, xkey)
    if x is None:
        return False
    marker = "o" if len(x) == 1 else None
    ax.plot(x, y, color=colour, marker=marker, label=run.label)
    avg = ev.get(f"avg_{metric}")
    if avg is not None:
        ax.plot(x, avg, color=colour, marker=marker, linestyle="--")
    return avg is not None


def _legend(fig: Any, ax: Any, dashed: bool) -> None:
    """Put one legend for all panels below them, noting dashed averages when drawn."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    if dashed:
        handles.append(Line2D([], [], color="grey", linestyle="--"))
        labels.append("dashed: averaged model")
    if handles:
        fig.legend(handles, labels, loc="outside lower center",
                   ncols=legend_columns(fig.get_figwidth(), labels), fontsize="small")


def legend_columns(width_in: float, labels: list[str]) -> int:
    """Return how many columns of ``labels`` fit side by side in ``width_in`` inches.

    A legend wider than the figure is cut on both sides. The estimate, 13 characters of the
    small legend font per inch and 8 characters' worth for the line sample and the gaps, keeps
    even labels of LABEL_MAX ``W`` (the widest glyph of the default font) inside the figures.
    """
    longest = max(len(label) for label in labels)
    return max(1, min(len(labels), int(width_in * 13 // (longest + 8))))


def metric_figure(runs: list[Run], metric: str) -> Any:
    """Return the figure of eval ``metric`` of all runs against steps, wall time and MB sent."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 5), layout="constrained")
    axes = fig.subplots(1, len(PANELS), squeeze=True)
    dashed = False
    for i, run in enumerate(runs):
        for ax, (xkey, _) in zip(axes, PANELS, strict=True):
            dashed |= _draw_run(ax, run, metric, xkey, _colour(i, len(runs)))
    for ax, (_, xlabel) in zip(axes, PANELS, strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"test {metric}")
    _legend(fig, axes[0], dashed)
    return fig


def training_loss_figure(runs: list[Run]) -> Any:
    """Return the figure of the smoothed minibatch loss, mean over ranks, against steps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    for i, run in enumerate(runs):
        steps, loss = mean_training_loss(run)
        if not len(steps):
            continue
        colour, window = _colour(i, len(runs)), smoothing_window(len(loss))
        ax.plot(steps, loss, color=colour, alpha=0.2, linewidth=0.8)
        ax.plot(steps[window - 1:], moving_average(loss, window), color=colour, label=run.label)
    if not ax.lines:
        ax.text(0.5, 0.5, "no per-step data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("minibatch loss (mean over ranks)")
    ax.grid(alpha=0.3)
    ax.set_title("training loss (faint: raw; solid: moving average over ~2% of steps)")
    _legend(fig, ax, False)
    return fig


PANEL_COLUMNS = 3  # small multiples: panels per row


def _panels(count: int, title: str) -> tuple[Any, list[Any]]:
    """Return a figure with ``count`` panels, ``PANEL_COLUMNS`` a row, and its axes."""
    from matplotlib.figure import Figure

    cols = min(count, PANEL_COLUMNS)
    rows = -(-count // cols)
    fig = Figure(figsize=(5.2 * cols, 3.4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes[:count])


def staleness_figure(runs: list[Run]) -> Any | None:
    """Return histograms of the staleness of the applied gradients, a panel per run.

    Only runs that recorded a ``staleness`` series get a panel (None if none did). Bars are
    the share of the run's applied gradients with each staleness, on one x scale for all
    panels; lines mark the mean and the 99th percentile.
    """
    data = [(i, run, run_series(run, "staleness")) for i, run in enumerate(runs)]
    data = [(i, run, values) for i, run, values in data if values is not None and len(values)]
    if not data:
        return None
    from matplotlib.ticker import MaxNLocator

    top = max(int(values.max()) for _, _, values in data)
    bins = np.arange(top + 2) - 0.5 if top < 60 else np.linspace(-0.5, top + 0.5, 61)
    fig, axes = _panels(len(data), "staleness of the applied gradients (updates applied "
                        "between a gradient's model and its own)")
    for ax, (i, run, values) in zip(axes, data, strict=True):
        colour = _colour(i, len(runs))
        ax.hist(values, bins=bins, weights=np.full(len(values), 1 / len(values)), color=colour,
                alpha=0.75)
        mean, p99 = float(values.mean()), float(np.percentile(values, 99))
        ax.axvline(mean, color="black", linestyle="--", label=f"mean {mean:.2f}")
        ax.axvline(p99, color="black", linestyle=":", label=f"p99 {p99:g}")
        ax.set_title(run.label, fontsize="medium")
        ax.set_xlabel(f"staleness ({len(values)} applied gradients)")
        ax.set_ylabel("share of applied gradients")
        ax.set_xlim(bins[0], bins[-1])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    return fig


def workers_figure(runs: list[Run]) -> Any | None:
    """Return bars of the gradients applied from each worker, a panel per run.

    Only runs that know their per-worker counts get a panel (None if none did); a dashed
    line marks the even share.
    """
    data = [(i, run, updates_per_worker(run)) for i, run in enumerate(runs)]
    data = [(i, run, counts) for i, run, counts in data if counts is not None and len(counts)]
    if not data:
        return None
    fig, axes = _panels(len(data), "gradients applied from each worker")
    for ax, (i, run, counts) in zip(axes, data, strict=True):
        workers = np.arange(len(counts))
        ax.bar(workers, counts, color=_colour(i, len(runs)), alpha=0.75)
        even = counts.sum() / len(counts)
        ax.axhline(even, color="black", linestyle="--", label=f"even share {even:.1f}")
        ax.set_title(run.label, fontsize="medium")
        ax.set_xlabel("worker index (rank - 1 with one server)")
        ax.set_ylabel("applied gradients")
        if len(counts) <= 16:
            ax.set_xticks(workers)
        ax.set_ylim(0, max(counts.max(), 1) * 1.2)  # headroom: the legend clears the bars
        ax.legend(fontsize="small", loc="upper center")
        ax.grid(alpha=0.3, axis="y")
    return fig


RETURN_WINDOW = 100  # training episodes per point of the return curve (as the summary's)


def episode_curve(run: Run) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Return the training return curve of a reinforcement-learning run (None: not one).

    The episodes of all ranks (``series/<r>/episode_*``) in the order they ended: the run
    time at which each ended, the environment steps of all ranks by then (each rank's own
    count, interpolated between its episodes' ends and from 0 at the start), and the mean
    return of the last ``RETURN_WINDOW`` episodes ended by then (of all, for the first ones).
    """
    parts = [cols for cols in run.series.values()
             if all(f"episode_{k}" in cols for k in ("time", "return", "env_steps"))]
    if not parts:
        return None
    time = np.concatenate([np.asarray(c["episode_time"], np.float64) for c in parts])
    ret = np.concatenate([np.asarray(c["episode_return"], np.float64) for c in parts])
    order = np.argsort(time, kind="stable")
    time, ret = time[order], ret[order]
    steps = sum(np.interp(time, np.concatenate(([0.0], c["episode_time"])),
                          np.concatenate(([0.0], c["episode_env_steps"]))) for c in parts)
    cumsum = np.concatenate(([0.0], np.cumsum(ret)))
    i = np.arange(1, len(ret) + 1)
    first = np.maximum(i - RETURN_WINDOW, 0)
    return time, steps, (cumsum[i] - cumsum[first]) / (i - first)


def returns_figure(runs: list[Run]) -> Any | None:
    """Return the figure of the training return against environment steps and wall time.

    Only runs that recorded episodes get a curve (None if none did); the wall-time panel
    also marks the greedy evaluations (``eval/return``).
    """
    curves = [(i, run, episode_curve(run)) for i, run in enumerate(runs)]
    curves = [(i, run, curve) for i, run, curve in curves if curve is not None]
    if not curves:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), layout="constrained")
    by_steps, by_time = fig.subplots(1, 2, squeeze=True)
    for i, run, (time, steps, mean) in curves:
        colour = _colour(i, len(runs))
        by_steps.plot(steps, mean, color=colour, label=run.label)
        by_time.plot(time, mean, color=colour)
        greedy = run.eval.get("return")
        if greedy is not None and len(greedy) and "time" in run.eval:
            by_time.plot(run.eval["time"], greedy, color=colour, linestyle="--", marker="o",
                         markersize=3)
    by_steps.set_xlabel("environment steps (all ranks)")
    by_time.set_xlabel("wall time (s)")
    for ax in (by_steps, by_time):
        ax.set_ylabel(f"return (mean of the last {RETURN_WINDOW} training episodes)")
        ax.grid(alpha=0.3)
    fig.suptitle("return (dashed with markers: greedy evaluations)")
    _legend(fig, by_steps, False)
    return fig


def _save(fig: Any, path: str) -> str:
    """Write ``fig`` as a PNG at 100 dpi; return ``path``."""
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------- entry point


def _check_target(target: float | None) -> None:
    """Raise a ConfigError unless ``target`` is None or an accuracy in [0, 1]."""
    if target is None:
        return
    if not _is_number(target) or not 0 <= target <= 1:
        raise ConfigError(f"must be an accuracy in [0, 1], got {target!r}", key="--target")


def _unique_dirs(run_dirs: list[str]) -> list[str]:
    """Drop repeated run directories (the same real path given twice), keeping the order."""
    seen, out = set(), []
    for path in map(os.fspath, run_dirs):
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            out.append(path)
    return out


def make_report(run_dirs: list[str], out_dir: str, target: float | None = None) -> list[str]:
    """Write plots and a markdown table comparing run directories.

    Args:
        run_dirs: Run directories written by ``mpiopt run``.
        out_dir: Where to write; created if needed.
        target: An eval accuracy; the table then says when each run first reached it.

    Returns:
        The paths written: ``loss.png``, ``accuracy.png``, ``training_loss.png``, then
        ``perplexity.png`` when some run was scored by perplexity (a topic model),
        ``staleness.png`` and ``workers.png`` when some run recorded staleness and gradients
        per worker (a parameter server), ``returns.png`` when some run recorded training
        episodes (reinforcement learning), and ``report.md``.

    Raises:
        ConfigError: No run given, a run directory is missing or unreadable, ``target`` is out
            of range, or ``out_dir`` cannot be created.
    """
    if not run_dirs:
        raise ConfigError("no run directories given")
    _check_target(target)
    runs = [load_run(path) for path in _unique_dirs(run_dirs)]
    assign_labels(runs)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output directory {out_dir}: "
                          f"{exc.strerror or exc}") from None
    import matplotlib

    matplotlib.use("Agg")
    written = [
        _save(metric_figure(runs, "loss"), os.path.join(out_dir, "loss.png")),
        _save(metric_figure(runs, "accuracy"), os.path.join(out_dir, "accuracy.png")),
        _save(training_loss_figure(runs), os.path.join(out_dir, "training_loss.png")),
    ]
    extra = []
    perplexity = (metric_figure(runs, "perplexity") if any(map(has_perplexity, runs))
                  else None)
    for title, name, fig in (("test perplexity", "perplexity.png", perplexity),
                             ("staleness", "staleness.png", staleness_figure(runs)),
                             ("gradients per worker", "workers.png", workers_figure(runs)),
                             ("return", "returns.png", returns_figure(runs))):
        if fig is not None:
            written.append(_save(fig, os.path.join(out_dir, name)))
            extra.append((title, name))
    return written + [write_markdown(runs, out_dir, target, tuple(extra))]
