"""The ``mpiopt`` command: run | bench | report | data | jobs | info.

User mistakes (:class:`~mpiopt.errors.ConfigError`, bad arguments) print one line, once (from
rank 0), and exit with status 2, without a traceback. Any other exception on any rank prints
the rank and the error and aborts the whole MPI job, so no rank is left waiting.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from mpiopt.errors import ConfigError

FORMATS = ("mnist", "cifar10")  # mpiopt.data.convert.FORMATS, without importing h5py here


def _launcher_rank() -> int:
    """Return this process's rank from the launcher's environment, without starting MPI."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _say_error(message: str) -> None:
    if _launcher_rank() == 0:
        sys.stderr.write(f"mpiopt: error: {message}\n")
        sys.stderr.flush()


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, printed once, with status 2."""

    def error(self, message):
        _say_error(f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)


def cmd_run(args) -> int:
    from mpiopt import runner

    runner.run(args.config, sets=args.set, steps=args.steps, seed=args.seed, out=args.out,
               overwrite=args.overwrite, quiet=args.quiet)
    return 0


def cmd_info(args) -> int:
    from mpiopt.info import collect, render

    facts = collect()
    if _launcher_rank() == 0:
        print(render(facts))
    return 0


def cmd_report(args) -> int:
    from mpiopt.report import make_report

    written = make_report(args.runs, args.out, target=args.target)
    for path in written:
        print(path)
    return 0


def cmd_data_describe(args) -> int:
    from mpiopt.data.describe import describe
    from mpiopt.schema import load_config

    cfg = load_config(args.config, args.set)
    if not cfg.problem.NEEDS_DATA:
        raise ConfigError(f"problem {cfg.problem.NAME!r} makes its own samples: there is no "
                          "data set to describe", key="data.name")
    ranks = args.ranks
    if ranks is None:
        from mpiopt.comm.transport import world_size

        ranks = world_size()
    from mpiopt.runner import workers_of

    workers = workers_of(cfg, ranks)  # the data goes to the workers (not to a server)
    cfg.data.check_world(len(workers))
    if _launcher_rank() == 0:
        print(describe(cfg.data, len(workers), cfg.run.seed, workers))
    return 0


def cmd_data_convert(args) -> int:
    if args.text is not None:
        if len(args.paths) != 1:
            raise ConfigError("with --text give one more argument, the output file: mpiopt "
                              "data convert --text FILE OUT", key="--text")
        from mpiopt.data.text import convert_text

        out = args.paths[0]
        counts = convert_text(args.text, out, args.column, args.min_df, args.max_df,
                              not args.keep_stop_words, args.test_fraction, args.seed,
                              args.overwrite)
    else:
        if len(args.paths) != 3:
            raise ConfigError(f"expected FORMAT SRC OUT (FORMAT: {', '.join(FORMATS)}) or "
                              f"--text FILE OUT, got {len(args.paths)} argument(s)")
        from mpiopt.data.convert import convert

        fmt, src, out = args.paths
        counts = convert(fmt, src, out, overwrite=args.overwrite)
    print(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()
                                       if k not in ("out", "format")))
    return 0


# Algorithms whose exchange ``bench comm --algorithm`` can time, and the bench module of each.
STEP_BENCHES = {"signum": "vote", "swarm": "gossip"}


def cmd_bench(args) -> int:
    import importlib

    if args.what == "kernels":
        from mpiopt.bench.kernels import run as run_kernels

        run_kernels(args.size, args.threads, args.json)
    elif args.what == "comm" and args.algorithm is not None:
        if args.algorithm not in STEP_BENCHES:
            raise ConfigError(f"{args.algorithm!r} has no communication benchmark; choose from "
                              f"{', '.join(STEP_BENCHES)}", key="--algorithm")
        bench = importlib.import_module(f"mpiopt.bench.{STEP_BENCHES[args.algorithm]}")
        bench.run(args.size, args.repeats, args.json)
    elif args.what == "comm":
        from mpiopt.bench import comm

        comm.run(args.max_mb, args.repeats, args.json)
    elif args.what == "ps":
        from mpiopt.bench import ps

        ps.run(args.size, args.repeats, args.json, args.steps)
    elif args.what == "lda" and args.peers:
        from mpiopt.bench import lda_peers

        lda_peers.run(args.data, args.topics, args.passes, args.seed, args.json)
    elif args.what == "lda":
        from mpiopt.bench import lda

        lda.run(args.data, args.topics, args.batch, args.threads, args.repeats, args.json)
    elif args.what == "startup":
        from mpiopt.bench import startup

        startup.run(args.repeats, args.json, args.ranks, args.steps)
    else:
        from mpiopt.bench import train

        train.run(args.steps or 300, args.repeats, args.json)
    return 0


def cmd_jobs(args) -> int:
    from mpiopt import jobs

    if args.what == "list":
        print(jobs.list_jobs())
        return 0
    if args.what == "hosts":
        print(jobs.render_hosts(args.config, jobs.parse_list(args.hosts, "--hosts"),
                                args.tasks_per_node, args.venv or jobs.active_venv()), end="")
        return 0
    script = jobs.render_slurm(
        args.config, args.template, nodes=args.nodes, tasks_per_node=args.tasks_per_node,
        time=args.time, partition=args.partition, launcher=args.launcher,
        algorithms=jobs.parse_list(args.algorithms, "--algorithms"),
        seeds=jobs.parse_list(args.seeds, "--seeds", int), signal_before=args.signal_before,
        venv=args.venv or jobs.active_venv())
    print(script, end="")
    return 0


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="train with a configuration file (under mpiexec)")
    p.add_argument("config", help="YAML configuration file")
    p.add_argument("--out", help="run directory (default runs/<algorithm>-<time>)")
    p.add_argument("--steps", type=int, help="override run.steps")
    p.add_argument("--seed", type=int, help="override run.seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any key, e.g. --set algorithm.lr=0.05 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--quiet", action="store_true", help="no progress lines (batch logs)")
    p.set_defaults(func=cmd_run)


def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="describe partitions, convert datasets to HDF5")
    dsub = p.add_subparsers(dest="what", required=True, parser_class=_Parser)
    d = dsub.add_parser("describe", help="per-rank sample counts and class histograms")
    d.add_argument("config")
    d.add_argument("--ranks", type=int, help="world size (default: the MPI job's)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.set_defaults(func=cmd_data_describe)
    c = dsub.add_parser(
        "convert", help="MNIST/Fashion-MNIST IDX or CIFAR-10 binary to HDF5; text to a "
        "bag-of-words HDF5 file (data.name: bow)",
        usage="mpiopt data convert {mnist,cifar10} SRC OUT [--overwrite]\n"
              "       mpiopt data convert --text FILE OUT [--column NAMES] [--min-df N] "
              "[--max-df F] [--test-fraction F] [--seed S] [--keep-stop-words] [--overwrite]")
    c.add_argument("paths", nargs="+", metavar="ARG",
                   help="FORMAT SRC OUT: FORMAT mnist or cifar10, SRC the directory with the "
                        "original files, OUT the HDF5 file to write; with --text only OUT")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    t = c.add_argument_group("text (--text)")
    t.add_argument("--text", metavar="FILE", help="UTF-8 text: one document per line, or CSV "
                   "with --column")
    t.add_argument("--column", metavar="NAMES", help="CSV column(s) holding the text, e.g. "
                   "text or title,text (joined); the file's first row names the columns")
    t.add_argument("--min-df", type=int, default=5, help="keep words in at least this many "
                   "training documents (default 5)")
    t.add_argument("--max-df", type=float, default=0.5, help="keep words in at most this "
                   "share of the training documents (default 0.5)")
    t.add_argument("--test-fraction", type=float, default=0.1, help="share of the documents "
                   "held out as the test set (default 0.1)")
    t.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    t.add_argument("--keep-stop-words", action="store_true",
                   help="keep the English stop words (left out by default)")
    c.set_defaults(func=cmd_data_convert)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks against references measured in the same run")
    p.add_argument("what", choices=("comm", "train", "kernels", "startup", "ps", "lda"),
                   help="startup: run as a plain process (it launches mpiexec itself)")
    p.add_argument("--max-mb", type=float, default=64.0, help="comm: largest buffer (MB)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions")
    p.add_argument("--steps", type=int, default=None,
                   help="train: steps per repetition (default 300); startup: steps of every "
                        "run (default: each config's own); ps: updates per run (default: "
                        "by d)")
    p.add_argument("--algorithm", default=None,
                   help="comm: time this algorithm's exchange instead (signum: a vote "
                        "step; swarm: reads of idle and busy partners)")
    p.add_argument("--size", type=int, default=64 * 2**20,
                   help="kernels: elements; comm --algorithm, ps: the largest vector")
    p.add_argument("--threads", type=int, default=None, help="kernels, lda: numba threads")
    p.add_argument("--data", default="news", help="lda: the bag-of-words data set")
    p.add_argument("--topics", type=int, default=20, help="lda: topics K")
    p.add_argument("--batch", type=int, default=256, help="lda: documents per minibatch")
    p.add_argument("--peers", action="store_true",
                   help="lda: DPSVI against scikit-learn's and gensim's online LDA, "
                        "perplexity against time (a plain process: it launches mpiexec)")
    p.add_argument("--passes", type=int, default=5, help="lda --peers: passes over the corpus")
    p.add_argument("--seed", type=int, default=0, help="lda --peers: the seed of every model")
    p.add_argument("--ranks", type=int, default=None,
                   help="startup: ranks of every case (default: 4 for the quickstart, 5 for "
                        "signum)")
    p.add_argument("--json", default=None, help="also write the results as JSON")
    p.set_defaults(func=cmd_bench)


def _jobs_parser(sub) -> None:
    from mpiopt.jobs import LAUNCHERS, SLURM_TEMPLATES

    p = sub.add_parser("jobs", help="example configs, Slurm job scripts, mpiexec scripts")
    jsub = p.add_subparsers(dest="what", required=True, parser_class=_Parser)
    jsub.add_parser("list", help="list configs and templates").set_defaults(func=cmd_jobs)
    s = jsub.add_parser("slurm", help="print a Slurm batch script for a config",
                        description="Print a template of jobs/slurm filled in for CONFIG; "
                        "options left out keep the template's defaults.")
    s.add_argument("config")
    s.add_argument("--template", default="multinode", choices=tuple(SLURM_TEMPLATES),
                   help="multinode (default; srun), single-node (mpiexec), gpu (one rank per "
                        "GPU), sweep (job array over algorithms x seeds, then a report), "
                        "preempt (USR1 before the end, then requeue)")
    s.add_argument("--nodes", type=int, help="#SBATCH --nodes")
    s.add_argument("--tasks-per-node", type=int, help="#SBATCH --ntasks-per-node (ranks)")
    s.add_argument("--time", help="#SBATCH --time, e.g. 00:30:00")
    s.add_argument("--partition", help="#SBATCH --partition")
    s.add_argument("--launcher", choices=LAUNCHERS,
                   help="how ranks start: srun --mpi=pmi2, or mpiexec inside the allocation")
    s.add_argument("--algorithms", help="sweep: comma-separated algorithm names")
    s.add_argument("--seeds", help="sweep: comma-separated seeds")
    s.add_argument("--signal-before", type=int, metavar="SECONDS",
                   help="preempt: USR1 this long before the time limit (#SBATCH --signal)")
    s.add_argument("--venv", help="environment the job activates (default: the active one)")
    s.set_defaults(func=cmd_jobs)
    h = jsub.add_parser("hosts", help="print an mpiexec script for a list of hosts (no Slurm)",
                        description="Print jobs/hosts/mpiexec.sh filled in for CONFIG: "
                        "MPICH's mpiexec starts the ranks on the hosts over ssh.")
    h.add_argument("config")
    h.add_argument("--hosts", help="comma-separated host names (default: localhost)")
    h.add_argument("--tasks-per-node", type=int, help="ranks on each host (default 4)")
    h.add_argument("--venv", help="environment the ranks use (default: the active one)")
    h.set_defaults(func=cmd_jobs)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``mpiopt`` command."""
    from mpiopt import __version__

    parser = _Parser(prog="mpiopt", description="Communication-efficient distributed SGD "
                     "over MPI. Launch training under mpiexec/srun.")
    parser.add_argument("--version", action="version", version=f"mpiopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _run_parser(sub)
    _bench_parser(sub)
    r = sub.add_parser("report", help="plots and a markdown table from run directories")
    r.add_argument("runs", nargs="+", help="run directories")
    r.add_argument("--out", default="report", help="output directory (default report/)")
    r.add_argument("--target", type=float, default=None, help="target test accuracy")
    r.set_defaults(func=cmd_report)
    _data_parser(sub)
    _jobs_parser(sub)
    sub.add_parser("info", help="versions, MPI library, GPUs, CUDA-aware MPI").set_defaults(
        func=cmd_info)
    return parser


def _abort_job(exc: BaseException) -> int:
    """Report an unexpected error with the rank and end every rank of the job."""
    rank = _launcher_rank()
    traceback.print_exc()
    sys.stderr.write(f"mpiopt: rank {rank}: {type(exc).__name__}: {exc}\n")
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and mpi.COMM_WORLD.Get_size() > 1:
        import time

        time.sleep(0.5)  # let the launcher forward the message before the job is torn down
        mpi.COMM_WORLD.Abort(1)
    return 1


def main(argv=None) -> int:
    """Run the ``mpiopt`` command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        _say_error(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # any failure on one rank must end the whole job
        return _abort_job(exc)


if __name__ == "__main__":
    sys.exit(main())
