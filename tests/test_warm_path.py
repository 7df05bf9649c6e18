"""The warm path's shortcuts give what the long way gives (issue 12): metrics, hashes, image paths, the DB."""

from __future__ import annotations

import shutil

import numpy as np
import pytest


def predictions_frame(spark, y, pred, margin):
    from pyspark.ml.linalg import Vectors

    rows = [(float(a), float(b), Vectors.dense([-m, m])) for a, b, m in zip(y, pred, margin, strict=True)]
    return spark.createDataFrame(rows, ["label", "prediction", "rawPrediction"])


@pytest.mark.parametrize("case", ["mixed", "ties", "never predicts COVID"])
def test_collected_metrics_equal_sparks_evaluators(spark, case):
    from covidct.modelling.evaluate import evaluate, evaluate_collected

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    margin = rng.normal(0, 1, 60) + (y - 0.5)
    if case == "ties":
        margin = np.round(margin)  # many equal scores: the ROC's trapezoids
    pred = (margin > 0).astype(int) if case != "never predicts COVID" else np.zeros(60, dtype=int)
    spark_metrics = evaluate(predictions_frame(spark, y, pred, margin))
    collected = evaluate_collected({"label": y, "prediction": pred, "margin": margin})
    assert collected.keys() == spark_metrics.keys()
    assert collected["confusion"] == spark_metrics["confusion"]
    for name in ("accuracy", "weightedPrecision", "weightedRecall", "f1", "auc", "sensitivity", "specificity"):
        assert collected[name] == pytest.approx(spark_metrics[name], abs=1e-12), name


@pytest.mark.slow
def test_hashes_come_from_the_manifest_and_only_uncached_images_are_read(spark, small_dataset, tmp_path):
    from covidct.data.dataset import load_images
    from covidct.data.manifest import MANIFEST_NAME, build_manifest, write_manifest
    from covidct.features.backbone import get_backbone, weights_identity
    from covidct.features.cache import CacheKey, FeatureCache
    from covidct.modelling.train import image_table

    data = shutil.copytree(small_dataset, tmp_path / "COVID-CT")
    cache = FeatureCache(tmp_path / "cache")
    key = CacheKey("VGG16", weights_identity(get_backbone("VGG16"), "none", 0), "avg")
    scanned = load_images(spark, data).select("path", "relpath", "label", "sha256").toPandas()

    # No manifest: every file is read and hashed in Spark (and the cache's hits are counted there).
    images, meta, n, counted = image_table(spark, data, cache, key)
    assert n == 24 and images.count() == 24 and counted is None
    meta.unpersist()  # as train() does: a later scan of the same folder must not get these cached rows

    write_manifest(build_manifest(data), data / MANIFEST_NAME)
    unique = scanned["sha256"].nunique()
    images, meta, n, counted = image_table(spark, data, cache, key)
    assert n == 24 and images.count() == 24 and counted == (unique, 0)  # nothing cached yet: all to read
    listed = meta.toPandas().sort_values("relpath").reset_index(drop=True)
    # The same path, relpath, label and sha256 as reading the files would give.
    assert listed.equals(scanned.sort_values("relpath").reset_index(drop=True)[listed.columns])

    def cache_features_of(shas) -> None:
        cache.write(
            spark.createDataFrame([(sha, [0.0, 1.0]) for sha in shas], "sha256 string, features array<float>"), key
        )

    covid = scanned.loc[scanned["label"] == 1, "sha256"]
    cache_features_of(covid)  # the COVID half
    images, meta, n, counted = image_table(spark, data, cache, key)
    assert n == 24 and meta.count() == 24 and counted == (unique, covid.nunique())
    to_read = sorted(r.relpath for r in images.select("relpath").collect())
    assert to_read == sorted(scanned.loc[scanned["label"] == 0, "relpath"])

    cache_features_of(scanned["sha256"])
    images, meta, n, counted = image_table(spark, data, cache, key)
    assert "image" not in images.columns and counted == (unique, unique)  # a warm run reads no image at all

    # A manifest that no longer matches the files is not trusted: back to reading them.
    (data / "CT_COVID" / scanned["relpath"].iloc[0].split("/")[1]).unlink()
    images, meta, n, counted = image_table(spark, data, cache, key)
    assert n == 23 and "image" in images.columns and counted is None


def test_make_run_does_not_migrate_an_up_to_date_db(airflow_db):
    from covidct.orchestration.local.runner import migrate_if_needed

    assert migrate_if_needed() is False
