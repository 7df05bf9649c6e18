"""Bare Keras ``predict`` vs the Spark ``DeepImageFeaturizer`` on the same real images.

    python bench/featurize.py keras  --backbone VGG16 --images 200 [--repeat 3] [--precision bfloat16]
    python bench/featurize.py spark  --backbone VGG16 --images 200 [--repeat 3] [--master local[2]] [--task-cpus 1]
                                     [--view body-blank] [--grids]   # what the DAG's train job computes
                                     [--partitions -1]   # -1: the job's layout (default); 0: as Spark reads the files
    python bench/featurize.py poolings --backbone VGG16 --images 200 [--repeat 3] [--poolings avg,avg-b345,avgmax-b345]
    python bench/featurize.py cpu-poolings --backbone VGG16 --images 32 [--repeat 3]   # CPU s/image, no Spark

Each prints one JSON line: img/s of every timed pass (after a warm-up that builds the
model), their median, and the cold first pass. ``poolings`` runs the Spark featurizer once per
pooling in one Spark session on the same cached images (a cold pass, then the timed passes, pooling
after pooling: each worker keeps two models, so interleaving three would rebuild them) and gives
each pooling's median beside its ratio to the first one's. Both paths decode the same files with
``covidct.data.image.decode`` and run the backbone's ``preprocess_input``; bare Keras uses
TensorFlow's default threads in one process. Needs ImageNet weights in
``COVIDCT_WEIGHTS_DIR`` (``make weights``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, median, sample_images  # noqa: E402

#: Images per task in the train job's featurization: Spark packs the 746 files into 25 tasks of ~31
#: (binaryFile, 4 MB open cost per file). A sample read as it comes packs unevenly (96 files: 30, 30, 30, 6 ->
#: the last round runs one task on one core), which is the sample's layout, not the job's.
JOB_TASK_IMAGES = 32


def imagenet_model(backbone_name: str, precision: str):
    """``(backbone, model)``: the backbone's ImageNet Keras model with global average pooling, bare (no Spark)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from covidct.features.backbone import get_backbone, resolve_weights

    backbone = get_backbone(backbone_name)
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    model = backbone.keras_constructor()(
        include_top=False,
        weights=str(resolve_weights(backbone, "imagenet")),
        input_shape=(backbone.input_size, backbone.input_size, 3),
        pooling="avg",
    )
    return backbone, model


def bare_keras(backbone_name: str, files: list[Path], repeat: int, batch_size: int, precision: str) -> dict:
    import numpy as np

    from covidct.data.image import decode

    t0 = time.perf_counter()
    backbone, model = imagenet_model(backbone_name, precision)
    preprocess = backbone.preprocess_input()

    def one_pass() -> float:
        start = time.perf_counter()
        for i in range(0, len(files), batch_size):
            chunk = files[i : i + batch_size]
            x = np.stack([decode(f.read_bytes(), backbone.input_size, str(f)) for f in chunk])
            model.predict(preprocess(x), batch_size=batch_size, verbose=0)
        return len(files) / (time.perf_counter() - start)

    cold = len(files) / (time.perf_counter() - t0 + len(files) / one_pass())
    rates = [one_pass() for _ in range(repeat)]
    return {"path": "keras", "backbone": backbone.name, "images": len(files), "rates": rates,
            "median": median(rates), "cold": cold, "precision": precision}  # fmt: skip


def spark_featurizer(backbone_name: str, files: list[Path], repeat: int, batch_size: int, master: str,
                     task_cpus: int, precision: str, view: str = "full", grids: bool = False,
                     partitions: int = -1) -> dict:  # fmt: skip
    os.environ["COVIDCT_SPARK_MASTER"] = master
    from covidct.core.session import get_spark
    from covidct.features.featurizer import DeepImageFeaturizer

    spark = get_spark("bench-featurize", {"spark.task.cpus": str(task_cpus)})
    df = spark.read.format("binaryFile").load([str(f) for f in files]).withColumnRenamed("content", "image")
    if partitions < 0:  # the train job's layout: tasks of ~32 images, a whole number of rounds over the cores
        cores = spark.sparkContext.defaultParallelism
        partitions = cores * -(-len(files) // (cores * JOB_TASK_IMAGES))
    if partitions:
        df = df.repartition(partitions)
    df = df.cache()
    df.count()  # the bytes are in memory: both paths then start from decoded-nothing, read-nothing
    n_partitions = df.rdd.getNumPartitions()
    featurizer = DeepImageFeaturizer(
        modelName=backbone_name, weights="imagenet", batchSize=batch_size, precision=precision, view=view
    )
    # grids: what the train job computes (the features and their grids, covidct.features.featurizer.featureRecords)
    column = featurizer.featureRecords(df) if grids else featurizer.featureArrays(df)

    def one_pass() -> float:
        start = time.perf_counter()
        df.select(column.alias("f")).write.format("noop").mode("overwrite").save()
        return len(files) / (time.perf_counter() - start)

    cold = one_pass()  # Python workers start, import TensorFlow and build the model
    rates = [one_pass() for _ in range(repeat)]
    spark.stop()
    return {"path": "spark", "backbone": featurizer.getModelName(), "images": len(files), "rates": rates,
            "median": median(rates), "cold": cold, "master": master, "task_cpus": task_cpus,
            "precision": precision, "view": view, "grids": grids, "partitions": n_partitions}  # fmt: skip


def spark_poolings(backbone_name: str, files: list[Path], repeat: int, batch_size: int, master: str,
                   poolings: list[str], precision: str) -> dict:  # fmt: skip
    os.environ["COVIDCT_SPARK_MASTER"] = master
    from covidct.core.session import get_spark
    from covidct.features.featurizer import DeepImageFeaturizer

    spark = get_spark("bench-poolings")
    df = spark.read.format("binaryFile").load([str(f) for f in files]).withColumnRenamed("content", "image")
    df = df.cache()
    df.count()
    out = {}
    for pooling in poolings:
        featurizer = DeepImageFeaturizer(
            modelName=backbone_name, weights="imagenet", pooling=pooling, batchSize=batch_size, precision=precision
        )

        def one_pass(featurizer=featurizer) -> float:
            start = time.perf_counter()
            featurizer.transform(df).select("features").write.format("noop").mode("overwrite").save()
            return len(files) / (time.perf_counter() - start)

        cold = one_pass()
        rates = [one_pass() for _ in range(repeat)]
        out[pooling] = {"rates": rates, "median": median(rates), "cold": cold, "dim": featurizer.featureDim()}
        print(f"  {backbone_name} {pooling}: {out[pooling]['median']:.2f} img/s", file=sys.stderr, flush=True)
    spark.stop()
    base = out[poolings[0]]["median"]
    for row in out.values():
        row["ratio"] = row["median"] / base
    return {"path": "poolings", "backbone": backbone_name, "images": len(files), "poolings": out, "master": master,
            "precision": precision}  # fmt: skip


def cpu_poolings(backbone_name: str, files: list[Path], repeat: int, batch_size: int, poolings: list[str],
                 precision: str) -> dict:  # fmt: skip
    """The featurizer's own worker model per pooling, in this process: CPU seconds per image.

    CPU time (all threads of the process) barely moves when other jobs share the cores, unlike
    img/s; it is the cost to compare on a loaded machine.
    """
    import pandas as pd

    from covidct.features.workers import WorkerModel

    images = pd.Series([f.read_bytes() for f in files])
    names = pd.Series([str(f) for f in files])
    out = {}
    for pooling in poolings:
        model = WorkerModel(backbone_name, "imagenet", pooling, 0, precision)
        model.features(images[:batch_size], names[:batch_size], "bytes", batch_size)  # warm-up
        cpu, wall = [], []
        for _ in range(repeat):
            c0, w0 = time.process_time(), time.perf_counter()
            model.features(images, names, "bytes", batch_size)
            cpu.append((time.process_time() - c0) / len(files))
            wall.append(len(files) / (time.perf_counter() - w0))
        out[pooling] = {"cpu_s_per_image": cpu, "median_cpu_s": median(cpu), "img_s": wall, "dim": model.dim}
        print(f"  {backbone_name} {pooling}: {median(cpu):.3f} CPU s/image", file=sys.stderr, flush=True)
    base = out[poolings[0]]["median_cpu_s"]
    for row in out.values():
        row["cost_ratio"] = row["median_cpu_s"] / base
    return {"path": "cpu-poolings", "backbone": backbone_name, "images": len(files), "poolings": out,
            "precision": precision}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", choices=["keras", "spark", "poolings", "cpu-poolings"])
    parser.add_argument("--backbone", default="VGG16")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("COVIDCT_DATA_DIR", DEFAULT_DATA)))
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--task-cpus", type=int, default=1)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--poolings", default="avg,avg-b345,avgmax-b345", help="for `poolings`: the first is the base")
    parser.add_argument("--view", default="full", help="for `spark`: what the backbone sees (the DAG: body-blank)")
    parser.add_argument("--grids", action="store_true", help="for `spark`: also the grids, as the train job")
    parser.add_argument(
        "--partitions",
        type=int,
        default=-1,
        help="for `spark`: repartition the images (-1: as the train job's, ~32 per task and a whole "
        "number of rounds over the cores; 0: as Spark reads the files)",
    )
    args = parser.parse_args()
    files = sample_images(args.data, args.images)
    if args.path == "keras":
        result = bare_keras(args.backbone, files, args.repeat, args.batch_size, args.precision)
    elif args.path == "cpu-poolings":
        poolings = [p.strip() for p in args.poolings.split(",") if p.strip()]
        result = cpu_poolings(args.backbone, files, args.repeat, args.batch_size, poolings, args.precision)
    elif args.path == "poolings":
        poolings = [p.strip() for p in args.poolings.split(",") if p.strip()]
        result = spark_poolings(
            args.backbone, files, args.repeat, args.batch_size, args.master, poolings, args.precision
        )
    else:
        result = spark_featurizer(args.backbone, files, args.repeat, args.batch_size, args.master, args.task_cpus,
                                  args.precision, args.view, args.grids, args.partitions)  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
