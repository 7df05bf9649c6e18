"""The report gallery's cache: the maps of the same models on the same images are the same.

A gallery is kept in
``$COVIDCT_HOME/gallery-cache/<key>/`` (the newest ``CACHE_KEEP``), keyed by what it shows and what
computes it (the split, the picked images' bytes, paths, labels and probabilities, each model's stages
and their values (``model_digest``), the sizes, and the package's code and library versions). A report
of a run retrained on unchanged data (``force``) reuses it instead of a Spark session and a forward
pass per image and backbone (a minute on two cores).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from covidct.core import paths
from covidct.core.versions import code_version
from covidct.inference.explanations import local_path

log = logging.getLogger(__name__)

CACHE_FOLDER = "gallery-cache"
CACHE_KEEP = 20  # galleries kept in the cache (the newest); each up to a few MB (its PNGs and .npy)


def cache_dir() -> Path:
    return paths.home() / CACHE_FOLDER


def model_digest(model_dir: Path) -> str:
    """What a saved ``PipelineModel`` computes: each stage's class and params, and the values of its data.

    Not the files' bytes: two fits of the same model on the same data differ in their uids,
    timestamps and part-file names, not in this.
    """
    import pyarrow.parquet as pq

    digest = hashlib.sha256()

    def metadata(folder: Path) -> None:
        for part in sorted(folder.glob("part-*")):
            for line in part.read_text().splitlines():
                meta = json.loads(line)
                for volatile in ("uid", "timestamp", "sparkVersion"):
                    meta.pop(volatile, None)
                meta.get("paramMap", {}).pop("stageUids", None)
                digest.update(json.dumps(meta, sort_keys=True).encode())

    model_dir = Path(model_dir)
    metadata(model_dir / "metadata")
    for stage in sorted((model_dir / "stages").iterdir(), key=lambda p: int(p.name.split("_", 1)[0])):
        metadata(stage / "metadata")
        for part in sorted((stage / "data").glob("part-*.parquet")):
            digest.update(json.dumps(pq.read_table(part).to_pylist(), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def gallery_key(split: str, folders: dict[str, Path], items: list[tuple], max_side: int) -> str:
    """A gallery's cache key: what it shows (``items``: path, name, title, predicted COVID), what computes it."""
    images = {path: hashlib.sha256(local_path(path).read_bytes()).hexdigest() for path, *_ in items}
    spec = {
        "split": split,
        "models": {backbone: model_digest(f) for backbone, f in folders.items()},
        "items": [[*item, images[item[0]]] for item in items],
        "max_side": max_side,
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def from_cache(key: str, out: Path) -> tuple[dict, dict] | None:
    """The cached gallery ``key`` copied to ``out``: ``(methods, {path: (png, [npy])})``; None when absent."""
    cached = cache_dir() / key
    if out.exists():
        return None
    try:
        index = json.loads((cached / "gallery.json").read_text())
        shutil.copytree(cached, out, ignore=shutil.ignore_patterns("gallery.json"))
    except (OSError, ValueError):
        shutil.rmtree(out, ignore_errors=True)
        return None
    os.utime(cached)  # recently used: kept when older ones are pruned
    written = {path: (out / f["png"], [out / n for n in f["npy"]]) for path, f in index["written"].items()}
    return index["methods"], written


def to_cache(key: str, out: Path, methods: dict, written: dict) -> None:
    """Keep the gallery written in ``out`` under ``key`` (whole or not at all); never fails the report."""
    root = cache_dir()
    if (root / key).exists():
        return
    staging = root / f".staging-{uuid.uuid4().hex}"
    try:
        shutil.copytree(out, staging)
        index = {
            "methods": methods,
            "written": {p: {"png": png.name, "npy": [n.name for n in npys]} for p, (png, npys) in written.items()},
        }
        (staging / "gallery.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.rename(staging, root / key)  # fails if another report stored the same gallery meanwhile: fine
        kept = sorted((d for d in root.iterdir() if not d.name.startswith(".")), key=lambda d: d.stat().st_mtime)
        for old in kept[:-CACHE_KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        log.warning("gallery not cached (%s): %s", root / key, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
