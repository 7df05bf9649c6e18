"""The comparison report: backbones side by side per split, beside Benbrahim et al. (2021).

``build_report`` reads every ``metrics.json`` under the run folders (grouped by the
``backbone`` and ``split`` fields inside, whatever the layout) and the
``predictions.parquet`` beside each, and writes one folder, atomically::

    report.html   self-contained (inline CSS, figures as data URIs)
    report.md     the same tables; figures are the PNG files beside it
    summary.json  the table data, for programs
    roc_<split>.png  confusion_<split>.png  calibration_<split>.png
    seeds_random70.png   (where the run repeated random70 over several seeds)
    gallery/<split>/     the best model's most confident TP/FP/FN/TN test images with their maps

The figures in the tables are metrics.json's (Spark's evaluators); the 95 % intervals
come from a seeded percentile bootstrap over the test predictions (``covidct.stats``),
resampling patients rather than images on the ``official`` split. Backbones that were
expected but have no results, or whose task failed, are named as failed. Runs with
random weights are flagged in red, in words, wherever they appear.

The ensembles (``covidct.ensemble``, ``RUN_DIR/ensemble/<split>/{mean,stacked}/``) are found
like backbones and get the same rows, intervals, McNemar tests and curves. Repeated random70
splits (``seeds.json`` from ``covidct train --seeds``) get their own table: per model the
mean ± sd and min–max of accuracy and AUC over the seeds, and where the study's accuracy falls
in that distribution, with a box/strip plot.
"""

from __future__ import annotations

import base64
import functools
import html
import itertools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from covidct import gallery as gallerylib
from covidct import plots, stats
from covidct.atomic import atomic_dir
from covidct.backbone import BACKBONES, get_backbone
from covidct.errors import CovidctError

log = logging.getLogger(__name__)

#: Benbrahim et al. (2021): random 70/30 split, 216 test images, a 2-core Spark driver.
PAPER_CITATION = (
    "Benbrahim et al. (2021), Deep Transfer Learning Pipelines with Apache Spark "
    "and Keras TensorFlow combined with Logistic Regression to Detect COVID-19 in Chest CT Images"
)
PAPER_TEST_IMAGES = 216
PAPER = {
    "VGG16": {"accuracy": 0.8565, "correct": 185, "fit_min": 16.1, "evaluate_min": 14.2},
    "VGG19": {"accuracy": 0.8426, "correct": 182, "fit_min": 20.3, "evaluate_min": 17.6},
    "Xception": {"accuracy": 0.8287, "correct": 179, "fit_min": 12.4, "evaluate_min": 10.5},
}
SPLIT_ORDER = ("random70", "official")
SPLIT_TITLES = {
    "random70": "random70: seeded image-level 70/30 split (the study's protocol)",
    "official": "official: the published patient-level split lists (not directly comparable with the study)",
}
#: (metrics.json key, column title, shown as a percentage)
COLUMNS = (
    ("accuracy", "Accuracy", True),
    ("weightedPrecision", "Weighted precision", True),
    ("weightedRecall", "Weighted recall", True),
    ("f1", "Weighted F1", True),
    ("sensitivity", "Sensitivity", True),
    ("specificity", "Specificity", True),
    ("auc", "AUC", False),
)
FIGURE_TITLES = {"roc": "ROC curves", "confusion": "Confusion matrices", "calibration": "Reliability (calibration)"}
RANDOM_WARNING = "RANDOM WEIGHTS — not a meaningful result"
MD_RANDOM = "**⚠ RANDOM WEIGHTS**"
HTML_NAME, MARKDOWN_NAME, SUMMARY_NAME = "report.html", "report.md", "summary.json"
SEEDS_NAME = "seeds.json"
#: What an ensemble is held against: the study's best figure (VGG16's 85.65 %).
STUDY_BEST = "VGG16"
_SKIP_DIRS = {"model", "predictions.parquet", "members"}
_PREDICTION_COLUMNS = {"relpath", "label", "probability", "prediction"}


# --------------------------------------------------------------------------- data


@dataclass
class Entry:
    """One metrics.json: one backbone on one split, with its predictions and intervals."""

    backbone: str
    split: str
    metrics: dict
    source: Path  # the metrics.json
    predictions: pd.DataFrame | None = None  # sorted by relpath; None where missing
    label: str = ""  # the row's name (the backbone, disambiguated where it ran several times)
    bootstrap: stats.Bootstrap | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def random_weights(self) -> bool:
        return bool(self.metrics.get("random_weights")) or str(self.metrics.get("weights", "")).lower() == "none"

    @property
    def title(self) -> str:
        return f"{self.label} ({RANDOM_WARNING})" if self.random_weights else self.label

    def value(self, name: str) -> float | None:
        return _number(self.metrics.get(name))

    def interval(self, name: str) -> stats.Interval | None:
        return self.bootstrap.intervals.get(name) if self.bootstrap else None


@dataclass
class SplitResult:
    split: str
    entries: list[Entry]
    failed: dict[str, str]  # backbone -> why it has no row on this split
    mcnemar: list[dict]
    images: dict[str, Path]  # "roc" / "confusion" / "calibration" -> PNG (in the report folder)
    gallery: gallerylib.Gallery | None = None  # the best model's test images with their maps


@dataclass
class Repeat:
    """One model's random70 results over several seeds (a seeds.json)."""

    label: str
    backbone: str
    split: str
    seeds: list[int]
    accuracy: np.ndarray
    auc: np.ndarray
    random_weights: bool
    source: Path
    study_name: str | None  # whose figure of the study it is compared with
    study_accuracy: float | None

    def describe(self, name: str) -> dict:
        values = np.asarray(getattr(self, name), dtype=float)
        values = values[np.isfinite(values)]
        if not len(values):
            return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
        sd = float(values.std(ddof=1)) if len(values) > 1 else None
        return {"n": int(len(values)), "mean": float(values.mean()), "sd": sd,
                "min": float(values.min()), "max": float(values.max())}  # fmt: skip

    @property
    def study_percentile(self) -> float | None:
        """Percent of our seeds below the study's accuracy (ties count half)."""
        if self.study_accuracy is None or not len(self.accuracy):
            return None
        from scipy.stats import percentileofscore

        return float(percentileofscore(self.accuracy, self.study_accuracy, kind="mean"))


@dataclass
class Report:
    out: Path
    html: Path
    markdown: Path
    summary_json: Path
    images: list[Path]
    splits: dict[str, SplitResult]
    failures: dict[str, str]  # backbone -> reason, over all splits
    random_weights: list[str]  # "Xception (official)", ...
    notes: list[str]
    summary: dict  # what summary.json holds
    repeats: list[Repeat] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def canonical_backbone(name: str) -> str:
    """'vgg16' -> 'VGG16'; names outside the backbone table are kept as given."""
    try:
        return get_backbone(name).name
    except CovidctError:
        return str(name).strip()


def _backbone_order(name: str) -> tuple[int, str]:
    names = list(BACKBONES)
    return (names.index(name), "") if name in names else (len(names), name.lower())


def _split_order(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split), "") if split in SPLIT_ORDER else (len(SPLIT_ORDER), split)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "split"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- reading runs


def find_metrics(run_dirs: list[Path], skip: Path | None = None) -> list[Path]:
    """Every metrics.json under the run folders (hidden staging folders, models and ``skip`` excluded)."""
    found: dict[Path, None] = {}
    for root in run_dirs:
        root = Path(root).expanduser()
        if root.is_file() and root.name == "metrics.json":
            found[root.resolve()] = None
            continue
        if not root.is_dir():
            raise CovidctError(f"run folder {root} does not exist")
        for folder, dirnames, filenames in os.walk(root):
            here = Path(folder)
            dirnames[:] = sorted(
                d
                for d in dirnames
                if not d.startswith(".") and d not in _SKIP_DIRS and (skip is None or (here / d).resolve() != skip)
            )
            if "metrics.json" in filenames:
                found[(here / "metrics.json").resolve()] = None
    return list(found)


def find_seeds(run_dirs: list[Path], skip: Path | None = None) -> list[Path]:
    """Every seeds.json (random70 repeated over seeds) under the run folders."""
    found: dict[Path, None] = {}
    for root in run_dirs:
        root = Path(root).expanduser()
        if not root.is_dir():
            continue
        for folder, dirnames, filenames in os.walk(root):
            here = Path(folder)
            dirnames[:] = sorted(
                d
                for d in dirnames
                if not d.startswith(".") and d not in _SKIP_DIRS and (skip is None or (here / d).resolve() != skip)
            )
            if SEEDS_NAME in filenames:
                found[(here / SEEDS_NAME).resolve()] = None
    return list(found)


def load_repeat(path: Path, notes: list[str]) -> Repeat | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        runs = data["runs"]
        backbone = canonical_backbone(data["backbone"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        notes.append(f"{path} could not be read ({exc}); it is left out.")
        return None
    study_name = backbone if backbone in PAPER else (STUDY_BEST if data.get("ensemble") else None)
    return Repeat(
        label=backbone,
        backbone=backbone,
        split=str(data.get("split", "random70")),
        seeds=[int(r["seed"]) for r in runs],
        accuracy=np.array([_number(r.get("accuracy")) for r in runs], dtype=float),
        auc=np.array([_number(r.get("auc")) for r in runs], dtype=float),
        random_weights=bool(data.get("random_weights")),
        source=path,
        study_name=study_name,
        study_accuracy=PAPER[study_name]["accuracy"] if study_name else None,
    )


def read_predictions(folder: Path) -> pd.DataFrame:
    """predictions.parquet (Spark's folder or one file), one row per relpath, sorted by relpath."""
    frame = pd.read_parquet(folder)
    missing = _PREDICTION_COLUMNS - set(frame.columns)
    if missing:
        raise ValueError(f"columns {', '.join(sorted(missing))} are missing")
    frame = frame.dropna(subset=["label", "prediction"]).drop_duplicates("relpath")
    frame = frame.astype({"label": int, "prediction": int, "probability": float})
    return frame.sort_values("relpath", kind="stable").reset_index(drop=True)


def load_entry(path: Path, notes: list[str]) -> Entry | None:
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        notes.append(f"{path} could not be read ({exc}); it is left out.")
        log.warning("skipping %s: %s", path, exc)
        return None
    if not isinstance(metrics, dict) or not metrics.get("backbone") or not metrics.get("split"):
        notes.append(f"{path} has no backbone or split field; it is left out.")
        return None
    entry = Entry(canonical_backbone(metrics["backbone"]), str(metrics["split"]), metrics, path)
    entry.label = entry.backbone
    folder = path.parent / "predictions.parquet"
    if not folder.exists():
        entry.problems.append("no predictions.parquet beside metrics.json: no intervals, curves or McNemar test")
        return entry
    try:
        entry.predictions = read_predictions(folder)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
        entry.problems.append(f"predictions.parquet could not be read ({type(exc).__name__}: {exc})")
        return entry
    if entry.predictions["probability"].isna().any():
        dropped = int(entry.predictions["probability"].isna().sum())
        entry.predictions = entry.predictions.dropna(subset=["probability"]).reset_index(drop=True)
        entry.problems.append(f"{dropped} predictions without a probability were left out of the intervals")
    if entry.predictions.empty:
        entry.problems.append("predictions.parquet is empty")
        entry.predictions = None
        return entry
    _check_consistency(entry)
    return entry


def _check_consistency(entry: Entry) -> None:
    """Warn where predictions.parquet does not reproduce metrics.json (a stale or mixed-up folder)."""
    frame = entry.predictions
    n_test = entry.metrics.get("n_test")
    if n_test is not None and int(n_test) != len(frame):
        entry.problems.append(f"predictions.parquet holds {len(frame)} test images, metrics.json says {n_test}")
    computed = stats.reference_metrics(frame["label"], frame["prediction"], frame["probability"])
    for name in ("accuracy", "auc"):
        ours, theirs = computed.get(name), entry.value(name)
        if ours is not None and theirs is not None and abs(ours - theirs) > 1e-6:
            entry.problems.append(
                f"{name} from predictions.parquet ({ours:.4f}) differs from metrics.json ({theirs:.4f})"
            )


def _label_duplicates(entries: list[Entry]) -> None:
    """Name rows apart where one backbone ran more than once on a split (several run folders)."""
    groups: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.split, e.backbone), []).append(e)
    for same in groups.values():
        if len(same) < 2:
            continue
        fields = [
            k for k in ("weights_id", "pooling", "precision", "seed") if len({str(e.metrics.get(k)) for e in same}) > 1
        ]
        for e in same:
            parts = [f"{k}={e.metrics.get(k)}" for k in fields]
            if not parts or len({tuple(str(x.metrics.get(k)) for k in fields) for x in same}) < len(same):
                parts.append(str(e.source.parent))
            e.label = f"{e.backbone} ({', '.join(parts)})"


# --------------------------------------------------------------------------- analysis


def _bootstrap(entry: Entry, n_resamples: int, seed: int) -> None:
    frame = entry.predictions
    if frame is None:
        return
    groups = [stats.group_key(p) for p in frame["relpath"]] if entry.split == "official" else None
    entry.bootstrap = stats.bootstrap(
        frame["label"].to_numpy(),
        frame["prediction"].to_numpy(),
        frame["probability"].to_numpy(),
        groups=groups,
        n_resamples=n_resamples,
        seed=seed,
    )


def compare_pairs(entries: list[Entry]) -> list[dict]:
    """McNemar's exact test for every pair of backbones with predictions on the same test images."""
    rows = []
    for a, b in itertools.combinations([e for e in entries if e.predictions is not None], 2):
        row = {
            "backbone_a": a.label,
            "backbone_b": b.label,
            "a_random_weights": a.random_weights,
            "b_random_weights": b.random_weights,
        }
        paths_a, paths_b = set(a.predictions["relpath"]), set(b.predictions["relpath"])
        if paths_a != paths_b:
            row.update(
                tested=False,
                reason=f"test sets differ ({len(paths_a)} vs {len(paths_b)} images, {len(paths_a & paths_b)} "
                f"shared; seeds {a.metrics.get('seed')} vs {b.metrics.get('seed')}): not tested",
            )
            rows.append(row)
            continue
        joined = a.predictions.merge(b.predictions, on="relpath", suffixes=("_a", "_b"))
        if not (joined["label_a"] == joined["label_b"]).all():
            row.update(tested=False, reason="the two runs disagree on the labels of the same images: not tested")
            rows.append(row)
            continue
        test = stats.mcnemar(joined["label_a"], joined["prediction_a"], joined["prediction_b"])
        row.update(tested=True, n=test.n, b=test.b, c=test.c, pvalue=test.pvalue)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- formatting


def _fmt(value: float | None, percent: bool) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f}" if percent else f"{value:.3f}"


def _fmt_ci(interval: stats.Interval | None, percent: bool) -> str:
    if interval is None or interval.low is None:
        return "95 % CI n/a"
    return f"[{_fmt(interval.low, percent)}, {_fmt(interval.high, percent)}]"


def _fmt_p(p: float) -> str:
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def _paper_cell(entry: Entry) -> tuple[str, str]:
    """(figure, remark) for the study's accuracy beside this row."""
    paper = PAPER.get(entry.backbone)
    if paper is None:
        return "—", ""
    figure = f"{100 * paper['accuracy']:.2f} ({paper['correct']}/{PAPER_TEST_IMAGES})"
    if entry.split != "random70":
        return figure, "different protocol"
    interval = entry.interval("accuracy")
    if interval is None or interval.low is None:
        return figure, ""
    return figure, "inside our 95 % CI" if interval.brackets(paper["accuracy"]) else "outside our 95 % CI"


def _cache_text(metrics: dict) -> str:
    cache = metrics.get("cache") or {}
    hits, misses = cache.get("hits"), cache.get("misses")
    if not cache.get("enabled", False):
        return f"off ({misses} featurized)" if misses is not None else "off"
    return f"{hits} hits / {misses} misses"


def _seconds(value) -> str:
    number = _number(value)
    return "—" if number is None else f"{number:.1f}"


def _weights_text(entry: Entry) -> str:
    text = f"{entry.metrics.get('weights', '?')} ({entry.metrics.get('weights_id', '?')})"
    precision = entry.metrics.get("precision")
    return text if precision in (None, "float32") else f"{text}, {precision}"


def _timing_rows(entries: list[Entry]) -> list[dict]:
    rows = []
    for e in sorted(entries, key=lambda e: (_backbone_order(e.backbone), e.label, _split_order(e.split))):
        if e.metrics.get("ensemble"):
            continue  # no job of its own: it combines the backbones' predictions
        t = e.metrics.get("timings") or {}
        paper = PAPER.get(e.backbone, {})
        rows.append(
            {
                "backbone": e.label,
                "split": e.split,
                "random_weights": e.random_weights,
                "featurize_s": _number(t.get("featurize_s")),
                "fit_s": _number(t.get("fit_s")),
                "evaluate_s": _number(t.get("evaluate_s")),
                "total_s": _number(t.get("total_s")),
                "cache": e.metrics.get("cache") or {},
                "cache_text": _cache_text(e.metrics),
                "paper_fit_min": paper.get("fit_min"),
                "paper_evaluate_min": paper.get("evaluate_min"),
            }
        )
    return rows


def _notes(splits: dict[str, SplitResult], n_resamples: int, seed: int, repeats: list[Repeat] = ()) -> list[str]:
    notes = [
        f"Study: {PAPER_CITATION}. It reported accuracy on one random 70/30 image-level split "
        f"({PAPER_TEST_IMAGES} test images); that protocol is our random70 split. Images of one patient can "
        "fall on both sides of an image-level split, which flatters accuracy; the official split keeps "
        "patients apart, so its figures are not directly comparable with the study's.",
        "Point estimates are metrics.json's, computed by Spark's evaluators (weighted precision, recall and "
        "F1 as MulticlassClassificationEvaluator defines them, equal to scikit-learn's average='weighted'; "
        "AUC by BinaryClassificationEvaluator); percentages except AUC.",
        f"95 % confidence intervals: percentile bootstrap with {n_resamples} resamples (seed {seed}) of the "
        "test predictions in predictions.parquet; each resample's metrics are scikit-learn's definitions. "
        "Resamples with one class only are skipped for sensitivity, specificity and AUC where undefined.",
        "On the official split whole patients are resampled, not images. The patient is guessed from the "
        "file name: the class folder plus the name without its extension and without a trailing '%<n>' "
        "(upstream numbers the slices or sub-figures of one case '%0', '%1', ...), e.g. "
        "CT_COVID/2020.02.10.20021584-p6-52%3.png -> CT_COVID/2020.02.10.20021584-p6-52. One patient shown "
        "in several figures still counts as several, so the intervals may be somewhat narrow. random70 "
        "resamples images, as the study's protocol treats them as independent.",
        "McNemar: for each pair of backbones on the same test images, b = images only the first classifies "
        "correctly, c = images only the second does; p is the exact two-sided binomial test of b out of "
        "b + c at 1/2 (scipy.stats.binomtest). Pairs whose test sets differ (other seed or data) are not "
        "tested. With k pairs, compare p with 0.05 / k (Bonferroni).",
        "Timings: the study's 'fit' ran sparkdl's DeepImageFeaturizer inside the pipeline, i.e. it includes "
        "featurizing the training images, and its 'evaluation' featurized the test images. Here each job "
        "featurizes all images once (or reads them from the feature cache) for all its splits: compare the "
        "study's fit + evaluation with featurize_s + fit_s + evaluate_s, or with the job's total_s.",
    ]
    if any(e.metrics.get("ensemble") for split in splits.values() for e in split.entries):
        notes.append(
            "Ensemble: the mean of the backbones' probabilities of COVID on the same test images, COVID above 0.5; "
            "the product's model (covidct predict --model RUN_DIR/ensemble). Ensemble (stacked): a logistic "
            "regression on the backbones' probabilities, fitted only on out-of-fold predictions of the training "
            "images (each predicted by an LR fitted without its fold; whole patients per fold on official), never "
            "on a test image. The product uses the mean: it fits nothing, so it cannot overfit the few hundred "
            "training images, and the stack did not do better (compare the two rows). The ensembles' figures are "
            "scikit-learn's on their predictions (the same definitions as Spark's evaluators)."
        )
    if repeats:
        notes.append(
            "Repeated splits: random70 refitted once per seed from the same features (featurized once), each "
            "seed a different 70/30 image-level split. sd is the sample standard deviation over seeds; the "
            "percentile is the share of our seeds whose accuracy is below the study's figure (ties count half). "
            "The ensembles are held against the study's best figure (VGG16, 85.65 %)."
        )
    for split in splits.values():
        for e in split.entries:
            for problem in e.problems:
                notes.append(f"{e.label} ({split.split}): {problem} [{e.source}].")
    return notes


def _gallery_note(galleries: list[gallerylib.Gallery]) -> str:
    seconds = sum(g.seconds or 0.0 for g in galleries)
    return (
        "Gallery: per split, the best model (highest accuracy, then AUC, among the rows with a saved model) and "
        "its most confident test images of each outcome (true/false positives: highest P(COVID); true/false "
        "negatives: lowest), each with the map of the evidence for the predicted class (upsampled, ReLU'd). CAM "
        "(avg pooling: the LR's coefficients weight the last conv block's channels; exact: the raw map's mean plus "
        "the intercept is the model's logit) or Grad-CAM (flatten and multi-layer poolings: the logit's gradient, "
        "averaged per channel, weights a conv block's channels); an ensemble shows each member's map. The maps "
        f"are computed by the report itself, for these images only: {seconds:.0f} s here"
        + (
            " (reused from the gallery cache: the same models on the same images)."
            if galleries and all(g.cached for g in galleries)
            else "."
        )
    )


# --------------------------------------------------------------------------- figures


def _figures(split: SplitResult, folder: Path) -> dict[str, Path]:
    series = [
        plots.Series(
            label=e.label,
            random_weights=e.random_weights,
            y=None if e.predictions is None else e.predictions["label"].to_numpy(),
            score=None if e.predictions is None else e.predictions["probability"].to_numpy(),
            confusion=e.metrics.get("confusion") or {},
            auc=e.value("auc"),
        )
        for e in split.entries
    ]
    missing = [f"{b} (failed: {reason})" for b, reason in split.failed.items()]
    slug = _slug(split.split)
    return {
        "roc": plots.roc_figure(series, folder / f"roc_{slug}.png", f"ROC curves, {split.split} split", missing),
        "confusion": plots.confusion_figure(
            series, folder / f"confusion_{slug}.png", f"Confusion matrices, {split.split} split", missing
        ),
        "calibration": plots.calibration_figure(
            series, folder / f"calibration_{slug}.png", f"Reliability, {split.split} split", missing
        ),
    }


def _seeds_figure(repeats: list[Repeat], folder: Path) -> Path | None:
    if not repeats:
        return None
    series = [plots.SeedSeries(r.label, r.accuracy, r.auc, r.random_weights, r.study_accuracy) for r in repeats]
    seeds = sorted({s for r in repeats for s in r.seeds})
    title = f"random70 over {len(seeds)} seeds ({_seed_ranges(seeds)})"
    return plots.seeds_figure(series, folder / "seeds_random70.png", title)


def _repeat_summary(r: Repeat) -> dict:
    return {
        "label": r.label,
        "backbone": r.backbone,
        "split": r.split,
        "seeds": r.seeds,
        "random_weights": r.random_weights,
        "accuracy": {**r.describe("accuracy"), "values": r.accuracy.tolist()},
        "auc": {**r.describe("auc"), "values": r.auc.tolist()},
        "study": r.study_name,
        "study_accuracy": r.study_accuracy,
        "study_percentile": r.study_percentile,
        "source": str(r.source),
    }


def _seed_ranges(seeds) -> str:
    """[0, 1, 2, 3, 7] -> '0-3, 7'."""
    seeds, parts = sorted(seeds), []
    for s in seeds:
        if parts and s == parts[-1][1] + 1:
            parts[-1][1] = s
        else:
            parts.append([s, s])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


def _mean_sd(described: dict, percent: bool) -> str:
    if described.get("mean") is None:
        return "—"
    sd = described.get("sd")
    return _fmt(described["mean"], percent) + ("" if sd is None else f" ± {_fmt(sd, percent)}")


def _min_max(described: dict, percent: bool) -> str:
    if described.get("min") is None:
        return "—"
    return f"{_fmt(described['min'], percent)}–{_fmt(described['max'], percent)}"


# --------------------------------------------------------------------------- rendering
# Presentation lives in templates/ (Jinja2): report.html.j2 (autoescaped) and report.md.j2.

TEMPLATES = "templates"


def _html_escape(value):
    """Every ``{{ }}`` of the HTML template is escaped as html.escape does (markup from macros passes)."""
    return value if hasattr(value, "__html__") else Markup(html.escape(str(value)))


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


@functools.cache
def _environment(kind: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("covidct", TEMPLATES),
        autoescape=kind == "html",
        finalize=_html_escape if kind == "html" else None,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(fmt=_fmt, fmt_ci=_fmt_ci, fmt_p=_fmt_p, seconds=_seconds, md=_md, data_uri=_data_uri,
                       seed_ranges=_seed_ranges, mean_sd=_mean_sd, min_max=_min_max)  # fmt: skip
    env.globals.update(
        columns=COLUMNS,
        split_titles=SPLIT_TITLES,
        figure_titles=FIGURE_TITLES,
        paper_citation=PAPER_CITATION,
        paper_test_images=PAPER_TEST_IMAGES,
        random_warning=RANDOM_WARNING,
        md_random=MD_RANDOM,
        paper_cell=_paper_cell,
        weights_text=_weights_text,
    )
    return env


def _render(template: str, data: dict, splits: dict[str, SplitResult], timings: list[dict], notes: list[str],
            repeats: list[Repeat] | None = None, seeds_image: Path | None = None) -> str:  # fmt: skip
    kind = "html" if template.endswith(".html.j2") else "md"
    context = {"data": data, "splits": list(splits.values()), "timings": timings, "notes": notes,
               "repeats": repeats or [], "seeds_image": seeds_image}  # fmt: skip
    return _environment(kind).get_template(template).render(context)


def render_html(data: dict, splits: dict[str, SplitResult], timings: list[dict], notes: list[str], **extra) -> str:
    return _render("report.html.j2", data, splits, timings, notes, **extra)


def render_markdown(data: dict, splits: dict[str, SplitResult], timings: list[dict], notes: list[str], **extra) -> str:
    return _render("report.md.j2", data, splits, timings, notes, **extra)


# --------------------------------------------------------------------------- summary.json


def _summary(
    run_dirs: list[Path],
    splits: dict[str, SplitResult],
    failures: dict[str, str],
    random_weights: list[str],
    timings: list[dict],
    notes: list[str],
    n_resamples: int,
    seed: int,
) -> dict:
    out_splits = {}
    for name, split in splits.items():
        rows = []
        for e in split.entries:
            metrics = {}
            for key, _title, _percent in COLUMNS:
                interval = e.interval(key)
                metrics[key] = {
                    "value": e.value(key),
                    "ci_low": None if interval is None else interval.low,
                    "ci_high": None if interval is None else interval.high,
                    "ci_resamples": None if interval is None else interval.n_valid,
                }
            paper = PAPER.get(e.backbone)
            _figure, remark = _paper_cell(e)
            rows.append(
                {
                    "backbone": e.backbone,
                    "label": e.label,
                    "random_weights": e.random_weights,
                    "warning": RANDOM_WARNING if e.random_weights else None,
                    "weights": e.metrics.get("weights"),
                    "weights_id": e.metrics.get("weights_id"),
                    "seed": e.metrics.get("seed"),
                    "pooling": e.metrics.get("pooling"),
                    "precision": e.metrics.get("precision", "float32"),
                    "n_train": e.metrics.get("n_train"),
                    "n_test": e.metrics.get("n_test"),
                    "metrics": metrics,
                    "confusion": e.metrics.get("confusion"),
                    "paper_accuracy": None if paper is None else paper["accuracy"],
                    "paper_remark": remark or None,
                    "bootstrap_unit": None if e.bootstrap is None else e.bootstrap.unit,
                    "bootstrap_units": None if e.bootstrap is None else e.bootstrap.n_units,
                    "timings": e.metrics.get("timings"),
                    "cache": e.metrics.get("cache"),
                    "source": str(e.source),
                    "problems": e.problems,
                }
            )
        out_splits[name] = {
            "title": SPLIT_TITLES.get(name, name),
            "rows": rows,
            "failed": [{"backbone": b, "reason": r} for b, r in split.failed.items()],
            "mcnemar": split.mcnemar,
            "images": {k: p.name for k, p in split.images.items()},
            "gallery": split.gallery.summary() if split.gallery else None,
        }
    return _jsonable(
        {
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "run_dirs": [str(Path(d).expanduser().absolute()) for d in run_dirs],
            "paper": {"citation": PAPER_CITATION, "test_images": PAPER_TEST_IMAGES, "backbones": PAPER},
            "bootstrap": {"resamples": n_resamples, "seed": seed, "level": stats.LEVEL, "method": "percentile"},
            "random_weights": random_weights,
            "random_weights_warning": RANDOM_WARNING if random_weights else None,
            "failures": failures,
            "splits": out_splits,
            "timings": timings,
            "notes": notes,
        }
    )


# --------------------------------------------------------------------------- entry point


def _check_out(out: Path, run_dirs: list[Path]) -> None:
    """Refuse an --out that would replace a run (or anything that is not a previous report)."""
    resolved = out.resolve()
    for d in run_dirs:
        d = Path(d).expanduser().resolve()
        if resolved == d or resolved in d.parents:
            raise CovidctError(f"report folder {out} would replace run folder {d}; choose another --out")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SUMMARY_NAME).exists())):
        raise CovidctError(f"{out} exists and is not a covidct report; refusing to replace it")


def build_report(
    run_dirs: list[Path],
    out: Path | None = None,
    expected_backbones: list[str] | None = None,
    failures: dict[str, str] | None = None,
    n_resamples: int = stats.N_RESAMPLES,
    seed: int = stats.SEED,
    gallery: int = gallerylib.PER_CATEGORY,
) -> Report:
    """Compare every backbone found under ``run_dirs``; write the report folder ``out`` atomically.

    ``expected_backbones`` without results and ``failures`` (backbone -> reason) are shown
    as failed. Raises CovidctError where no metrics.json is found at all. ``gallery``: test images
    per outcome (TP, FP, FN, TN) in each split's gallery of the best model with its maps; 0: none.
    """
    run_dirs = [Path(d).expanduser() for d in run_dirs]
    if not run_dirs:
        raise CovidctError("no run folder given")
    out = Path(out).expanduser() if out is not None else run_dirs[0] / "report"
    _check_out(out, run_dirs)
    paths = find_metrics(run_dirs, skip=out.resolve())
    if not paths:
        raise CovidctError(
            f"no metrics.json found under {', '.join(str(d) for d in run_dirs)}: no backbone produced results"
        )
    log.info("found %d metrics.json under %s", len(paths), ", ".join(str(d) for d in run_dirs))
    problems: list[str] = []
    entries = [e for e in (load_entry(p, problems) for p in paths) if e is not None]
    if not entries:
        raise CovidctError(f"none of the {len(paths)} metrics.json files found could be used: {'; '.join(problems)}")
    _label_duplicates(entries)
    entries.sort(key=lambda e: (_split_order(e.split), _backbone_order(e.backbone), e.label))

    failures = {canonical_backbone(b): str(r) for b, r in (failures or {}).items()}
    found = {e.backbone for e in entries if not e.metrics.get("ensemble")}  # ensembles are never "failed"
    known = list(dict.fromkeys([canonical_backbone(b) for b in expected_backbones or []] + list(failures)))
    known += sorted(found - set(known), key=_backbone_order)
    overall_failures = dict(failures)
    for b in known:
        if b not in found and b not in overall_failures:
            overall_failures[b] = "no results"

    splits: dict[str, SplitResult] = {}
    for name in sorted({e.split for e in entries}, key=_split_order):
        members = [e for e in entries if e.split == name]
        present = {e.backbone for e in members}
        failed = {}
        for b in known:
            if b not in present:
                failed[b] = failures.get(b) or ("no results" if b not in found else "no results on this split")
        for e in members:
            log.info("bootstrap %s on %s (%d resamples)", e.label, name, n_resamples)
            _bootstrap(e, n_resamples, seed)
        splits[name] = SplitResult(name, members, failed, compare_pairs(members), {})

    repeats = [r for r in (load_repeat(p, problems) for p in find_seeds(run_dirs, skip=out.resolve())) if r]
    repeats.sort(key=lambda r: (_split_order(r.split), _backbone_order(r.backbone), str(r.source)))
    labels = [r.label for r in repeats]
    for r in repeats:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.source.parent})"

    random_weights = [f"{e.label} ({e.split})" for e in entries if e.random_weights]
    for item in random_weights:
        log.warning("RANDOM WEIGHTS in the report: %s", item)
    timings = _timing_rows(entries)
    notes = _notes(splits, n_resamples, seed, repeats) + problems

    with atomic_dir(out, what="report") as staging:
        for split in splits.values():
            log.info("plotting %s", split.split)
            split.images = _figures(split, staging)
        seeds_image = _seeds_figure(repeats, staging)
        if gallery > 0:
            for split in splits.values():
                split.gallery = gallerylib.build(split.split, split.entries, staging / gallerylib.FOLDER, gallery)
            made = [s.gallery for s in splits.values() if s.gallery is not None]
            if made:
                notes.append(_gallery_note(made))
        data = _summary(run_dirs, splits, overall_failures, random_weights, timings, notes, n_resamples, seed)
        data["repeats"] = _jsonable([_repeat_summary(r) for r in repeats])
        data["repeats_image"] = seeds_image.name if seeds_image else None
        (staging / SUMMARY_NAME).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        extra = {"repeats": repeats, "seeds_image": seeds_image}
        (staging / HTML_NAME).write_text(render_html(data, splits, timings, notes, **extra), encoding="utf-8")
        (staging / MARKDOWN_NAME).write_text(render_markdown(data, splits, timings, notes, **extra), encoding="utf-8")
    out = out.absolute()
    for split in splits.values():
        split.images = {kind: out / path.name for kind, path in split.images.items()}
        for category in split.gallery.categories if split.gallery else []:
            for image in category.images:
                image.png = out / image.rel
    images = [p for s in splits.values() for p in s.images.values()]
    images += [out / seeds_image.name] if seeds_image else []
    log.info("wrote report %s (%d backbones, %d splits)", out, len(found), len(splits))
    return Report(
        out=out,
        html=out / HTML_NAME,
        markdown=out / MARKDOWN_NAME,
        summary_json=out / SUMMARY_NAME,
        images=images,
        splits=splits,
        failures=overall_failures,
        random_weights=random_weights,
        notes=notes,
        summary=data,
        repeats=repeats,
    )


# --------------------------------------------------------------------------- sections added later


def append_section(report_dir: Path, key: str, template: str, data: dict) -> None:
    """Add (or replace) a section at the end of a written report, and ``data`` as ``summary.json[key]``.

    For what later tasks add to the run's report (the MLflow runs, the promotion decision):
    ``section_<template>.html.j2`` goes before ``</body>``, ``section_<template>.md.j2`` at the end
    of the Markdown. Each file is rewritten atomically; a section added again replaces itself.
    """
    from covidct.atomic import write_text_atomic

    report_dir = Path(report_dir)
    begin, end = f"<!-- covidct:{key} -->", f"<!-- /covidct:{key} -->"
    for kind, name in (("html", HTML_NAME), ("md", MARKDOWN_NAME)):
        path = report_dir / name
        text = path.read_text(encoding="utf-8")
        if begin in text and end in text:
            text = text[: text.index(begin)].rstrip("\n") + "\n" + text[text.index(end) + len(end) :].lstrip("\n")
        ext = "html" if kind == "html" else "md"
        block = _environment(kind).get_template(f"section_{template}.{ext}.j2").render(data=_jsonable(data))
        block = f"{begin}\n{block.strip()}\n{end}\n"
        if kind == "html" and "</body>" in text:
            at = text.rindex("</body>")
            text = text[:at] + block + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + block
        write_text_atomic(path, text)
    summary_path = report_dir / SUMMARY_NAME
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    summary[key] = _jsonable(data)
    write_text_atomic(summary_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
