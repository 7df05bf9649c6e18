"""Retrain on change: a fingerprint of what determines a model, and the last successful run's.

A run's fingerprint is the sha256 of a canonical JSON of its components:

- ``dataset``: the manifest's ``relpath, label, sha256`` of every image and the sha256 of each
  official split list (``covidct.data.manifest.dataset_digest``);
- ``params``: the DAG params, except those that cannot change a model (``NOT_MODEL_PARAMS``);
- ``weights``: the weights identity of each chosen backbone (the file's sha256, or ``random-seedN``);
- ``preprocessing``: ``covidct.data.image.preprocessing_id`` of the ``view`` and ``flips`` params;
- ``code``: the sha256 of the ``covidct`` package's files, and the versions of the libraries that
  compute features and fits (Spark, TensorFlow, Keras, scikit-learn, NumPy, Pillow).

The last successful run is recorded in ``$COVIDCT_HOME/state/last-successful-run.json``, written
only by ``record_last_success`` (the DAG's last task, after every other task of the run succeeded),
atomically (``covidct.core.atomic``) and under a lock (``covidct.core.locks``), so readers see a whole
record and two runs finishing at once write one after the other. A run whose fingerprint equals
that record's, and whose outputs are still there, is ``unchanged``: it does not retrain unless
forced. Each run also keeps its own fingerprint and decision in ``RUN_DIR/fingerprint.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from covidct.core import paths
from covidct.core.atomic import atomic_dir, write_text_atomic
from covidct.core.errors import CovidctError
from covidct.core.locks import locked
from covidct.core.versions import code_version
from covidct.data.body import FULL
from covidct.data.image import preprocessing_id
from covidct.data.manifest import dataset_digest, load_manifest
from covidct.features.backbone import get_backbone, weights_identity
from covidct.reporting.rendering import render

log = logging.getLogger(__name__)

#: Trigger params that cannot change a model, left out of the fingerprint: ``force`` itself;
#: ``feature_cache`` (cached features equal computed ones: the cache is keyed by weights, pooling,
#: precision and preprocessing); ``data_source`` and the expected counts (where the data come from
#: and the gate they passed: the data themselves are in the ``dataset`` component).
NOT_MODEL_PARAMS = frozenset(
    {"force", "feature_cache", "data_source", "expect_covid", "expect_noncovid", "near_duplicates"}
)
STATE_NAME = "last-successful-run.json"
RUN_FILE = "fingerprint.json"
COMPONENTS = ("dataset", "params", "weights", "preprocessing", "code")


@dataclass(frozen=True)
class Fingerprint:
    digest: str  # sha256 of the canonical JSON of ``components``
    components: dict
    complete: bool = True  # False: a part could not be known (e.g. weights not downloaded yet)

    @classmethod
    def of(cls, components: dict, complete: bool = True) -> Fingerprint:
        return cls(hashlib.sha256(_canonical(components).encode()).hexdigest(), components, complete)

    def differences(self, other: Mapping) -> list[str]:
        """What differs from another fingerprint's components, in a few words each."""
        found = []
        for name in COMPONENTS:
            mine, theirs = self.components.get(name), other.get(name)
            if mine == theirs:
                continue
            if isinstance(mine, dict) and isinstance(theirs, dict) and name in ("params", "weights"):
                keys = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
                found.append(f"{name} ({', '.join(f'{k}: {theirs.get(k)!r} -> {mine.get(k)!r}' for k in keys)})")
            else:
                found.append(name)
        return found


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reason: str  # one line, for logs, the report and `make run`
    since: dict | None = None  # the last successful run's record, when there is one


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def model_params(params: Mapping) -> dict:
    """The params that can change a model, as plain JSON values."""
    return {key: json.loads(_canonical(params[key])) for key in sorted(params) if key not in NOT_MODEL_PARAMS}


def compute(data_dir: str | Path, params: Mapping) -> Fingerprint:
    """The fingerprint of a run on ``data_dir`` with the trigger ``params``.

    Weights are never downloaded here: a backbone whose weights file is not on this machine yet
    makes the fingerprint incomplete (the run retrains; its train job downloads them).
    """
    manifest = load_manifest(data_dir)
    weights, complete = {}, True
    chosen, seed = params.get("weights"), params.get("seed", 0)
    for name in params.get("backbones") or ():
        backbone = get_backbone(name)
        try:
            weights[backbone.name] = weights_identity(backbone, chosen, seed, download=False)
        except CovidctError as exc:
            weights[backbone.name], complete = f"unknown ({str(exc).splitlines()[0][:200]})", False
    components = {
        "dataset": dataset_digest(data_dir, manifest),
        "params": model_params(params),
        "weights": weights,
        "preprocessing": preprocessing_id(params.get("view") or FULL, bool(params.get("flips"))),
        "code": code_version(),
    }
    return Fingerprint.of(components, complete)


# --------------------------------------------------------------------------- the last successful run


def state_path() -> Path:
    return paths.home() / "state" / STATE_NAME


def last_success() -> dict | None:
    """The last successful run's record, or None (none yet, or unreadable: then the run retrains)."""
    path = state_path()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s): retraining as if no run had succeeded", path, exc)
        return None
    if not isinstance(record, dict) or not {"run_id", "fingerprint", "components"} <= record.keys():
        log.warning("%s is not a covidct record: retraining as if no run had succeeded", path)
        return None
    return record


def decide_retrain(fingerprint: Fingerprint, force: bool = False, last: dict | None = None) -> RetrainDecision:
    """Retrain or not, and why (one line)."""
    last = last_success() if last is None else last
    since = f"run {last['run_id']}" if last else None
    if last is None:
        changed = "no successful run recorded yet"
    elif not fingerprint.complete:
        changed = f"changed since {since}: the weights are not on this machine yet"
    elif fingerprint.digest != last["fingerprint"]:
        changed = f"changed since {since}: {', '.join(fingerprint.differences(last['components'])) or 'fingerprint'}"
    elif not _outputs_exist(last):
        changed = f"unchanged since {since}, but its outputs are gone ({last.get('report')})"
    else:
        changed = None
    if force:
        why = changed or f"unchanged since {since}"
        return RetrainDecision(True, f"retraining: param force is set ({why})", last)
    if changed:
        return RetrainDecision(True, f"retraining: {changed}", last)
    return RetrainDecision(
        False,
        f"unchanged since {since} (succeeded {last.get('recorded_at', '?')}): same dataset, params, weights, "
        f"preprocessing and code; training skipped, its models and report stand (param force retrains)",
        last,
    )


def _outputs_exist(record: dict) -> bool:
    report = record.get("report")
    return bool(report) and Path(report).is_file()


def record_last_success(run_id: str, run_dir: str | Path, report: str | Path) -> dict:
    """Record ``run_id`` (whose ``RUN_DIR/fingerprint.json`` holds its fingerprint) as the last success.

    Call only when the whole run succeeded. Atomic, and one writer at a time.
    """
    run_dir = Path(run_dir)
    own = read_run_fingerprint(run_dir)
    if own is None:
        raise CovidctError(f"{run_dir / RUN_FILE} is missing or unreadable: the run's fingerprint is unknown")
    if not own.get("complete", True):
        raise CovidctError("the run's fingerprint was incomplete (weights unknown when it started); not recorded")
    record = {
        "run_id": run_id,
        "run_dir": str(run_dir),
        "report": str(report),
        "fingerprint": own["fingerprint"],
        "components": own["components"],
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path, what="record of the last successful run", wait=60):
        write_text_atomic(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    log.info("recorded run %s as the last successful run (fingerprint %s) in %s", run_id, own["fingerprint"][:12],
             path)  # fmt: skip
    return record


# --------------------------------------------------------------------------- a run's own files


def write_run_fingerprint(run_dir: str | Path, fingerprint: Fingerprint, decision: RetrainDecision) -> Path:
    """``RUN_DIR/fingerprint.json``: this run's fingerprint and decision (atomic)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    since = decision.since or {}
    payload = {
        "fingerprint": fingerprint.digest,
        "complete": fingerprint.complete,
        "components": fingerprint.components,
        "retrain": decision.retrain,
        "reason": decision.reason,
        "since_run": since.get("run_id"),
        "since_report": since.get("report"),
    }
    path = run_dir / RUN_FILE
    write_text_atomic(path, json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return path


def read_run_fingerprint(run_dir: str | Path) -> dict | None:
    try:
        payload = json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def write_unchanged_report(run_dir: str | Path, decision: RetrainDecision) -> Path:
    """``RUN_DIR/report/``: what an unchanged run shows as its result (it trains nothing)."""
    since = decision.since or {}
    data = {"reason": decision.reason, "since_run": since.get("run_id"), "since_report": since.get("report"),
            "since_run_dir": since.get("run_dir"), "recorded_at": since.get("recorded_at")}  # fmt: skip
    out = Path(run_dir) / "report"
    with atomic_dir(out, what="report") as staging:
        for name in ("report.html", "report.md"):
            (staging / name).write_text(render(f"unchanged.{name.split('.')[1]}.j2", data), encoding="utf-8")
        (staging / "summary.json").write_text(json.dumps({"unchanged": True, **data}, indent=1) + "\n")
    return out / "report.html"
