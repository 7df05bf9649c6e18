"""MLflow tracking: one parent run per DAG run, one child run per train job, the ensemble and the report.

Where runs go (``tracking_uri()``)::

    MLFLOW_TRACKING_URI set     that server or store (the compose stack: its ``mlflow`` service)
    else (embedded default)     sqlite:///$COVIDCT_HOME/mlflow/mlflow.db,
                                artifacts in $COVIDCT_HOME/mlflow/artifacts   (``make mlflow-ui`` shows them)

Runs of the DAG live in the experiment ``covid-ct`` (``COVIDCT_MLFLOW_EXPERIMENT``):

- the **parent run** of a DAG run (tags ``airflow.dag_id``, ``airflow.run_id``; the trigger
  params as params), created by ``select_backbones`` and found again by every later task by
  those tags; the report task logs the report into it, the promote task its decision;
- one **child run per train job** (``train_vgg16``...): params (backbone, splits, seeds, weights
  id, pooling, precision, LR params), per-split metrics named as in ``metrics.json``
  (``official/accuracy``...), timings, each split's ``metrics.json`` and its ``PipelineModel``
  logged with MLflow's Spark flavour (``mlflow.spark.load_model`` loads it back);
- a child run for the **ensemble**: its metrics and the saved ensemble folder as a pyfunc model.

Inside Airflow the runs are tied to the DAG run without any DAG wiring: Airflow exports
``AIRFLOW_CTX_DAG_ID``, ``AIRFLOW_CTX_DAG_RUN_ID``, ``AIRFLOW_CTX_TASK_ID`` and
``AIRFLOW_CTX_TRY_NUMBER`` to a task's process before it runs, and ``spark-submit`` (so the
job's driver) inherits them. ``covidct train`` run by hand logs a run of its own.
``COVIDCT_TRACKING=off`` turns all of it off.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidct import paths

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

TRACKING_ENV = "COVIDCT_TRACKING"
EXPERIMENT_ENV = "COVIDCT_MLFLOW_EXPERIMENT"
EXPERIMENT = "covid-ct"
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
#: Logged with every model: what loading it needs (no inference of requirements: that
#: imports the model in a subprocess, seconds per model).
PIP_REQUIREMENTS = ("covid-ct-pipelines", "pyspark==4.2.0", "tensorflow-cpu==2.21.0")


def enabled() -> bool:
    """False when ``COVIDCT_TRACKING`` is off/0/false/no."""
    return os.environ.get(TRACKING_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def mlflow_dir() -> Path:
    return paths.home() / "mlflow"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the embedded SQLite store under ``$COVIDCT_HOME/mlflow``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{mlflow_dir() / 'mlflow.db'}"


def artifact_root() -> str | None:
    """Where new experiments keep artifacts with the embedded store (None: the server decides)."""
    if os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        return None
    return (mlflow_dir() / "artifacts").as_uri()


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV, "").strip() or EXPERIMENT


def _quiet() -> None:
    # Before mlflow is imported: no usage telemetry to the internet, no git probing of the cwd.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def client() -> MlflowClient:
    """An MlflowClient on ``tracking_uri()``; the fluent API is pointed there too."""
    _quiet()
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        mlflow_dir().mkdir(parents=True, exist_ok=True)
    import mlflow

    # MLflow's set_tracking_uri also exports MLFLOW_TRACKING_URI to this process's environment: put the
    # environment back, so that our own default never passes for a user's setting (a later COVIDCT_HOME,
    # the embedded artifact root); child processes compute the same default themselves.
    before = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(mlflow_client: MlflowClient) -> str:
    """The id of the experiment, created (with the embedded artifact root) on first use."""
    from mlflow.exceptions import MlflowException

    name = experiment_name()
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_root())
    except MlflowException:  # another process created it meanwhile
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def airflow_context(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The ``airflow.*`` tags of the Airflow task this process runs for (empty outside Airflow)."""
    environ = os.environ if environ is None else environ
    found = {tag: environ[var] for tag, var in _AIRFLOW_ENV.items() if environ.get(var)}
    return found if TAG_RUN_ID in found and TAG_DAG_ID in found else {}


# --------------------------------------------------------------------------- the parent run


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
        _log_params(mlflow_client, created, {f"dag.{k}": v for k, v in params.items()})
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


# --------------------------------------------------------------------------- logging helpers


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:6000]  # MLflow's limit on a param value


def _log_params(mlflow_client: MlflowClient, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(str(k), _param_value(v)) for k, v in params.items() if v is not None]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params
        mlflow_client.log_batch(run_id, params=items[i : i + 100])


def _log_metrics(mlflow_client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
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


def _child_tags(kind: str, name: str, parent: str | None) -> dict[str, str]:
    tags = {TAG_KIND: kind, "mlflow.runName": name, **airflow_context()}
    if parent:
        tags[PARENT_TAG] = parent
    return tags


def log_train(config, results: dict[str, dict], models: dict, targets: dict[str, Path], staging: Path) -> Logged:
    """The train job's child run: params, per-split metrics, metrics.json files and Spark models.

    ``models``: split -> the fitted ``PipelineModel``; ``targets``: split -> its output folder
    (inside ``staging``, the job's unpublished output, where Spark writes the models' temporary
    copies so that executors on other machines can write them too).
    """
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
    with mlflow.start_run(experiment_id=exp, run_name=name, tags=_child_tags("train", name, parent)) as run:
        run_id = run.info.run_id
        _log_params(mlflow_client, run_id, params)
        _log_metrics(mlflow_client, run_id, metrics)
        seeds = staging / "random70-seeds" / "seeds.json"
        if seeds.is_file():
            _log_seeds(mlflow_client, run_id, json.loads(seeds.read_text(encoding="utf-8")))
            mlflow_client.log_artifact(run_id, str(seeds), "random70-seeds")
        try:
            for split, target in targets.items():
                mlflow_client.log_artifact(run_id, str(target / "metrics.json"), split)
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


def write_info(folder: Path, logged: Logged) -> None:
    from covidct.atomic import write_text_atomic

    write_text_atomic(Path(folder) / INFO_FILE, json.dumps(logged.to_json(), indent=2, sort_keys=True) + "\n")


def log_ensemble(ensemble_dir: Path, splits: dict[str, dict[str, dict]]) -> Logged | None:
    """The ensemble's child run: its metrics per split and method, and the ensemble folder as a pyfunc model."""
    context = airflow_context()
    if not enabled() or not context:  # the DAG's ensemble task (`covidct ensemble` by hand logs nothing)
        return None
    started = time.monotonic()
    mlflow_client = client()
    import mlflow
    import mlflow.pyfunc

    from covidct.pyfunc import EnsembleModel

    exp = experiment_id(mlflow_client)
    parent = parent_run(context[TAG_DAG_ID], context[TAG_RUN_ID], mlflow_client=mlflow_client)
    manifest = json.loads((Path(ensemble_dir) / "ensemble.json").read_text(encoding="utf-8"))
    metrics: dict[str, float] = {}
    for split, methods in splits.items():
        for method, m in methods.items():
            metrics.update(split_metrics(f"{split}/{method}", m))
    with mlflow.start_run(
        experiment_id=exp, run_name="ensemble", tags=_child_tags("ensemble", "ensemble", parent)
    ) as run:
        run_id = run.info.run_id
        _log_params(mlflow_client, run_id, {
            "method": manifest.get("method"),
            "threshold": manifest.get("threshold"),
            "members": ",".join(m["backbone"] for m in manifest.get("members", [])),
            "weights_id": "+".join(str(m.get("weights_id")) for m in manifest.get("members", [])),
            "random_weights": manifest.get("random_weights"),
            "trained_on_split": manifest.get("trained_on_split"),
        })  # fmt: skip
        _log_metrics(mlflow_client, run_id, metrics)
        mlflow_client.log_artifact(run_id, str(Path(ensemble_dir) / "ensemble.json"))
        info = mlflow.pyfunc.log_model(
            name="model-ensemble",
            python_model=EnsembleModel(),
            artifacts={"ensemble": str(ensemble_dir)},
            pip_requirements=list(PIP_REQUIREMENTS),
        )
    logged = Logged(run_id, exp, tracking_uri(), parent, {"ensemble": info.model_uri}, time.monotonic() - started)
    log.info("MLflow run %s (ensemble; parent %s) in %.1f s", run_id, parent, logged.seconds)
    return logged


# --------------------------------------------------------------------------- the report


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


def log_report(report_dir: Path) -> dict | None:
    """In the report task: add the MLflow runs to the report, then log the report folder into the parent run."""
    if not enabled() or not airflow_context():
        return None
    from covidct.report import append_section

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


# --------------------------------------------------------------------------- make mlflow-ui

UI_PORT_ENV = "COVIDCT_MLFLOW_UI_PORT"
DEFAULT_UI_PORT = 5000
#: ``mlflow server`` without MLflow 3's job runner (huey consumer processes for GenAI jobs, unused here);
#: docker-compose.yml's mlflow service sets the same.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def ui_command(host: str = "127.0.0.1", port: int | None = None) -> list[str]:
    """``mlflow server`` on the tracking store (the embedded default, or ``MLFLOW_TRACKING_URI``'s)."""
    import sys

    port = port or int(os.environ.get(UI_PORT_ENV) or DEFAULT_UI_PORT)
    uri = tracking_uri()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",  # a UI for one person: one worker process is plenty
    ]
    root = artifact_root()
    if root:  # experiments record their artifact folder; this is for new ones created in the UI
        command += ["--default-artifact-root", root]
    return command


def ui(host: str = "127.0.0.1", port: int | None = None) -> int:
    """Run the MLflow UI in the foreground, on 127.0.0.1 only; Ctrl-C (or SIGTERM) stops it and its workers."""
    import signal
    import subprocess

    _quiet()
    if not os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        mlflow_dir().mkdir(parents=True, exist_ok=True)
    command = ui_command(host, port)
    url = f"http://{host}:{command[command.index('--port') + 1]}"
    print(f"MLflow UI: {url} (runs in {tracking_uri()}). Ctrl-C stops it.", flush=True)

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    proc = subprocess.Popen(command, start_new_session=True, env={**os.environ, **SERVER_ENV})
    try:
        return proc.wait()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the server and its workers: one process group
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=20)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            _wait_group_empty(proc.pid, 10.0)
        print("MLflow UI stopped.", flush=True)
        return 0


def _wait_group_empty(pgid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m covidct.tracking", description="MLflow helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ui", help="the MLflow UI on the tracking store (127.0.0.1)")
    p.add_argument("--port", type=int, help=f"default ${UI_PORT_ENV}, else {DEFAULT_UI_PORT}")
    sub.add_parser("uri", help="print the tracking URI")
    args = parser.parse_args(argv)
    if args.command == "uri":
        print(tracking_uri())
        return 0
    return ui(port=args.port)


if __name__ == "__main__":
    raise SystemExit(main())
