"""The transfer-learning job: featurize once, then fit logistic regression and evaluate per split.

``OUT`` is written atomically (a staging folder beside it, renamed at the end): a
failed run leaves no partial ``OUT``. With one split::

    OUT/metrics.json  OUT/model/  OUT/predictions.parquet

With several splits (``--split official,random70``) each gets ``OUT/<split>/`` with the
same three entries; the features are computed (or read from the cache) once for all.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from pyspark import StorageLevel
from pyspark.ml import PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.functions import array_to_vector
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from covidct import split as splitlib
from covidct.atomic import atomic_dir
from covidct.backbone import PRECISIONS, get_backbone, is_random, normalize_weights, weights_identity
from covidct.cache import CacheKey, FeatureCache
from covidct.dataset import load_images
from covidct.errors import CovidctError, ImageDecodeError, WeightsNotFoundError
from covidct.evaluate import covid_probability, evaluate
from covidct.featurizer import DeepImageFeaturizer
from covidct.session import get_spark, progress

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data_dir: Path
    backbone: str
    out: Path
    splits: list[str] = field(default_factory=lambda: ["random70"])
    seed: int = 42
    weights: str = "imagenet"
    pooling: str = "avg"
    precision: str = "float32"
    batch_size: int = 32
    max_iter: int = 20
    reg_param: float = 0.05
    elastic_net_param: float = 0.3
    cache_dir: Path | None = None  # None: no feature cache

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser()
        self.out = Path(self.out).expanduser()
        self.backbone = get_backbone(self.backbone).name
        self.splits = splitlib.parse_splits(self.splits)
        self.weights = normalize_weights(self.weights)
        self.pooling = get_backbone(self.backbone).check_pooling(str(self.pooling).lower())
        self.precision = str(self.precision).lower()
        if self.precision not in PRECISIONS:
            raise CovidctError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.batch_size <= 0 or self.max_iter <= 0:
            raise CovidctError("batch size and max iterations must be positive")
        if self.reg_param < 0 or not 0 <= self.elastic_net_param <= 1:
            raise CovidctError("regParam must be >= 0 and elasticNetParam within [0, 1]")


def versions(spark: SparkSession) -> dict[str, str]:
    found = {"spark": spark.version}
    for name, dists in {"tensorflow": ("tensorflow-cpu", "tensorflow"), "keras": ("keras",)}.items():
        for dist in dists:
            try:
                found[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def featurize(
    spark: SparkSession,
    images: DataFrame,
    featurizer: DeepImageFeaturizer,
    cache: FeatureCache | None,
    key: CacheKey,
    known: DataFrame | None = None,
) -> tuple[DataFrame, dict]:
    """``sha256, features (array<float>)`` for every image, through the cache when there is one.

    ``known``: the images' ``sha256`` column already computed (persisted), so that checking the
    cache reads no image bytes; only the images missing from the cache are read and featurized.
    """
    if cache is None:
        feats = images.select("sha256", featurizer.featureArrays(images).alias("features"))
        feats = feats.dropDuplicates(["sha256"]).persist(StorageLevel.MEMORY_AND_DISK)
        n = feats.count()
        return feats, {"enabled": False, "hits": 0, "misses": n}
    shas = (images if known is None else known).select("sha256").distinct()
    cached = cache.read(spark, key)
    if cached is None:
        n_unique, hits, missing = shas.count(), 0, images
    else:
        hit = cached.select("sha256", F.lit(1).alias("hit"))
        counts = shas.join(hit, "sha256", "left").agg(F.count("*").alias("n"), F.count("hit").alias("hits")).first()
        n_unique, hits = counts["n"], counts["hits"]
        missing = images.join(cached.select("sha256"), "sha256", "left_anti")
    log.info("feature cache %s: %d of %d images cached", cache.folder(key), hits, n_unique)
    if hits < n_unique:
        cache.write(missing.select("sha256", featurizer.featureArrays(missing).alias("features")), key)
    feats = cache.read(spark, key).persist(StorageLevel.MEMORY_AND_DISK)
    feats.count()
    return feats, {"enabled": True, "dir": str(cache.folder(key)), "hits": hits, "misses": n_unique - hits}


def train(config: TrainConfig, spark: SparkSession | None = None) -> dict[str, dict]:
    """Run the job; returns ``{split: metrics}``. Raises CovidctError for user mistakes."""
    started = time.monotonic()
    backbone = get_backbone(config.backbone)
    # Fail before any Spark work if the weights are unavailable (and record which weights).
    weights_id = weights_identity(backbone, config.weights, config.seed)
    if is_random(config.weights):
        log.warning("RANDOM WEIGHTS: %s features come from an untrained network (weights=none)", backbone.name)
    spark = spark or get_spark(f"covidct-train-{backbone.name}")
    featurizer = DeepImageFeaturizer(
        inputCol="image",
        outputCol="features",
        modelName=backbone.name,
        weights=config.weights,
        pooling=config.pooling,
        precision=config.precision,
        batchSize=config.batch_size,
        seed=config.seed,
    )
    images = load_images(spark, config.data_dir)
    meta = images.select("path", "relpath", "label", "sha256").persist()
    n_images = meta.count()
    if n_images == 0:
        raise CovidctError(f"no images found under {config.data_dir}")
    log.info("%d images in %s; featurizing with %s (%s pooling, %s, weights %s)", n_images, config.data_dir,
             backbone.name, config.pooling, config.precision, weights_id)  # fmt: skip

    t0 = time.monotonic()
    cache = FeatureCache(config.cache_dir) if config.cache_dir else None
    key = CacheKey(backbone.name, weights_id, config.pooling, config.precision)
    with progress(spark, f"featurize {backbone.name}"), spark_errors():
        feats, cache_stats = featurize(spark, images, featurizer, cache, key, known=meta)
    featurize_s = time.monotonic() - t0
    data = meta.join(feats, "sha256").withColumn("features", array_to_vector("features"))
    data = data.persist(StorageLevel.MEMORY_AND_DISK)
    data.count()

    results: dict[str, dict] = {}
    with atomic_dir(config.out) as staging:
        # One split: OUT/metrics.json ...; several: OUT/<split>/metrics.json ...
        targets = {s: staging if len(config.splits) == 1 else staging / s for s in config.splits}
        shared = {  # the same in every split's metrics.json
            "backbone": backbone.name,
            "weights": config.weights,
            "weights_id": weights_id,
            "random_weights": is_random(config.weights),
            "pooling": config.pooling,
            "precision": config.precision,
            "feature_dim": backbone.feature_dim(config.pooling),
            "n_images": n_images,
            "cache": cache_stats,
            "versions": versions(spark),
            "data_dir": str(config.data_dir.absolute()),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        for split, target in targets.items():
            target.mkdir(parents=True, exist_ok=True)
            metrics = fit_and_evaluate(config, split, data, featurizer, target, weights_id)
            metrics.update(shared)
            metrics["timings"] = {"featurize_s": round(featurize_s, 3), **metrics["timings"]}
            results[split] = metrics
        total_s = time.monotonic() - started
        for split, metrics in results.items():
            metrics["timings"]["total_s"] = round(total_s, 3)
            (targets[split] / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    data.unpersist()
    feats.unpersist()
    meta.unpersist()
    log.info("wrote %s in %.1f s", config.out, total_s)
    return results


def fit_and_evaluate(
    config: TrainConfig, split: str, data: DataFrame, featurizer: DeepImageFeaturizer, target: Path, weights_id: str
) -> dict:
    """Fit LR on the split's train part, evaluate its test part, save model + predictions."""
    assigned = splitlib.assign(data, split, config.seed, config.data_dir)
    train_df = assigned.filter("split = 'train'").persist()
    test_df = assigned.filter("split = 'test'").persist()
    n_train, n_test = train_df.count(), test_df.count()
    lr = LogisticRegression(
        maxIter=config.max_iter,
        regParam=config.reg_param,
        elasticNetParam=config.elastic_net_param,
        labelCol="label",
        featuresCol="features",
    )
    t0 = time.monotonic()
    lr_model = lr.fit(train_df)
    fit_s = time.monotonic() - t0
    t0 = time.monotonic()
    predictions = lr_model.transform(test_df).persist()
    metrics = evaluate(predictions)
    evaluate_s = time.monotonic() - t0
    log.info("%s %s: accuracy %.4f on %d test images (fit %.1f s)", config.backbone, split,
             metrics["accuracy"], n_test, fit_s)  # fmt: skip
    # The saved model classifies new images end to end: image bytes -> features -> LR.
    PipelineModel(stages=[featurizer, lr_model]).write().save((target / "model").as_uri())
    # Each row records the weights it came from ("random-seedN" marks random weights).
    out = covid_probability(predictions).withColumn("weights_id", F.lit(weights_id))
    out.coalesce(1).write.parquet((target / "predictions.parquet").as_uri())
    for df in (predictions, train_df, test_df):
        df.unpersist()
    return {
        "split": split,
        "seed": config.seed,
        "n_train": n_train,
        "n_test": n_test,
        **metrics,
        "lr": {"maxIter": config.max_iter, "regParam": config.reg_param, "elasticNetParam": config.elastic_net_param},
        "timings": {"fit_s": round(fit_s, 3), "evaluate_s": round(evaluate_s, 3)},
    }


# --------------------------------------------------------------------------- errors from workers

_WORKER_ERRORS = {
    "ImageDecodeError": ImageDecodeError,
    "WeightsNotFoundError": WeightsNotFoundError,
    "CovidctError": CovidctError,
}
_WORKER_ERROR_RE = re.compile(r"covidct\.errors\.(\w+): (.+)")


def user_error(exc: BaseException) -> CovidctError | None:
    """The covidct error a Spark worker raised, if ``exc`` wraps one (else None)."""
    match = _WORKER_ERROR_RE.search(str(exc))
    if match and match.group(1) in _WORKER_ERRORS:
        return _WORKER_ERRORS[match.group(1)](match.group(2).strip())
    return None


class spark_errors:  # noqa: N801 - used as a context manager
    """Re-raise a covidct error from a Spark worker as itself, without the JVM/worker traces."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and not isinstance(exc, CovidctError):
            found = user_error(exc)
            if found is not None:
                raise found from None
        return False
