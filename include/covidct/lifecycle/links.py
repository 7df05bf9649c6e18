"""Links into the MLflow UI: a run's page, and the runs of a DAG run (the report's MLflow section)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from covidct.lifecycle.runs import PARENT_TAG, TAG_KIND
from covidct.lifecycle.store import client, tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient


def ui_url() -> str | None:
    """The MLflow UI's base URL when the tracking URI is a server, else None (embedded: ``make mlflow-ui``)."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return os.environ.get("COVIDCT_MLFLOW_UI_URL", "").strip() or uri.rstrip("/")
    return os.environ.get("COVIDCT_MLFLOW_UI_URL", "").strip() or None


def run_url(experiment: str, run_id: str) -> str | None:
    base = ui_url()
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}" if base else None


def runs_of(parent: str, mlflow_client: MlflowClient | None = None) -> list[dict]:
    """The parent run and its children: ``name, run_id, kind, url`` each (the report's links)."""
    mlflow_client = mlflow_client or client()
    run = mlflow_client.get_run(parent)
    exp = run.info.experiment_id
    children = mlflow_client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'", max_results=100)
    rows = []
    for r in [run, *sorted(children, key=lambda c: c.info.run_name or "")]:
        rows.append({
            "name": r.info.run_name,
            "run_id": r.info.run_id,
            "kind": r.data.tags.get(TAG_KIND, ""),
            "url": run_url(exp, r.info.run_id),
        })  # fmt: skip
    return rows
