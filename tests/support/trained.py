"""The session's one trained DAG run: what the whole-DAG, MLflow/promotion and registry tests read.

``conftest.trained_run`` runs the transfer-learning DAG once with ``dag.test()`` (real spark-submit
per backbone): the three backbones on the default splits of the synthetic dataset, stand-in ImageNet
weights files (so the gate promotes, and the report has a gallery), the mean ensemble only (the
default: the stacked one's out-of-fold fits cost a third of each job; test_ensemble fits it), MLflow
tracking on in an
embedded store under its own COVIDCT_HOME. Tests read what it left; a test that runs more DAG
runs in its home calls :meth:`TrainedRun.use` first, and must not change what others read
(its data, its records of success, the registry's champion) — see each user.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

DAG_ID = "covid_ct_transfer_learning"
BACKBONES = ("VGG16", "VGG19", "Xception")
SEED = 5


@dataclass(frozen=True)
class TrainedRun:
    home: Path
    data_source: Path
    weights_dir: Path
    conf: dict
    env: dict[str, str]
    run_id: str
    run_dir: Path
    states: dict[str, str]
    errors: dict[str, str]
    #: ``state/last-successful-run.json`` right after the run (later runs in this home may move it).
    last_success: dict | None
    #: The DAG run's MLflow parent run, and the registry's champion version right after the run.
    parent_run_id: str
    champion_version: str | None

    def use(self, monkeypatch) -> None:
        """This run's environment for one test (COVIDCT_HOME, tracking on, the allowlist, the weights)."""
        use_env(monkeypatch, self.env)


def use_env(monkeypatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for var in ("MLFLOW_TRACKING_URI", "AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TASK_ID",
                "AIRFLOW_CTX_TRY_NUMBER"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)


def train_once(root: Path, data_source: Path) -> TrainedRun:
    from airflow.sdk.listener import get_listener_manager

    from covidct.core import paths
    from covidct.lifecycle import registry, runs
    from covidct.orchestration.local.runner import TaskProgress
    from support.dags import fresh
    from support.weights import write_weights

    weights = write_weights(root / "weights", BACKBONES)
    home = root / "home"
    env = {"COVIDCT_HOME": str(home), "COVIDCT_TRACKING": "on", "COVIDCT_ALLOWED_SOURCES": str(data_source),
           "COVIDCT_WEIGHTS_DIR": str(weights)}  # fmt: skip
    conf = {"data_source": str(data_source), "weights": "imagenet", "expect_covid": 12, "expect_noncovid": 12,
            "seed": SEED}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        use_env(mp, env)
        dag = fresh(DAG_ID)
        progress = TaskProgress(io.StringIO())  # the cause of each failed task, as `make run` shows it
        get_listener_manager().add_listener(progress)
        try:
            dagrun = dag.test(run_conf=conf)
        finally:
            get_listener_manager().pm.unregister(progress)
        state = home / "state" / "last-successful-run.json"
        version = registry.champion_version()
        return TrainedRun(
            home=home, data_source=data_source, weights_dir=weights, conf=conf, env=env, run_id=dagrun.run_id,
            run_dir=paths.run_dir(dagrun.run_id),
            states={ti.task_id: ti.state for ti in dagrun.get_task_instances()}, errors=dict(progress.errors),
            last_success=json.loads(state.read_text()) if state.is_file() else None,
            parent_run_id=runs.parent_run(DAG_ID, dagrun.run_id),
            champion_version=None if version is None else str(version.version),
        )  # fmt: skip
