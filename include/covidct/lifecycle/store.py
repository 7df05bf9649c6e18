"""Where MLflow runs go, and the client every covidct module talks to MLflow through.

Where runs go (``tracking_uri()``)::

    MLFLOW_TRACKING_URI set     that server or store (the compose stack: its ``mlflow`` service)
    else (embedded default)     sqlite:///$COVIDCT_HOME/mlflow/mlflow.db,
                                artifacts in $COVIDCT_HOME/mlflow/artifacts   (``make mlflow-ui`` shows them)

Runs of the DAG live in the experiment ``covid-ct`` (``COVIDCT_MLFLOW_EXPERIMENT``).
``COVIDCT_TRACKING=off`` turns all tracking off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from covidct.core import paths

if TYPE_CHECKING:
    from mlflow import MlflowClient

TRACKING_ENV = "COVIDCT_TRACKING"

EXPERIMENT_ENV = "COVIDCT_MLFLOW_EXPERIMENT"

EXPERIMENT = "covid-ct"


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


def quiet() -> None:
    # Before mlflow is imported: no usage telemetry to the internet, no git probing of the cwd.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def client() -> MlflowClient:
    """An MlflowClient on ``tracking_uri()``; the fluent API is pointed there too."""
    quiet()
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
