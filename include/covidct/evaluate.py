"""Held-out evaluation with pyspark.ml's own evaluators (the study's figures)."""

from __future__ import annotations

from pyspark.ml.evaluation import BinaryClassificationEvaluator, MulticlassClassificationEvaluator
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

#: Computed by MulticlassClassificationEvaluator, as the study reported them.
MULTICLASS_METRICS = ("accuracy", "weightedPrecision", "weightedRecall", "f1")


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def evaluate(predictions: DataFrame, label_col: str = "label") -> dict:
    """Metrics of a DataFrame with ``label``, ``prediction`` and ``rawPrediction`` columns."""
    metrics: dict = {}
    multiclass = MulticlassClassificationEvaluator(labelCol=label_col, predictionCol="prediction")
    for name in MULTICLASS_METRICS:
        metrics[name] = multiclass.setMetricName(name).evaluate(predictions)
    binary = BinaryClassificationEvaluator(labelCol=label_col, rawPredictionCol="rawPrediction")
    metrics["auc"] = binary.setMetricName("areaUnderROC").evaluate(predictions)
    counts = {
        (int(r[label_col]), int(r["prediction"])): r["count"]
        for r in predictions.groupBy(label_col, "prediction").count().collect()
    }
    tp, fn = counts.get((1, 1), 0), counts.get((1, 0), 0)
    tn, fp = counts.get((0, 0), 0), counts.get((0, 1), 0)
    metrics["sensitivity"] = _ratio(tp, tp + fn)
    metrics["specificity"] = _ratio(tn, tn + fp)
    metrics["confusion"] = {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    return metrics


def covid_probability(predictions: DataFrame) -> DataFrame:
    """``path, relpath, label, probability (of COVID), prediction`` for predictions.parquet."""
    from pyspark.ml.functions import vector_to_array

    return predictions.select(
        "path",
        "relpath",
        F.col("label").cast("int").alias("label"),
        vector_to_array("probability")[1].alias("probability"),
        F.col("prediction").cast("int").alias("prediction"),
    )
