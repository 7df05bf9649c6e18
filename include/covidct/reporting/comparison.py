"""The comparison's rows: every result found under the run folders, with bootstrap intervals and McNemar pairs.

An ``Entry`` is one ``metrics.json`` (one backbone, or an ensemble, on one split) with the
``predictions.parquet`` beside it; a ``Repeat`` is one ``seeds.json`` (random70 over several seeds).
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from covidct.data.dataset import group_key
from covidct.data.split import PATIENT_SPLITS
from covidct.features.backbone import BACKBONES
from covidct.modelling import stats
from covidct.modelling.runfolder import PREDICTIONS, canonical_backbone, read_predictions
from covidct.reporting.formatting import number
from covidct.reporting.study import PAPER, STUDY_BEST

if TYPE_CHECKING:
    from covidct.reporting.gallery import Gallery

log = logging.getLogger(__name__)

SPLIT_ORDER = ("random70", "official", "official-clean")
SPLIT_TITLES = {
    "random70": "random70: seeded image-level 70/30 split (the study's protocol)",
    "official": "official: the published patient-level split lists (not directly comparable with the study)",
    "official-clean": "official-clean: the official lists without the test images that show the same picture as "
    "an image of the other class or of another split",
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
RANDOM_WARNING = "RANDOM WEIGHTS — not a meaningful result"


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
        return number(self.metrics.get(name))

    def interval(self, name: str) -> stats.Interval | None:
        return self.bootstrap.intervals.get(name) if self.bootstrap else None


@dataclass
class SplitResult:
    split: str
    entries: list[Entry]
    failed: dict[str, str]  # backbone -> why it has no row on this split
    mcnemar: list[dict]
    images: dict[str, Path]  # "roc" / "confusion" / "calibration" -> PNG (in the report folder)
    gallery: Gallery | None = None  # the best model's test images with their maps


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


def backbone_order(name: str) -> tuple[int, str]:
    names = list(BACKBONES)
    return (names.index(name), "") if name in names else (len(names), name.lower())


def split_order(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split), "") if split in SPLIT_ORDER else (len(SPLIT_ORDER), split)


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
        accuracy=np.array([number(r.get("accuracy")) for r in runs], dtype=float),
        auc=np.array([number(r.get("auc")) for r in runs], dtype=float),
        random_weights=bool(data.get("random_weights")),
        source=path,
        study_name=study_name,
        study_accuracy=PAPER[study_name]["accuracy"] if study_name else None,
    )


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
    folder = path.parent / PREDICTIONS
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


def label_duplicates(entries: list[Entry]) -> None:
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


def bootstrap_entry(entry: Entry, n_resamples: int, seed: int) -> None:
    frame = entry.predictions
    if frame is None:
        return
    groups = [group_key(p) for p in frame["relpath"]] if entry.split in PATIENT_SPLITS else None
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


def cache_text(metrics: dict) -> str:
    cache = metrics.get("cache") or {}
    hits, misses = cache.get("hits"), cache.get("misses")
    if not cache.get("enabled", False):
        return f"off ({misses} featurized)" if misses is not None else "off"
    return f"{hits} hits / {misses} misses"


def weights_text(entry: Entry) -> str:
    text = f"{entry.metrics.get('weights', '?')} ({entry.metrics.get('weights_id', '?')})"
    precision = entry.metrics.get("precision")
    return text if precision in (None, "float32") else f"{text}, {precision}"


def timing_rows(entries: list[Entry]) -> list[dict]:
    rows = []
    for e in sorted(entries, key=lambda e: (backbone_order(e.backbone), e.label, split_order(e.split))):
        if e.metrics.get("ensemble"):
            continue  # no job of its own: it combines the backbones' predictions
        t = e.metrics.get("timings") or {}
        paper = PAPER.get(e.backbone, {})
        rows.append(
            {
                "backbone": e.label,
                "split": e.split,
                "random_weights": e.random_weights,
                "featurize_s": number(t.get("featurize_s")),
                "fit_s": number(t.get("fit_s")),
                "evaluate_s": number(t.get("evaluate_s")),
                "total_s": number(t.get("total_s")),
                "cache": e.metrics.get("cache") or {},
                "cache_text": cache_text(e.metrics),
                "paper_fit_min": paper.get("fit_min"),
                "paper_evaluate_min": paper.get("evaluate_min"),
            }
        )
    return rows
