"""Where things live: one work area (``COVIDCT_HOME``) holding data, runs and the feature cache.

    $COVIDCT_HOME/data/COVID-CT         the fetched, validated dataset
    $COVIDCT_HOME/runs/<run id>/...     one folder per pipeline run (never shared by two runs)
    $COVIDCT_HOME/feature-cache/        cached features ($COVIDCT_CACHE_DIR overrides)
    $COVIDCT_HOME/gallery-cache/        the report's galleries of maps, reused for the same models and images
    $COVIDCT_HOME/cues/                 the report's shortcut cues per image (``covidct.data.cues``), per dataset
    $COVIDCT_HOME/incoming/             new scans the scoring DAG scores ($COVIDCT_INCOMING_DIR overrides)
    $COVIDCT_HOME/scores/<run id>/...   one folder per scoring run; scores/_ledger/: what each model version scored

``make run`` uses the project's ``var/``; the docker-compose stack ``/opt/covidct/var``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HOME_ENV = "COVIDCT_HOME"
INCOMING_ENV = "COVIDCT_INCOMING_DIR"


def home() -> Path:
    value = os.environ.get(HOME_ENV)
    return Path(value).expanduser().absolute() if value else Path.home() / "covidct"


def data_dir() -> Path:
    return home() / "data" / "COVID-CT"


def runs_dir() -> Path:
    return home() / "runs"


def safe_name(value: str) -> str:
    """A path component for any run id (Airflow's hold ':' and '+', which Hadoop paths reject)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("._")
    if not cleaned:
        raise ValueError(f"cannot make a folder name of {value!r}")
    return cleaned


def run_dir(run_id: str) -> Path:
    """The folder of one pipeline run: ``$COVIDCT_HOME/runs/<run id made path-safe>``."""
    return runs_dir() / safe_name(run_id)


def scores_dir() -> Path:
    """Where the scoring DAG writes: ``scores/<run id>/`` per run, ``scores/_ledger/`` (what was scored)."""
    return home() / "scores"


def run_scores_dir(run_id: str) -> Path:
    """One scoring run's folder: ``$COVIDCT_HOME/scores/<run id made path-safe>``."""
    return scores_dir() / safe_name(run_id)


def ledger_dir() -> Path:
    """What each model version scored: ``$COVIDCT_HOME/scores/_ledger`` (no ``safe_name`` starts with ``_``)."""
    return scores_dir() / "_ledger"


def incoming_dir() -> Path:
    """The folder of new scans the scoring DAG scores by default: ``$COVIDCT_INCOMING_DIR``, else ``incoming/``."""
    value = os.environ.get(INCOMING_ENV)
    return Path(value).expanduser().absolute() if value else home() / "incoming"
