"""Class activation maps of a saved model's predictions: one Spark pass gives each image's probability and map.

The driver side of ``covidct.inference.explainer``: ``explain_model`` loads a PipelineModel written
by ``covidct train`` (featurizer + LR), runs the explainer over a DataFrame of images in the
workers and collects, per image, the probability the model's own LR stage gives and the raw map
(signed, at the conv grid's size). The driver collects only the small maps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.ml import PipelineModel
from pyspark.ml.classification import LogisticRegressionModel
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from covidct.core.errors import CovidctError
from covidct.core.spark_errors import spark_errors
from covidct.data.body import FULL
from covidct.features.featurizer import DeepImageFeaturizer
from covidct.features.workers import bound_arrow_batches
from covidct.inference.explainer import map_layer, method_for, worker_explainer


@dataclass(frozen=True)
class Explained:
    """One image through one model: its probability, prediction and raw map (signed, conv grid)."""

    backbone: str
    method: str
    layer: str
    probability: float
    prediction: int
    logit: float  # Spark's rawPrediction[1]: the LR's margin
    map: np.ndarray  # (h, w) float32, evidence for COVID before upsampling and ReLU
    view: str = FULL  # what the backbone saw (covidct.data.body): the map lies over that picture


def load_model(model_dir: Path) -> tuple[DeepImageFeaturizer, LogisticRegressionModel]:
    """The featurizer and LR of a PipelineModel written by ``covidct train``."""
    model = PipelineModel.load(Path(model_dir).absolute().as_uri())
    stages = model.stages
    if len(stages) != 2 or not isinstance(stages[0], DeepImageFeaturizer):
        raise CovidctError(f"{model_dir} is not a featurizer + logistic regression model; cannot explain it")
    lr = stages[1]
    if not isinstance(lr, LogisticRegressionModel) or lr.numClasses != 2:
        raise CovidctError(f"{model_dir}: only a binary LogisticRegressionModel can be explained")
    return stages[0], lr


def explain_model(model_dir: Path, df: DataFrame) -> dict[str, Explained]:
    """``{path: Explained}`` for every row of ``df`` (``path``, ``image`` bytes), one Spark pass.

    The features come from the same forward pass as the map and go through the model's own LR
    stage, so the probability is the one ``covidct predict`` computes.
    """
    featurizer, lr = load_model(model_dir)
    backbone, pooling = featurizer.getModelName(), featurizer.getPooling()
    method, layer = method_for(pooling), map_layer(backbone, pooling)
    coef = np.asarray(lr.coefficients.toArray(), dtype=np.float64)
    if coef.size != featurizer.featureDim():
        raise CovidctError(f"{model_dir}: {coef.size} LR coefficients for {featurizer.featureDim()} features")
    bound_arrow_batches(df, featurizer.getBatchSize())
    udf = _maps_udf(
        backbone,
        featurizer.getWeights(),
        pooling,
        featurizer.getPrecision(),
        featurizer.getSeed(),
        featurizer.getBatchSize(),
        coef,
        featurizer.getView(),
        featurizer.getFlips(),
    )
    features = featurizer.getOutputCol()
    scored = lr.transform(
        df.withColumn("_explain", udf(F.col(featurizer.getInputCol()), F.col("path"))).withColumn(
            features, array_to_vector("_explain.features")
        )
    )
    with spark_errors():
        rows = scored.select(
            "path",
            vector_to_array(lr.getProbabilityCol())[1].alias("p"),
            F.col(lr.getPredictionCol()).alias("pred"),
            vector_to_array(lr.getRawPredictionCol())[1].alias("logit"),
            "_explain.map",
            "_explain.map_h",
            "_explain.map_w",
        ).collect()
    return {
        r.path: Explained(
            backbone,
            method,
            layer or "last conv block",
            float(r.p),
            int(r.pred),
            float(r.logit),
            np.asarray(r.map, dtype=np.float32).reshape(r.map_h, r.map_w),
            featurizer.getView(),
        )
        for r in rows
    }


def _maps_udf(
    model_name: str, weights: str, pooling: str, precision: str, seed: int, batch_size: int, coef: np.ndarray,
    view: str, flips: bool,
):  # fmt: skip
    @F.pandas_udf("features array<float>, map array<float>, map_h int, map_w int")
    def maps(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        explainer = worker_explainer(model_name, weights, pooling, seed, precision)
        for images, names in batches:
            feats, cams = explainer.explain(images, names, batch_size, coef, view, flips)
            yield pd.DataFrame(
                {
                    "features": list(feats),
                    "map": [m.ravel() for m in cams],
                    "map_h": [m.shape[0] for m in cams],
                    "map_w": [m.shape[1] for m in cams],
                }
            )

    return maps
