"""The model registry: the registered model ``covid-ct`` and its ``champion`` alias, what the product serves.

- ``REGISTERED_MODEL`` / ``CHAMPION_ALIAS``: the names in MLflow's registry (the tracking URI of
  ``covidct.lifecycle.store.tracking_uri()``: ``MLFLOW_TRACKING_URI``, else the embedded SQLite store).
- its Airflow Asset (``covidct.orchestration.assets.CHAMPION_ASSET``) gets an event whenever a new
  champion is promoted.
- ``champion(dest)``: the current champion, downloaded under ``dest`` as a local covidct model
  folder that ``covidct.inference.predict.predict(model_dir, images)`` uses as it is (a backbone's saved
  ``PipelineModel`` folder, or an ensemble folder); None while there is no champion.

A backbone's version is the Spark-flavour model its train job logged (``sparkml/`` is the
PipelineModel folder); the ensemble's is a pyfunc model holding the ensemble folder as the
artifact ``ensemble`` (``covidct.lifecycle.pyfunc.EnsembleModel``: also usable with ``mlflow.pyfunc.load_model``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from covidct.core.errors import CovidctError
from covidct.lifecycle import store

log = logging.getLogger(__name__)

REGISTERED_MODEL = "covid-ct"
CHAMPION_ALIAS = "champion"
#: Marks a complete download under ``dest`` (a reused download must be whole).
_COMPLETE = ".covidct-complete"


@dataclass(frozen=True)
class Champion:
    name: str  # the registered model
    version: str
    model_dir: Path  # a local covidct model folder: PipelineModel folder or ensemble folder
    tags: dict = field(default_factory=dict)  # the version's tags (covidct.*: what it is, its gate numbers)
    run_id: str | None = None  # the MLflow run that logged it

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


def champion_version(mlflow_client=None):
    """The registry's champion ``ModelVersion``, or None when there is none (or no registered model)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = mlflow_client or store.client()
    try:
        return mlflow_client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        # A server with MLflow's login (the compose stack) answers 403, not 404, for a model that does
        # not exist, to users other than its admin: no champion when a search does not find the model.
        if exc.error_code == "PERMISSION_DENIED" and not mlflow_client.search_registered_models(
            filter_string=f"name = '{REGISTERED_MODEL}'"
        ):
            return None
        raise


def find_model_dir(root: Path) -> Path:
    """The covidct model folder inside a downloaded MLflow model."""
    root = Path(root)
    if (root / "sparkml" / "metadata").is_dir():
        return root / "sparkml"
    manifests = sorted(root.glob("artifacts/*/ensemble.json")) or sorted(root.rglob("ensemble.json"))
    if manifests:
        return manifests[0].parent
    if (root / "metadata").is_dir():
        return root
    raise CovidctError(f"{root} holds no covidct model (no sparkml/ PipelineModel, no ensemble.json)")


def champion(dest: str | Path) -> Champion | None:
    """The current champion, downloaded under ``dest`` (reused when that version is there already)."""
    from covidct.core.atomic import atomic_dir

    mlflow_client = store.client()
    version = champion_version(mlflow_client)
    if version is None:
        return None
    folder = Path(dest).expanduser().absolute() / f"{REGISTERED_MODEL}-v{version.version}"
    if not (folder / _COMPLETE).is_file():
        import mlflow.artifacts

        with atomic_dir(folder, what="champion download") as staging:
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{REGISTERED_MODEL}/{version.version}", dst_path=str(staging)
            )
            (staging / _COMPLETE).write_text(f"{REGISTERED_MODEL} {version.version}\n")
        log.info("downloaded champion %s v%s into %s", REGISTERED_MODEL, version.version, folder)
    return Champion(REGISTERED_MODEL, str(version.version), find_model_dir(folder), dict(version.tags or {}),
                    version.run_id)  # fmt: skip


def register(model_uri: str, tags: dict[str, str], mlflow_client=None) -> str:
    """Register ``model_uri`` as a new version of ``covid-ct`` with ``tags``; returns the version."""
    import mlflow

    mlflow_client = mlflow_client or store.client()
    version = mlflow.register_model(model_uri, REGISTERED_MODEL, tags={k: str(v) for k, v in tags.items()})
    return str(version.version)


def set_champion(version: str, mlflow_client=None) -> None:
    mlflow_client = mlflow_client or store.client()
    mlflow_client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION_ALIAS, str(version))
    log.info("%s@%s is now version %s", REGISTERED_MODEL, CHAMPION_ALIAS, version)
