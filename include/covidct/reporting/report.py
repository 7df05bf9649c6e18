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
come from a seeded percentile bootstrap over the test predictions (``covidct.modelling.stats``),
resampling patients rather than images on the ``official`` and ``official-clean`` splits. Backbones that were
expected but have no results, or whose task failed, are named as failed. Runs with
random weights are flagged in red, in words, wherever they appear.

The ensembles (``covidct.modelling.ensemble``, ``RUN_DIR/ensemble/<split>/{mean,stacked}/``) are found
like backbones and get the same rows, intervals, McNemar tests and curves. Repeated random70
splits (``seeds.json`` from ``covidct train --seeds``) get their own table: per model the
mean ± sd and min–max of accuracy and AUC over the seeds, and where the study's accuracy falls
in that distribution, with a box/strip plot.

At its end, the "Shortcut baselines" section (``covidct.reporting.shortcuts``,
``summary.json["shortcuts"]``): per split, models that never see the anatomy (file cues; statistics
of the decoded pixels per view) on the same test images, with the same metrics and intervals; then
"Where the evidence lies" (``covidct.reporting.evidence``, ``summary.json["evidence"]``): per split and
backbone, the share of its evidence for the predicted class inside the body.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from covidct.core.atomic import atomic_dir
from covidct.core.errors import CovidctError
from covidct.data.split import CLEANED_FROM
from covidct.modelling import stats
from covidct.modelling.runfolder import canonical_backbone, find_metrics, find_seeds
from covidct.reporting import gallery as gallerylib
from covidct.reporting.comparison import (
    COLUMNS,
    RANDOM_WARNING,
    SPLIT_TITLES,
    Repeat,
    SplitResult,
    backbone_order,
    bootstrap_entry,
    compare_pairs,
    label_duplicates,
    load_entry,
    load_repeat,
    split_order,
    timing_rows,
    weights_text,
)
from covidct.reporting.evidence import KEY as EVIDENCE
from covidct.reporting.evidence import append_evidence_section
from covidct.reporting.figures import FIGURE_TITLES, seeds_figure, split_figures
from covidct.reporting.formatting import jsonable
from covidct.reporting.rendering import render
from covidct.reporting.sections import HTML_NAME, MARKDOWN_NAME, SUMMARY_NAME, append_section
from covidct.reporting.shortcuts import KEY as SHORTCUTS
from covidct.reporting.shortcuts import append_shortcuts_section
from covidct.reporting.study import PAPER_CITATION, PAPER_TEST_IMAGES, paper_cell
from covidct.reporting.summary import repeat_summary, summary

log = logging.getLogger(__name__)

__all__ = ["Report", "append_section", "build_report"]

MD_RANDOM = "**⚠ RANDOM WEIGHTS**"
#: What the report's templates use besides their data.
GLOBALS = {
    "columns": COLUMNS,
    "split_titles": SPLIT_TITLES,
    "figure_titles": FIGURE_TITLES,
    "paper_citation": PAPER_CITATION,
    "paper_test_images": PAPER_TEST_IMAGES,
    "random_warning": RANDOM_WARNING,
    "md_random": MD_RANDOM,
    "paper_cell": paper_cell,
    "weights_text": weights_text,
}


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
        "On the official and official-clean splits whole patients are resampled, not images. The patient is "
        "guessed from the file name: the class folder plus the name without its extension and without a "
        "trailing '%<n>' (upstream numbers the slices or sub-figures of one case '%0', '%1', ...), e.g. "
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
            "images (each predicted by an LR fitted without its fold; whole patients per fold on official and "
            "official-clean), never on a test image. The product uses the mean: it fits nothing, so it cannot "
            "overfit the few hundred training images, and the stack did not do better (compare the two rows). The "
            "ensembles' figures are scikit-learn's on their predictions (the same definitions as Spark's evaluators)."
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


def _render(template: str, data: dict, splits: dict[str, SplitResult], timings: list[dict], notes: list[str],
            repeats: list[Repeat] | None = None, seeds_image: Path | None = None) -> str:  # fmt: skip
    context = {"data": data, "splits": list(splits.values()), "timings": timings, "notes": notes,
               "repeats": repeats or [], "seeds_image": seeds_image, **GLOBALS}  # fmt: skip
    return render(template, context)


def render_html(data: dict, splits: dict[str, SplitResult], timings: list[dict], notes: list[str], **extra) -> str:
    return _render("report.html.j2", data, splits, timings, notes, **extra)


def render_markdown(data: dict, splits: dict[str, SplitResult], timings: list[dict], notes: list[str], **extra) -> str:
    return _render("report.md.j2", data, splits, timings, notes, **extra)


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
    label_duplicates(entries)
    entries.sort(key=lambda e: (split_order(e.split), backbone_order(e.backbone), e.label))

    failures = {canonical_backbone(b): str(r) for b, r in (failures or {}).items()}
    found = {e.backbone for e in entries if not e.metrics.get("ensemble")}  # ensembles are never "failed"
    known = list(dict.fromkeys([canonical_backbone(b) for b in expected_backbones or []] + list(failures)))
    known += sorted(found - set(known), key=backbone_order)
    overall_failures = dict(failures)
    for b in known:
        if b not in found and b not in overall_failures:
            overall_failures[b] = "no results"

    splits: dict[str, SplitResult] = {}
    for name in sorted({e.split for e in entries}, key=split_order):
        members = [e for e in entries if e.split == name]
        present = {e.backbone for e in members}
        failed = {}
        for b in known:
            if b not in present:
                failed[b] = failures.get(b) or ("no results" if b not in found else "no results on this split")
        for e in members:
            log.info("bootstrap %s on %s (%d resamples)", e.label, name, n_resamples)
            bootstrap_entry(e, n_resamples, seed)
        splits[name] = SplitResult(name, members, failed, compare_pairs(members), {})

    repeats = [r for r in (load_repeat(p, problems) for p in find_seeds(run_dirs, skip=out.resolve())) if r]
    repeats.sort(key=lambda r: (split_order(r.split), backbone_order(r.backbone), str(r.source)))
    labels = [r.label for r in repeats]
    for r in repeats:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.source.parent})"

    random_weights = [f"{e.label} ({e.split})" for e in entries if e.random_weights]
    for item in random_weights:
        log.warning("RANDOM WEIGHTS in the report: %s", item)
    timings = timing_rows(entries)
    notes = _notes(splits, n_resamples, seed, repeats) + problems

    with atomic_dir(out, what="report") as staging:
        for split in splits.values():
            log.info("plotting %s", split.split)
            split.images = split_figures(split, staging)
        seeds_image = seeds_figure(repeats, staging)
        if gallery > 0:
            for split in splits.values():
                if CLEANED_FROM.get(split.split) in splits:  # the same models as that split's: its gallery shows them
                    continue
                split.gallery = gallerylib.build(split.split, split.entries, staging / gallerylib.FOLDER, gallery)
            made = [s.gallery for s in splits.values() if s.gallery is not None]
            if made:
                notes.append(_gallery_note(made))
        data = summary(run_dirs, splits, overall_failures, random_weights, timings, notes, n_resamples, seed)
        data["repeats"] = jsonable([repeat_summary(r) for r in repeats])
        data["repeats_image"] = seeds_image.name if seeds_image else None
        (staging / SUMMARY_NAME).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        extra = {"repeats": repeats, "seeds_image": seeds_image}
        (staging / HTML_NAME).write_text(render_html(data, splits, timings, notes, **extra), encoding="utf-8")
        (staging / MARKDOWN_NAME).write_text(render_markdown(data, splits, timings, notes, **extra), encoding="utf-8")
        data[SHORTCUTS] = append_shortcuts_section(staging, splits, n_resamples, seed)
        data[EVIDENCE] = append_evidence_section(staging, splits)
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
