"""The ``covidct`` command line: fetch, validate, train, predict, report, cache.

User mistakes (bad arguments, missing files, undecodable images, unavailable weights,
failed validation) end with a one-line ``error: ...`` and exit status 2 (1 for a
failed validation), never a stack trace.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from covidct.backbone import POOLINGS
from covidct.errors import CovidctError

log = logging.getLogger("covidct")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="featurize with a backbone, fit logistic regression, evaluate")
    p.add_argument("--data", required=True, type=Path, help="dataset folder laid out like upstream COVID-CT")
    p.add_argument("--backbone", required=True, help="VGG16, VGG19, Xception, ResNet50 or InceptionV3")
    p.add_argument(
        "--split",
        default="random70",
        help="random70 (seeded 70/30, the study's protocol), official (patient-level lists), "
        "or several: official,random70 / both (features computed once)",
    )
    p.add_argument("--seed", type=int, default=42, help="seed of the random70 split (and of random weights)")
    p.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    p.add_argument("--weights", default="imagenet", help="imagenet (default), none (random), or a weights file")
    p.add_argument(
        "--pooling",
        default="avg",
        choices=POOLINGS,
        help="avg: global average of the last conv block; flatten: it flattened (sparkdl); avg-b345: global "
        "averages of conv blocks 3, 4, 5 concatenated; avgmax-b345: those plus the blocks' global maxima "
        "(multi-layer: VGG16, VGG19, ResNet50)",
    )
    p.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bfloat16"],
        help="bfloat16: ~2x faster featurization on CPUs with AVX512_BF16/AMX, features within ~1 %%",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per Keras forward pass")
    p.add_argument("--max-iter", type=int, default=20)
    p.add_argument("--reg-param", type=float, default=0.05)
    p.add_argument("--elastic-net-param", type=float, default=0.3)
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="feature cache folder (default: $COVIDCT_CACHE_DIR, else $COVIDCT_HOME/feature-cache)",
    )
    p.add_argument("--cache", choices=["on", "off"], default="on", help="off: featurize every image, no cache")
    p.add_argument("--no-cache", dest="cache", action="store_const", const="off", help="same as --cache off")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from covidct.cache import default_cache_dir
    from covidct.train import TrainConfig, train

    config = TrainConfig(
        data_dir=args.data,
        backbone=args.backbone,
        out=args.out,
        splits=args.split,
        seed=args.seed,
        weights=args.weights,
        pooling=args.pooling,
        precision=args.precision,
        batch_size=args.batch_size,
        max_iter=args.max_iter,
        reg_param=args.reg_param,
        elastic_net_param=args.elastic_net_param,
        cache_dir=None if args.cache == "off" else (args.cache_dir or default_cache_dir()),
    )
    results = train(config)
    for split, m in results.items():
        print(
            f"{m['backbone']} {split}: accuracy {m['accuracy']:.4f}  f1 {m['f1']:.4f}  auc {m['auc']:.4f}  "
            f"({m['n_test']} test images, featurize {m['timings']['featurize_s']:.0f} s, "
            f"fit {m['timings']['fit_s']:.1f} s)"
        )
    print(f"wrote {args.out}")
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify new images with a saved model")
    p.add_argument("--model", required=True, type=Path, help="a model/ folder written by `covidct train`")
    p.add_argument("--images", required=True, type=Path, help="an image file or a folder of images (recursive)")
    p.add_argument("--out", type=Path, help="write a CSV here (default: print)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> int:
    from covidct.predict import predict

    rows = predict(args.model, args.images, args.out)
    if args.out is None:
        for r in rows:
            print(f"{r['probability']:.4f}\t{'COVID' if r['prediction'] else 'non-COVID'}\t{r['path']}")
    else:
        print(f"wrote {len(rows)} predictions to {args.out}")
    return 0


def _add_fetch(sub) -> None:
    p = sub.add_parser("fetch", help="download (or copy) the COVID-CT dataset, verified and atomic")
    p.add_argument("--dest", required=True, type=Path, help="where the dataset folder goes")
    p.add_argument(
        "--source",
        default=os.environ.get("COVIDCT_DATA_SOURCE") or None,
        help="upstream (default), a base URL of a mirror, a local dataset folder, or a folder holding the zips",
    )
    p.add_argument("--expect-covid", type=int, default=349, help="COVID images the data must have (default 349)")
    p.add_argument("--expect-noncovid", type=int, default=397, help="non-COVID images (default 397)")
    p.set_defaults(func=_cmd_fetch)


def _cmd_fetch(args) -> int:
    from covidct.fetch import fetch

    result = fetch(
        args.dest, source=args.source, expected_covid=args.expect_covid, expected_noncovid=args.expect_noncovid
    )
    print(result.summary())
    return 0


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="Great Expectations validation of a fetched dataset")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--expect-covid", type=int, default=349, help="expected COVID images (default 349)")
    p.add_argument("--expect-noncovid", type=int, default=397, help="expected non-COVID images (default 397)")
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args) -> int:
    from covidct.validate import validate

    result = validate(args.data, expected_covid=args.expect_covid, expected_noncovid=args.expect_noncovid)
    print(result.summary())
    return 0 if result.success else 1


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="compare backbones of one or more runs (HTML + Markdown + PNG)")
    p.add_argument("run_dirs", nargs="+", type=Path, help="run folders holding */metrics.json")
    p.add_argument("--out", type=Path, help="report folder (default: RUN_DIR/report)")
    p.add_argument("--expect", help="comma-separated backbones that were asked for (missing ones are failures)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from covidct.report import build_report

    expected = [b.strip() for b in args.expect.split(",") if b.strip()] if args.expect else None
    report = build_report(args.run_dirs, out=args.out, expected_backbones=expected)
    print(f"report: {report.html}\n        {report.markdown}")
    return 0


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="inspect or clear the feature cache")
    p.add_argument("action", choices=["info", "clear"])
    p.add_argument("--cache-dir", type=Path)
    p.set_defaults(func=_cmd_cache)


def _cmd_cache(args) -> int:
    from covidct.cache import FeatureCache, default_cache_dir

    cache = FeatureCache(args.cache_dir or default_cache_dir())
    if args.action == "clear":
        cache.clear()
        print(f"cleared {cache.root}")
        return 0
    rows = cache.summary()
    print(f"feature cache {cache.root}: {len(rows)} keys")
    for r in rows:
        size_mb = r["bytes"] / 1e6
        key = f"{r['backbone']:12} {r['weights_id']:24} {r['pooling']:11} {r['precision']:9}"
        print(f"  {key} {r['files']:4} files {size_mb:9.1f} MB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covidct", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_fetch, _add_validate, _add_train, _add_predict, _add_report, _add_cache):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except CovidctError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from covidct.train import user_error

        found = user_error(exc)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
