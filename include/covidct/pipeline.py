"""What the Airflow DAG's Python tasks do (the DAG file only wires these together).

Every function here is a plain library call, testable without Airflow.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from covidct import paths
from covidct.backbone import get_backbone
from covidct.errors import CovidctError

log = logging.getLogger(__name__)

#: The study's three backbones: one Spark job (task ``train_<name>``) each.
DAG_BACKBONES = ("VGG16", "VGG19", "Xception")
FAILED_STATES = {"failed", "upstream_failed"}


def train_task_id(backbone: str) -> str:
    return f"train_{get_backbone(backbone).name.lower()}"


def fetch_dataset(source: str | None, expected_covid: int, expected_noncovid: int) -> str:
    """Fetch into ``$COVIDCT_HOME/data/COVID-CT`` (a no-op when unchanged); returns the folder.

    Data that fail validation are never published: the previous good copy stays.
    """
    from covidct.fetch import fetch

    source = source or os.environ.get("COVIDCT_DATA_SOURCE") or None
    result = fetch(paths.data_dir(), source=source, expected_covid=expected_covid, expected_noncovid=expected_noncovid)
    log.info("%s", result.summary())
    return str(paths.data_dir())


def validate_dataset(data_dir: str, expected_covid: int, expected_noncovid: int) -> None:
    """Great Expectations gate: raises CovidctError naming every failed expectation."""
    from covidct.validate import validate

    result = validate(data_dir, expected_covid=expected_covid, expected_noncovid=expected_noncovid)
    log.info("%s", result.summary())
    if not result.success:
        raise CovidctError(result.summary())


def select_backbones(backbones: list[str], pooling: str = "avg") -> list[str]:
    """The train task ids of the backbones chosen in the trigger form (the rest are skipped).

    Fails before any Spark job when a chosen backbone lacks the pooling (multi-layer poolings
    exist only for backbones with conv blocks 3-5 in the backbone table).
    """
    chosen = [train_task_id(b) for b in backbones]
    unknown = sorted(set(chosen) - {train_task_id(b) for b in DAG_BACKBONES})
    if not chosen or unknown:
        raise CovidctError(f"choose one or more of {', '.join(DAG_BACKBONES)} (got {backbones})")
    for backbone in backbones:
        get_backbone(backbone).check_pooling(pooling)
    return chosen


def failures_from_states(states: dict[str, str | None], backbones: list[str]) -> dict[str, str]:
    """``{backbone: reason}`` for the chosen backbones whose train task did not succeed."""
    failures = {}
    for backbone in backbones:
        task_id = train_task_id(backbone)
        state = states.get(task_id)
        if state in FAILED_STATES:
            failures[get_backbone(backbone).name] = f"task {task_id} {state}; see its log"
    return failures


def build_run_report(run_dir: str, backbones: list[str], states: dict[str, str | None]) -> str:
    """Compare the run's backbones, naming those that failed; returns the HTML report's path.

    Fails (without retries: nothing would change) when no chosen backbone succeeded.
    """
    from covidct.report import build_report

    if not any(states.get(train_task_id(b)) == "success" for b in backbones):
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"no backbone succeeded (train task states: {states}); nothing to compare")
    failures = failures_from_states(states, backbones)
    report = build_report([Path(run_dir)], expected_backbones=list(backbones), failures=failures)
    log.info("report: %s (markdown: %s)", report.html, report.markdown)
    return str(report.html)
