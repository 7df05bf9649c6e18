"""Classifying new images with a model folder written by ``covidct train`` or ``covidct ensemble``."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from pyspark.ml import PipelineModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import functions as F

from covidct.atomic import write_text_atomic
from covidct.errors import CovidctError
from covidct.session import get_spark
from covidct.train import spark_errors

#: Columns ``predict --explain`` adds to the CSV (see ``covidct.explain``).
EXPLAIN_COLUMNS = ("explain_method", "explanation_png", "explanation_npy")


def _images(spark, images: Path):
    return (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .load(images.absolute().as_uri())
        .select("path", F.col("content").alias("image"))
    )


def _probabilities(model_dir: Path, df) -> dict[str, float]:
    """``{path: P(COVID)}`` from one saved PipelineModel."""
    model = PipelineModel.load(model_dir.absolute().as_uri())
    with spark_errors():
        rows = model.transform(df).select("path", vector_to_array("probability")[1].alias("p")).collect()
    return {r.path: float(r.p) for r in rows}


def predict(
    model_dir: str | Path,
    images: str | Path,
    out_csv: str | Path | None = None,
    explain_dir: str | Path | None = None,
) -> list[dict]:
    """``path, probability (of COVID), prediction`` for every image file under ``images``.

    With an ensemble folder (``ensemble.json``) each row also has ``members`` (each backbone's
    probability), ``mean`` and ``stacked`` (where a stacker was fitted) and ``method``: the
    combination ``probability`` and ``prediction`` come from.

    ``explain_dir``: also write each image's class activation map (PNG + raw ``.npy``, see
    ``covidct.explain``) there; the rows gain ``explanation_png``, ``explanation_npy`` and
    ``explain_method``. The maps come from the same forward pass as the probabilities.
    """
    from covidct import ensemble

    model_dir, images = Path(model_dir).expanduser(), Path(images).expanduser()
    is_ensemble = (model_dir / ensemble.MANIFEST).is_file()
    if not is_ensemble and not (model_dir / "metadata").is_dir():
        raise CovidctError(
            f"{model_dir} is not a saved model (expected the model/ folder of a training run or RUN_DIR/ensemble)"
        )
    if not images.exists():
        raise CovidctError(f"{images} does not exist")
    manifest = ensemble.load_manifest(model_dir) if is_ensemble else None
    if explain_dir is not None:
        from covidct.explain import check_out_dir

        explain_dir = Path(explain_dir).expanduser().absolute()
        check_out_dir(explain_dir)  # before any Spark work
    spark = get_spark("covidct-predict")
    df = _images(spark, images).cache()
    if explain_dir is not None:
        rows = _predict_explained(model_dir, manifest, df, images, explain_dir)
    elif manifest is None:
        model = PipelineModel.load(model_dir.absolute().as_uri())
        with spark_errors():
            rows = [
                {"path": r.path, "probability": float(r.probability), "prediction": int(r.prediction)}
                for r in model.transform(df)
                .select("path", vector_to_array("probability")[1].alias("probability"), "prediction")
                .orderBy("path")
                .collect()
            ]
    else:
        rows = _predict_ensemble(model_dir, manifest, df)
    df.unpersist()
    if not rows:
        raise CovidctError(f"no image files under {images}")
    if out_csv is not None:
        write_text_atomic(out_csv, _csv(rows, manifest))
    return rows


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


def _csv(rows: list[dict], manifest: dict | None) -> str:
    label = {1: "COVID", 0: "non-COVID"}
    if manifest is None:
        lines = [["path", "probability_covid", "prediction"]]
        lines += [[r["path"], f"{r['probability']:.6f}", label[r["prediction"]]] for r in rows]
    else:
        names = [m["backbone"] for m in manifest["members"]]
        stacked = any("stacked" in r for r in rows)
        header = ["path", "probability_covid", "prediction", "method"] + [f"probability_{b}" for b in names]
        lines = [header + ["probability_mean"] + (["probability_stacked"] if stacked else [])]
        for r in rows:
            line = [r["path"], f"{r['probability']:.6f}", label[r["prediction"]], r["method"]]
            line += [f"{r['members'][b]:.6f}" for b in names] + [f"{r['mean']:.6f}"]
            lines.append(line + ([f"{r['stacked']:.6f}"] if stacked else []))
    explained = [k for k in EXPLAIN_COLUMNS if rows and k in rows[0]]  # predict --explain
    lines[0] += explained
    for line, r in zip(lines[1:], rows, strict=True):
        line += [r[k] for k in explained]
    buf = io.StringIO()
    csv.writer(buf).writerows(lines)
    return buf.getvalue()
