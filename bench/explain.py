"""The cost of ``covidct predict --explain`` against plain ``covidct predict``, per pooling (img/s).

    python bench/explain.py --backbone VGG16 --images 32 [--repeat 3] [--poolings avg,avg-b345] [--master local[2]]

For each pooling, a featurizer + LR model is fitted on the same real images (ImageNet weights, half
COVID, half not), then, in one Spark session after a warm-up pass of each path (the workers build
their Keras models once), passes alternate: plain ``predict`` (featurize + LR), the maps alone
(``covidct.inference.maps.explain_model``: one forward pass, plus the gradient for Grad-CAM, and the LR),
and ``predict --explain`` (the maps, then every PNG drawn at the image's size and written with its
``.npy``). Prints one JSON line: img/s of every pass, medians, and the ratios to plain predict.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, median, sample_images  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="VGG16")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--poolings", default="avg,avg-b345")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("COVIDCT_DATA_DIR", DEFAULT_DATA)))
    args = parser.parse_args()
    os.environ["COVIDCT_SPARK_MASTER"] = args.master
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression

    from covidct.core.session import get_spark
    from covidct.data.dataset import load_images
    from covidct.features.featurizer import DeepImageFeaturizer
    from covidct.inference import maps
    from covidct.inference.explainer import method_for
    from covidct.inference.files import read_images
    from covidct.inference.predict import predict

    work = Path(tempfile.mkdtemp(prefix="covidct-bench-explain-"))
    try:
        data = work / "data"
        for f in sample_images(args.data, args.images):
            (data / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, data / f.parent.name / f.name)
        spark = get_spark("covidct-bench-explain", {"spark.ui.enabled": "false"})
        result = {"backbone": args.backbone, "images": args.images, "master": args.master, "poolings": {}}
        for pooling in [p.strip() for p in args.poolings.split(",") if p.strip()]:
            model = work / f"model-{pooling}"
            featurizer = DeepImageFeaturizer(modelName=args.backbone, weights="imagenet", pooling=pooling)
            lr = LogisticRegression(maxIter=20, regParam=0.05, elasticNetParam=0.3)
            Pipeline(stages=[featurizer, lr]).fit(load_images(spark, data)).save(str(model))
            out = work / f"maps-{pooling}"

            def plain(model=model):
                predict(model, data)

            def maps_only(model=model):
                files = read_images(spark, data)
                maps.explain_model(model, files.frame)
                files.unpersist()

            def explained(model=model, out=out):
                predict(model, data, explain_dir=out)

            paths = {"predict": plain, "maps": maps_only, "predict --explain": explained}
            for run in paths.values():  # warm-up: the workers build their models
                run()
            rates: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.repeat):
                for name, run in paths.items():
                    start = time.perf_counter()
                    run()
                    rates[name].append(args.images / (time.perf_counter() - start))
            medians = {name: median(r) for name, r in rates.items()}
            result["poolings"][pooling] = {
                "method": method_for(pooling),
                "rates": rates,
                "median": medians,
                "cost_vs_predict": {name: medians["predict"] / m for name, m in medians.items()},
            }
            print(f"  {pooling}: " + ", ".join(f"{n} {m:.2f} img/s" for n, m in medians.items()), file=sys.stderr)
        spark.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
