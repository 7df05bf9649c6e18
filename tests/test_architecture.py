"""The package's architecture (docs/architecture.md): layers checked by import-linter, and the old public names.

``lint-imports`` reads the contracts in pyproject.toml ``[tool.importlinter]``. The red cases run it
on a copy of the package with one import added, the kind of edit that starts a circle.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(config_dir: Path, package_parent: Path | None = None) -> subprocess.CompletedProcess:
    """``lint-imports`` with the contracts of ``config_dir/pyproject.toml`` on the package found first on the path."""
    env = dict(os.environ)
    if package_parent is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(package_parent), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=config_dir, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_layers_hold_and_no_module_imports_into_a_circle():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "added", "broken", "named"),
    [
        # an import that runs back up: the lowest layer using the tracking store
        (
            "core/paths.py",
            "from covidct.lifecycle import store",
            "Layers",
            "covidct.core.paths -> covidct.lifecycle.store",
        ),
        # a lazy one counts too: moving an import into a function hides a circle, it does not remove it
        (
            "modelling/train.py",
            "def _later():\n    from covidct.reporting import report",
            "Layers",
            "covidct.modelling.train -> covidct.reporting.report",
        ),
        # inside one layer: the manifest importing the fetch that builds it
        ("data/manifest.py", "from covidct.data import fetch", "No import circles", ".manifest -> .fetch"),
        # Airflow outside orchestration
        ("lifecycle/registry.py", "import airflow.sdk", "Airflow only in orchestration", "covidct.lifecycle.registry"),
    ],
    ids=["back-up", "lazy-back-up", "circle-in-a-layer", "airflow-below-orchestration"],
)
def test_an_import_against_the_architecture_turns_it_red(tmp_path, module, added, broken, named):
    copy = tmp_path / "src" / "covidct"
    shutil.copytree(ROOT / "include" / "covidct", copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    assert lint_imports(tmp_path, tmp_path / "src").returncode == 0  # the copy as it is: green
    with open(copy / module, "a") as f:
        f.write(f"\n\n{added}  # noqa\n")
    result = lint_imports(tmp_path, tmp_path / "src")
    assert result.returncode != 0, result.stdout
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout
    assert named in result.stdout, result.stdout


def test_the_old_public_names_still_work():
    """The study's import line, PipelineModels and MLflow ensembles saved before the layers (tests/test_featurizer.py
    loads such a PipelineModel), and the command line's entry point."""
    from covidct.features import featurizer
    from covidct.featurizer import DeepImageFeaturizer
    from covidct.lifecycle.pyfunc import EnsembleModel

    assert DeepImageFeaturizer is featurizer.DeepImageFeaturizer
    # What MLflow's cloudpickle wrote for an ensemble registered before: the class by its old path.
    old = pickle.loads(b"\x80\x02ccovidct.pyfunc\nEnsembleModel\nq\x00)\x81q\x01.")
    assert type(old) is EnsembleModel
    entry = subprocess.run([sys.executable, "-m", "covidct.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert entry.returncode == 0 and "train" in entry.stdout
