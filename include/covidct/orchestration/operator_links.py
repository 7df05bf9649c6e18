"""The Airflow UI's extra links: from a task's page to its MLflow run, Spark application, report, model version
or scores.

Airflow 3 builds an operator's extra links in the task's own process when the task ends (success or
failure) and keeps them as XComs, which the UI reads. Each link here is built from what the task
recorded, never guessed:

- train tasks: "MLflow run" from the job's ``mlflow.json`` (``covidct.lifecycle.runs``) and "Spark
  application" from the ``spark`` field of its ``metrics.json``, both in its output folder (the
  ``--out`` argument, rendered);
- ``report``: "Report", the run's ``report/report.html`` on the covidct pages of the Airflow UI
  (``covidct.orchestration.ui_plugin``);
- ``promote``: "Model version", the registered version its ``promotion.json`` names (only when it promoted);
- the scoring task: "Scores" (its run's page) and "Spark application" (from its ``summary.json``).

A task that wrote nothing (it failed, or never ran) gets no link; nor does an application whose UI ended
with it (``local[*]``: only a cluster's master keeps a page per application).

Where the pages are: the MLflow UI at ``COVIDCT_MLFLOW_UI_URL`` (``covidct.lifecycle.links``; the compose
stack sets it, ``make ui`` points it at ``make mlflow-ui``'s address), the Spark master's UI at
``COVIDCT_SPARK_UI_URL``, else port 8080 of the master's host (``spark://host:7077``), the Airflow UI at
``AIRFLOW__API__BASE_URL`` (else localhost on ``AIRFLOW__API__PORT``); set them where a site serves them
behind a proxy.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseOperatorLink

from covidct.core import paths
from covidct.lifecycle.links import run_url, ui_url
from covidct.lifecycle.registry import REGISTERED_MODEL
from covidct.lifecycle.runs import read_info

log = logging.getLogger(__name__)

SPARK_UI_ENV = "COVIDCT_SPARK_UI_URL"
#: Where the api-server mounts the covidct pages (covidct.orchestration.ui_plugin).
PAGES_PREFIX = "/covidct"
DECISION_FILE = "promotion.json"  # covidct.lifecycle.promotion's (not imported: it loads pandas and numpy)
SPARK_MASTER_UI_PORT = 8080
#: Where a job records its Spark application: the train job per split, the scoring job once.
RECORDS = ("metrics.json", "summary.json")


def job_out(operator) -> Path | None:
    """The job's output folder: the value after ``--out`` in its (rendered) arguments."""
    args = [str(a) for a in (getattr(operator, "application_args", None) or [])]
    if "--out" in args[:-1]:
        return Path(args[args.index("--out") + 1])
    return None


def recorded_application(out: Path) -> dict | None:
    """``{"application_id", "master"}`` as the job recorded it in ``out`` (one split's record is enough)."""
    for name in RECORDS:
        for path in [out / name, *sorted(out.glob(f"*/{name}"))]:
            try:
                spark = json.loads(path.read_text(encoding="utf-8")).get("spark")
            except (OSError, ValueError):
                continue
            if isinstance(spark, dict) and spark.get("application_id"):
                return spark
    return None


def application_url(application_id: str, master: str) -> str | None:
    """The application's page on its standalone master's UI; None where no UI outlives the job."""
    if not master.startswith("spark://"):
        return None  # local[*]: its UI ended with the driver; YARN and Kubernetes: not served here
    base = os.environ.get(SPARK_UI_ENV, "").strip()
    if not base:
        host = urlsplit(master.split(",")[0]).hostname
        if not host:
            return None
        base = f"http://{host}:{SPARK_MASTER_UI_PORT}"
    return f"{base.rstrip('/')}/app/?appId={quote(application_id)}"


class MlflowRunLink(BaseOperatorLink):
    """The train job's MLflow run (a child of the DAG run's parent run)."""

    name = "MLflow run"

    def get_link(self, operator, *, ti_key) -> str:
        out = job_out(operator)
        info = read_info(out) if out is not None and out.is_dir() else None
        url = run_url(info["experiment_id"], info["run_id"]) if info else None
        return url or ""


class SparkApplicationLink(BaseOperatorLink):
    """The job's Spark application on the cluster's master UI."""

    name = "Spark application"

    def get_link(self, operator, *, ti_key) -> str:
        out = job_out(operator)
        app = recorded_application(out) if out is not None and out.is_dir() else None
        url = application_url(str(app["application_id"]), str(app.get("master", ""))) if app else None
        return url or ""


def airflow_base_url() -> str:
    """Where a browser reaches the Airflow api-server: ``[api] base_url``, else localhost on its port."""
    base = os.environ.get("AIRFLOW__API__BASE_URL", "").strip()
    return (base or f"http://localhost:{os.environ.get('AIRFLOW__API__PORT') or 8080}").rstrip("/")


def report_page(run_id: str) -> str:
    return f"{airflow_base_url()}{PAGES_PREFIX}/runs/{quote(paths.safe_name(run_id))}/report/report.html"


def scores_page(run_id: str) -> str:
    return f"{airflow_base_url()}{PAGES_PREFIX}/scores/{quote(paths.safe_name(run_id))}/"


class ReportLink(BaseOperatorLink):
    """The run's report, inside the Airflow UI (behind its login)."""

    name = "Report"

    def get_link(self, operator, *, ti_key) -> str:
        written = (paths.run_dir(ti_key.run_id) / "report" / "report.html").is_file()
        return report_page(ti_key.run_id) if written else ""


class ModelVersionLink(BaseOperatorLink):
    """The registered model version the promote task made champion (none when it kept the champion)."""

    name = "Model version"

    def get_link(self, operator, *, ti_key) -> str:
        try:
            decision = json.loads((paths.run_dir(ti_key.run_id) / DECISION_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return ""
        base, version = ui_url(), decision.get("version")
        if not (decision.get("promoted") and version and base):
            return ""
        return f"{base.rstrip('/')}/#/models/{quote(REGISTERED_MODEL)}/versions/{quote(str(version))}"


class ScoresLink(BaseOperatorLink):
    """The scoring run's page: its counts and files (predictions, series, unreadable ones)."""

    name = "Scores"

    def get_link(self, operator, *, ti_key) -> str:
        written = (paths.run_scores_dir(ti_key.run_id) / "summary.json").is_file()
        return scores_page(ti_key.run_id) if written else ""
