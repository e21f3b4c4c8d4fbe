"""Fashion-MNIST end to end: the shipped config trains; without the package, exit 2."""

import json
import os
import sys

import pytest
from conftest import CONFIGS, launch, mpiopt_cmd

from mpiopt.data.fashion import PACKAGE_DIR

pytestmark = pytest.mark.mpi
CONFIG = str(CONFIGS / "fashion-allreduce.yaml")


@pytest.mark.skipif(not os.path.isfile(os.path.join(PACKAGE_DIR, "train-images-idx3-ubyte.gz")),
                    reason=f"Debian package dataset-fashion-mnist is not installed in "
                    f"{PACKAGE_DIR} (apt-get install dataset-fashion-mnist; .ci/run installs it)")
def test_shipped_config_reaches_its_stated_accuracy(tmp_path):
    out = tmp_path / "fashion"
    res = launch(2, [*mpiopt_cmd(), "run", CONFIG, "--out", str(out), "--quiet"], timeout=60)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "fashion_mnist" and summary["steps"] == 300
    assert summary["final"]["accuracy"] >= 0.8  # chance is 0.1; the config states about 0.8


def test_missing_package_exits_2_with_one_line(tmp_path):
    # The same CLI with the package's folder pointed somewhere empty.
    code = ("import sys, mpiopt.data.fashion as f\n"
            f"f.PACKAGE_DIR = {str(tmp_path / 'absent')!r}\n"
            "from mpiopt.cli import main\n"
            f"sys.exit(main(['run', {CONFIG!r}, '--out', 'o']))\n")
    res = launch(None, [sys.executable, "-c", code], timeout=60, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr == (f"mpiopt: error: data.path: Fashion-MNIST is not installed in "
                          f"{tmp_path / 'absent'}: run `apt-get install dataset-fashion-mnist` "
                          f"(as root), or set data.path to a folder holding its four IDX "
                          f"files\n")
    assert res.stdout == "" and not (tmp_path / "o").exists()
