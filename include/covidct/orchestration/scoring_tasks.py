"""What the scoring DAG's Python tasks do (``dags/covid_ct_scoring.py`` only wires them).

The scoring job itself (``covidct.lifecycle.scoring``) runs in the spark-submit task; these run
before it in the Airflow worker: the ``folder`` param held to the operator's allowlist, and the
champion downloaded from the registry.
"""

from __future__ import annotations

import logging
from pathlib import Path

from covidct.core import paths
from covidct.core.errors import CovidctError
from covidct.lifecycle import registry
from covidct.orchestration.policy import Policy, PolicyError
from covidct.orchestration.retries import fail_now, retry_only_transient

log = logging.getLogger(__name__)


def check_folder_param(folder: str | None) -> str:
    """The ``folder`` trigger param held to the operator's allowlist; returns the resolved folder.

    Empty: the operator's incoming folder (created if missing, so that a run a new champion
    triggers scores nothing rather than fails). A folder not allowed, or missing, fails the task
    at once, without retries, naming the setting to change.
    """
    try:
        resolved = Path(Policy.from_env().check_folder(folder))
    except PolicyError as exc:
        raise fail_now(f"refused trigger params: {exc}") from None
    if not folder or not str(folder).strip():
        resolved.mkdir(parents=True, exist_ok=True)
    elif not resolved.is_dir():
        raise fail_now(f"folder of scans {resolved} does not exist (or is not a folder)")
    return str(resolved)


def resolve_champion(dest: Path | None = None) -> dict[str, str]:
    """The registered model's champion, downloaded under ``dest``: ``{name, version, model_dir}``.

    No champion yet fails at once (no retries: only a promotion creates one); a registry that
    cannot be reached is left to the task's retries.
    """
    with retry_only_transient():
        found = registry.champion(Path(dest) if dest else paths.scores_dir() / "_champions")
        if found is None:
            raise CovidctError(
                f"no champion model yet: registered model {registry.REGISTERED_MODEL!r} has no "
                f"{registry.CHAMPION_ALIAS!r} alias. The covid_ct_transfer_learning DAG's promote task sets it; "
                "this DAG then runs by itself"
            )
    log.info("champion: %s version %s (%s)", found.name, found.version, found.model_dir)
    return {"name": found.name, "version": str(found.version), "model_dir": str(found.model_dir)}
