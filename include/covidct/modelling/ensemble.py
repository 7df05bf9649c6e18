"""The backbone ensemble, a first-class model: evaluated like a backbone, saved, and usable.

Two ways to combine the backbones' COVID probabilities on the same images:

- ``mean`` (the product's): their plain average, thresholded at 0.5. Nothing is fitted, so
  nothing can overfit, and it needs no more data than the backbones already saw.
- ``stacked``: a logistic regression on the backbones' probabilities, fitted only on
  out-of-fold predictions of the *training* images (``oof.parquet`` beside each backbone's
  predictions: every training image predicted by an LR fitted without its fold). It never
  sees a test image; ``fit_stacker`` refuses rows that are test rows.

``build_ensemble(run_dir)`` reads the backbones' results in one run folder and writes,
atomically, ``RUN_DIR/ensemble/``::

    ensemble.json                      the saved model: method, threshold, members, stacker
    members/<backbone>/                copies of the members' PipelineModels (featurizer + LR)
    <split>/mean/     metrics.json  predictions.parquet    one "backbone" row per split
    <split>/stacked/  metrics.json  predictions.parquet    for the report, like a backbone
    random70-seeds/{mean,stacked}/  seeds.json  predictions.parquet   (with --seeds)

The report finds the two ``metrics.json`` like any backbone's (rows ``Ensemble`` and
``Ensemble (stacked)``: bootstrap CIs, McNemar against each backbone, every plot).
``covidct predict --model RUN_DIR/ensemble`` classifies new images with the saved members.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from covidct.core.atomic import atomic_dir
from covidct.core.errors import CovidctError
from covidct.features.backbone import BACKBONES
from covidct.modelling import stats
from covidct.modelling.ensemble_format import (
    MANIFEST,
    MEAN,
    METHOD_LABELS,
    PRODUCT_METHOD,
    STACKED,
    STACKER_C,
    THRESHOLD,
    Stacker,
)
from covidct.modelling.evaluate import confusion
from covidct.modelling.runfolder import SEEDS_DIR, canonical_backbone, find_metrics

log = logging.getLogger(__name__)

#: The members' models the saved ensemble uses: the first of these splits they were trained on (official
#: wherever it ran, as the promotion gate compares on it; official-clean only in a run without official).
MODEL_SPLITS = ("official", "official-clean", "random70")


@dataclass
class Member:
    """One backbone's result on one split (a metrics.json folder)."""

    backbone: str
    split: str
    folder: Path
    metrics: dict
    predictions: pd.DataFrame
    oof: pd.DataFrame | None


@dataclass
class EnsembleResult:
    out: Path
    splits: dict[str, dict[str, dict]] = field(default_factory=dict)  # split -> method -> metrics
    seeds: dict[str, list[dict]] = field(default_factory=dict)  # method -> per-seed metrics
    members: list[str] = field(default_factory=list)
    model_split: str | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- combining


def mean_probability(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """``relpath, label, probability_<backbone>..., probability`` (their mean) over the same images."""
    names = list(frames)
    joined = None
    for name in names:
        part = frames[name][["relpath", "label", "probability"]].rename(columns={"probability": f"probability_{name}"})
        if joined is None:
            joined = part
            continue
        if set(part["relpath"]) != set(joined["relpath"]):
            raise CovidctError(f"{name} was evaluated on other images than {names[0]}: cannot combine them")
        joined = joined.merge(part, on="relpath", suffixes=("", "_other"))
        if not (joined["label"] == joined["label_other"]).all():
            raise CovidctError(f"{name} and {names[0]} disagree on the labels of the same images")
        joined = joined.drop(columns="label_other")
    joined["probability"] = joined[[f"probability_{n}" for n in names]].mean(axis=1)
    return joined.sort_values("relpath", kind="stable").reset_index(drop=True)


def fit_stacker(oof: dict[str, pd.DataFrame], test_relpaths: set[str] | None = None) -> Stacker:
    """An LR on the backbones' out-of-fold training probabilities.

    ``test_relpaths``: the images it will be evaluated on; any of them among its training
    rows is an error (the stacker must never see a test image).
    """
    from sklearn.linear_model import LogisticRegression

    table = mean_probability(oof)
    if test_relpaths is not None:
        leaked = set(table["relpath"]) & set(test_relpaths)
        if leaked:
            raise CovidctError(
                f"{len(leaked)} test images are among the stacker's training rows (e.g. {sorted(leaked)[0]})"
            )
    names = list(oof)
    x = table[[f"probability_{n}" for n in names]].to_numpy()
    y = table["label"].to_numpy().astype(int)
    if len(np.unique(y)) < 2:
        raise CovidctError("the out-of-fold predictions hold one class only: cannot fit the stacker")
    model = LogisticRegression(C=STACKER_C).fit(x, y)
    return Stacker(tuple(names), tuple(float(c) for c in model.coef_[0]), float(model.intercept_[0]), len(y))


def _predictions_frame(joined: pd.DataFrame, probability: np.ndarray, paths: dict[str, str]) -> pd.DataFrame:
    frame = joined.drop(columns="probability").copy()
    frame["probability"] = probability
    frame["prediction"] = (frame["probability"] > THRESHOLD).astype("int32")
    frame["label"] = frame["label"].astype("int32")
    frame.insert(0, "path", frame["relpath"].map(paths))
    return frame


def _metrics(frame: pd.DataFrame) -> dict:
    y, pred = frame["label"].to_numpy().astype(int), frame["prediction"].to_numpy().astype(int)
    metrics = stats.reference_metrics(y, pred, frame["probability"].to_numpy())
    metrics["confusion"] = confusion(y, pred)
    return metrics


# --------------------------------------------------------------------------- reading a run


def _read_frame(path: Path) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    return frame.sort_values("relpath", kind="stable").reset_index(drop=True)


def find_members(run_dir: Path, skip: Path) -> dict[str, dict[str, Member]]:
    """``{split: {backbone: Member}}`` for every backbone result (metrics.json + predictions) in the run."""
    found: dict[str, dict[str, Member]] = {}
    for path in find_metrics([run_dir], skip=skip.resolve()):
        metrics = json.loads(path.read_text(encoding="utf-8"))
        backbone = canonical_backbone(metrics.get("backbone", ""))
        if backbone not in BACKBONES or metrics.get("ensemble"):
            continue
        folder = path.parent
        if not (folder / "predictions.parquet").exists():
            log.warning("%s has no predictions.parquet; left out of the ensemble", folder)
            continue
        split = str(metrics.get("split"))
        if backbone in found.get(split, {}):
            raise CovidctError(
                f"{backbone} has two results on {split} in {run_dir} ({found[split][backbone].folder} and {folder})"
            )
        oof = _read_frame(folder / "oof.parquet") if (folder / "oof.parquet").exists() else None
        member = Member(backbone, split, folder, metrics, _read_frame(folder / "predictions.parquet"), oof)
        found.setdefault(split, {})[backbone] = member
    return found


def _order(backbones) -> list[str]:
    names = list(BACKBONES)
    return sorted(backbones, key=names.index)


# --------------------------------------------------------------------------- evaluation


def _shared_fields(members: list[Member], method: str) -> dict:
    first = members[0].metrics
    random = any(bool(m.metrics.get("random_weights")) for m in members)
    return {
        "backbone": METHOD_LABELS[method],
        "ensemble": True,
        "method": method,
        "product_method": method == PRODUCT_METHOD,
        "members": [m.backbone for m in members],
        "member_folders": [str(m.folder) for m in members],
        "weights": first.get("weights") if len({m.metrics.get("weights") for m in members}) == 1 else "mixed",
        "weights_id": "+".join(str(m.metrics.get("weights_id")) for m in members),
        "random_weights": random,
        "pooling": first.get("pooling"),
        "precision": first.get("precision", "float32"),
        "threshold": THRESHOLD,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def evaluate_split(members: list[Member], notes: list[str]) -> dict[str, tuple[dict, pd.DataFrame]]:
    """``{method: (metrics, predictions)}`` of the mean and (where out-of-fold predictions exist) the stack."""
    split = members[0].split
    paths = {}
    for m in members:
        paths.update(dict(zip(m.predictions["relpath"], m.predictions["path"], strict=True)))
    names = [m.backbone for m in members]
    t0 = time.monotonic()
    joined = mean_probability({m.backbone: m.predictions for m in members})
    seeds = {m.metrics.get("seed") for m in members}
    common = {"split": split, "seed": members[0].metrics.get("seed") if len(seeds) == 1 else None,
              "n_train": members[0].metrics.get("n_train"), "n_test": len(joined)}  # fmt: skip
    out = {}
    frame = _predictions_frame(joined, joined["probability"].to_numpy(), paths)
    out[MEAN] = (
        {**_shared_fields(members, MEAN), **common, **_metrics(frame),
         "timings": {"fit_s": 0.0, "evaluate_s": round(time.monotonic() - t0, 3)}},
        frame,
    )  # fmt: skip
    if any(m.oof is None for m in members):
        missing = ", ".join(m.backbone for m in members if m.oof is None)
        notes.append(f"Ensemble (stacked) on {split}: no out-of-fold predictions from {missing} (trained with "
                     "--stack-folds 0, i.e. the DAG's param stacked off, or by an older version); "
                     "not fitted.")  # fmt: skip
        return out
    t0 = time.monotonic()
    stacker = fit_stacker({m.backbone: m.oof for m in members}, set(joined["relpath"]))
    fit_s = time.monotonic() - t0
    probability = stacker.predict(joined[[f"probability_{n}" for n in names]].to_numpy())
    frame = _predictions_frame(joined, probability, paths)
    out[STACKED] = (
        {**_shared_fields(members, STACKED), **common, "n_train": stacker.n_train, **_metrics(frame),
         "stacker": stacker.to_json(), "timings": {"fit_s": round(fit_s, 3), "evaluate_s": 0.0}},
        frame,
    )  # fmt: skip
    return out


def _seed_members(run_dir: Path, skip: Path) -> dict[str, Path]:
    """``{backbone: random70-seeds folder}`` of the run (each backbone once)."""
    found: dict[str, Path] = {}
    for path in sorted(run_dir.rglob("seeds.json")):
        if skip in path.parents or any(p.name.startswith(".") for p in path.parents):
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        backbone = canonical_backbone(data.get("backbone", ""))
        if not (path.parent / "predictions.parquet").exists():
            log.warning("%s has no predictions.parquet beside it; its seeds are left out of the ensemble", path)
            continue
        if backbone in BACKBONES and not data.get("ensemble"):
            if backbone in found:
                raise CovidctError(f"{backbone} has two seed folders in {run_dir}")
            found[backbone] = path.parent
    return found


def evaluate_seeds(folders: dict[str, Path], notes: list[str]) -> dict[str, tuple[dict, pd.DataFrame]]:
    """Mean and stacked ensembles on every random70 seed that all backbones ran."""
    names = _order(folders)
    info = {b: json.loads((folders[b] / "seeds.json").read_text(encoding="utf-8")) for b in names}
    predictions = {b: pd.read_parquet(folders[b] / "predictions.parquet") for b in names}
    oofs = {b: pd.read_parquet(folders[b] / "oof.parquet") for b in names if (folders[b] / "oof.parquet").exists()}
    seeds = [s for s in info[names[0]]["seeds"] if all(s in info[b]["seeds"] for b in names)]
    if len(oofs) < len(names):
        notes.append("Ensemble (stacked) over seeds: not fitted, some backbones have no out-of-fold predictions "
                     "per seed (train with --stack-seeds).")  # fmt: skip
    runs: dict[str, list[dict]] = {MEAN: [], STACKED: []}
    frames: dict[str, list[pd.DataFrame]] = {MEAN: [], STACKED: []}
    for seed in seeds:
        per = {b: predictions[b][predictions[b]["seed"] == seed].sort_values("relpath") for b in names}
        paths = dict(zip(per[names[0]]["relpath"], per[names[0]]["path"], strict=True))
        joined = mean_probability(per)
        frame = _predictions_frame(joined, joined["probability"].to_numpy(), paths)
        n_train = next(r["n_train"] for r in info[names[0]]["runs"] if r["seed"] == seed)
        runs[MEAN].append({"seed": seed, "n_train": n_train, "n_test": len(frame), **_metrics(frame)})
        frames[MEAN].append(frame.assign(seed=seed))
        if len(oofs) == len(names):
            stacker = fit_stacker({b: oofs[b][oofs[b]["seed"] == seed] for b in names}, set(joined["relpath"]))
            probability = stacker.predict(joined[[f"probability_{n}" for n in names]].to_numpy())
            frame = _predictions_frame(joined, probability, paths)
            runs[STACKED].append({"seed": seed, "n_train": stacker.n_train, "n_test": len(frame), **_metrics(frame),
                                  "stacker": stacker.to_json()})  # fmt: skip
            frames[STACKED].append(frame.assign(seed=seed))
    members = [Member(b, "random70", folders[b], info[b], predictions[b], None) for b in names]
    out = {}
    for method in (MEAN, STACKED):
        if runs[method]:
            summary = {**_shared_fields(members, method), "split": "random70", "seeds": seeds,
                       "main_seed": info[names[0]].get("main_seed"), "runs": runs[method]}  # fmt: skip
            out[method] = (summary, pd.concat(frames[method], ignore_index=True))
    return out


# --------------------------------------------------------------------------- entry point


def build_ensemble(run_dir: str | Path, out: str | Path | None = None) -> EnsembleResult:
    """Combine the backbones of ``run_dir``; write ``out`` (default ``RUN_DIR/ensemble``) atomically.

    Raises CovidctError where fewer than two backbones have results on any split.
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise CovidctError(f"run folder {run_dir} does not exist")
    out = Path(out).expanduser() if out is not None else run_dir / "ensemble"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise CovidctError(f"{out} exists and is not a covidct ensemble; refusing to replace it")
    found = find_members(run_dir, skip=out)
    usable = {s: _order(m) for s, m in found.items() if len(m) >= 2}
    if not usable:
        have = {s: sorted(m) for s, m in found.items()}
        raise CovidctError(f"an ensemble needs two or more backbones on one split; {run_dir} has {have or 'none'}")
    result = EnsembleResult(out=out.absolute())
    with atomic_dir(out) as staging:
        for split, names in usable.items():
            members = [found[split][b] for b in names]
            for method, (metrics, frame) in evaluate_split(members, result.notes).items():
                folder = staging / split / method
                folder.mkdir(parents=True)
                frame.to_parquet(folder / "predictions.parquet", index=False)
                (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
                result.splits.setdefault(split, {})[method] = metrics
                log.info("%s on %s: accuracy %.4f, auc %.4f (%s)", METHOD_LABELS[method], split, metrics["accuracy"],
                         metrics["auc"] or float("nan"), ", ".join(names))  # fmt: skip
        seed_folders = _seed_members(run_dir, out.resolve())
        if len(seed_folders) >= 2:
            for method, (summary, frame) in evaluate_seeds(seed_folders, result.notes).items():
                folder = staging / SEEDS_DIR / method
                folder.mkdir(parents=True)
                frame.to_parquet(folder / "predictions.parquet", index=False)
                (folder / "seeds.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
                result.seeds[method] = summary["runs"]
        # The saved model: the members' PipelineModels of one split, and the stacker fitted on that split.
        model_split = next((s for s in MODEL_SPLITS if s in usable), next(iter(usable)))
        members = [found[model_split][b] for b in usable[model_split]]
        for m in members:
            shutil.copytree(m.folder / "model", staging / "members" / m.backbone.lower())
        stacker = result.splits[model_split].get(STACKED, {}).get("stacker")
        manifest = {
            "format": 1,
            "method": PRODUCT_METHOD,
            "threshold": THRESHOLD,
            "trained_on_split": model_split,
            "members": [
                {
                    "backbone": m.backbone,
                    "model": f"members/{m.backbone.lower()}",
                    "weights_id": m.metrics.get("weights_id"),
                    "source": str(m.folder),
                }
                for m in members
            ],
            "stacker": stacker,
            "random_weights": any(bool(m.metrics.get("random_weights")) for m in members),
            "test_metrics": {
                method: {k: result.splits[model_split][method].get(k) for k in ("accuracy", "auc")}
                for method in result.splits[model_split]
            },  # fmt: skip
            "run_dir": str(run_dir.absolute()),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    result.members = [m.backbone for m in members]
    result.model_split = model_split
    log.info("wrote ensemble %s (%s, models of the %s split)", out, "+".join(result.members), model_split)
    return result
