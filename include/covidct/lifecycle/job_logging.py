"""Logging the train job and the report into MLflow (``covidct.lifecycle.runs`` holds the runs they go to).

- a train job's **child run** (``train_vgg16``...): params (backbone, splits, seeds, weights id,
  pooling, precision, LR params), per-split metrics named as in ``metrics.json``
  (``official/accuracy``...), timings, each split's ``metrics.json`` and its ``PipelineModel``
  logged with MLflow's Spark flavour (``mlflow.spark.load_model`` loads it back);
- the **report**: the MLflow runs of the DAG run added to it as a section, then the report folder
  logged into the parent run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from covidct.lifecycle.links import runs_of, ui_url
from covidct.lifecycle.runs import (
    METRIC_NAMES,
    TAG_DAG_ID,
    TAG_RUN_ID,
    TAG_TASK_ID,
    Logged,
    airflow_context,
    child_tags,
    current_parent,
    log_metrics,
    log_params,
    parent_run,
    set_tags,
    split_metrics,
    write_info,
)
from covidct.lifecycle.store import client, enabled, experiment_id, experiment_name, tracking_uri
from covidct.modelling.runfolder import METRICS, SEEDS, SEEDS_DIR
from covidct.reporting.sections import append_section

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from covidct.modelling.train import TrainedJob

log = logging.getLogger(__name__)

#: Logged with every model: what loading it needs (no inference of requirements: that
#: imports the model in a subprocess, seconds per model).
PIP_REQUIREMENTS = ("covid-ct-pipelines", "pyspark==4.2.0", "tensorflow-cpu==2.21.0")


def log_train(job: TrainedJob) -> Logged:
    """The train job's child run: params, per-split metrics, metrics.json files and Spark models.

    Spark writes the models' temporary copies inside ``job.staging`` (the job's unpublished
    output), so that executors on other machines can write them too.
    """
    config, results, models, targets, staging = job.config, job.results, job.models, job.targets, job.staging
    started = time.monotonic()
    mlflow_client = client()
    import mlflow
    import mlflow.spark

    exp = experiment_id(mlflow_client)
    context = airflow_context()
    parent = parent_run(context[TAG_DAG_ID], context[TAG_RUN_ID], mlflow_client=mlflow_client) if context else None
    first = next(iter(results.values()))
    params = {
        "backbone": first["backbone"],
        "splits": ",".join(results),
        "seed": config.seed,
        "seeds": ",".join(str(s) for s in config.seeds) if config.seeds else None,
        "weights": config.weights,
        "weights_id": first["weights_id"],
        "random_weights": first["random_weights"],
        "pooling": config.pooling,
        "precision": config.precision,
        "feature_dim": first.get("feature_dim"),
        "batch_size": config.batch_size,
        "lr.maxIter": config.max_iter,
        "lr.regParam": config.reg_param,
        "lr.elasticNetParam": config.elastic_net_param,
        "stack_folds": config.stack_folds,
        "feature_cache": "on" if config.cache_dir else "off",
        "n_images": first.get("n_images"),
        "data_dir": first.get("data_dir"),
    }
    metrics: dict[str, float] = {}
    for split, m in results.items():
        metrics.update(split_metrics(split, m))
    timings = first.get("timings") or {}
    metrics.update({f"timings/{k}": timings[k] for k in ("featurize_s", "total_s") if k in timings})
    cache = first.get("cache") or {}
    metrics.update({f"cache/{k}": cache[k] for k in ("hits", "misses") if k in cache})
    name = f"{first['backbone']}" + (f" ({context[TAG_TASK_ID]})" if TAG_TASK_ID in context else "")
    logged_models: dict[str, str] = {}
    with mlflow.start_run(experiment_id=exp, run_name=name, tags=child_tags("train", name, parent)) as run:
        run_id = run.info.run_id
        log_params(mlflow_client, run_id, params)
        log_metrics(mlflow_client, run_id, metrics)
        seeds = staging / SEEDS_DIR / SEEDS
        if seeds.is_file():
            _log_seeds(mlflow_client, run_id, json.loads(seeds.read_text(encoding="utf-8")))
            mlflow_client.log_artifact(run_id, str(seeds), SEEDS_DIR)
        try:
            for split, target in targets.items():
                mlflow_client.log_artifact(run_id, str(target / METRICS), split)
                info = mlflow.spark.log_model(
                    models[split],
                    f"model-{split}",
                    dfs_tmpdir=str(staging / ".mlflow-dfs"),  # beside the outputs: executors elsewhere reach it
                    pip_requirements=list(PIP_REQUIREMENTS),
                )
                logged_models[split] = info.model_uri
        finally:
            shutil.rmtree(staging / ".mlflow-dfs", ignore_errors=True)
    logged = Logged(run_id, exp, tracking_uri(), parent, logged_models, time.monotonic() - started)
    log.info("MLflow run %s (%s; parent %s): %d models logged in %.1f s", run_id, tracking_uri(), parent,
             len(logged_models), logged.seconds)  # fmt: skip
    return logged


def _log_seeds(mlflow_client: MlflowClient, run_id: str, summary: dict) -> None:
    """Per-seed random70 metrics as steps (step = seed) of ``random70-seeds/<metric>``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = []
    for row in summary.get("runs", []):
        for name in METRIC_NAMES:
            value = row.get(name)
            if isinstance(value, int | float) and value == value:
                items.append(Metric(f"random70-seeds/{name}", float(value), now, int(row["seed"])))
    for i in range(0, len(items), 1000):
        mlflow_client.log_batch(run_id, metrics=items[i : i + 1000])


def record_train(job: TrainedJob) -> None:
    """``train``'s ``before_publish`` hook: log the job's run, then write ``mlflow.json`` into its output."""
    write_info(job.staging, log_train(job))


def log_report(report_dir: Path) -> dict | None:
    """In the report task: add the MLflow runs to the report, then log the report folder into the parent run."""
    if not enabled() or not airflow_context():
        return None
    mlflow_client = client()
    parent = current_parent()
    runs = runs_of(parent, mlflow_client)
    data = {"tracking_uri": tracking_uri(), "experiment": experiment_name(), "parent_run_id": parent, "runs": runs,
            "ui_hint": None if ui_url() else "make mlflow-ui (http://127.0.0.1:5000)"}  # fmt: skip
    append_section(Path(report_dir), "mlflow", "mlflow", data)
    log_report_files(Path(report_dir), parent, mlflow_client)
    set_tags(parent, {"covidct.report": str(Path(report_dir) / "report.html")}, mlflow_client)
    return data


def log_report_files(report_dir: Path, parent: str, mlflow_client: MlflowClient | None = None) -> None:
    mlflow_client = mlflow_client or client()
    mlflow_client.log_artifacts(parent, str(report_dir), "report")
