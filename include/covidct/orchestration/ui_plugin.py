"""The covidct pages inside the Airflow UI, behind Airflow's own login: an Airflow plugin.

Airflow 3's api-server mounts this FastAPI app at ``/covidct`` (the package's ``airflow.plugins``
entry point, so ``make ui`` and the compose stack load it with nothing to copy):

    /covidct/runs                              the transfer-learning runs with a report, their headline figures
    /covidct/runs/<run id>/report/<file>       a run's report: report.html, its figures, the gallery's maps
    /covidct/scores/<run id>/                  a scoring run: its counts and files
    /covidct/scores/<run id>/<file>            predictions.csv, series.csv, summary.json ...
    /covidct/dag-runs/<dag id>/<run id>        what the "Report" tab of a DAG run opens (redirects to one above)

and two views in the UI itself: "COVID-CT runs" in the navigation, a "Report" tab on every DAG run
(both frame the pages above). Every page needs an Airflow login that may read that DAG's runs (the
UI's session cookie, or a bearer token): an anonymous request gets HTTP 401, never a report. A run
id becomes a folder only through ``paths.safe_name`` (no ``/``, no leading dot) and a file only through
``catalog.confined_file`` (inside the folder after ``..`` and symbolic links are resolved): anything
else is a 404.

The train, report, promote and scoring tasks link here, or to MLflow and Spark, from the task's own
page (``covidct.orchestration.operator_links``).
"""

from __future__ import annotations

from urllib.parse import quote

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from covidct.core import paths
from covidct.orchestration.operator_links import PAGES_PREFIX
from covidct.reporting import catalog
from covidct.reporting.rendering import environment

TRAINING_DAG_ID = "covid_ct_transfer_learning"
SCORING_DAG_ID = "covid_ct_scoring"
#: A scoring run's files the page lists (what covidct.lifecycle.scoring writes).
SCORING_FILES = ("predictions.csv", "predictions.parquet", "series.csv", "series.parquet", "unreadable.csv",
                 "summary.json")  # fmt: skip
#: Served as what they are; never run by the browser as something else.
HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}

can_read_training = Depends(requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=TRAINING_DAG_ID))
can_read_scoring = Depends(requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=SCORING_DAG_ID))

app = FastAPI(title="covidct", docs_url=None, redoc_url=None, openapi_url=None)


def folder_of(root, run_id: str):
    """The run's folder under ``root``; 404 for an id that names none (``paths.safe_name`` refuses it)."""
    try:
        return root / paths.safe_name(run_id)
    except ValueError:
        raise HTTPException(404, "no such run") from None


def served(root, relative: str) -> FileResponse:
    found = catalog.confined_file(root, relative)
    if found is None:
        raise HTTPException(404, "no such file")
    return FileResponse(found, headers=HEADERS)


def page(template: str, **data) -> HTMLResponse:
    return HTMLResponse(environment("html").get_template(template).render(**data), headers=HEADERS)


def base(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


@app.get("/runs", dependencies=[can_read_training])
def runs(request: Request) -> HTMLResponse:
    root = paths.runs_dir()
    return page("catalog_runs.html.j2", runs=catalog.list_runs(root), runs_root=str(root), dag_id=TRAINING_DAG_ID,
                base=base(request))  # fmt: skip


@app.get("/runs/{run_id}/report/{file_path:path}", dependencies=[can_read_training])
def report_file(run_id: str, file_path: str) -> FileResponse:
    return served(folder_of(paths.runs_dir(), run_id) / catalog.REPORT_FOLDER, file_path)


@app.get("/scores/{run_id}/", dependencies=[can_read_scoring])
def scoring_run(request: Request, run_id: str) -> HTMLResponse:
    folder = folder_of(paths.scores_dir(), run_id)
    summary = catalog.read_scoring_summary(folder)
    files = [name for name in SCORING_FILES if catalog.confined_file(folder, name)]
    return page("catalog_scoring.html.j2", run=folder.name, summary=summary, files=files, base=base(request))


@app.get("/scores/{run_id}/{file_path:path}", dependencies=[can_read_scoring])
def scoring_file(run_id: str, file_path: str) -> FileResponse:
    return served(folder_of(paths.scores_dir(), run_id), file_path)


@app.get("/dag-runs/{dag_id}/{run_id}", dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))])
def dag_run(request: Request, dag_id: str, run_id: str) -> RedirectResponse:
    """The DAG run tab: the run's report (training) or its scores (scoring)."""
    if dag_id == TRAINING_DAG_ID:
        target = f"/runs/{quote(folder_of(paths.runs_dir(), run_id).name)}/report/report.html"
    elif dag_id == SCORING_DAG_ID:
        target = f"/scores/{quote(folder_of(paths.scores_dir(), run_id).name)}/"
    else:
        raise HTTPException(404, "covidct has no page for this DAG")
    return RedirectResponse(base(request) + target, status_code=303)


class CovidctPlugin(AirflowPlugin):
    name = "covidct"
    fastapi_apps = [{"app": app, "url_prefix": PAGES_PREFIX, "name": "covidct reports and scores"}]
    external_views = [
        {"name": "COVID-CT runs", "href": f"{PAGES_PREFIX}/runs", "destination": "nav", "url_route": "covidct-runs"},
        {"name": "Report", "href": PAGES_PREFIX + "/dag-runs/{DAG_ID}/{RUN_ID}", "destination": "dag_run",
         "url_route": "covidct-report"},
    ]  # fmt: skip
