"""Classifying new images with a model folder written by ``covidct train``."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pyspark.ml import PipelineModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import functions as F

from covidct.atomic import write_text_atomic
from covidct.errors import CovidctError
from covidct.session import get_spark
from covidct.train import spark_errors


def predict(model_dir: str | Path, images: str | Path, out_csv: str | Path | None = None) -> list[dict]:
    """``path, probability (of COVID), prediction`` for every image file under ``images``."""
    model_dir, images = Path(model_dir).expanduser(), Path(images).expanduser()
    if not (model_dir / "metadata").is_dir():
        raise CovidctError(f"{model_dir} is not a saved model (expected the model/ folder of a training run)")
    if not images.exists():
        raise CovidctError(f"{images} does not exist")
    spark = get_spark("covidct-predict")
    model = PipelineModel.load(model_dir.absolute().as_uri())
    df = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .load(images.absolute().as_uri())
        .select("path", F.col("content").alias("image"))
    )
    with spark_errors():
        rows = [
            {"path": r.path, "probability": float(r.probability), "prediction": int(r.prediction)}
            for r in model.transform(df)
            .select("path", vector_to_array("probability")[1].alias("probability"), "prediction")
            .orderBy("path")
            .collect()
        ]
    if not rows:
        raise CovidctError(f"no image files under {images}")
    if out_csv is not None:
        lines = [["path", "probability_covid", "prediction"]]
        lines += [[r["path"], f"{r['probability']:.6f}", "COVID" if r["prediction"] else "non-COVID"] for r in rows]
        buf = io.StringIO()
        csv.writer(buf).writerows(lines)
        write_text_atomic(out_csv, buf.getvalue())
    return rows
