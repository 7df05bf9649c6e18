"""The run-folder layout: where a run's results lie, and reading and writing its shared files.

A train job's ``OUT`` (one split; with several, one such folder per split, ``OUT/<split>/``)::

    metrics.json          the split's metrics (``backbone`` and ``split`` fields inside)
    predictions.parquet   one row per test image: PREDICTIONS_COLUMNS (Spark's folder layout)
    oof.parquet           out-of-fold predictions on the training images (for the stacked ensemble)
    evidence.parquet      each test image's evidence share inside the body (avg pooling)
    cams.parquet          each test image's class activation map at the conv grid (avg pooling): CAMS_COLUMNS
    model/                the PipelineModel (featurizer + LR)
    random70-seeds/       seeds.json + predictions.parquet (+ oof.parquet) with ``--seeds``

A DAG run's folder (``covidct.core.paths.run_dir``) holds one such ``OUT`` per backbone, then
``ensemble/`` (the same files per split and method), ``report/`` and ``fingerprint.json``. Readers
find results by their ``metrics.json`` / ``seeds.json``, whatever the folders are called.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from covidct.core.errors import CovidctError
from covidct.features.backbone import get_backbone

METRICS = "metrics.json"
PREDICTIONS = "predictions.parquet"
OOF = "oof.parquet"
MODEL = "model"
SEEDS = "seeds.json"
SEEDS_DIR = "random70-seeds"
CAMS_FILE = "cams.parquet"
#: cams.parquet's columns: the map (row-major, float32) of the image at relpath, its grid's rows and columns.
CAMS_COLUMNS = ("relpath", "map", "map_h", "map_w")
#: Folders that never hold results (models, a Spark-written predictions folder, an ensemble's member copies).
SKIP_DIRS = {MODEL, PREDICTIONS, "members"}
#: predictions.parquet's columns, with the types Spark's writer gave them.
PREDICTIONS_COLUMNS = ("path", "relpath", "label", "probability", "prediction", "weights_id")
#: What a reader needs of predictions.parquet.
PREDICTION_COLUMNS_READ = {"relpath", "label", "probability", "prediction"}


def canonical_backbone(name: str) -> str:
    """'vgg16' -> 'VGG16'; names outside the backbone table are kept as given."""
    try:
        return get_backbone(name).name
    except CovidctError:
        return str(name).strip()


def _walk(root: Path, name: str, skip: Path | None) -> list[Path]:
    """Every file called ``name`` under ``root`` (hidden folders, SKIP_DIRS and ``skip`` excluded)."""
    found = []
    for folder, dirnames, filenames in os.walk(root):
        here = Path(folder)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and d not in SKIP_DIRS and (skip is None or (here / d).resolve() != skip)
        )
        if name in filenames:
            found.append((here / name).resolve())
    return found


def find_metrics(run_dirs: list[Path], skip: Path | None = None) -> list[Path]:
    """Every metrics.json under the run folders (hidden staging folders, models and ``skip`` excluded)."""
    found: dict[Path, None] = {}
    for root in run_dirs:
        root = Path(root).expanduser()
        if root.is_file() and root.name == METRICS:
            found[root.resolve()] = None
            continue
        if not root.is_dir():
            raise CovidctError(f"run folder {root} does not exist")
        found.update(dict.fromkeys(_walk(root, METRICS, skip)))
    return list(found)


def find_seeds(run_dirs: list[Path], skip: Path | None = None) -> list[Path]:
    """Every seeds.json (random70 repeated over seeds) under the run folders (missing folders skipped)."""
    found: dict[Path, None] = {}
    for root in run_dirs:
        root = Path(root).expanduser()
        if root.is_dir():
            found.update(dict.fromkeys(_walk(root, SEEDS, skip)))
    return list(found)


def read_predictions(folder: Path) -> pd.DataFrame:
    """predictions.parquet (Spark's folder or one file), one row per relpath, sorted by relpath."""
    frame = pd.read_parquet(folder)
    missing = PREDICTION_COLUMNS_READ - set(frame.columns)
    if missing:
        raise ValueError(f"columns {', '.join(sorted(missing))} are missing")
    frame = frame.dropna(subset=["label", "prediction"]).drop_duplicates("relpath")
    frame = frame.astype({"label": int, "prediction": int, "probability": float})
    return frame.sort_values("relpath", kind="stable").reset_index(drop=True)


def write_predictions(frame: pd.DataFrame, folder: Path) -> Path:
    """``folder/part-00000.parquet``: the folder layout and column types of Spark's writer, without a Spark job."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"label": pa.int32(), "probability": pa.float64(), "prediction": pa.int32()}
    schema = pa.schema([(name, types.get(name, pa.string())) for name in PREDICTIONS_COLUMNS])
    table = pa.Table.from_pandas(frame[list(PREDICTIONS_COLUMNS)], schema=schema, preserve_index=False)
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000.parquet")
    return folder


def write_cams(maps: dict[str, np.ndarray], file: Path) -> Path:
    """``cams.parquet``: ``{relpath: (h, w) map}`` as CAMS_COLUMNS rows, sorted by relpath."""
    rows = sorted(maps.items())
    frame = pd.DataFrame(
        {
            "relpath": [r for r, _ in rows],
            "map": [np.asarray(m, dtype=np.float32).ravel() for _, m in rows],
            "map_h": [int(m.shape[0]) for _, m in rows],
            "map_w": [int(m.shape[1]) for _, m in rows],
        },
        columns=list(CAMS_COLUMNS),
    )
    frame.to_parquet(file, index=False)
    return file


def read_cams(file: Path) -> dict[str, np.ndarray]:
    """``{relpath: (h, w) float32 map}`` from a ``cams.parquet``."""
    frame = pd.read_parquet(file, columns=list(CAMS_COLUMNS))
    return {
        r.relpath: np.asarray(r.map, dtype=np.float32).reshape(int(r.map_h), int(r.map_w))
        for r in frame.itertuples(index=False)
    }
