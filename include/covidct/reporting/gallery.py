"""The report's gallery: per split, the best model's most confident test images of each outcome, with maps.

For each split the report picks the best model (highest accuracy, then AUC, among the rows with
test predictions and a saved model: a backbone, or an ensemble through its members' models) and
shows up to ``PER_CATEGORY`` test images of each of true positive, false positive, false negative
and true negative: the most confident of each (the highest probability of the predicted class),
each with its class activation map (``covidct.inference.maps``: CAM or Grad-CAM; an ensemble shows one
map per member, side by side).

Where and at what cost: for ``avg`` pooling (CAM) the train jobs have recorded every test image's map
(``cams.parquet``, computed from the conv block the featurization pass kept: ``covidct.modelling.evidence``),
so the report only draws these few images (at most 4 × ``PER_CATEGORY`` per split, and per member for an
ensemble) in its own process: no Spark session, no model, no second pass over the images. Where a member
has no recorded maps (another pooling: Grad-CAM; a run folder from before) they are computed here through
the same Spark code as ``covidct predict --explain`` on the report's session (local unless
``COVIDCT_SPARK_MASTER`` says otherwise). The seconds it took are in the report and ``summary.json``. The
PNGs are scaled to ``MAX_SIDE`` pixels so that the self-contained HTML stays a few MB.

The maps of the same models on the same images are reused (``covidct.reporting.gallery_cache``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from covidct.core.errors import CovidctError
from covidct.core.session import get_spark
from covidct.data.body import FULL
from covidct.data.dataset import LABEL_NAMES
from covidct.inference.drawing import Panel
from covidct.inference.explainer import CAM
from covidct.inference.explanations import Item, local_path, write_explanations, write_explanations_here
from covidct.inference.maps import explain_model
from covidct.modelling.runfolder import CAMS_FILE, METRICS, PREDICTIONS, read_cams, read_predictions
from covidct.reporting.gallery_cache import cache_dir, from_cache, gallery_key, to_cache

log = logging.getLogger(__name__)

#: (key, title, label, prediction), in the order the gallery shows them.
CATEGORIES = (
    ("TP", "True positives (COVID, predicted COVID)", 1, 1),
    ("FP", "False positives (non-COVID, predicted COVID)", 0, 1),
    ("FN", "False negatives (COVID, predicted non-COVID)", 1, 0),
    ("TN", "True negatives (non-COVID, predicted non-COVID)", 0, 0),
)
PER_CATEGORY = 3
MAX_SIDE = 320
FOLDER = "gallery"


@dataclass
class GalleryImage:
    category: str
    relpath: str
    label: int
    probability: float
    png: Path  # absolute, while the report is built (then relative: ``rel``)
    rel: str  # relative to the report folder
    npy: list[str]


@dataclass
class Category:
    key: str
    title: str
    total: int  # test images in this category
    images: list[GalleryImage] = field(default_factory=list)


@dataclass
class Gallery:
    split: str
    model: str  # the row's label
    members: list[str]
    methods: dict[str, str]  # backbone -> CAM / Grad-CAM
    random_weights: bool
    categories: list[Category] = field(default_factory=list)
    seconds: float | None = None
    reason: str | None = None  # why there is no gallery (then categories is empty)
    cached: bool = False  # the maps came from the gallery cache (same models, same images)

    def summary(self) -> dict:
        return {
            "model": self.model,
            "members": self.members,
            "methods": self.methods,
            "random_weights": self.random_weights,
            "seconds": self.seconds,
            "cached": self.cached,
            "reason": self.reason,
            "categories": {
                c.key: {
                    "title": c.title,
                    "total": c.total,
                    "images": [
                        {
                            "relpath": i.relpath,
                            "label": i.label,
                            "probability": i.probability,
                            "png": i.rel,
                            "npy": i.npy,
                        }
                        for i in c.images
                    ],
                }
                for c in self.categories
            },
        }


def model_folders(entry) -> dict[str, Path] | None:
    """``{backbone: model folder}`` of a report row (an ensemble: its members'), None where one is missing."""
    if entry.metrics.get("ensemble"):
        members, folders = entry.metrics.get("members") or [], entry.metrics.get("member_folders") or []
        if not members or len(members) != len(folders):
            return None
        found = {str(b): Path(f) / "model" for b, f in zip(members, folders, strict=True)}
    else:
        found = {entry.backbone: entry.source.parent / "model"}
    return found if all((f / "metadata").is_dir() for f in found.values()) else None


def best_entry(entries: list):
    """The row with the highest accuracy (then AUC) among those with predictions and saved models."""
    usable = [e for e in entries if e.predictions is not None and "path" in e.predictions and model_folders(e)]
    if not usable:
        return None
    return max(usable, key=lambda e: (e.value("accuracy") or 0.0, e.value("auc") or 0.0))


def pick(predictions: pd.DataFrame, per_category: int = PER_CATEGORY) -> dict[str, tuple[int, pd.DataFrame]]:
    """``{category: (total, the most confident rows)}``: P(COVID) descending for predicted COVID, ascending else."""
    picked = {}
    for key, _title, label, prediction in CATEGORIES:
        rows = predictions[(predictions["label"] == label) & (predictions["prediction"] == prediction)]
        rows = rows.sort_values(["probability", "relpath"], ascending=[prediction == 0, True], kind="stable")
        picked[key] = (len(rows), rows.head(per_category))
    return picked


def build(
    split: str, entries: list, folder: Path, per_category: int = PER_CATEGORY, max_side: int = MAX_SIDE
) -> Gallery | None:
    """The gallery of one split, its files under ``folder/<split>/``; None where no row has a saved model.

    Never raises for a gallery that cannot be made: the report says why instead.
    """
    entry = best_entry(entries)
    if entry is None:
        return None
    folders = model_folders(entry)
    gallery = Gallery(split, entry.label, list(folders), {}, entry.random_weights)
    started = time.monotonic()
    try:
        _fill(gallery, entry, folders, folder, per_category, max_side)
    except Exception as exc:  # noqa: BLE001 - the report is still useful without its gallery
        log.warning("no gallery for %s (%s): %s", split, entry.label, exc)
        gallery.categories = []
        gallery.reason = str(exc) if isinstance(exc, CovidctError) else f"{type(exc).__name__}: {exc}"
    gallery.seconds = round(time.monotonic() - started, 1)
    log.info("gallery %s (%s): %.1f s", split, entry.label, gallery.seconds)
    return gallery


def _fill(gallery: Gallery, entry, folders: dict[str, Path], folder: Path, per_category: int, max_side: int):
    picked = pick(entry.predictions, per_category)
    chosen = pd.concat([rows for _total, rows in picked.values()], ignore_index=True)
    missing = [p for p in chosen["path"] if not local_path(p).is_file()]
    if missing:
        raise CovidctError(f"{len(missing)} test images are not where the run read them (e.g. {missing[0]})")
    items, meta = [], {}
    for key, (_total, rows) in picked.items():
        for i, r in enumerate(rows.itertuples(index=False), start=1):
            title = f"{key} · label {LABEL_NAMES[int(r.label)]} · {entry.label}: P(COVID) = {r.probability:.3f}"
            items.append((r.path, f"{key}-{i}", f"{title}\n{r.relpath}", bool(r.prediction)))
            meta[r.path] = (key, r)
    out = folder / gallery.split
    try:
        cache_key = gallery_key(gallery.split, folders, items, max_side)
    except (OSError, ValueError) as exc:  # a model folder laid out otherwise: computed, not cached
        log.warning("gallery %s: no cache key (%s)", gallery.split, exc)
        cache_key = None
    reused = from_cache(cache_key, out) if cache_key else None
    if reused is not None:
        gallery.methods, written = reused
        gallery.cached = True
        log.info("gallery %s: the maps of the same models on the same images, from %s", gallery.split,
                 cache_dir() / cache_key)  # fmt: skip
    else:
        recorded = recorded_panels(folders, {path: meta[path][1].relpath for path, *_ in items})
        if recorded is not None:
            gallery.methods, panels = recorded
            drawn = [Item(path, name, title, covid, panels[path]) for path, name, title, covid in items]
            written = write_explanations_here(drawn, out, max_side=max_side, about={"split": gallery.split})
        else:
            gallery.methods, written = _draw(gallery.split, folders, items, out, max_side)
        if cache_key:
            to_cache(cache_key, out, gallery.methods, written)
    by_category: dict[str, list[GalleryImage]] = {key: [] for key, *_ in CATEGORIES}
    for path, *_ in items:
        key, r = meta[path]
        png, npys = written[path]
        here = Path(folder.name) / gallery.split
        npy = [str(here / n.name) for n in npys]
        by_category[key].append(
            GalleryImage(key, r.relpath, int(r.label), float(r.probability), png, str(here / png.name), npy)
        )
    gallery.categories = [Category(key, title, picked[key][0], by_category[key]) for key, title, *_ in CATEGORIES]


def recorded_panels(
    folders: dict[str, Path], relpaths: dict[str, str]
) -> tuple[dict[str, str], dict[str, tuple[Panel, ...]]] | None:
    """``(methods, {path: panels})`` of the images at ``relpaths`` (``{path: relpath}``) from what each model's
    train job recorded beside it (``cams.parquet``, ``predictions.parquet``, ``metrics.json``); None where a
    model lacks a map of one of them."""
    panels: dict[str, list[Panel]] = {path: [] for path in relpaths}
    for backbone, model_dir in folders.items():
        run = model_dir.parent
        try:
            cams = read_cams(run / CAMS_FILE)
            view = json.loads((run / METRICS).read_text()).get("view", FULL)
            probability = read_predictions(run / PREDICTIONS).set_index("relpath")["probability"]
        except (OSError, ValueError, KeyError) as exc:  # nothing recorded (another pooling, an older run)
            log.info("gallery: no recorded maps of %s in %s (%s)", backbone, run, type(exc).__name__)
            return None
        for path, relpath in relpaths.items():
            if relpath not in cams or relpath not in probability.index:
                return None
            panels[path].append(Panel(backbone, CAM, float(probability[relpath]), cams[relpath], view))
    return dict.fromkeys(folders, CAM), {path: tuple(found) for path, found in panels.items()}


def _draw(split: str, folders: dict[str, Path], items: list[tuple], out: Path, max_side: int):
    """Compute the maps in Spark and write the PNGs and ``.npy``; ``(methods, {path: (png, [npy])})``."""
    from pyspark.sql import functions as F

    spark = get_spark("covidct-report")
    uris = sorted({path for path, *_ in items})
    parents = sorted({p.rsplit("/", 1)[0] for p in uris})
    df = (
        spark.read.format("binaryFile")
        .load(parents)
        .select("path", F.col("content").alias("image"))
        .filter(F.col("path").isin(uris))
        .cache()
    )
    log.info("gallery %s: maps of %d test images with %s", split, len(uris), " + ".join(folders))
    maps = {b: explain_model(f, df) for b, f in folders.items()}
    methods = {b: next(iter(m.values())).method for b, m in maps.items() if m}
    drawn = [
        Item(
            path,
            name,
            title,
            covid,
            tuple(Panel(b, m[path].method, m[path].probability, m[path].map, m[path].view) for b, m in maps.items()),
        )
        for path, name, title, covid in items
    ]
    written = write_explanations(df, drawn, out, max_side=max_side, about={"split": split})
    df.unpersist()
    return methods, written
