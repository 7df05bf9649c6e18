"""The ``covidct`` command line: fetch, validate, train, predict, score, ensemble, report, cache.

User mistakes (bad arguments, missing files, undecodable images, unavailable weights,
failed validation) end with a one-line ``error: ...`` and exit status 2 (1 for a
failed validation), never a stack trace.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from covidct.core import executors
from covidct.core.errors import CovidctError
from covidct.core.locks import DEFAULT_WAIT
from covidct.core.spark_errors import user_error
from covidct.data import duplicates
from covidct.data.body import VIEWS
from covidct.data.split import STACK_FOLDS
from covidct.features.backbone import POOLINGS

log = logging.getLogger("covidct")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="featurize with a backbone, fit logistic regression, evaluate")
    p.add_argument("--data", required=True, type=Path, help="dataset folder laid out like upstream COVID-CT")
    p.add_argument("--backbone", required=True, help="VGG16, VGG19, Xception, ResNet50 or InceptionV3")
    p.add_argument(
        "--split",
        default="random70",
        help="random70 (seeded 70/30, the study's protocol), official (patient-level lists), official-clean "
        "(official without the test images that are near-duplicates of another class's or split's image), "
        "or several: official,official-clean,random70 / both = official,random70 (features computed once)",
    )
    p.add_argument("--seed", type=int, default=42, help="seed of the random70 split (and of random weights)")
    p.add_argument(
        "--seeds",
        help="also repeat random70 for these seeds from the same features, e.g. 0-9 or 1,5,20-24 "
        "(written to OUT/random70-seeds/; the report shows mean, sd, min-max); empty: --seed only",
    )
    p.add_argument(
        "--stack-folds",
        type=int,
        default=STACK_FOLDS,
        help="folds of the out-of-fold training predictions the stacked ensemble is fitted on (0: none)",
    )
    p.add_argument(
        "--stack-seeds",
        action="store_true",
        help="out-of-fold predictions for every seed of --seeds too (the stacked ensemble per seed; "
        "folds x seeds more LR fits)",
    )
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
    p.add_argument(
        "--view",
        default="full",
        choices=VIEWS,
        help="what the backbone sees: full (the whole picture), body (cropped to the body's bounding box) or "
        "body-blank (cropped, and black outside the body): no margins, borders or labels of the source figure",
    )
    p.add_argument(
        "--flips",
        choices=["on", "off"],
        default="off",
        help="on: test-time flips, each image's features are the mean of its own and its mirror image's "
        "(2x the passes)",
    )
    p.add_argument(
        "--evidence",
        choices=["on", "off"],
        default="on",
        help="the share of each model's evidence that lies inside the body, over the test images, and their maps "
        "(from the conv blocks the featurization pass keeps in the feature cache; without a cache, one more pass "
        "over the test images; avg pooling only)",
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
    p.add_argument(
        "--tracking",
        choices=["on", "off"],
        help="log an MLflow run (params, metrics, metrics.json, the models) to $MLFLOW_TRACKING_URI, else "
        "$COVIDCT_HOME/mlflow/mlflow.db (default: on, unless COVIDCT_TRACKING=off)",
    )
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from covidct.features.cache import default_cache_dir
    from covidct.lifecycle import job_logging, store
    from covidct.modelling.train import TrainConfig, train

    if args.confined:  # the DAG's job: its arguments came from trigger params
        from covidct.orchestration.policy import WEIGHTS_PATTERN, Policy, check_pattern

        check_pattern(args.weights, WEIGHTS_PATTERN, "--weights")
        args.weights = Policy.from_env().check_weights(args.weights)
    config = TrainConfig(
        data_dir=args.data,
        backbone=args.backbone,
        out=args.out,
        splits=args.split,
        seed=args.seed,
        weights=args.weights,
        pooling=args.pooling,
        precision=args.precision,
        view=args.view,
        flips=args.flips == "on",
        evidence=args.evidence == "on",
        batch_size=args.batch_size,
        max_iter=args.max_iter,
        reg_param=args.reg_param,
        elastic_net_param=args.elastic_net_param,
        cache_dir=None if args.cache == "off" else (args.cache_dir or default_cache_dir()),
        seeds=args.seeds if args.seeds and args.seeds.strip() else None,
        stack_folds=args.stack_folds,
        stack_seeds=args.stack_seeds,
    )
    tracking = (args.tracking or ("on" if store.enabled() else "off")) == "on"
    results = train(config, before_publish=job_logging.record_train if tracking else None)
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
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        help="a model/ folder written by `covidct train`, or RUN_DIR/ensemble written by `covidct ensemble`",
    )
    p.add_argument(
        "--images",
        required=True,
        type=Path,
        help="an image file or a folder of images (recursive): PNG, JPEG, ... and DICOM CT (scored slice by slice, "
        "one result per series beside them)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="write a CSV here (default: print); with DICOM slices also OUT.series.csv and both as Parquet",
    )
    _add_window(p)
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit 2, nothing scored) if any file cannot be scored; by default unreadable files are "
        "listed with the reason and the rest are scored",
    )
    p.add_argument(
        "--log",
        type=Path,
        help="where Spark's and TensorFlow's own output goes (default: $COVIDCT_HOME/logs/predict-<time>.log)",
    )
    p.add_argument(
        "--explain",
        type=Path,
        metavar="OUT_DIR",
        help="also write each image's class activation map there: a PNG (the scan with the map overlaid) and the "
        "raw map (.npy); CAM for avg pooling, Grad-CAM for the others; the CSV gains their paths",
    )
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> int:
    from covidct.core import paths
    from covidct.inference.predict import predict

    log_path = args.log or paths.home() / "logs" / f"predict-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"Spark and TensorFlow output: {log_path}", file=sys.stderr)
    handler = logging.FileHandler(log_path)  # our own lines (the unreadable files among them) go there too
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    try:
        rows = predict(
            args.model, args.images, args.out, strict=args.strict, spark_log=log_path, explain_dir=args.explain,
            window=args.window,
        )  # fmt: skip
    except CovidctError as exc:  # the terminal gets it from main(); the log gets it here
        handler.stream.write(f"error: {exc}\n")
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    if args.out is None:
        for r in rows:
            line = f"{r['probability']:.4f}\t{'COVID' if r['prediction'] else 'non-COVID'}\t{r['path']}"
            if "members" in r:  # an ensemble: each backbone's probability beside the ensemble's
                parts = [f"{b} {p:.4f}" for b, p in r["members"].items()] + [f"mean {r['mean']:.4f}"]
                parts += [f"stacked {r['stacked']:.4f}"] if "stacked" in r else []
                line += f"\t({r['method']}; {', '.join(parts)})"
            if "explanation_png" in r:
                line += f"\t{r['explain_method']}: {r['explanation_png']}"
            print(line)
        for u in rows.unreadable:
            print(f"     -\tunreadable\t{u.path}\t({u.reason})")
        for s in rows.series.itertuples():
            print(f"{s.probability:.4f}\t{s.label}\tDICOM series {s.series_uid_hash[:16]} ({s.slices} slices, "
                  f"window {s.window}; {s.rule})")  # fmt: skip
    else:
        print(f"wrote {len(rows)} predictions to {args.out}")
        if not rows.series.empty:
            print(f"wrote {len(rows.series)} DICOM series to {args.out.with_suffix('')}.series.csv (and .parquet)")
    if not rows.series.empty:
        from covidct.data.dicom import NOTICE

        print(NOTICE, file=sys.stderr)
    if args.explain is not None:
        print(f"wrote {len(rows)} explanations (PNG + .npy) to {args.explain}")
    if rows.unreadable:
        n = len(rows) + len(rows.unreadable)
        print(
            f"{len(rows.unreadable)} of {n} files could not be scored (unreadable: listed "
            f"{'above' if args.out is None else 'in ' + str(args.out)} and in {log_path}, with the reason)",
            file=sys.stderr,
        )
    return 0


def _add_score(sub) -> None:
    p = sub.add_parser(
        "score", help="score a folder of new scans with a model, each image once per model version (a ledger)"
    )
    p.add_argument("--images", required=True, type=Path, help="the folder of scans (recursive)")
    p.add_argument("--model", required=True, type=Path, help="a model/ folder of `covidct train` or RUN_DIR/ensemble")
    p.add_argument("--model-name", required=True, help="the model's name (e.g. the registered model covid-ct)")
    p.add_argument("--model-version", required=True, help="its version: a new version scores every image again")
    p.add_argument("--out", required=True, type=Path, help="the run's output folder (written atomically)")
    p.add_argument("--ledger", type=Path, help="what was scored (default: $COVIDCT_HOME/scores/_ledger)")
    p.add_argument("--strict", action="store_true", help="fail (nothing scored) if any file cannot be scored")
    _add_window(p)
    p.add_argument(
        "--lock-wait",
        type=float,
        default=DEFAULT_WAIT,
        metavar="SECONDS",
        help=f"if another job scores with the same model version, wait this long for it (default {DEFAULT_WAIT:.0f})",
    )
    p.set_defaults(func=_cmd_score)


def _cmd_score(args) -> int:
    from covidct.lifecycle.scoring import ScoreConfig, score_folder

    confine_to = None
    if args.confined:  # the scoring DAG's job: the folder came from a trigger param
        from covidct.orchestration.policy import FOLDER_PATTERN, Policy, check_pattern

        check_pattern(str(args.images), FOLDER_PATTERN, "--images")
        policy = Policy.from_env()
        args.images = Path(policy.check_folder(str(args.images)))
        confine_to = policy.scoring_roots()  # and every file in it, symbolic links followed
    config = ScoreConfig(
        images=args.images,
        model_dir=args.model,
        model_name=args.model_name,
        model_version=args.model_version,
        out=args.out,
        ledger=args.ledger,
        strict=args.strict,
        lock_wait=args.lock_wait,
        window=args.window,
        confine_to=confine_to,
    )
    s = score_folder(config)
    print(
        f"{s['model']['name']} version {s['model']['version']}: {s['files']} files in {s['folder']}: "
        f"{s['scored_new']} images scored, {s['already_scored']} already scored by this version, "
        f"{s['unreadable']} unreadable"
    )
    for u in s["unreadable_files"]:
        print(f"  unreadable, not scored: {u['path']}: {u['reason']}")
    if s["dicom"]["series"]:
        print(f"{s['dicom']['slices']} DICOM slices in {s['dicom']['series']} series (window {s['dicom']['window']})")
        print(s["dicom"]["notice"], file=sys.stderr)
    print(f"wrote {s['out']}")
    return 0


def _add_window(p) -> None:
    p.add_argument(
        "--window",
        type=_window,
        default=None,
        metavar="LEVEL,WIDTH",
        help="DICOM slices: the display window in Hounsfield units that maps them to 8 bits, recorded with every "
        "result (default: the lung window, --window=-600,1500; write it with '=': a negative level reads as an option)",
    )


def _window(text: str):
    from covidct.data.dicom import Window

    try:
        return Window.parse(text)
    except CovidctError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_ensemble(sub) -> None:
    p = sub.add_parser("ensemble", help="combine a run's backbones: mean and stacked ensembles, saved for predict")
    p.add_argument("run_dir", type=Path, help="a run folder holding the backbones' results (*/metrics.json)")
    p.add_argument("--out", type=Path, help="ensemble folder (default: RUN_DIR/ensemble)")
    p.set_defaults(func=_cmd_ensemble)


def _cmd_ensemble(args) -> int:
    from covidct.modelling.ensemble import build_ensemble
    from covidct.modelling.ensemble_format import METHOD_LABELS

    result = build_ensemble(args.run_dir, out=args.out)
    for split, methods in result.splits.items():
        for method, m in methods.items():
            acc, auc = m["accuracy"], m["auc"]
            print(f"{METHOD_LABELS[method]} {split}: accuracy {acc:.4f}  auc {auc:.4f}  ({m['n_test']} test images)")
    for method, runs in result.seeds.items():
        acc = [r["accuracy"] for r in runs]
        print(f"{METHOD_LABELS[method]} random70 over {len(acc)} seeds: accuracy mean {sum(acc) / len(acc):.4f}")
    print(f"wrote {result.out} ({'+'.join(result.members)}, models of the {result.model_split} split)")
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
    p.add_argument(
        "--lock-wait",
        type=float,
        default=DEFAULT_WAIT,
        metavar="SECONDS",
        help=f"if another fetch into DEST is running, wait this long for it (default {DEFAULT_WAIT:.0f}; "
        "0: fail at once)",
    )
    p.set_defaults(func=_cmd_fetch)


def _cmd_fetch(args) -> int:
    from covidct.data.fetch import fetch

    result = fetch(
        args.dest,
        source=args.source,
        expected_covid=args.expect_covid,
        expected_noncovid=args.expect_noncovid,
        lock_wait=args.lock_wait,
    )
    print(result.summary())
    return 0


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="Great Expectations validation of a fetched dataset")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--expect-covid", type=int, default=349, help="expected COVID images (default 349)")
    p.add_argument("--expect-noncovid", type=int, default=397, help="expected non-COVID images (default 397)")
    p.add_argument(
        "--near-duplicates",
        choices=duplicates.POLICIES,
        default="warn",
        help="a picture under both classes or in two official splits: a warning (default) or a failure",
    )
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args) -> int:
    from covidct.data.validate import validate

    result = validate(
        args.data,
        expected_covid=args.expect_covid,
        expected_noncovid=args.expect_noncovid,
        near_duplicates=args.near_duplicates,
    )
    print(result.summary())
    return 0 if result.success else 1


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="compare backbones of one or more runs (HTML + Markdown + PNG)")
    p.add_argument("run_dirs", nargs="+", type=Path, help="run folders holding */metrics.json")
    p.add_argument("--out", type=Path, help="report folder (default: RUN_DIR/report)")
    p.add_argument("--expect", help="comma-separated backbones that were asked for (missing ones are failures)")
    p.add_argument(
        "--gallery",
        type=int,
        default=3,
        metavar="N",
        help="per split, the best model's N most confident test images of each outcome (TP, FP, FN, TN) with "
        "their class activation maps (default 3; 0: no gallery)",
    )
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from covidct.reporting.report import build_report

    expected = [b.strip() for b in args.expect.split(",") if b.strip()] if args.expect else None
    if args.gallery < 0:
        raise CovidctError("--gallery must be 0 (no gallery) or more")
    report = build_report(args.run_dirs, out=args.out, expected_backbones=expected, gallery=args.gallery)
    print(f"report: {report.html}\n        {report.markdown}")
    return 0


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="inspect or clear the feature cache")
    p.add_argument("action", choices=["info", "clear"])
    p.add_argument("--cache-dir", type=Path)
    p.set_defaults(func=_cmd_cache)


def _cmd_cache(args) -> int:
    from covidct.features.cache import FeatureCache, default_cache_dir

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
    for add in (_add_fetch, _add_validate, _add_train, _add_predict, _add_score, _add_ensemble, _add_report,
                _add_cache):  # fmt: skip
        add(sub)
    return parser


def main(argv: list[str] | None = None, *, confined: bool = False) -> int:
    """Run a command; ``confined``: its arguments are untrusted (the DAG's job; ``covidct.orchestration.policy``)."""
    args = build_parser().parse_args(argv)
    args.confined = confined
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format=LOG_FORMAT,
        stream=sys.stderr,
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except CovidctError as exc:
        print(f"error: {executors.failure() or exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # The executor watchdog stopped Spark: whatever the job was doing failed because of it.
        found = executors.failure() or user_error(exc)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
