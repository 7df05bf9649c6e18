"""MLflow runs of a DAG run: one parent run per DAG run, child runs under it, and what a job logged.

- the **parent run** of a DAG run (tags ``airflow.dag_id``, ``airflow.run_id``; the trigger
  params as params), created by ``select_backbones`` and found again by every later task by
  those tags; the report task logs the report into it, the promote task its decision;
- **child runs** (``mlflow.parentRunId``): one per train job and one for the ensemble
  (``covidct.lifecycle.job_logging``, ``covidct.lifecycle.pyfunc``).

Inside Airflow the runs are tied to the DAG run without any DAG wiring: Airflow exports
``AIRFLOW_CTX_DAG_ID``, ``AIRFLOW_CTX_DAG_RUN_ID``, ``AIRFLOW_CTX_TASK_ID`` and
``AIRFLOW_CTX_TRY_NUMBER`` to a task's process before it runs, and ``spark-submit`` (so the
job's driver) inherits them. ``covidct train`` run by hand logs a run of its own.

A job writes what it logged (``Logged``) as ``mlflow.json`` beside its outputs (``write_info``):
the promotion gate finds the models to register there.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidct.core.atomic import write_text_atomic
from covidct.lifecycle.store import client, enabled, experiment_id, tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

#: What a job writes beside its outputs: the MLflow run and models it logged.
INFO_FILE = "mlflow.json"
TAG_DAG_ID = "airflow.dag_id"
TAG_RUN_ID = "airflow.run_id"
TAG_TASK_ID = "airflow.task_id"
TAG_TRY = "airflow.try_number"
TAG_KIND = "covidct.kind"  # dag_run | train | ensemble
PARENT_TAG = "mlflow.parentRunId"
_AIRFLOW_ENV = {
    TAG_DAG_ID: "AIRFLOW_CTX_DAG_ID",
    TAG_RUN_ID: "AIRFLOW_CTX_DAG_RUN_ID",
    TAG_TASK_ID: "AIRFLOW_CTX_TASK_ID",
    TAG_TRY: "AIRFLOW_CTX_TRY_NUMBER",
}


def airflow_context(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The ``airflow.*`` tags of the Airflow task this process runs for (empty outside Airflow)."""
    environ = os.environ if environ is None else environ
    found = {tag: environ[var] for tag, var in _AIRFLOW_ENV.items() if environ.get(var)}
    return found if TAG_RUN_ID in found and TAG_DAG_ID in found else {}


def _parents(mlflow_client: MlflowClient, exp: str, dag_id: str, run_id: str) -> list:
    def quoted(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    query = (
        f"tags.`{TAG_KIND}` = 'dag_run' and tags.`{TAG_DAG_ID}` = {quoted(dag_id)} "
        f"and tags.`{TAG_RUN_ID}` = {quoted(run_id)}"
    )
    runs = mlflow_client.search_runs([exp], filter_string=query, max_results=50)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def parent_run(dag_id: str, run_id: str, params: dict | None = None, mlflow_client: MlflowClient | None = None) -> str:
    """The MLflow run id of the DAG run's parent run, created on first use (params: the trigger params).

    Concurrent creators converge: each looks again after creating, keeps the earliest and
    deletes its own duplicate.
    """
    mlflow_client = mlflow_client or client()
    exp = experiment_id(mlflow_client)
    found = _parents(mlflow_client, exp, dag_id, run_id)
    if found:
        return found[0].info.run_id
    tags = {TAG_KIND: "dag_run", TAG_DAG_ID: dag_id, TAG_RUN_ID: run_id, "mlflow.runName": f"{dag_id} {run_id}"}
    created = mlflow_client.create_run(exp, tags=tags, run_name=f"{dag_id} {run_id}").info.run_id
    if params:
        log_params(mlflow_client, created, {f"dag.{k}": v for k, v in params.items()})
    first = _parents(mlflow_client, exp, dag_id, run_id)[0].info.run_id
    if first != created:
        mlflow_client.delete_run(created)
    log.info("MLflow parent run %s for %s %s (%s)", first, dag_id, run_id, tracking_uri())
    return first


def start_dag_run(params: dict | None = None) -> str | None:
    """In an Airflow task: make sure the DAG run's parent run exists (None outside Airflow or when off)."""
    context = airflow_context()
    if not enabled() or not context:
        return None
    return parent_run(context[TAG_DAG_ID], context[TAG_RUN_ID], params)


def current_parent() -> str | None:
    """The parent run of the DAG run this process works for (None outside Airflow or when off)."""
    return start_dag_run()


def finish_dag_run(status: str = "FINISHED") -> None:
    run = current_parent()
    if run is not None:
        client().set_terminated(run, status)


#: On a failed DAG run's parent run (and its children left running): the failed task(s) it ended on.
TAG_FAILED_TASKS = "covidct.failed_tasks"


def fail_dag_run(dag_id: str, run_id: str, failed_tasks: list[str], mlflow_client: MlflowClient | None = None) -> list:
    """A failed DAG run leaves no MLflow run open: its parent run ends FAILED (also when ``promote`` had
    finished it: the DAG run failed after), and every child still RUNNING ends FAILED; each is tagged with
    the failed tasks. Returns the run ids ended (empty when tracking is off or the run made no parent)."""
    if not enabled():
        return []
    mlflow_client = mlflow_client or client()
    exp = experiment_id(mlflow_client)
    named = ", ".join(failed_tasks) or "unknown (the run failed or timed out)"
    ended = []
    for parent in _parents(mlflow_client, exp, dag_id, run_id):
        query = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.status = 'RUNNING'"
        for run in [*mlflow_client.search_runs([exp], filter_string=query, max_results=100), parent]:
            mlflow_client.set_tag(run.info.run_id, TAG_FAILED_TASKS, named)
            mlflow_client.set_terminated(run.info.run_id, "FAILED")
            ended.append(run.info.run_id)
    if ended:
        log.info("MLflow runs %s ended FAILED: %s %s failed in %s", ", ".join(ended), dag_id, run_id, named)
    return ended


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:6000]  # MLflow's limit on a param value


def log_params(mlflow_client: MlflowClient, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(str(k), _param_value(v)) for k, v in params.items() if v is not None]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params
        mlflow_client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(mlflow_client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float) and v == v]
    for i in range(0, len(items), 1000):
        mlflow_client.log_batch(run_id, metrics=items[i : i + 1000])


def set_tags(run_id: str, tags: dict[str, Any], mlflow_client: MlflowClient | None = None) -> None:
    from mlflow.entities import RunTag

    mlflow_client = mlflow_client or client()
    mlflow_client.log_batch(run_id, tags=[RunTag(k, _param_value(v)) for k, v in tags.items() if v is not None])


METRIC_NAMES = ("accuracy", "weightedPrecision", "weightedRecall", "f1", "auc", "sensitivity", "specificity")


def split_metrics(split: str, metrics: dict) -> dict[str, float]:
    """``{split}/{name}`` for the metrics, counts, confusion and timings of one split's metrics.json."""
    out = {f"{split}/{name}": metrics.get(name) for name in METRIC_NAMES}
    out.update({f"{split}/{k}": metrics.get(k) for k in ("n_train", "n_test")})
    out.update({f"{split}/confusion_{k}": v for k, v in (metrics.get("confusion") or {}).items()})
    out.update({f"{split}/timings/{k}": v for k, v in (metrics.get("timings") or {}).items()})
    return {k: v for k, v in out.items() if isinstance(v, int | float) and not isinstance(v, bool)}


@dataclass
class Logged:
    """What a job logged: written to ``INFO_FILE`` beside its outputs."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    parent_run_id: str | None
    models: dict[str, str]  # split (or "ensemble") -> model URI (models:/m-...)
    seconds: float

    def to_json(self) -> dict:
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "tracking_uri": self.tracking_uri,
            "parent_run_id": self.parent_run_id,
            "models": self.models,
            "seconds": round(self.seconds, 3),
        }


def read_info(folder: Path) -> dict | None:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write_info(folder: Path, logged: Logged) -> None:
    write_text_atomic(Path(folder) / INFO_FILE, json.dumps(logged.to_json(), indent=2, sort_keys=True) + "\n")


def child_tags(kind: str, name: str, parent: str | None) -> dict[str, str]:
    tags = {TAG_KIND: kind, "mlflow.runName": name, **airflow_context()}
    if parent:
        tags[PARENT_TAG] = parent
    return tags
