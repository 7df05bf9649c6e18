"""``summary.json``: the report's tables as data, for programs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from covidct.modelling import stats
from covidct.reporting.comparison import COLUMNS, RANDOM_WARNING, SPLIT_TITLES, Entry, Repeat, SplitResult
from covidct.reporting.formatting import jsonable
from covidct.reporting.study import PAPER, PAPER_CITATION, PAPER_TEST_IMAGES, paper_cell


def entry_metrics(e: Entry) -> dict:
    """A row's ``metrics`` in summary.json: per column, its value and 95 % interval."""
    metrics = {}
    for key, _title, _percent in COLUMNS:
        interval = e.interval(key)
        metrics[key] = {
            "value": e.value(key),
            "ci_low": None if interval is None else interval.low,
            "ci_high": None if interval is None else interval.high,
            "ci_resamples": None if interval is None else interval.n_valid,
        }
    return metrics


def summary(
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
            metrics = entry_metrics(e)
            paper = PAPER.get(e.backbone)
            _figure, remark = paper_cell(e)
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
    return jsonable(
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


def repeat_summary(r: Repeat) -> dict:
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
