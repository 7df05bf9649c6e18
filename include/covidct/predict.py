"""Classifying new images with a model folder written by ``covidct train`` or ``covidct ensemble``.

A folder of new scans often holds files that are not images the model can take: notes, a
truncated copy, an empty file, one this process may not read. ``read_images`` reads and checks
every file in the Spark workers (one pass: the bytes, a full decode, the sha256) and lists those
that cannot be scored with the reason; ``score`` runs the model on the rest. ``predict`` does
both and fails only when nothing could be scored (or, with ``strict``, when anything could not).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.ml import PipelineModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import BinaryType, StringType, StructField, StructType

from covidct import image as imagelib
from covidct.atomic import write_text_atomic
from covidct.errors import CovidctError
from covidct.session import get_spark
from covidct.train import spark_errors

log = logging.getLogger(__name__)

#: Columns ``predict --explain`` adds to the CSV (see ``covidct.explain``).
EXPLAIN_COLUMNS = ("explain_method", "explanation_png", "explanation_npy")
#: Larger files are not read (a CT slice is well under 10 MB; this is a guard, not a limit in practice).
MAX_FILE_BYTES = 256 * 1024 * 1024
#: Files per Spark task when reading and checking a folder (at least one task per core).
FILES_PER_TASK = 64
#: How many unreadable files an error message names before "and N more".
LISTED = 10
LABELS = {1: "COVID", 0: "non-COVID"}


@dataclass(frozen=True)
class Unreadable:
    """A file that could not be scored, and why (``not a recognised image format``, ``Permission denied``...)."""

    path: str
    reason: str


class Predictions(list):
    """The scored images' rows (a list, as ``predict`` always returned), plus ``unreadable``: the files it skipped."""

    def __init__(self, rows=(), unreadable=()):
        super().__init__(rows)
        self.unreadable: list[Unreadable] = list(unreadable)


@dataclass
class ImageFiles:
    """What ``read_images`` found: the readable images (``path, image, sha256``, persisted) and the rest."""

    frame: DataFrame
    unreadable: list[Unreadable]
    n_files: int

    @property
    def n_readable(self) -> int:
        return self.n_files - len(self.unreadable)

    def unpersist(self) -> None:
        self.frame.unpersist()


def listing(unreadable: list[Unreadable], limit: int = LISTED) -> str:
    """``path (reason), ...`` for an error message, the first ``limit`` of them."""
    shown = ", ".join(f"{u.path} ({u.reason})" for u in unreadable[:limit])
    return shown + (f", and {len(unreadable) - limit} more" if len(unreadable) > limit else "")


def _read_file(path: str) -> tuple[bytes | None, str | None]:
    """The bytes of a file Spark listed (``file:/...``), or None and why they cannot be had."""
    if not path.startswith("file:"):
        return None, "only local files (file:) can be read"
    local = path.removeprefix("file:")
    try:
        info = os.stat(local)
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file"
        if info.st_size > MAX_FILE_BYTES:
            return None, f"{info.st_size} bytes, more than the {MAX_FILE_BYTES} bytes an image may have"
        with open(local, "rb") as f:
            return f.read(MAX_FILE_BYTES + 1), None
    except OSError as exc:
        return None, f"cannot read the file: {exc.strerror or exc}"


def _as_path(uri: str) -> str:
    """``file:///a/b%25c.png`` (the file index's URIs) as Spark's ``path`` columns write it: ``file:/a/b%c.png``."""
    parts = urlsplit(uri)
    return f"{parts.scheme}:{unquote(parts.path)}" if parts.scheme == "file" else unquote(uri)


def _check_udf():
    schema = StructType([StructField("content", BinaryType()), StructField("problem", StringType())])

    @F.pandas_udf(schema)
    def read_and_check(paths: pd.Series) -> pd.DataFrame:
        contents, problems = [], []
        for path in paths:
            data, why = _read_file(path)
            if why is None:
                why = imagelib.problem(data)
            contents.append(data if why is None else None)
            problems.append(why)
        return pd.DataFrame({"content": contents, "problem": problems})

    return read_and_check


def read_images(spark, images: Path) -> ImageFiles:
    """Every file under ``images`` (recursive; hidden files skipped, as Spark does), read and checked in the workers.

    The files are listed with Spark's file index (the ``binaryFile`` source, which reads nothing
    to list them), then read by the check itself: Spark's own scan would silently skip empty
    files and fail the job on a file it cannot open.
    """
    listed = (
        spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(Path(images).absolute().as_uri())
    )
    files = sorted(_as_path(uri) for uri in listed.inputFiles())
    slices = max(spark.sparkContext.defaultParallelism, math.ceil(len(files) / FILES_PER_TASK))
    paths = spark.sparkContext.parallelize([(f,) for f in files], slices).toDF("path string")
    checked = (
        paths.select("path", _check_udf()("path").alias("file"))
        .select("path", F.col("file.content").alias("image"), F.col("file.problem").alias("problem"))
        .withColumn("sha256", F.sha2("image", 256))
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    status = checked.select("path", "problem").collect()
    unreadable = sorted((Unreadable(r.path, r.problem) for r in status if r.problem is not None), key=lambda u: u.path)
    frame = checked.filter(F.col("problem").isNull()).select("path", "image", "sha256")
    return ImageFiles(frame=frame, unreadable=unreadable, n_files=len(status))


def load_manifest(model_dir: Path) -> dict | None:
    """The ensemble's manifest, None for a single model's PipelineModel; CovidctError for anything else."""
    from covidct import ensemble

    if (model_dir / ensemble.MANIFEST).is_file():
        return ensemble.load_manifest(model_dir)
    if not (model_dir / "metadata").is_dir():
        raise CovidctError(
            f"{model_dir} is not a saved model (expected the model/ folder of a training run or RUN_DIR/ensemble)"
        )
    return None


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
) -> Predictions:
    """``path, probability (of COVID), prediction`` for every image file under ``images`` that can be scored.

    With an ensemble folder (``ensemble.json``) each row also has ``members`` (each backbone's
    probability), ``mean`` and ``stacked`` (where a stacker was fitted) and ``method``: the
    combination ``probability`` and ``prediction`` come from.

    ``explain_dir``: also write each image's class activation map (PNG + raw ``.npy``, see
    ``covidct.explain``) there; the rows gain ``explanation_png``, ``explanation_npy`` and
    ``explain_method``. The maps come from the same forward pass as the probabilities.

    Files that cannot be scored are logged and returned in ``.unreadable`` (and are rows of the
    CSV with their reason in ``error``); CovidctError when no file could be scored, or with
    ``strict`` when any could not (then nothing is scored or written). ``spark_log``: where the
    Spark JVM's (and its Python workers') output goes if this call starts it.
    """
    model_dir, images = Path(model_dir).expanduser(), Path(images).expanduser()
    manifest = load_manifest(model_dir)
    if not images.exists():
        raise CovidctError(f"{images} does not exist")
    if explain_dir is not None:
        from covidct.explain import check_out_dir

        explain_dir = Path(explain_dir).expanduser().absolute()
        check_out_dir(explain_dir)  # before any Spark work
    spark = get_spark("covidct-predict", jvm_output=spark_log)
    files = read_images(spark, images)
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
        log.info("scoring %d images (%d unreadable files skipped)", files.n_readable, len(files.unreadable))
        if explain_dir is not None:
            rows = _predict_explained(model_dir, manifest, files.frame, images, explain_dir)
        else:
            rows = score(model_dir, files.frame, manifest)
        result = Predictions(rows, files.unreadable)
    finally:
        files.unpersist()
    if out_csv is not None:
        write_text_atomic(out_csv, _csv(result, manifest))
    return result


def _predict_explained(model_dir: Path, manifest: dict | None, df, images: Path, out: Path) -> list[dict]:
    """Predictions with their maps: one forward pass per model gives both (``covidct.explain``)."""
    from covidct import explain

    if manifest is None:
        found = explain.explain_model(model_dir, df)
        backbone = next(iter(found.values())).backbone if found else "model"
        maps = {backbone: found}
        rows = [{"path": p, "probability": e.probability, "prediction": e.prediction} for p, e in sorted(found.items())]
    else:
        maps = {m["backbone"]: explain.explain_model(model_dir / m["model"], df) for m in manifest["members"]}
        member = {b: {p: e.probability for p, e in found.items()} for b, found in maps.items()}
        rows = _predict_ensemble(model_dir, manifest, df, member)
    if not rows:
        return rows
    return explain.explain_rows(rows, maps, df, images, out, model=str(model_dir))


def _predict_ensemble(model_dir: Path, manifest: dict, df, member: dict[str, dict[str, float]] | None = None):
    from covidct.ensemble import MEAN, STACKED, Stacker

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
        lines += [[r["path"], f"{r['probability']:.6f}", LABELS[r["prediction"]]] for r in rows]
    else:
        names = [m["backbone"] for m in manifest["members"]]
        stacked = any("stacked" in r for r in rows)
        header = ["path", "probability_covid", "prediction", "method"] + [f"probability_{b}" for b in names]
        lines = [header + ["probability_mean"] + (["probability_stacked"] if stacked else [])]
        for r in rows:
            line = [r["path"], f"{r['probability']:.6f}", LABELS[r["prediction"]], r["method"]]
            line += [f"{r['members'][b]:.6f}" for b in names] + [f"{r['mean']:.6f}"]
            lines.append(line + ([f"{r['stacked']:.6f}"] if stacked else []))
    explained = [k for k in EXPLAIN_COLUMNS if rows and k in rows[0]]  # predict --explain
    lines[0] += explained
    for line, r in zip(lines[1:], rows, strict=True):
        line += [r[k] for k in explained]
    width = len(lines[0])
    lines = [lines[0] + ["error"]] + [line + [""] for line in lines[1:]]
    lines += [[u.path] + [""] * (width - 1) + [u.reason] for u in getattr(rows, "unreadable", ())]
    buf = io.StringIO()
    csv.writer(buf).writerows(lines)
    return buf.getvalue()
