"""Scoring new scans with a model (the champion), in Spark, each image once per model version.

    $COVIDCT_HOME/scores/<run id>/predictions.parquet   path, sha256, model_name, model_version, probability,
                                  predictions.csv       label, new, scored_run, scored_at (every readable file)
                                  series.parquet, .csv  one row per DICOM series (covidct.inference.series)
                                  unreadable.csv        path, reason (files that could not be scored)
                                  summary.json          counts, model, folder, timings, DICOM window and notice
    $COVIDCT_HOME/scores/_ledger/<model name>/<model version>/part-*.parquet   what that version scored

DICOM CT files are scored slice by slice (``covidct.data.dicom``); their rows add the DICOM columns
(keyed hashes of the UIDs, technical tags, the window; never patient data).

The ledger makes scoring idempotent: an image (by the sha256 of its bytes, whatever its name), or a
DICOM slice (by the keyed hash of its SOP instance UID, frame and window: a re-export is the same
slice), already scored by the same model version is not scored again; its row in the run's output
comes from the ledger (``new`` false, ``scored_run`` the run that scored it). A new model
version scores everything again. Writers of one version's ledger take turns (``covidct.core.locks``,
held from reading the ledger to the last write), so two runs never score an image twice; each
ledger part and each run folder is published whole (``covidct.core.atomic``). Unreadable files are
listed with the reason and do not stop the rest; a folder whose every file is unreadable is an
error. Run folder names come from ``paths.safe_name``, which never starts with ``_``: no run id
can name the ledger.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from covidct.core import paths
from covidct.core.atomic import atomic_dir, atomic_file
from covidct.core.errors import CovidctError
from covidct.core.locks import DEFAULT_WAIT, locked
from covidct.core.session import application, get_spark
from covidct.data.dataset import LABEL_NAMES
from covidct.data.dicom import DICOM_PREPROCESSING, NOTICE, Window
from covidct.inference import predict
from covidct.inference.files import DICOM_COLUMNS, DICOM_DTYPES, listing, read_images
from covidct.inference.series import RULE, series_table
from covidct.modelling.ensemble_format import read_model
from covidct.modelling.evaluate import THRESHOLD

log = logging.getLogger(__name__)

COLUMNS = ["path", "sha256", "model_name", "model_version", "probability", "label", "new", "scored_run", "scored_at",
           *DICOM_COLUMNS]  # fmt: skip
LEDGER_COLUMNS = ["sha256", "probability", "label", "model_name", "model_version", "path", "scored_run", "scored_at"]


@dataclass
class ScoreConfig:
    images: Path
    model_dir: Path
    model_name: str
    model_version: str
    out: Path
    ledger: Path | None = None  # None: $COVIDCT_HOME/scores/_ledger
    strict: bool = False
    lock_wait: float = DEFAULT_WAIT
    window: Window | str | None = None  # DICOM slices: "LEVEL,WIDTH" in HU (default: the lung window)
    confine_to: tuple[Path, ...] | None = None  # files must really lie in these (symbolic links re-checked)

    def __post_init__(self) -> None:
        self.window = self.window if isinstance(self.window, Window) else Window.parse(self.window)
        self.images = Path(self.images).expanduser()
        self.model_dir = Path(self.model_dir).expanduser()
        self.out = Path(self.out).expanduser()
        self.ledger = Path(self.ledger).expanduser() if self.ledger else paths.ledger_dir()
        self.model_name, self.model_version = str(self.model_name).strip(), str(self.model_version).strip()
        if not self.model_name or not self.model_version:
            raise CovidctError("a model name and a model version are required (they key the ledger)")


class Ledger:
    """What one model version has scored: Parquet parts keyed by the images' sha256."""

    def __init__(self, root: Path, model_name: str, model_version: str):
        self.folder = Path(root) / paths.safe_name(model_name) / paths.safe_name(model_version)

    def lookup(self, shas: set[str]) -> pd.DataFrame:
        """The ledger's rows for these images (one per sha256: the first scoring)."""
        parts = sorted(self.folder.glob("part-*.parquet")) if self.folder.is_dir() else []
        if not parts or not shas:
            return pd.DataFrame(columns=LEDGER_COLUMNS)
        table = ds.dataset([str(p) for p in parts], format="parquet").to_table(
            filter=ds.field("sha256").isin(sorted(shas))
        )
        found = table.to_pandas().sort_values("scored_at", kind="stable")
        return found.drop_duplicates("sha256").reset_index(drop=True)

    def append(self, rows: pd.DataFrame) -> Path | None:
        """One new part, published whole (written hidden, then renamed); None when there is nothing to add."""
        if rows.empty:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        part = self.folder / f"part-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        with atomic_file(part, what="scoring job") as tmp:
            pq.write_table(pa.Table.from_pandas(rows[LEDGER_COLUMNS], preserve_index=False), tmp)
        return part


def score_folder(config: ScoreConfig, spark=None) -> dict:
    """Score the new images of ``config.images``; writes ``config.out`` and the ledger; returns the summary."""
    started = time.monotonic()
    manifest = read_model(config.model_dir)
    if not config.images.is_dir():
        raise CovidctError(f"folder of scans {config.images} does not exist (or is not a folder)")
    ledger = Ledger(config.ledger, config.model_name, config.model_version)
    run = config.out.name
    with locked(ledger.folder, what="scoring job", wait=config.lock_wait):
        spark = spark or get_spark("covidct-score")
        files = read_images(spark, config.images, config.window, config.confine_to)
        try:
            for u in files.unreadable:
                log.warning("unreadable, not scored: %s: %s", u.path, u.reason)
            if config.strict and files.unreadable:
                raise CovidctError(f"{len(files.unreadable)} of {files.n_files} files cannot be scored (strict): "
                                   f"{listing(files.unreadable)}")  # fmt: skip
            if files.n_files and not files.n_readable:
                raise CovidctError(f"none of the {files.n_files} files in {config.images} could be scored: "
                                   f"{listing(files.unreadable)}")  # fmt: skip
            found = {r.path: r.sha256 for r in files.frame.select("path", "sha256").collect()}
            known = ledger.lookup(set(found.values()))
            new = sorted(set(found.values()) - set(known["sha256"]))
            log.info("%d files in %s: %d readable (%d images already scored by %s version %s, %d to score), "
                     "%d unreadable", files.n_files, config.images, len(found), len(known), config.model_name,
                     config.model_version, len(new), len(files.unreadable))  # fmt: skip
            scored = pd.DataFrame(columns=LEDGER_COLUMNS)
            score_s = 0.0
            if new:
                t0 = time.monotonic()
                todo = files.frame.dropDuplicates(["sha256"]).join(
                    spark.createDataFrame([(s,) for s in new], "sha256 string"), "sha256"
                )
                rows = predict.score(config.model_dir, todo, manifest)
                score_s = time.monotonic() - t0
                now = datetime.now(UTC).isoformat(timespec="seconds")
                scored = pd.DataFrame(
                    [
                        {
                            "sha256": found[r["path"]],
                            "probability": r["probability"],
                            "label": LABEL_NAMES[r["prediction"]],
                            "model_name": config.model_name,
                            "model_version": config.model_version,
                            "path": r["path"],
                            "scored_run": run,
                            "scored_at": now,
                        }
                        for r in rows
                    ],
                    columns=LEDGER_COLUMNS,
                )
                ledger.append(scored)  # before the run's output: a crash after it re-scores nothing
        finally:
            files.unpersist()
        frames = [f for f in (known, scored) if not f.empty] or [known]
        by_sha = pd.concat(frames, ignore_index=True).drop_duplicates("sha256").set_index("sha256")
        newly = set(scored["sha256"])
        dicom = files.dicom.set_index("path") if not files.dicom.empty else None
        predictions = pd.DataFrame(
            [
                {
                    "path": path,
                    "sha256": sha,
                    "model_name": config.model_name,
                    "model_version": config.model_version,
                    "probability": float(by_sha.at[sha, "probability"]),
                    "label": by_sha.at[sha, "label"],
                    "new": sha in newly,
                    "scored_run": by_sha.at[sha, "scored_run"],
                    "scored_at": by_sha.at[sha, "scored_at"],
                    **(dicom.loc[path].to_dict() if dicom is not None and path in dicom.index else {}),
                }
                for path, sha in sorted(found.items())
            ],
            columns=COLUMNS,
        ).astype(DICOM_DTYPES)
        series = series_table(predictions, float((manifest or {}).get("threshold", THRESHOLD)))
        summary = {
            "folder": str(config.images),
            "model": {"name": config.model_name, "version": config.model_version, "dir": str(config.model_dir)},
            "files": files.n_files,
            "readable": len(found),
            "scored_new": len(scored),  # images run through the model (two files with the same bytes: one)
            "already_scored": len(known),  # images this model version had scored before
            "unreadable": len(files.unreadable),
            "unreadable_files": [{"path": u.path, "reason": u.reason} for u in files.unreadable],
            "dicom": {
                "slices": int(predictions["series_uid_hash"].notna().sum()),
                "series": len(series),
                "window": config.window.id,
                "preprocessing": DICOM_PREPROCESSING,
                "series_rule": RULE,
                "notice": NOTICE,
            },
            "out": str(config.out),
            "spark": application(spark),
            "timings": {"score_s": round(score_s, 3), "total_s": round(time.monotonic() - started, 3)},
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with atomic_dir(config.out, what="scoring job") as staging:
            pq.write_table(pa.Table.from_pandas(predictions, preserve_index=False), staging / "predictions.parquet")
            predictions.to_csv(staging / "predictions.csv", index=False, float_format="%.6f")
            pq.write_table(pa.Table.from_pandas(series, preserve_index=False), staging / "series.parquet")
            series.to_csv(staging / "series.csv", index=False, float_format="%.6f")
            unreadable = pd.DataFrame(summary["unreadable_files"], columns=["path", "reason"])
            unreadable.to_csv(staging / "unreadable.csv", index=False)
            (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("scored %d new images, %d already scored, %d unreadable: %s", summary["scored_new"],
             summary["already_scored"], summary["unreadable"], config.out)  # fmt: skip
    if len(series):
        log.info("%d DICOM slices in %d series (window %s; series: %s). %s", summary["dicom"]["slices"], len(series),
                 config.window.id, RULE, NOTICE)  # fmt: skip
    return summary
