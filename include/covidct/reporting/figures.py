"""The report's figures of a split (ROC, confusion, calibration) and of repeated seeds, drawn by ``plots``."""

from __future__ import annotations

from pathlib import Path

from covidct.reporting import plots
from covidct.reporting.comparison import Repeat, SplitResult
from covidct.reporting.formatting import seed_ranges, slug

FIGURE_TITLES = {"roc": "ROC curves", "confusion": "Confusion matrices", "calibration": "Reliability (calibration)"}


def split_figures(split: SplitResult, folder: Path) -> dict[str, Path]:
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
    name = slug(split.split)
    return {
        "roc": plots.roc_figure(series, folder / f"roc_{name}.png", f"ROC curves, {split.split} split", missing),
        "confusion": plots.confusion_figure(
            series, folder / f"confusion_{name}.png", f"Confusion matrices, {split.split} split", missing
        ),
        "calibration": plots.calibration_figure(
            series, folder / f"calibration_{name}.png", f"Reliability, {split.split} split", missing
        ),
    }


def seeds_figure(repeats: list[Repeat], folder: Path) -> Path | None:
    if not repeats:
        return None
    series = [plots.SeedSeries(r.label, r.accuracy, r.auc, r.random_weights, r.study_accuracy) for r in repeats]
    seeds = sorted({s for r in repeats for s in r.seeds})
    title = f"random70 over {len(seeds)} seeds ({seed_ranges(seeds)})"
    return plots.seeds_figure(series, folder / "seeds_random70.png", title)
