"""The transfer-learning job: featurize once, then fit logistic regression and evaluate per split.

``OUT`` is written atomically (a staging folder beside it, renamed at the end): a
failed run leaves no partial ``OUT``. With one split::

    OUT/metrics.json  OUT/model/  OUT/predictions.parquet

With several splits (``--split official,random70``) each gets ``OUT/<split>/`` with the
same three entries; the features are computed (or read from the cache) once for all.

Beside each ``predictions.parquet``, ``oof.parquet`` holds out-of-fold predictions on the
training images (k-fold LR fits inside the train part, whole patients per fold on
``official`` and ``official-clean``): what the stacked ensemble (``covidct.modelling.ensemble``) is
fitted on, so that it never sees a test image. ``--seeds`` repeats the random70 protocol per seed from the same
features into ``OUT/random70-seeds/`` (``seeds.json``: metrics per seed; ``predictions.parquet``
with a ``seed`` column, and ``oof.parquet`` with ``--stack-seeds``; no models).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from pyspark import StorageLevel
from pyspark.ml import PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.functions import array_to_vector
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from covidct.core.atomic import atomic_dir
from covidct.core.errors import CovidctError
from covidct.core.session import application, get_spark, progress
from covidct.core.spark_errors import spark_errors
from covidct.core.versions import library_versions
from covidct.data import split as splitlib
from covidct.data.body import FULL, VIEWS
from covidct.data.dataset import image_path, load_images
from covidct.data.manifest import MANIFEST_NAME, fresh_manifest
from covidct.features.backbone import PRECISIONS, get_backbone, is_random, normalize_weights, weights_identity
from covidct.features.cache import GRID_COLUMNS, CacheKey, FeatureCache
from covidct.features.featurizer import DeepImageFeaturizer
from covidct.modelling import evidence, stats
from covidct.modelling.evaluate import confusion, covid_probability, evaluate_collected
from covidct.modelling.runfolder import CAMS_FILE, SEEDS_DIR, write_cams, write_predictions

log = logging.getLogger(__name__)

#: Partitions of the small DataFrames the LR fits run on.
FIT_PARTITIONS = 2


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
    view: str = FULL  # what the backbone sees (covidct.data.body.VIEWS)
    flips: bool = False  # test-time flips: features of the picture and its mirror image, averaged
    evidence: bool = True  # the evidence-inside-body share of every split's model (avg pooling)
    batch_size: int = 32
    max_iter: int = 20
    reg_param: float = 0.05
    elastic_net_param: float = 0.3
    cache_dir: Path | None = None  # None: no feature cache
    seeds: list[int] | None = None  # random70 repeated per seed (features reused); None: only ``seed``
    stack_folds: int = splitlib.STACK_FOLDS  # out-of-fold predictions for the stacked ensemble; 0: none
    stack_seeds: bool = False  # also per seed (folds x seeds more LR fits): the stacked ensemble over seeds

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser()
        self.out = Path(self.out).expanduser()
        self.backbone = get_backbone(self.backbone).name
        self.splits = splitlib.parse_splits(self.splits)
        if self.seeds is not None:
            self.seeds = splitlib.parse_seeds(self.seeds)
            if "random70" not in self.splits:
                raise CovidctError("--seeds repeats the random70 split: add random70 to the splits")
        if self.stack_folds == 1 or not 0 <= self.stack_folds <= 20:
            raise CovidctError("stack folds must be 0 (off) or 2..20")
        self.weights = normalize_weights(self.weights)
        self.pooling = get_backbone(self.backbone).check_pooling(str(self.pooling).lower())
        self.precision = str(self.precision).lower()
        if self.precision not in PRECISIONS:
            raise CovidctError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        self.view = str(self.view).lower()
        if self.view not in VIEWS:
            raise CovidctError(f"unknown view {self.view!r}; choose from {', '.join(VIEWS)}")
        if self.batch_size <= 0 or self.max_iter <= 0:
            raise CovidctError("batch size and max iterations must be positive")
        if self.reg_param < 0 or not 0 <= self.elastic_net_param <= 1:
            raise CovidctError("regParam must be >= 0 and elasticNetParam within [0, 1]")


def featurize(
    spark: SparkSession,
    images: DataFrame,
    featurizer: DeepImageFeaturizer,
    cache: FeatureCache | None,
    key: CacheKey,
    known: DataFrame | None = None,
    grids: bool = False,
    counted: tuple[int, int] | None = None,
) -> tuple[DataFrame, dict]:
    """``sha256, features (array<float>)`` for every image, through the cache when there is one.

    ``known``: the images' ``sha256`` column already computed (persisted), so that checking the
    cache reads no image bytes; only the images missing from the cache are read and featurized.
    ``grids``: the cache also keeps each new image's grid (``avg`` pooling; ``FeatureCache``).
    ``counted``: ``(distinct images, of them cached)`` where the caller has counted them and ``images`` holds
    exactly the uncached ones (``image_table`` from a manifest): no Spark job to count them again.
    """
    if cache is None:
        feats = images.select("sha256", featurizer.featureArrays(images).alias("features"))
        feats = feats.dropDuplicates(["sha256"]).persist(StorageLevel.MEMORY_AND_DISK)
        n = feats.count()
        return feats, {"enabled": False, "hits": 0, "misses": n}
    shas = (images if known is None else known).select("sha256").distinct()  # lazy: no job unless counted here
    if counted is not None:
        (n_unique, hits), missing = counted, images
    elif (cached := cache.read(spark, key)) is None:
        n_unique, hits, missing = shas.count(), 0, images
    else:
        hit = cached.select("sha256", F.lit(1).alias("hit"))
        counts = shas.join(hit, "sha256", "left").agg(F.count("*").alias("n"), F.count("hit").alias("hits")).first()
        n_unique, hits = counts["n"], counts["hits"]
        missing = images.join(cached.select("sha256"), "sha256", "left_anti")
    log.info("feature cache %s: %d of %d images cached", cache.folder(key), hits, n_unique)
    if hits < n_unique and "image" not in images.columns:  # image_table found them all cached a moment ago
        raise lost_entries(cache, key)
    if hits < n_unique:
        if grids:  # the features and, from the same pass, their grids (what every map is computed from)
            records = missing.select("sha256", featurizer.featureRecords(missing).alias("r"))
            cache.write(records.select("sha256", *(F.col(f"r.{c}").alias(c) for c in ("features", *GRID_COLUMNS))), key)
        else:
            cache.write(missing.select("sha256", featurizer.featureArrays(missing).alias("features")), key)
    feats = cache.read(spark, key)
    if feats is None:  # every file gone since it was counted
        raise lost_entries(cache, key)
    feats = feats.persist(StorageLevel.MEMORY_AND_DISK)
    feats.count()
    return feats, {"enabled": True, "dir": str(cache.folder(key)), "hits": hits, "misses": n_unique - hits}


def lost_entries(cache: FeatureCache | None, key: CacheKey, detail: str = "") -> CovidctError:
    """The error of a job whose feature cache lost entries (another process, a disk) while the job read it."""
    where = f" {cache.folder(key)}" if cache is not None else ""
    return CovidctError(f"the feature cache{where} lost entries while this job read it{detail}; run it again")


class ImageTable(NamedTuple):
    """What a train job featurizes (``image_table``)."""

    images: DataFrame  # the images to featurize (with their bytes), or ``meta`` when there is none to read
    meta: DataFrame  # path, relpath, label, sha256 of every image (persisted)
    n: int  # images (rows of meta)
    counted: tuple[int, int] | None  # (distinct sha256, of them in the cache), where known without Spark


def image_table(spark: SparkSession, data_dir: Path, cache: FeatureCache | None, key: CacheKey) -> ImageTable:
    """The images to featurize, and ``path, relpath, label, sha256`` of every image.

    When the dataset's manifest (written by ``covidct fetch``) still matches the files, the hashes
    come from it (every image is hashed once, by fetch) and ``images`` holds only the files whose
    features the cache lacks: a warm run reads no image, and the counts of cached and uncached images are
    known without a Spark job (``counted``). Otherwise every file is read and hashed in Spark, as for any
    folder.
    """
    manifest = fresh_manifest(data_dir)
    if manifest is None:
        images = load_images(spark, data_dir)
        meta = images.select("path", "relpath", "label", "sha256").persist()
        return ImageTable(images, meta, meta.count(), None)
    root = Path(data_dir).resolve()
    rows = pd.DataFrame(
        {
            "path": [image_path(root, r) for r in manifest["relpath"]],
            "relpath": manifest["relpath"],
            "label": manifest["label"].astype("int32"),
            "sha256": manifest["sha256"],
        }
    )
    meta = spark.createDataFrame(rows, "path string, relpath string, label int, sha256 string").persist()
    cached = cache.shas(key) if cache is not None else set()
    missing = sorted(manifest.loc[~manifest["sha256"].isin(cached), "relpath"])
    log.info("hashes from %s; %d of %d images to read", Path(data_dir) / MANIFEST_NAME, len(missing), len(rows))
    if not missing:
        images = meta  # nothing to read
    elif len(missing) == len(rows):
        images = load_images(spark, data_dir)  # a cold cache: read the folders
    else:
        images = load_images(spark, data_dir, relpaths=missing)
    unique = set(manifest["sha256"])
    return ImageTable(images, meta, len(rows), (len(unique), len(unique & cached)))


@dataclass
class TrainedJob:
    """A finished train job before it publishes ``OUT``: what ``train``'s ``before_publish`` is given."""

    config: TrainConfig
    results: dict[str, dict]  # split -> its metrics.json
    models: dict[str, PipelineModel]  # split -> the fitted PipelineModel (featurizer + LR)
    targets: dict[str, Path]  # split -> its output folder inside ``staging``
    staging: Path  # the job's unpublished OUT (published only if ``before_publish`` returns)


def train(
    config: TrainConfig,
    spark: SparkSession | None = None,
    *,
    before_publish: Callable[[TrainedJob], None] | None = None,
) -> dict[str, dict]:
    """Run the job; returns ``{split: metrics}``. Raises CovidctError for user mistakes.

    ``before_publish`` runs inside the staging folder, after every output is written and before
    ``OUT`` is published: a job whose hook fails publishes nothing. The CLI logs the MLflow run
    there (``covidct.lifecycle.job_logging.record_train``).
    """
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
        view=config.view,
        flips=config.flips,
        batchSize=config.batch_size,
        seed=config.seed,
    )
    cache = FeatureCache(config.cache_dir) if config.cache_dir else None
    key = CacheKey(backbone.name, weights_id, config.pooling, config.precision, featurizer.preprocessing())
    t0 = time.monotonic()
    images, meta, n_images, counted = image_table(spark, config.data_dir, cache, key)
    if n_images == 0:
        raise CovidctError(f"no images found under {config.data_dir}")
    log.info("%d images in %s; featurizing with %s (%s pooling, %s, weights %s, %s)", n_images, config.data_dir,
             backbone.name, config.pooling, config.precision, weights_id, featurizer.preprocessing())  # fmt: skip
    with progress(spark, f"featurize {backbone.name}"), spark_errors():
        wants_grids = config.evidence and config.pooling == "avg"
        feats, cache_stats = featurize(spark, images, featurizer, cache, key, meta, wants_grids, counted)
    featurize_s = time.monotonic() - t0
    data = meta.join(feats, "sha256").withColumn("features", array_to_vector("features"))
    # Few partitions (see FIT_PARTITIONS): every LR iteration is a Spark job over them, on a few hundred rows.
    data = data.coalesce(FIT_PARTITIONS).persist(StorageLevel.MEMORY_AND_DISK)
    relpaths = [r.relpath for r in data.select("relpath").collect()]  # fills the persisted data; every split's
    if len(relpaths) != n_images:  # assignment comes from these (no Spark job per split to collect or count them)
        raise lost_entries(cache, key, f" ({len(relpaths)} of {n_images} images have features)")

    results: dict[str, dict] = {}
    models: dict[str, PipelineModel] = {}
    with atomic_dir(config.out, what="train job") as staging:
        # One split: OUT/metrics.json ...; several: OUT/<split>/metrics.json ...
        targets = {s: staging if len(config.splits) == 1 else staging / s for s in config.splits}
        shared = {  # the same in every split's metrics.json
            "backbone": backbone.name,
            "weights": config.weights,
            "weights_id": weights_id,
            "random_weights": is_random(config.weights),
            "pooling": config.pooling,
            "precision": config.precision,
            "view": config.view,
            "flips": config.flips,
            "preprocessing": featurizer.preprocessing(),
            "feature_dim": backbone.feature_dim(config.pooling),
            "n_images": n_images,
            "cache": cache_stats,
            "versions": {"spark": spark.version, **library_versions(("tensorflow", "keras"))},
            "spark": application(spark),
            "data_dir": str(config.data_dir.absolute()),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        for target in targets.values():
            target.mkdir(parents=True, exist_ok=True)
        # The splits' fits are independent and small: in threads, their Spark jobs' latencies overlap. A cleaned
        # split trains on its source's training images (it only leaves test images out): its source's LR.
        with ThreadPoolExecutor(max_workers=len(targets)) as pool:
            fitted: dict[str, Future] = {}
            for split in sorted(targets, key=lambda s: s in splitlib.CLEANED_FROM):
                source = fitted.get(splitlib.CLEANED_FROM.get(split, ""))
                fitted[split] = pool.submit(fit_and_evaluate, config, split, data, relpaths, featurizer,
                                            targets[split], weights_id, models, source)  # fmt: skip
            fitted = {split: fitted[split] for split in targets}
        for split, future in fitted.items():
            metrics = dict(future.result())
            metrics.pop("lr_model")
            metrics.update(shared)
            metrics["timings"] = {"featurize_s": round(featurize_s, 3), **metrics["timings"]}
            results[split] = metrics
        if config.evidence:
            with progress(spark, f"{backbone.name}: where the evidence lies"):
                locate_evidence(spark, config, featurizer, models, targets, results, cache, key, meta)
        if config.seeds:
            with progress(spark, f"{backbone.name}: random70 over {len(config.seeds)} seeds"):
                repeat_seeds(config, data, staging / SEEDS_DIR, {**shared, "featurize_s": round(featurize_s, 3)})
        total_s = time.monotonic() - started
        for split, metrics in results.items():
            metrics["timings"]["total_s"] = round(total_s, 3)
            (targets[split] / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if before_publish is not None:
            before_publish(TrainedJob(config, results, models, targets, staging))
    data.unpersist()
    feats.unpersist()
    meta.unpersist()
    log.info("wrote %s in %.1f s", config.out, total_s)
    return results


def locate_evidence(
    spark: SparkSession,
    config: TrainConfig,
    featurizer: DeepImageFeaturizer,
    models: dict[str, PipelineModel],
    targets: dict[str, Path],
    results: dict[str, dict],
    cache: FeatureCache | None = None,
    key: CacheKey | None = None,
    meta: DataFrame | None = None,
) -> None:
    """Every split's evidence-inside-body share (``covidct.modelling.evidence``): ``metrics["evidence"]``,
    ``evidence.parquet`` (``relpath, evidence_inside_body, body_share``) and ``cams.parquet`` (``relpath, map,
    map_h, map_w``: each test image's CAM, what the report's gallery draws) per split. From the grids the
    featurization pass left in the feature cache (``meta``: every image's ``relpath, sha256``); a forward pass
    only over test images without one."""
    if config.pooling != "avg":
        for metrics in results.values():
            metrics["evidence"] = None  # no exact CAM for this pooling
        log.info("no evidence-inside-body share for %s pooling (CAM needs avg pooling)", config.pooling)
        return
    t0 = time.monotonic()
    tests = {split: pd.read_parquet(targets[split] / "predictions.parquet", columns=["relpath"]) for split in targets}
    relpaths = sorted(set().union(*(set(t["relpath"]) for t in tests.values())))
    lrs = {split: models[split].stages[1] for split in targets}
    lrs = {split: (lr.coefficients.toArray(), lr.intercept) for split, lr in lrs.items()}
    grids, without = None, relpaths
    if cache is not None and key is not None and meta is not None:
        held = cache.grid_shas(key)
        wanted = meta.filter(F.col("relpath").isin(relpaths)).select("relpath", "sha256").collect()
        with_grid = sorted({(r.relpath, r.sha256) for r in wanted if r.sha256 in held})
        without = sorted(set(relpaths) - {r for r, _ in with_grid})
        if with_grid:
            table = spark.createDataFrame(with_grid, "relpath string, sha256 string")
            grids = F.broadcast(table).join(cache.read_grids(spark, key), "sha256").select("relpath", *GRID_COLUMNS)
    if without:
        log.info("%d test images have no grid in the feature cache: a forward pass over them", len(without))
    images = load_images(spark, config.data_dir, relpaths=without) if without else None
    frame, maps = evidence.evidence_inside_body(featurizer, lrs, images, grids)
    seconds = round(time.monotonic() - t0, 3)
    for split, test in tests.items():
        mine = test.merge(frame[["relpath", split, evidence.BODY_SHARE]], on="relpath", how="left")
        mine = mine.rename(columns={split: "evidence_inside_body"})
        mine.to_parquet(targets[split] / "evidence.parquet", index=False)
        write_cams({r: maps[split][r] for r in test["relpath"] if r in maps[split]}, targets[split] / CAMS_FILE)
        summary = evidence.summarize(mine["evidence_inside_body"], mine[evidence.BODY_SHARE])
        from_grids = int((~mine["relpath"].isin(without)).sum())  # this split's test images drawn from grids
        results[split]["evidence"] = {**summary, "seconds": seconds, "from_grids": from_grids}
        log.info("%s %s: %.1f %% of the evidence for the predicted class lies inside the body (%d images, %.1f s)",
                 config.backbone, split, 100 * (results[split]["evidence"]["inside_body"] or float("nan")),
                 len(mine), seconds)  # fmt: skip


def _lr(config: TrainConfig) -> LogisticRegression:
    return LogisticRegression(
        maxIter=config.max_iter,
        regParam=config.reg_param,
        elasticNetParam=config.elastic_net_param,
        labelCol="label",
        featuresCol="features",
    )


def out_of_fold(config: TrainConfig, split: str, seed: int, train_df: DataFrame) -> pd.DataFrame:
    """``relpath, label, probability, fold``: each training image predicted by an LR fitted without its fold.

    Only training images take part: the stacked ensemble fitted on these never sees a test image.
    Folds hold whole patients on ``official`` and ``official-clean`` (as their test splits do), single
    images on random70.
    """
    relpaths = [r.relpath for r in train_df.select("relpath").collect()]
    folds = splitlib.kfold(relpaths, config.stack_folds, seed, grouped=split in splitlib.PATIENT_SPLITS)
    table = train_df.sparkSession.createDataFrame(sorted(folds.items()), "relpath string, fold int")
    # Few partitions: each LR iteration is one Spark job, and these are a few hundred rows.
    df = train_df.join(table, "relpath").coalesce(FIT_PARTITIONS).persist()
    df.count()  # materialized once, before the folds' threads read it

    def fold(k: int) -> pd.DataFrame:
        model = _lr(config).fit(df.filter(F.col("fold") != k))
        held_out = model.transform(df.filter(F.col("fold") == k))
        return covid_probability(held_out).select("relpath", "label", "probability").toPandas().assign(fold=k)

    # The folds' fits are independent and tiny (each LR iteration a Spark job of a few ms of work):
    # their driver-side latencies overlap in threads. Each fit's result does not depend on the others.
    with ThreadPoolExecutor(max_workers=config.stack_folds) as pool:
        frames = list(pool.map(fold, range(config.stack_folds)))
    df.unpersist()
    return pd.concat(frames, ignore_index=True).sort_values("relpath", kind="stable").reset_index(drop=True)


def repeat_seeds(config: TrainConfig, data: DataFrame, target: Path, shared: dict) -> list[dict]:
    """random70 once per seed of ``config.seeds`` from the same features: metrics and predictions, no models.

    Metrics are scikit-learn's on the collected predictions (the definitions Spark's evaluators
    use; the report checks they agree on the main split).
    """
    target.mkdir(parents=True)
    rows, predictions, oofs = [], [], []
    data = data.coalesce(FIT_PARTITIONS).persist()  # see out_of_fold
    for seed in config.seeds:
        t0 = time.monotonic()
        assigned = splitlib.assign(data, "random70", seed, config.data_dir)
        train_df = assigned.filter("split = 'train'").persist()
        test_df = assigned.filter("split = 'test'")
        model = _lr(config).fit(train_df)
        frame = covid_probability(model.transform(test_df)).toPandas()
        frame = frame.sort_values("relpath", kind="stable").reset_index(drop=True)
        fit_s = time.monotonic() - t0
        if config.stack_folds and config.stack_seeds:
            oofs.append(out_of_fold(config, "random70", seed, train_df).assign(seed=seed))
        n_train = train_df.count()
        train_df.unpersist()
        y, pred = frame["label"].to_numpy(), frame["prediction"].to_numpy()
        metrics = stats.reference_metrics(y, pred, frame["probability"].to_numpy())
        rows.append({"seed": seed, "n_train": n_train, "n_test": len(frame), **metrics, "confusion": confusion(y, pred),
                     "timings": {"fit_s": round(fit_s, 3), "total_s": round(time.monotonic() - t0, 3)}})  # fmt: skip
        predictions.append(frame.assign(seed=seed))
        log.info("%s random70 seed %d: accuracy %.4f, auc %.4f (%.1f s)", config.backbone, seed,
                 metrics["accuracy"], metrics["auc"] or float("nan"), time.monotonic() - t0)  # fmt: skip
    data.unpersist()
    pd.concat(predictions, ignore_index=True).to_parquet(target / "predictions.parquet", index=False)
    if oofs:
        pd.concat(oofs, ignore_index=True).to_parquet(target / "oof.parquet", index=False)
    summary = {
        "split": "random70",
        "seeds": config.seeds,
        "main_seed": config.seed,
        "stack_folds": config.stack_folds if config.stack_seeds else 0,
        "lr": {"maxIter": config.max_iter, "regParam": config.reg_param, "elasticNetParam": config.elastic_net_param},
        **shared,
        "runs": rows,
    }
    (target / "seeds.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return rows


def fit_and_evaluate(
    config: TrainConfig,
    split: str,
    data: DataFrame,
    relpaths: list[str],
    featurizer: DeepImageFeaturizer,
    target: Path,
    weights_id: str,
    models: dict | None = None,
    source: Future | None = None,
) -> dict:
    """Fit LR on the split's train part, evaluate its test part, save model + predictions (+ out-of-fold).

    ``source``: for a cleaned split (``official-clean``), its source split's ``fit_and_evaluate``: the same
    training images, so the same LR, taken from it instead of fitted again (``lr_from`` in the metrics).
    ``relpaths``: ``data``'s relpath column (collected once for every split).
    """
    mapping = splitlib.assignment(split, relpaths, config.seed, config.data_dir)
    assigned = splitlib.assign(data, split, config.seed, config.data_dir, mapping)
    train_df = assigned.filter("split = 'train'").persist()
    test_df = assigned.filter("split = 'test'").persist()
    n_train = sum(1 for part in mapping.values() if part == "train")  # one row per relpath: no count job
    n_test = len(mapping) - n_train
    theirs = source.result() if source is not None else None
    t0 = time.monotonic()
    if theirs is not None and theirs["n_train"] == n_train:
        lr_model = theirs["lr_model"]  # fit_s: 0, nothing fitted here
    else:
        lr_model, theirs = _lr(config).fit(train_df), None
    fit_s = time.monotonic() - t0
    t0 = time.monotonic()
    # One Spark job: the test predictions (a few hundred rows) collected once, then Spark's metric
    # definitions on them (covidct.modelling.evaluate), instead of five evaluator passes and a count.
    frame = covid_probability(lr_model.transform(test_df), margin=True).toPandas()
    frame = frame.sort_values("relpath", kind="stable").reset_index(drop=True)
    metrics = evaluate_collected(frame)
    evaluate_s = time.monotonic() - t0
    log.info("%s %s: accuracy %.4f on %d test images (fit %.1f s)", config.backbone, split,
             metrics["accuracy"], n_test, fit_s)  # fmt: skip
    t0 = time.monotonic()
    # The saved model classifies new images end to end: image bytes -> features -> LR.
    model = PipelineModel(stages=[featurizer, lr_model])
    model.write().save((target / "model").as_uri())
    if models is not None:  # kept for before_publish (MLflow logs it with the Spark flavour)
        models[split] = model
    # Each row records the weights it came from ("random-seedN" marks random weights).
    write_predictions(frame.drop(columns="margin").assign(weights_id=weights_id), target / "predictions.parquet")
    save_s = time.monotonic() - t0
    stack_s = None
    if config.stack_folds:
        t0 = time.monotonic()
        out_of_fold(config, split, config.seed, train_df).to_parquet(target / "oof.parquet", index=False)
        stack_s = round(time.monotonic() - t0, 3)
    for df in (train_df, test_df):
        df.unpersist()
    return {
        "split": split,
        "seed": config.seed,
        "n_train": n_train,
        "n_test": n_test,
        **metrics,
        "lr": {"maxIter": config.max_iter, "regParam": config.reg_param, "elasticNetParam": config.elastic_net_param},
        "timings": {"fit_s": round(fit_s, 3), "evaluate_s": round(evaluate_s, 3), "save_s": round(save_s, 3)},
        # oof.parquet: out-of-fold training predictions for the stacked ensemble (None: not made)
        "out_of_fold": {"folds": config.stack_folds, "seconds": stack_s} if config.stack_folds else None,
        "lr_from": theirs["split"] if theirs is not None else None,  # the split whose fitted LR this is
        "lr_model": lr_model,  # for a cleaned split's fit_and_evaluate; not written
    }
