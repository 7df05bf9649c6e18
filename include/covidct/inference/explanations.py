"""Writing explanations: each image's PNG and raw ``.npy`` maps into a folder, drawn in Spark workers.

The maps (``covidct.inference.maps``) and the drawing run in Spark's Python workers like the
featurizer: the Keras model is the featurizer's worker-side one (``covidct.features.workers``: built
once per worker, reused, TensorFlow threads = the task's cores), images go through it in batches,
and the PNGs are drawn and written by the executors (on a cluster, ``OUT_DIR`` must be on a
filesystem the executors share with the driver, as the run folders are). The driver collects only
the small maps.

``explain_rows`` is ``covidct predict --explain``: predict's rows gain ``explanation_png``,
``explanation_npy`` and ``explain_method``. The folder is written atomically and holds
``explanations.json``; an existing non-empty folder without it is never replaced.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from covidct.core.atomic import atomic_dir
from covidct.core.errors import CovidctError
from covidct.core.spark_errors import spark_errors
from covidct.data.dataset import LABEL_NAMES
from covidct.inference.drawing import Panel, render
from covidct.inference.maps import Explained
from covidct.modelling.evaluate import THRESHOLD

#: Written into OUT_DIR; an existing non-empty OUT_DIR without it is never replaced.
MANIFEST = "explanations.json"


@dataclass(frozen=True)
class Item:
    """One image to draw: where its files go (``name``, relative to OUT_DIR) and what they show."""

    path: str  # the image's Spark path (URI), as in the ``path`` column
    name: str  # output stem relative to OUT_DIR: <name>.png, <name>.npy (or <name>.<backbone>.npy)
    headline: str
    covid: bool  # the predicted class, whose evidence is drawn
    panels: tuple[Panel, ...]


def local_path(uri: str) -> Path:
    """A ``file:`` URI of Spark's ``path`` column as a local path."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path) if parsed.scheme in ("file", "") else uri)


def output_name(uri: str, root: Path) -> str:
    """``CT_COVID/x%1.png`` -> ``CT_COVID/x%1.png.map``: the image's place under ``root``, never outside."""
    path = local_path(uri)
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(path.name)
    return str(rel) + ".map"


def check_out_dir(out: Path) -> None:
    """Refuse an OUT_DIR that exists and is not a previous explanations folder (it would be replaced)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise CovidctError(f"{out} exists and is not a covidct explanations folder; refusing to replace it")


def write_explanations(
    df: DataFrame, items: list[Item], out: Path, *, max_side: int | None = None, about: dict | None = None
) -> dict[str, tuple[Path, list[Path]]]:
    """Draw and write every item's PNG and ``.npy`` into ``out`` (atomically), in the Spark workers.

    ``df`` holds the images (``path``, ``image`` bytes). Returns ``{path: (png, [npy, ...])}``.
    """
    out = Path(out).expanduser().absolute()
    check_out_dir(out)
    spark = df.sparkSession
    specs = [(i.path, i.name, json.dumps(_spec(i))) for i in items]
    with atomic_dir(out, what="explain") as staging:
        todo = spark.createDataFrame(specs, "path string, name string, spec string")
        joined = todo.join(df.select("path", "image"), "path")
        udf = _render_udf(str(staging), str(out), max_side)
        with spark_errors():
            rows = joined.select("path", udf("image", "path", "name", "spec").alias("f")).collect()
        _write_manifest(staging, len(rows), about)
    return {r.path: (Path(r.f.png), [Path(p) for p in r.f.npy]) for r in rows}


def write_explanations_here(
    items: list[Item], out: Path, *, max_side: int | None = None, about: dict | None = None
) -> dict[str, tuple[Path, list[Path]]]:
    """``write_explanations`` for a few local images whose maps are known, drawn in this process (no Spark)."""
    out = Path(out).expanduser().absolute()
    check_out_dir(out)
    written = {}
    with atomic_dir(out, what="explain") as staging:
        for item in items:
            spec = json.loads(json.dumps(_spec(item)))
            png, npys = _draw_one(local_path(item.path).read_bytes(), item.path, item.name, spec, staging, max_side)
            written[item.path] = (out / png, [out / n for n in npys])
        _write_manifest(staging, len(items), about)
    return written


def _write_manifest(staging: Path, images: int, about: dict | None) -> None:
    manifest = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"), "images": images, **(about or {})}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _spec(item: Item) -> dict:
    return {
        "headline": item.headline,
        "covid": bool(item.covid),
        "panels": [
            {
                "backbone": p.backbone,
                "method": p.method,
                "probability": p.probability,
                "map": np.asarray(p.map, dtype=np.float32).tolist(),
                "view": p.view,
            }
            for p in item.panels
        ],
    }


def _render_udf(staging: str, final: str, max_side: int | None):
    @F.pandas_udf("png string, npy array<string>")
    def draw(batches: Iterator[tuple[pd.Series, pd.Series, pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        for images, paths, names, specs in batches:
            pngs, npys = [], []
            for image, path, name, spec in zip(images, paths, names, specs, strict=True):
                png, npy = _draw_one(image, path, name, json.loads(spec), Path(staging), max_side)
                pngs.append(os.path.join(final, png))
                npys.append([os.path.join(final, n) for n in npy])
            yield pd.DataFrame({"png": pngs, "npy": npys})

    return draw


def _draw_one(image: bytes, path: str, name: str, spec: dict, staging: Path, max_side: int | None):
    panels = [
        Panel(p["backbone"], p["method"], float(p["probability"]), np.asarray(p["map"], dtype=np.float32), p["view"])
        for p in spec["panels"]
    ]
    png = render(image, path, spec["headline"], panels, bool(spec["covid"]), max_side)
    target = staging / (name + ".png")
    target.parent.mkdir(parents=True, exist_ok=True)
    _write(target, png)
    npys = []
    for p in panels:
        npy = name + (".npy" if len(panels) == 1 else f".{p.backbone}.npy")
        buf = io.BytesIO()
        np.save(buf, p.map)
        _write(staging / npy, buf.getvalue())
        npys.append(npy)
    return name + ".png", npys


def _write(path: Path, data: bytes) -> None:
    """Whole files only (a retried task rewrites the same content)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def headline(label: str, probability: float, image: str) -> str:
    return f"{label}: P(COVID) = {probability:.3f} → {LABEL_NAMES[int(probability > THRESHOLD)]}\n{image}"


def explain_rows(
    rows: list[dict],
    maps: dict[str, dict[str, Explained]],
    df: DataFrame,
    images: Path,
    out: Path,
    model: str,
    max_side: int | None = None,
) -> list[dict]:
    """Add ``explanation_png``, ``explanation_npy`` and ``explain_method`` to predict's rows, writing the files.

    ``maps``: ``{backbone: {path: Explained}}`` (one backbone, or an ensemble's members in order).
    """
    root = images if images.is_dir() else images.parent
    backbones = list(maps)
    items = []
    for r in rows:
        panels = tuple(
            Panel(b, e.method, e.probability, e.map, e.view) for b in backbones for e in (maps[b][r["path"]],)
        )
        title = backbones[0] if len(backbones) == 1 else f"Ensemble ({r.get('method', 'mean')})"
        items.append(
            Item(
                r["path"],
                output_name(r["path"], root),
                headline(title, r["probability"], local_path(r["path"]).name),
                bool(r["prediction"]),
                panels,
            )
        )
    firsts = {b: next(iter(maps[b].values()), None) for b in backbones}
    about = {
        "model": str(model),
        "source": str(images),
        "maps": {b: {"method": e.method, "layer": e.layer} for b, e in firsts.items() if e is not None},
    }
    written = write_explanations(df, items, out, max_side=max_side, about=about)
    for r in rows:
        png, npys = written[r["path"]]
        methods = {maps[b][r["path"]].method for b in backbones}
        r["explanation_png"] = str(png)
        r["explanation_npy"] = ";".join(str(n) for n in npys)
        r["explain_method"] = (
            methods.pop() if len(methods) == 1 else "; ".join(f"{b}: {maps[b][r['path']].method}" for b in backbones)
        )
    return rows
