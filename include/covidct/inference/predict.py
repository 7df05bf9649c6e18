"""Classifying new images with a model folder written by ``covidct train`` or ``covidct ensemble``.

``read_images`` (``covidct.inference.files``) reads and checks every file under the folder and
lists those that cannot be scored with the reason; ``score`` runs the model on the rest. ``predict`` does
both and fails only when nothing could be scored (or, with ``strict``, when anything could not).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.ml import PipelineModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame

from covidct.core.atomic import atomic_file, write_text_atomic
from covidct.core.errors import CovidctError
from covidct.core.session import get_spark
from covidct.core.spark_errors import spark_errors
from covidct.data.dataset import LABEL_NAMES
from covidct.data.dicom import NOTICE, Window
from covidct.inference.explanations import check_out_dir, explain_rows
from covidct.inference.files import DICOM_COLUMNS, Unreadable, listing, read_images
from covidct.inference.maps import explain_model
from covidct.inference.series import COLUMNS as SERIES_COLUMNS
from covidct.inference.series import RULE, series_table
from covidct.modelling.ensemble_format import MEAN, STACKED, Stacker, read_model
from covidct.modelling.evaluate import THRESHOLD

log = logging.getLogger(__name__)

#: Columns ``predict --explain`` adds to the CSV (see ``covidct.inference.explanations``).
EXPLAIN_COLUMNS = ("explain_method", "explanation_png", "explanation_npy")


class Predictions(list):
    """The scored images' rows (a list, as ``predict`` always returned), plus ``unreadable``: the files it skipped,
    and ``series``: one row per DICOM series (``covidct.inference.series``; empty without DICOM)."""

    def __init__(self, rows=(), unreadable=(), series: pd.DataFrame | None = None):
        super().__init__(rows)
        self.unreadable: list[Unreadable] = list(unreadable)
        self.series: pd.DataFrame = series if series is not None else pd.DataFrame(columns=SERIES_COLUMNS)


def _probabilities(model_dir: Path, df) -> dict[str, float]:
    """``{path: P(COVID)}`` from one saved PipelineModel."""
    model = PipelineModel.load(model_dir.absolute().as_uri())
    with spark_errors():
        rows = model.transform(df).select("path", vector_to_array("probability")[1].alias("p")).collect()
    return {r.path: float(r.p) for r in rows}


def score(model_dir: Path, frame: DataFrame, manifest: dict | None = None) -> list[dict]:
    """``path, probability (of COVID), prediction`` (+ the ensemble's columns) for every row of ``frame``."""
    if manifest is not None:
        return _predict_ensemble(model_dir, manifest, frame)
    model = PipelineModel.load(model_dir.absolute().as_uri())
    with spark_errors():
        return [
            {"path": r.path, "probability": float(r.probability), "prediction": int(r.prediction)}
            for r in model.transform(frame)
            .select("path", vector_to_array("probability")[1].alias("probability"), "prediction")
            .orderBy("path")
            .collect()
        ]


def predict(
    model_dir: str | Path,
    images: str | Path,
    out_csv: str | Path | None = None,
    *,
    strict: bool = False,
    spark_log: str | Path | None = None,
    explain_dir: str | Path | None = None,
    window: Window | str | None = None,
) -> Predictions:
    """``path, probability (of COVID), prediction`` for every image file under ``images`` that can be scored.

    With an ensemble folder (``ensemble.json``) each row also has ``members`` (each backbone's
    probability), ``mean`` and ``stacked`` (where a stacker was fitted) and ``method``: the
    combination ``probability`` and ``prediction`` come from.

    ``explain_dir``: also write each image's class activation map (PNG + raw ``.npy``, see
    ``covidct.inference.explanations``) there; the rows gain ``explanation_png``, ``explanation_npy`` and
    ``explain_method``. The maps come from the same forward pass as the probabilities.

    DICOM CT files are scored slice by slice (``covidct.data.dicom``: Hounsfield units through ``window``,
    ``"LEVEL,WIDTH"``, default the lung window -600,1500): their rows gain ``DICOM_COLUMNS`` (keyed hashes,
    never UIDs or patient data), and ``.series`` holds one row per series (``covidct.inference.series``).
    With ``out_csv`` and DICOM slices, ``<out>.series.csv`` and both tables as Parquet (``<out>.parquet``,
    ``<out>.series.parquet``) are written beside it.

    Files that cannot be scored are logged and returned in ``.unreadable`` (and are rows of the
    CSV with their reason in ``error``); CovidctError when no file could be scored, or with
    ``strict`` when any could not (then nothing is scored or written). ``spark_log``: where the
    Spark JVM's (and its Python workers') output goes if this call starts it.
    """
    model_dir, images = Path(model_dir).expanduser(), Path(images).expanduser()
    window = window if isinstance(window, Window) else Window.parse(window)
    manifest = read_model(model_dir)
    if not images.exists():
        raise CovidctError(f"{images} does not exist")
    if explain_dir is not None:
        explain_dir = Path(explain_dir).expanduser().absolute()
        check_out_dir(explain_dir)  # before any Spark work
    spark = get_spark("covidct-predict", jvm_output=spark_log)
    files = read_images(spark, images, window)
    try:
        if files.n_files == 0:
            raise CovidctError(f"no image files under {images}")
        for u in files.unreadable:
            log.warning("unreadable, not scored: %s: %s", u.path, u.reason)
        if strict and files.unreadable:
            raise CovidctError(
                f"{len(files.unreadable)} of {files.n_files} files under {images} cannot be scored (--strict: "
                f"nothing was scored): {listing(files.unreadable)}"
            )
        if files.n_readable == 0:
            raise CovidctError(
                f"none of the {files.n_files} files under {images} could be scored: {listing(files.unreadable)}"
            )
        log.info("scoring %d images (%d of them DICOM slices, window %s; %d unreadable files skipped)",
                 files.n_readable, len(files.dicom), window.id, len(files.unreadable))  # fmt: skip
        if explain_dir is not None:
            rows = _predict_explained(model_dir, manifest, files.frame, images, explain_dir)
        else:
            rows = score(model_dir, files.frame, manifest)
        attach_dicom(rows, files.dicom)
        threshold = float((manifest or {}).get("threshold", THRESHOLD))
        result = Predictions(rows, files.unreadable, series_table(pd.DataFrame(rows), threshold) if rows else None)
    finally:
        files.unpersist()
    if not result.series.empty:
        log.info("%d DICOM series (%s). %s", len(result.series), RULE, NOTICE)
    if out_csv is not None:
        write_outputs(Path(out_csv), result, manifest)
    return result


def attach_dicom(rows: list[dict], slices: pd.DataFrame) -> None:
    """The DICOM columns (``read_images``'s ``dicom`` table) added to the rows of DICOM slices, in place."""
    if slices.empty:
        return
    records = slices.astype(object).where(slices.notna(), None).to_dict("records")  # null, not NaN / <NA>
    found = {r.pop("path"): r for r in records}
    for row in rows:
        row.update(found.get(row["path"], {}))


def write_outputs(out_csv: Path, rows: Predictions, manifest: dict | None) -> None:
    """The CSV; with DICOM slices also ``.series.csv`` and both as Parquet, beside it (each written whole)."""
    write_text_atomic(out_csv, _csv(rows, manifest))
    if rows.series.empty:
        return
    stem = out_csv.with_suffix("")
    write_text_atomic(stem.with_name(stem.name + ".series.csv"), rows.series.to_csv(index=False, float_format="%.6f"))
    flat = [{k: v for k, v in r.items() if k != "members"} | _members(r) for r in rows]  # an ensemble's members
    slices = pd.DataFrame(flat)
    for table, name in ((slices, stem.name + ".parquet"), (rows.series, stem.name + ".series.parquet")):
        with atomic_file(stem.with_name(name)) as tmp:
            table.to_parquet(tmp, index=False)


def _members(row: dict) -> dict[str, float]:
    return {f"probability_{b}": p for b, p in row.get("members", {}).items()}


def _predict_explained(model_dir: Path, manifest: dict | None, df, images: Path, out: Path) -> list[dict]:
    """Predictions with their maps: one forward pass per model gives both (``covidct.inference.maps``)."""
    if manifest is None:
        found = explain_model(model_dir, df)
        backbone = next(iter(found.values())).backbone if found else "model"
        maps = {backbone: found}
        rows = [{"path": p, "probability": e.probability, "prediction": e.prediction} for p, e in sorted(found.items())]
    else:
        maps = {m["backbone"]: explain_model(model_dir / m["model"], df) for m in manifest["members"]}
        member = {b: {p: e.probability for p, e in found.items()} for b, found in maps.items()}
        rows = _predict_ensemble(model_dir, manifest, df, member)
    if not rows:
        return rows
    return explain_rows(rows, maps, df, images, out, model=str(model_dir))


def _predict_ensemble(model_dir: Path, manifest: dict, df, member: dict[str, dict[str, float]] | None = None):
    names = [m["backbone"] for m in manifest["members"]]
    if member is None:
        member = {m["backbone"]: _probabilities(model_dir / m["model"], df) for m in manifest["members"]}
    stacker = Stacker.from_json(manifest["stacker"]) if manifest.get("stacker") else None
    threshold = float(manifest.get("threshold", 0.5))
    rows = []
    for path in sorted(member[names[0]]):
        probs = {b: member[b][path] for b in names}
        row = {"path": path, "members": probs, MEAN: float(np.mean(list(probs.values())))}
        if stacker is not None:
            row[STACKED] = float(stacker.predict(np.array([[probs[b] for b in stacker.members]]))[0])
        row["method"] = manifest["method"]
        row["probability"] = row[manifest["method"]]
        row["prediction"] = int(row["probability"] > threshold)
        rows.append(row)
    return rows


def _csv(rows: Predictions, manifest: dict | None) -> str:
    """One row per file: the scored ones, then the unreadable ones (empty probability, the reason in ``error``)."""
    if manifest is None:
        lines = [["path", "probability_covid", "prediction"]]
        lines += [[r["path"], f"{r['probability']:.6f}", LABEL_NAMES[r["prediction"]]] for r in rows]
    else:
        names = [m["backbone"] for m in manifest["members"]]
        stacked = any("stacked" in r for r in rows)
        header = ["path", "probability_covid", "prediction", "method"] + [f"probability_{b}" for b in names]
        lines = [header + ["probability_mean"] + (["probability_stacked"] if stacked else [])]
        for r in rows:
            line = [r["path"], f"{r['probability']:.6f}", LABEL_NAMES[r["prediction"]], r["method"]]
            line += [f"{r['members'][b]:.6f}" for b in names] + [f"{r['mean']:.6f}"]
            lines.append(line + ([f"{r['stacked']:.6f}"] if stacked else []))
    explained = [k for k in EXPLAIN_COLUMNS if rows and k in rows[0]]  # predict --explain
    dicom = list(DICOM_COLUMNS) if any("series_uid_hash" in r for r in rows) else []  # DICOM slices among them
    lines[0] += explained + dicom
    for line, r in zip(lines[1:], rows, strict=True):
        line += [r[k] for k in explained] + ["" if r.get(k) is None else r[k] for k in dicom]
    width = len(lines[0])
    lines = [lines[0] + ["error"]] + [line + [""] for line in lines[1:]]
    lines += [[u.path] + [""] * (width - 1) + [u.reason] for u in getattr(rows, "unreadable", ())]
    buf = io.StringIO()
    csv.writer(buf).writerows(lines)
    return buf.getvalue()
