"""What the covidct pages of the Airflow UI show: the runs that have a report, their headline figures, the
scoring runs, and files resolved strictly inside their own folder.

Only reads what the tasks wrote (``report/summary.json``, a scoring run's ``summary.json``); never a
stack trace for a folder that is half there: a run whose summary cannot be read is listed without
figures. ``confined_file`` is the one way a requested path becomes a file: it must lie inside the
folder after every symbolic link and ``..`` is resolved.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

REPORT_FOLDER, REPORT_SUMMARY = "report", "summary.json"
#: Which metrics the run list shows for each split's best row.
HEADLINE_METRICS = ("accuracy", "auc")


@dataclass
class Headline:
    split: str  # the split's title
    label: str  # the best row (highest accuracy): a backbone or an ensemble
    accuracy: float | None
    auc: float | None


@dataclass
class RunEntry:
    folder: str  # the run folder's name (paths.safe_name of the run id)
    modified: str  # when the report was written (UTC, ISO)
    headlines: list[Headline] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    random_weights: bool = False
    problem: str | None = None  # why no figures are shown


def _value(metrics: dict, key: str) -> float | None:
    cell = (metrics or {}).get(key)
    value = cell.get("value") if isinstance(cell, dict) else cell
    return float(value) if isinstance(value, int | float) else None


def read_entry(run: Path) -> RunEntry:
    """One run folder's line in the list, from its ``report/summary.json``."""
    path = run / REPORT_FOLDER / REPORT_SUMMARY
    modified = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")
    entry = RunEntry(folder=run.name, modified=modified)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        entry.problem = f"its summary cannot be read ({type(exc).__name__})"
        return entry
    for split in (summary.get("splits") or {}).values():
        rows = [r for r in split.get("rows") or [] if _value(r.get("metrics"), "accuracy") is not None]
        if rows:
            best = max(rows, key=lambda r: _value(r["metrics"], "accuracy"))
            entry.headlines.append(
                Headline(
                    split.get("title", ""),
                    best.get("label", ""),
                    *(_value(best["metrics"], k) for k in HEADLINE_METRICS),
                )
            )
    entry.failures = {str(k): str(v) for k, v in (summary.get("failures") or {}).items()}
    entry.random_weights = bool(summary.get("random_weights"))
    return entry


def list_runs(runs_root: Path) -> list[RunEntry]:
    """The runs under ``runs_root`` that have a report, the newest first."""
    if not runs_root.is_dir():
        return []
    found = [
        run
        for run in runs_root.iterdir()
        if not run.name.startswith((".", "_")) and (run / REPORT_FOLDER / REPORT_SUMMARY).is_file()
    ]
    found.sort(key=lambda run: (run / REPORT_FOLDER / REPORT_SUMMARY).stat().st_mtime, reverse=True)
    return [read_entry(run) for run in found]


def read_scoring_summary(folder: Path) -> dict | None:
    """A scoring run's ``summary.json`` (counts, model, folder), None when it is missing or unreadable."""
    try:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def confined_file(root: Path, relative: str) -> Path | None:
    """``root/relative`` when that is a file really inside ``root`` (``..`` and symbolic links resolved),
    else None: an absolute path, a way out through ``..`` or a link, a folder, a missing file."""
    if not relative or "\x00" in relative:
        return None
    try:
        base = root.resolve(strict=True)
        target = (base / relative).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a link loop
        return None
    if base not in target.parents or not target.is_file():
        return None
    return target
