"""Held-out evaluation: the study's figures, as pyspark.ml's evaluators define them.

``evaluate`` runs Spark's evaluators (five passes over the predictions plus a count);
``evaluate_collected`` computes the same numbers from the predictions collected once (a few
hundred rows), which is what the train job does: one Spark job instead of six.
"""

from __future__ import annotations

from pyspark.ml.evaluation import BinaryClassificationEvaluator, MulticlassClassificationEvaluator
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

#: Computed by MulticlassClassificationEvaluator, as the study reported them.
MULTICLASS_METRICS = ("accuracy", "weightedPrecision", "weightedRecall", "f1")
#: A probability of COVID above this is a COVID prediction (Spark's LR, the ensemble, explanations).
THRESHOLD = 0.5


def confusion(y, pred) -> dict[str, int]:
    """``tp, fp, tn, fn`` of labels ``y`` and predictions ``pred`` (1 = COVID)."""
    import numpy as np

    y, pred = np.asarray(y).astype(int), np.asarray(pred).astype(int)
    return {
        "tp": int(((y == 1) & (pred == 1)).sum()),
        "fp": int(((y == 0) & (pred == 1)).sum()),
        "tn": int(((y == 0) & (pred == 0)).sum()),
        "fn": int(((y == 1) & (pred == 0)).sum()),
    }


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


def evaluate_collected(frame, label_col: str = "label") -> dict:
    """``evaluate``'s metrics from collected predictions (``label``, ``prediction``, ``margin``).

    The definitions are Spark's: weighted precision/recall/F1 weight each true label's figure by
    its share of the test images (a label never predicted has precision 0), weighted recall is
    the accuracy, and the AUC is the trapezoidal area under the ROC curve of the raw margin of
    COVID (``rawPrediction[1]``, what ``BinaryClassificationEvaluator`` ranks by).
    """
    import numpy as np
    from sklearn.metrics import roc_auc_score

    y = np.asarray(frame[label_col]).astype(int)
    pred = np.asarray(frame["prediction"]).astype(int)
    n = len(y)
    counts = confusion(y, pred)
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    weighted = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    for label in sorted(set(y.tolist())):
        correct = int(((y == label) & (pred == label)).sum())
        precision = _ratio(correct, int((pred == label).sum())) or 0.0
        recall = _ratio(correct, int((y == label).sum())) or 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        share = float((y == label).sum()) / n
        weighted["precision"] += share * precision
        weighted["recall"] += share * recall
        weighted["f1"] += share * f1
    both = len(set(y.tolist())) == 2
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "weightedPrecision": weighted["precision"],
        "weightedRecall": weighted["recall"],
        "f1": weighted["f1"],
        "auc": float(roc_auc_score(y, np.asarray(frame["margin"], dtype=float))) if both else None,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "confusion": counts,
    }


def covid_probability(predictions: DataFrame, margin: bool = False) -> DataFrame:
    """``path, relpath, label, probability (of COVID), prediction`` for predictions.parquet.

    ``margin``: also ``margin``, the raw score of COVID (``rawPrediction[1]``), for ``evaluate_collected``.
    """
    from pyspark.ml.functions import vector_to_array

    columns = [
        "path",
        "relpath",
        F.col("label").cast("int").alias("label"),
        vector_to_array("probability")[1].alias("probability"),
        F.col("prediction").cast("int").alias("prediction"),
    ]
    if margin:
        columns.append(vector_to_array("rawPrediction")[1].alias("margin"))
    return predictions.select(*columns)
