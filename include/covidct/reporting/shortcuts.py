"""Shortcut baselines: models that never see the anatomy, on the backbones' splits and test images.

On UCSD COVID-CT the classes come from different papers, and the file and the picture's margins say
which: (a) the file cues (format, colour mode, width, height, byte count) with statistics of the
decoded picture's grey levels, borders and corners (``covidct.data.cues``), and (b) the statistics
of the decoded pixels alone, what a backbone can see, once per view (``full``, ``body``,
``body-blank``: how much of that shortcut each crop leaves). Each is a scikit-learn
``StandardScaler`` + ``LogisticRegression`` fitted on the split's training images (recomputed with
``covidct.data.split`` from the data folder and seed in the backbones' metrics.json) and scored on the
backbones' own test images (their predictions.parquet), with the comparison's metrics and bootstrap
intervals (the same resamples: ``comparison.bootstrap_entry``). One sentence per split says what the
numbers mean for the backbones' figures.

The report gets them as its "Shortcut baselines" section and ``summary.json["shortcuts"]``. Where they
cannot be computed (no data folder, a split of one class, ...) the section says why: the report never
fails for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from covidct.core.errors import CovidctError
from covidct.data import cues as cuelib
from covidct.data.body import BODY, BODY_BLANK, FULL, VIEWS
from covidct.data.manifest import load_manifest
from covidct.data.split import split_mapping
from covidct.modelling import stats
from covidct.reporting.comparison import COLUMNS, SPLIT_TITLES, Entry, SplitResult, bootstrap_entry
from covidct.reporting.formatting import fmt, jsonable
from covidct.reporting.sections import append_section
from covidct.reporting.summary import entry_metrics

log = logging.getLogger(__name__)

KEY = "shortcuts"  # summary.json's key and the section's templates (section_shortcuts.*.j2)
FILE_CUES = "file-cues"
#: The file cues (``cues.FILE_COLUMNS``) in words.
FILE_CUE_WORDS = ("format", "colour mode", "width", "height", "byte size")
#: (row key, title, what it is fitted on, the view of its pixel statistics)
BASELINES = (
    (FILE_CUES, "File cues + picture statistics", f"{', '.join(FILE_CUE_WORDS)}; pixel statistics", FULL),
    *((f"pixels-{v}", f"Pixel statistics, {v} view", "statistics of the decoded pixels only", v) for v in VIEWS),
)
#: AUC within this of the best model's reads "close to" it.
CLOSE = 0.02
#: File cues below this AUC tell little about the class.
WEAK = 0.6
MODEL = "scikit-learn StandardScaler + LogisticRegression(max_iter=1000)"


def baseline_model():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def features(table: pd.DataFrame, key: str) -> pd.DataFrame:
    """What baseline ``key`` is fitted on, for every row of the cue table."""
    for name, _title, _what, view in BASELINES:
        if name == key:
            pixels = cuelib.pixel_cues(table, view)
            return pd.concat([cuelib.file_cues(table), pixels], axis=1) if key == FILE_CUES else pixels
    raise ValueError(f"unknown baseline {key!r}")


def fit_baselines(
    table: pd.DataFrame,
    train: list[str],
    test: pd.DataFrame,
    split: str,
    n_resamples: int = stats.N_RESAMPLES,
    seed: int = stats.SEED,
    source: Path | None = None,
) -> list[Entry]:
    """Every baseline fitted on the cue table's ``train`` images and scored on ``test`` (``relpath, label``).

    Each is an ``Entry`` like a backbone's row: reference metrics (scikit-learn's, the definitions of
    the backbones' figures), its predictions and bootstrap intervals (``comparison.bootstrap_entry``:
    whole patients on the patient-level splits). Test images without cues are left out.
    """
    rows = table.set_index("relpath", drop=False)
    fitted_on = rows.loc[sorted(set(train) & set(rows.index))]
    scored = test[test["relpath"].isin(rows.index)].sort_values("relpath", kind="stable").reset_index(drop=True)
    if fitted_on["label"].nunique() < 2:
        raise CovidctError(f"the training images of {split} are all of one class: no baseline can be fitted")
    if scored.empty:
        raise CovidctError(f"none of the test images of {split} has cues")
    entries = []
    for key, title, what, view in BASELINES:
        model = baseline_model().fit(features(fitted_on, key), fitted_on["label"].to_numpy())
        probability = model.predict_proba(features(rows.loc[scored["relpath"]], key))[:, 1]
        frame = pd.DataFrame(
            {
                "relpath": scored["relpath"].to_numpy(),
                "label": scored["label"].to_numpy().astype(int),
                "probability": probability,
                "prediction": (probability > 0.5).astype(int),
            }
        )
        metrics = stats.reference_metrics(frame["label"], frame["prediction"], frame["probability"])
        metrics.update(baseline=key, features=what, view=view, n_train=len(fitted_on), n_test=len(frame))
        entry = Entry(title, split, metrics, source or Path("."), predictions=frame, label=title)
        bootstrap_entry(entry, n_resamples, seed)
        entries.append(entry)
    return entries


def verdict(split: str, by_key: dict[str, float | None], best: tuple[str, float] | None) -> tuple[str | None, str]:
    """``(relation, sentence)``: the file cues' AUC against the best model's, and what that means, in words."""
    file_auc = by_key.get(FILE_CUES)
    full, views = (
        fmt(by_key.get(f"pixels-{FULL}"), False),
        "; ".join(f"{v} {fmt(by_key.get(f'pixels-{v}'), False)}" for v in (BODY, BODY_BLANK)),
    )
    pixel_part = f"the decoded pixels' statistics alone {full} ({FULL} view; {views})"
    if file_auc is None:
        return None, f"On {split} the baselines have no AUC (the test images are of one class)."
    head = f"File cues with picture statistics reach AUC {fmt(file_auc, False)} on {split}"
    if best is None:
        return None, f"{head}, and {pixel_part}; no model on these test images has an AUC to compare them with."
    label, best_auc = best
    source = "the source of the picture, not the lungs"
    if file_auc > best_auc + CLOSE:
        relation, meaning = "above", f"part of what the models score may be {source}"
    elif file_auc >= best_auc - CLOSE:
        relation, meaning = "close to", f"much of what the models score may be {source}"
    elif file_auc >= WEAK:
        relation, meaning = "below", f"the models see more than that, yet part of their score may be {source}"
    else:
        relation, meaning = "below", "the source of the picture tells little about the class here"
    compared = f"{relation} the best model ({label}, {fmt(best_auc, False)})"
    return relation, f"{head}, {compared}, and {pixel_part}: {meaning}."


def _best(entries: list[Entry]) -> tuple[str, float] | None:
    """The label and AUC of the row with the highest AUC (trained weights first)."""
    scored = [e for e in entries if e.value("auc") is not None]
    trained = [e for e in scored if not e.random_weights] or scored
    if not trained:
        return None
    top = max(trained, key=lambda e: e.value("auc"))
    return top.label, top.value("auc")


def _training_images(
    split: str, seed, data_dir: Path, manifest: pd.DataFrame, table: pd.DataFrame, test: set[str], notes: list[str]
) -> list[str]:
    """The split's training images recomputed from the data folder, checked against the backbones' test images."""
    candidates = [sorted(manifest["relpath"]), sorted(table["relpath"])]  # as trained: every file, or those that decode
    mappings = []
    for relpaths in candidates:
        mapping = split_mapping(split, relpaths, int(seed) if seed is not None else 0, data_dir, manifest)
        mappings.append(mapping)
        if {r for r, side in mapping.items() if side == "test"} == test:
            break
    else:
        mapping = mappings[0]
        ours = {r for r, side in mapping.items() if side == "test"}
        notes.append(
            f"The {split} split recomputed from {data_dir} (seed {seed}) has {len(ours)} test images, the backbones' "
            f"predictions {len(test)} ({len(ours & test)} shared): the baselines are fitted on its training images "
            "that are not among the backbones' test images, and scored on the backbones' test images."
        )
    return sorted(r for r, side in mapping.items() if side == "train" and r not in test)


def _part(split: str, reason: str | None = None) -> dict:
    """One split's part of the section, before its rows."""
    return {"split": split, "title": SPLIT_TITLES.get(split, split), "reason": reason, "rows": [], "notes": [],
            "relation": None, "sentence": None, "best": None}  # fmt: skip


def split_baselines(
    split: SplitResult, cue_table: Callable[[Path], tuple[pd.DataFrame, pd.DataFrame]], n_resamples: int, seed: int
) -> dict:
    """One split's part of the section: its rows, sentence and notes, or why there are none."""
    out = _part(split.split)
    rows = [e for e in split.entries if e.predictions is not None]
    reference = next((e for e in rows if not e.metrics.get("ensemble") and e.metrics.get("data_dir")), None)
    if reference is None:
        out["reason"] = "no backbone row has test predictions and a data folder in its metrics.json"
        return out
    data_dir, split_seed = Path(reference.metrics["data_dir"]), reference.metrics.get("seed")
    test = reference.predictions[["relpath", "label"]]
    same = [e for e in rows if set(e.predictions["relpath"]) == set(test["relpath"])]
    others = [e.label for e in rows if e not in same]
    if others:
        out["notes"].append(f"{', '.join(others)}: other test images than {reference.label}'s, which the baselines "
                            "are scored on; they are compared with the rows on the same images only.")  # fmt: skip
    out.update(data_dir=str(data_dir), seed=split_seed, test_images_of=reference.label)
    try:
        manifest, table = cue_table(data_dir)
    except CovidctError as exc:
        out["reason"] = f"the data folder the backbones were trained on cannot be read ({exc})"
        return out
    try:
        train = _training_images(split.split, split_seed, data_dir, manifest, table, set(test["relpath"]), out["notes"])
    except CovidctError as exc:
        out["reason"] = f"the {split.split} split cannot be recomputed ({exc})"
        return out
    labels = dict(zip(table["relpath"], table["label"], strict=True))
    known = test[test["relpath"].isin(labels.keys())]
    relabelled = int((known["relpath"].map(labels).astype(int) != known["label"].astype(int)).sum())
    if relabelled:
        out["notes"].append(f"{relabelled} test images have another label in {data_dir} than in the predictions; "
                            "the baselines are scored on the predictions' labels.")  # fmt: skip
    missing = int((~test["relpath"].isin(labels.keys())).sum())
    if missing:
        out["notes"].append(f"{missing} of the backbones' {len(test)} test images have no cues (gone from {data_dir} "
                            "or not decodable) and are left out of the baselines' rows.")  # fmt: skip
    try:
        entries = fit_baselines(table, train, test, split.split, n_resamples, seed, source=data_dir)
    except CovidctError as exc:
        out["reason"] = str(exc)
        return out
    best = _best(same)
    by_key = {e.metrics["baseline"]: e.value("auc") for e in entries}
    out["relation"], out["sentence"] = verdict(split.split, by_key, best)
    out["best"] = None if best is None else {"label": best[0], "auc": best[1]}
    for e in entries:
        out["rows"].append({"key": e.metrics["baseline"], "title": e.label, "features": e.metrics["features"],
                            "view": e.metrics["view"], "n_train": e.metrics["n_train"], "n_test": e.metrics["n_test"],
                            "metrics": entry_metrics(e), "bootstrap_unit": e.bootstrap.unit if e.bootstrap else None,
                            "bootstrap_units": e.bootstrap.n_units if e.bootstrap else None})  # fmt: skip
    return out


def _cue_tables() -> Callable[[Path], tuple[pd.DataFrame, pd.DataFrame]]:
    """``data_dir -> (manifest, cue table)``, each data folder read once."""
    found: dict[Path, tuple[pd.DataFrame, pd.DataFrame]] = {}

    def cue_table(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
        if data_dir not in found:
            manifest = load_manifest(data_dir)
            found[data_dir] = (manifest, cuelib.load_cues(data_dir, manifest))
        return found[data_dir]

    return cue_table


def shortcut_baselines(splits: dict[str, SplitResult], n_resamples: int, seed: int) -> dict:
    """The section's data (``summary.json["shortcuts"]``) for every split of the report; never raises."""
    started = time.monotonic()
    data = {
        "model": MODEL,
        "views": list(VIEWS),
        "close": CLOSE,
        "columns": [{"key": k, "title": t, "percent": p} for k, t, p in COLUMNS],
        "statistics": list(cuelib.PIXEL_STATISTICS),
        "file_cues": list(FILE_CUE_WORDS),
        "splits": [],
        "reason": None,
    }
    cue_table = _cue_tables()
    for split in splits.values():
        try:
            data["splits"].append(split_baselines(split, cue_table, n_resamples, seed))
        except Exception as exc:  # noqa: BLE001 - the report never fails for its baselines
            log.exception("no shortcut baselines on %s", split.split)
            data["splits"].append(_part(split.split, f"they could not be computed ({type(exc).__name__}: {exc})"))
    if not data["splits"]:
        data["reason"] = "the report has no split"
    data["seconds"] = round(time.monotonic() - started, 1)
    return jsonable(data)


def append_shortcuts_section(report_dir: Path, splits: dict[str, SplitResult], n_resamples: int, seed: int) -> dict:
    """Compute the baselines and add them to the report in ``report_dir`` as a section; returns its data."""
    data = shortcut_baselines(splits, n_resamples, seed)
    try:
        append_section(report_dir, KEY, KEY, data)
    except Exception as exc:  # noqa: BLE001 - the report never fails for its baselines
        log.exception("the shortcut baselines' section could not be written")
        data = {**{k: v for k, v in data.items() if k != "splits"}, "splits": [],
                "reason": f"the section could not be written ({type(exc).__name__}: {exc})"}  # fmt: skip
        append_section(report_dir, KEY, KEY, data)
    return data


def auc_by_baseline(data: dict, split: str) -> dict[str, float | None]:
    """``{row key: AUC}`` of one split in the section's data (for tests and programs)."""
    for part in data.get("splits", []):
        if part["split"] == split:
            return {r["key"]: r["metrics"]["auc"]["value"] for r in part["rows"]}
    return {}
