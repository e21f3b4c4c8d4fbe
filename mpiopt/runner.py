"""``mpiopt run``: from a config file to a finished run directory, on every rank.

The phases are: read and validate the configuration (every rank, errors agreed so that all
ranks stop together), load the data and build the problem (partition checks), create the run
directory (rank 0), train (the algorithm's own loop), then merge metrics and write the summary.
A :class:`~mpiopt.errors.ConfigError` in the first two phases leaves nothing on disk.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time

import h5py
import numpy as np

from mpiopt import __version__, backend, kernels
from mpiopt.algorithms.base import Context, ranks_of, reporter_rank
from mpiopt.comm.transport import Transport, mpi_info
from mpiopt.config import Config
from mpiopt.errors import ConfigError
from mpiopt.faults import FaultInjector
from mpiopt.io.metrics import StepLog, merge, rank_log_path
from mpiopt.io.stability import stability
from mpiopt.progress import Progress
from mpiopt.schema import load_config


def agree(transport: Transport, fn):
    """Run ``fn`` on every rank; if any rank raised ConfigError, raise the first on all."""
    try:
        result, error = fn(), None
    except ConfigError as exc:
        result, error = None, str(exc)
    errors = transport.allgather_obj(error)
    first = next((e for e in errors if e), None)
    if first:
        raise ConfigError(first)
    return result


def _overrides(sets, steps, seed, out, overwrite, quiet) -> list[str]:
    extra = list(sets or [])
    for key, value in (("steps", steps), ("seed", seed), ("out", out)):
        if value is not None:
            extra.append(f"run.{key}={value}")
    if overwrite:
        extra.append("run.overwrite=true")
    if quiet:
        extra.append("run.quiet=true")
    return extra


def _run_dir(cfg: Config) -> str:
    """Return the run directory (rank 0): the configured one, or a fresh timestamped one."""
    if cfg.run.out:
        out = cfg.run.out
        if os.path.exists(out) and not cfg.run.overwrite:
            raise ConfigError(f"{out} already exists; choose another or pass --overwrite",
                              key="run.out")
        return out
    base = os.path.join("runs", f"{cfg.algorithm.NAME}-{time.strftime('%Y%m%d-%H%M%S')}")
    out, i = base, 1
    while os.path.exists(out):
        i += 1
        out = f"{base}-{i}"
    return out


def prepare(transport: Transport, config_path: str, overrides: list[str]):
    """Validate the configuration on every rank; return it and the run directory."""
    def check():
        cfg = load_config(config_path, overrides)
        for section in (cfg.problem, cfg.algorithm, cfg.run):
            section.check_world(transport.size)
        cfg.data.check_world(len(workers_of(cfg, transport.size)))  # data goes to workers
        if cfg.run.total_steps is not None and not cfg.algorithm.ASYNCHRONOUS:
            raise ConfigError(f"{cfg.algorithm.NAME} is synchronous: every rank takes run.steps "
                              "steps; a total budget is for asynchronous algorithms",
                              key="run.total_steps")
        host_only = next((s.NAME for s in (cfg.algorithm, cfg.problem) if s.HOST_ONLY), None)
        if host_only and cfg.run.device == "gpu":
            raise ConfigError(f"{host_only} runs on host memory; valid: cpu, auto",
                              key="run.device")
        return cfg, (_run_dir(cfg) if transport.rank == 0 else None)

    cfg, out = agree(transport, check)
    return cfg, transport.bcast_obj(out)


def _device(cfg: Config) -> str:
    """Return where this run's arrays live: ``run.device``, or cpu for host-only algorithms
    and problems."""
    return "cpu" if cfg.algorithm.HOST_ONLY or cfg.problem.HOST_ONLY else cfg.run.device


def build_problem(transport: Transport, cfg: Config):
    """Load this rank's shard and build the problem (every rank; errors agreed).

    A problem that makes its own samples (``NEEDS_DATA`` False) is built without a shard.
    """
    def build():
        xp = backend.select(_device(cfg))
        if not cfg.problem.NEEDS_DATA:
            return xp, None, cfg.problem.build(None, 0, xp)  # no shard, no minibatches
        # Workers share the training set; a server or hub builds its problem on the first
        # worker's shard (for the shapes: it computes no gradients).
        workers = workers_of(cfg, transport.size)
        part = workers.index(transport.rank) if transport.rank in workers else 0
        shard = cfg.data.load(part, len(workers), cfg.run.seed,
                              with_test=transport.rank == 0)
        n = shard.x_train.shape[0]
        if cfg.data.batch_size > n:
            raise ConfigError(f"{cfg.data.batch_size} is larger than the {n} samples of rank "
                              f"{transport.rank}'s shard", key="data.batch_size")
        return xp, shard, cfg.problem.build(shard, cfg.data.batch_size, xp)

    return agree(transport, build)


def workers_of(cfg: Config, world_size: int) -> list[int]:
    """Return the ranks that take training steps on data (the algorithm's workers)."""
    return ranks_of(cfg.algorithm.roles(world_size))


def share_cores(transport: Transport) -> int:
    """Give each rank an equal share of its node's cores for numba and BLAS threads.

    Without this every rank starts one kernel thread and one BLAS thread per core, and ranks
    sharing a node oversubscribe it many times over (spinning thread pools make that
    ruinous). Returns the thread count chosen; numba itself is loaded only if a kernel runs.
    """
    node = transport.split_shared()
    share = max(1, (os.cpu_count() or 1) // node.size)
    node.free()
    threads = min(share, kernels.thread_limit())
    kernels.set_num_threads(threads)
    from threadpoolctl import threadpool_limits  # 5 ms; numpy's BLAS pool

    threadpool_limits(limits=share, user_api="blas")
    return threads


def _create_dir(transport: Transport, cfg: Config, out: str) -> None:
    if transport.rank == 0:
        if os.path.exists(out):
            shutil.rmtree(out)
        os.makedirs(os.path.join(out, ".ranks"))
        with open(os.path.join(out, "config.yaml"), "w") as fh:
            fh.write(cfg.to_yaml())
    transport.barrier()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time_to_target(ctx: Context, target) -> dict | None:
    if target is None:
        return None
    for row in ctx.evals.rows:
        if row.get("accuracy", -1.0) >= target:
            return {"accuracy": target, "step": int(row["step"]), "time_s": row["time"],
                    "train_time_s": row["train_time"]}
    return None


def _stability(ctx: Context, cfg: Config) -> dict:
    """Return the stability measures of the evaluations' test accuracy (io.stability)."""
    columns = ctx.evals.columns()
    accuracy = columns.get("accuracy", np.zeros(0))
    return stability(accuracy, columns.get("step"), cfg.algorithm.warmup_steps)


def _by_channel(totals: list[dict]) -> dict:
    """Mean bytes sent and received per rank per step on each channel (phase) that was used.

    Per step of any rank: ranks that take different numbers of steps (asynchronous methods,
    a parameter server) are averaged over the steps they took.
    """
    names = sorted({c for t in totals for c in t["channels"]})
    per = max(sum(t["steps"] for t in totals), 1)
    return {c: {"sent": sum(t["channels"].get(c, (0, 0))[0] for t in totals) / per,
                "recv": sum(t["channels"].get(c, (0, 0))[1] for t in totals) / per}
            for c in names}


def _summary(ctx: Context, cfg: Config, totals: list[dict], wall: float) -> dict:
    n = ctx.size
    sent = sum(t["sent"] for t in totals)
    steps = max(t["steps"] for t in totals)
    return {
        "algorithm": cfg.algorithm.NAME, "problem": cfg.problem.NAME,
        "dataset": cfg.data.NAME, "world_size": n, "steps": steps,
        "steps_per_rank": [t["steps"] for t in totals], "wall_time_s": wall,
        "final": ctx.final,
        "bytes_sent_total": sent, "bytes_recv_total": sum(t["recv"] for t in totals),
        "bytes_sent_per_rank_per_step": sent / max(sum(t["steps"] for t in totals), 1),
        "bytes_per_rank_per_step_by_channel": _by_channel(totals),
        "compute_s": sum(t["compute"] for t in totals) / n,
        "comm_s": sum(t["comm"] for t in totals) / n,
        "peak_rss_mb": [t["rss"] for t in totals],
        "seed": cfg.run.seed, "time_to_target": _time_to_target(ctx, cfg.run.target_accuracy),
        "stability": _stability(ctx, cfg),
        "model_dim": int(ctx.problem.dim), "mpi": mpi_info()["library"],
        "cuda_aware_mpi": ctx.transport.cuda_aware,
        "mpiopt_version": __version__, "config": cfg.to_dict(),
    }


def _series(algo, ctx: Context) -> dict:
    """Return this rank's series for metrics.h5: the algorithm's and the problem's."""
    series, own = algo.series(), ctx.problem.series(ctx.start)
    clash = sorted(set(series) & set(own))
    if clash:
        raise RuntimeError(f"algorithm and problem both record the series {clash}")
    return {**series, **own}


def _save_model(path: str, x, cfg: Config) -> None:
    with h5py.File(path + ".tmp", "w") as f:
        f.create_dataset("x", data=backend.to_host(x))
        f.attrs["algorithm"] = cfg.algorithm.NAME
        f.attrs["problem"] = cfg.problem.NAME
    os.replace(path + ".tmp", path)


def finish(ctx: Context, cfg: Config, algo, out: str) -> dict | None:
    """Close the logs, merge metrics, save the model and write summary.json (rank 0)."""
    wall = ctx.elapsed()
    rows = ctx.steplog
    rows.write_series(_series(algo, ctx))
    rows.close()
    mine = {"steps": ctx.steps_done, "sent": ctx.transport.bytes_sent(),
            "recv": ctx.transport.bytes_recv(), "compute": rows.compute_s, "comm": rows.comm_s,
            "rss": _peak_rss_mb(), "problem": ctx.problem.info(ctx.start),
            "channels": {c.name.lower(): (s.sent, s.recv)
                         for c, s in ctx.transport.stats.items() if s.sent or s.recv}}
    totals = ctx.transport.allgather_obj(mine)
    if ctx.rank != 0:
        return None
    attrs = {"algorithm": cfg.algorithm.NAME, "problem": cfg.problem.NAME,
             "dataset": cfg.data.NAME, "world_size": ctx.size, "config": cfg.to_yaml()}
    merge(out, ctx.size, ctx.evals, attrs)
    _save_model(os.path.join(out, "model.h5"), algo.model(), cfg)
    summary = _summary(ctx, cfg, totals, wall)
    summary["algorithm_info"] = algo.summary_info()
    summary["problem_info"] = ctx.problem.summary_info([t["problem"] for t in totals], wall)
    with open(os.path.join(out, "summary.json.tmp"), "w") as fh:
        json.dump(summary, fh, indent=2, default=float)
    os.replace(os.path.join(out, "summary.json.tmp"), os.path.join(out, "summary.json"))
    return summary


def describe_start(cfg: Config, n: int, out: str, dim: int) -> str:
    """Return the one line printed when a run starts."""
    data = (f"data {cfg.data.NAME} ({cfg.data.partition})" if cfg.problem.NEEDS_DATA
            else "no data")
    return (f"mpiopt {__version__}: {cfg.algorithm.NAME} on {n} rank(s), problem "
            f"{cfg.problem.NAME} (d={dim}), {data}, {cfg.run.steps} steps -> {out}")


def describe_end(summary: dict) -> str:
    """Return the closing line of a run."""
    final = " ".join(f"{k}={v:.4f}" for k, v in summary["final"].items()
                     if isinstance(v, float))
    return (f"done in {summary['wall_time_s']:.1f}s: {final} | "
            f"{summary['bytes_sent_per_rank_per_step'] / 1e6:.3f} MB sent per rank per step")


def run(config_path: str, sets=None, steps=None, seed=None, out=None, overwrite=False,
        quiet=False, transport: Transport | None = None) -> dict | None:
    """Run a configuration on every rank of the job; return the summary on rank 0."""
    transport = transport or Transport()
    tasks = backend.singleton_tasks(transport.size)
    if tasks:
        raise ConfigError(f"srun started {tasks} tasks but MPI sees 1 rank in each: they run "
                          "alone, as singletons; launch with `srun --mpi=pmi2` (MPICH; "
                          "`--mpi=pmix` for Open MPI) or set MpiDefault in slurm.conf")
    transport.reset_stats()
    faults = agree(transport, lambda: FaultInjector.from_env(transport.rank))
    cfg, out_dir = prepare(transport, config_path,
                           _overrides(sets, steps, seed, out, overwrite, quiet))
    transport.timeout = cfg.run.comm_timeout_s
    share_cores(transport)
    # Decided once for the job, before any rank touches its GPU (the probe's child needs it).
    transport.cuda_aware, gpu_line = backend.decide_cuda_aware(transport, cfg.run.cuda_aware,
                                                               _device(cfg))
    xp, shard, problem = build_problem(transport, cfg)
    # Progress lines come from the first rank of the algorithm's reporting role (a worker by
    # default: a rank 0 that serves takes no steps of its own).
    reporter = reporter_rank(cfg.algorithm.roles(transport.size), cfg.algorithm.REPORTER)
    loud = transport.rank == reporter and not cfg.run.quiet
    if transport.rank == 0:
        for warning in cfg.warnings:
            print(f"mpiopt: warning: {warning}", flush=True)
        if gpu_line:
            print(f"mpiopt: {gpu_line}", flush=True)
        print(describe_start(cfg, transport.size, out_dir, problem.dim), flush=True)
    _create_dir(transport, cfg, out_dir)
    steplog = StepLog(rank_log_path(out_dir, transport.rank), cfg.run.metrics_chunk)
    progress = Progress(cfg.run.expected_steps(transport.size), cfg.run.progress_every_s,
                        enabled=loud, metric=cfg.problem.HEADLINE)
    ctx = Context(cfg, transport, problem, xp, out_dir, steplog, faults, progress)
    algo = cfg.algorithm.build(ctx)
    algo.run()
    summary = finish(ctx, cfg, algo, out_dir)
    if summary is not None:
        print(describe_end(summary), flush=True)
    return summary
