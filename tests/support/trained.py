"""The session's one trained DAG run: what the whole-DAG, MLflow/promotion and registry tests read.

``conftest.trained_run`` runs the transfer-learning DAG once with ``dag.test()`` (real spark-submit
per backbone): the three backbones on both splits of the synthetic dataset, stand-in ImageNet
weights files (so the gate promotes, and the report has a gallery), MLflow tracking on in an
embedded store under its own COVIDCT_HOME. Tests read what it left; a test that runs more DAG
runs in its home calls :meth:`TrainedRun.use` first, and must not change what others read
(its data, its records of success, the registry's champion) — see each user.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAG_ID = "covid_ct_transfer_learning"
BACKBONES = ("VGG16", "VGG19", "Xception")
SEED = 5


@dataclass
class TrainedRun:
    home: Path
    data_source: Path
    weights_dir: Path
    conf: dict
    run_id: str
    states: dict[str, str]
    errors: dict[str, str]
    #: ``state/last-successful-run.json`` right after the run (later runs in this home may move it).
    last_success: dict | None
    #: tracking.client()'s experiment, the DAG run's parent run, the champion's version, right after it.
    parent_run_id: str | None = None
    champion_version: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.home / "runs" / self.run_dir_name

    @property
    def run_dir_name(self) -> str:
        from covidct import paths

        return paths.run_dir(self.run_id).name

    def use(self, monkeypatch) -> None:
        """This run's environment for one test (COVIDCT_HOME, tracking on, the allowlist, the weights)."""
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        for var in ("MLFLOW_TRACKING_URI", "AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TASK_ID",
                    "AIRFLOW_CTX_TRY_NUMBER"):  # fmt: skip
            monkeypatch.delenv(var, raising=False)


def train_once(root: Path, data_source: Path) -> TrainedRun:
    from airflow.sdk.listener import get_listener_manager

    from covidct.localstack import TaskProgress
    from support.dags import fresh
    from support.weights import write_weights

    weights = write_weights(root / "weights", BACKBONES)
    home = root / "home"
    env = {"COVIDCT_HOME": str(home), "COVIDCT_TRACKING": "on", "COVIDCT_ALLOWED_SOURCES": str(data_source),
           "COVIDCT_WEIGHTS_DIR": str(weights)}  # fmt: skip
    conf = {"data_source": str(data_source), "weights": "imagenet", "expect_covid": 12, "expect_noncovid": 12,
            "seed": SEED}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        run = TrainedRun(home, data_source, weights, conf, "", {}, {}, None, env=env)
        run.use(mp)
        dag = fresh(DAG_ID)
        progress = TaskProgress(io.StringIO())  # the cause of each failed task, as `make run` shows it
        get_listener_manager().add_listener(progress)
        try:
            dagrun = dag.test(run_conf=conf)
        finally:
            get_listener_manager().pm.unregister(progress)
        run.run_id = dagrun.run_id
        run.states = {ti.task_id: ti.state for ti in dagrun.get_task_instances()}
        run.errors = dict(progress.errors)
        state = home / "state" / "last-successful-run.json"
        run.last_success = json.loads(state.read_text()) if state.is_file() else None
        from covidct import registry, tracking

        run.parent_run_id = tracking.parent_run(DAG_ID, dagrun.run_id)
        version = registry.champion_version()
        run.champion_version = None if version is None else str(version.version)
    return run
