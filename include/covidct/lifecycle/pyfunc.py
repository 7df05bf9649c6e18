"""The saved ensemble as an MLflow pyfunc model (how the registry holds an ensemble champion).

``log_ensemble`` logs the ensemble task's child run with the ensemble folder as the artifact
``ensemble`` of an ``EnsembleModel``; ``covidct.lifecycle.registry.champion`` hands that folder to
``covidct.inference.predict``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from mlflow.pyfunc import PythonModel

from covidct.lifecycle.job_logging import PIP_REQUIREMENTS
from covidct.lifecycle.runs import (
    TAG_DAG_ID,
    TAG_RUN_ID,
    Logged,
    airflow_context,
    child_tags,
    log_metrics,
    log_params,
    parent_run,
    split_metrics,
    write_info,
)
from covidct.lifecycle.store import client, enabled, experiment_id, tracking_uri
from covidct.modelling.ensemble_format import MANIFEST

log = logging.getLogger(__name__)


class EnsembleModel(PythonModel):
    """``predict`` takes a DataFrame with a ``path`` column (image files or folders) and returns
    ``path, probability, prediction`` per image (``covidct.inference.predict`` on the ensemble folder)."""

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from covidct.inference.predict import predict

        folder = Path(context.artifacts["ensemble"])
        rows = []
        for path in list(pd.DataFrame(model_input)["path"]):
            rows += [{k: r[k] for k in ("path", "probability", "prediction")} for r in predict(folder, path)]
        return pd.DataFrame(rows)


def log_ensemble(ensemble_dir: Path, splits: dict[str, dict[str, dict]]) -> Logged | None:
    """The ensemble's child run: its metrics per split and method, and the ensemble folder as a pyfunc model."""
    context = airflow_context()
    if not enabled() or not context:  # the DAG's ensemble task (`covidct ensemble` by hand logs nothing)
        return None
    started = time.monotonic()
    mlflow_client = client()
    import mlflow
    import mlflow.pyfunc

    exp = experiment_id(mlflow_client)
    parent = parent_run(context[TAG_DAG_ID], context[TAG_RUN_ID], mlflow_client=mlflow_client)
    manifest = json.loads((Path(ensemble_dir) / MANIFEST).read_text(encoding="utf-8"))
    metrics: dict[str, float] = {}
    for split, methods in splits.items():
        for method, m in methods.items():
            metrics.update(split_metrics(f"{split}/{method}", m))
    with mlflow.start_run(
        experiment_id=exp, run_name="ensemble", tags=child_tags("ensemble", "ensemble", parent)
    ) as run:
        run_id = run.info.run_id
        log_params(mlflow_client, run_id, {
            "method": manifest.get("method"),
            "threshold": manifest.get("threshold"),
            "members": ",".join(m["backbone"] for m in manifest.get("members", [])),
            "weights_id": "+".join(str(m.get("weights_id")) for m in manifest.get("members", [])),
            "random_weights": manifest.get("random_weights"),
            "trained_on_split": manifest.get("trained_on_split"),
        })  # fmt: skip
        log_metrics(mlflow_client, run_id, metrics)
        mlflow_client.log_artifact(run_id, str(Path(ensemble_dir) / MANIFEST))
        info = mlflow.pyfunc.log_model(
            name="model-ensemble",
            python_model=EnsembleModel(),
            artifacts={"ensemble": str(ensemble_dir)},
            pip_requirements=list(PIP_REQUIREMENTS),
        )
    logged = Logged(run_id, exp, tracking_uri(), parent, {"ensemble": info.model_uri}, time.monotonic() - started)
    log.info("MLflow run %s (ensemble; parent %s) in %.1f s", run_id, parent, logged.seconds)
    return logged


def record_ensemble(ensemble_dir: Path, splits: dict[str, dict[str, dict]]) -> Logged | None:
    """Log the ensemble's run (in an Airflow task, tracking on) and write ``mlflow.json`` into its folder."""
    logged = log_ensemble(ensemble_dir, splits)
    if logged is not None:
        write_info(ensemble_dir, logged)
    return logged
