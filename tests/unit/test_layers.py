"""The import structure: the layer contracts, and a run importing only what it uses."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "jobs" / "configs" / "quickstart.yaml"
# Heavy or optional modules that a run imports only when it uses them.
HEAVY = ("numba", "sklearn", "scipy", "matplotlib", "networkx", "cupy", "torch")


def _python(code: str, cwd, env_path=None) -> str:
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
           "PYTHONPATH": str(env_path) if env_path else "", "HOME": str(cwd)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=cwd, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_import_contracts_hold(tmp_path):
    """import-linter: the layers, mpi4py only in mpiopt.comm, no cycles between siblings.

    The kernels are installed as ``mpiopt.kernels`` from a folder beside the package, which
    import-linter cannot follow; it reads a copy laid out as installed.
    """
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "mpiopt", tmp_path / "mpiopt", ignore=ignore)
    shutil.copytree(ROOT / "kernels", tmp_path / "mpiopt" / "kernels", ignore=ignore)
    lint = Path(sys.executable).parent / "lint-imports"
    res = subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 kept, 0 broken" in res.stdout, res.stdout


def test_a_run_imports_only_what_it_uses(tmp_path):
    """An allreduce run on digits imports no other algorithm, no numba, no scikit-learn."""
    code = (
        "import sys\n"
        "from mpiopt.cli import main\n"
        f"main(['run', {str(QUICK)!r}, '--steps', '5', '--out', 'o', '--quiet'])\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}"
        " or m.startswith(('mpiopt.algorithms.', 'mpiopt.compressors'))"
        " or m in ('mpiopt.kernels.cpu', 'mpiopt.kernels.gpu')))\n"
    )
    out = _python(code, tmp_path).strip().splitlines()
    assert "done in" in out[-2]
    assert eval(out[-1]) == ["mpiopt.algorithms.allreduce", "mpiopt.algorithms.base"]


def test_validating_a_config_imports_only_the_entries_it_names(tmp_path):
    code = (
        "import sys\n"
        "from mpiopt.schema import load_config\n"
        f"cfg = load_config({str(QUICK)!r}, ['algorithm.name=signum'])\n"
        "print(cfg.algorithm.NAME)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('mpiopt.algorithms.',"
        " 'mpiopt.problems.', 'mpiopt.data.'))))\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    name, entries, heavy = _python(code, tmp_path).strip().splitlines()
    assert name == "signum"
    assert eval(entries) == ["mpiopt.algorithms.base", "mpiopt.algorithms.signum",
                             "mpiopt.data.base", "mpiopt.data.datasets", "mpiopt.data.partition",
                             "mpiopt.problems.base", "mpiopt.problems.dense"]
    assert eval(heavy) == []
