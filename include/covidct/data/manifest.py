"""The manifest of a dataset folder: one row per image file, what it is by content.

Columns::

    relpath       CT_COVID/<file name> or CT_NonCOVID/<file name>
    label         1 COVID, 0 non-COVID (from the class folder)
    sha256, bytes of the file
    width, height, format, mode   after a full decode, by content (null if it fails)
    dhash         its perceptual hash (``covidct.data.duplicates``), or null if it does not decode
    split         the official list naming it: train, val or test; null if none;
                  several joined with "+" (e.g. "train+test") if more than one does
    decode_error  why the file does not decode fully, or null

``fetch`` writes it as ``DIR/manifest.parquet`` before publishing ``DIR``; ``validate``
reads it, or builds it when it is absent or no longer matches the files.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from covidct.core.atomic import atomic_file
from covidct.core.errors import CovidctError, ImageDecodeError
from covidct.data.dataset import CLASSES, check_layout, split_list_file, split_lists
from covidct.data.duplicates import perceptual_hash
from covidct.data.image import open_image, to_rgb

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.parquet"
COLUMNS = ("relpath", "label", "sha256", "bytes", "width", "height", "format", "mode", "dhash", "split", "decode_error")
SPLITS = ("train", "val", "test")
_DTYPES = {
    "relpath": "object",
    "label": "int64",
    "sha256": "object",
    "bytes": "int64",
    "width": "Int64",
    "height": "Int64",
    "format": "object",
    "mode": "object",
    "dhash": "object",
    "split": "object",
    "decode_error": "object",
}


def image_files(data_dir: str | Path) -> list[tuple[str, Path, int]]:
    """``(relpath, path, label)`` of every file in the class folders; hidden files skipped."""
    root = check_layout(data_dir)
    found = []
    for folder, (_, label) in CLASSES.items():
        for path in sorted((root / folder).iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            found.append((f"{folder}/{path.name}", path, label))
    return found


def list_file(relpath: str, split: str) -> str:
    """The official list that would name ``relpath`` in ``split``: ``Data-split/COVID/trainCT_COVID.txt``."""
    return split_list_file(CLASSES[relpath.split("/", 1)[0]][0], split)


def split_entries(data_dir: str | Path) -> pd.DataFrame:
    """One row per line of the official lists: ``relpath, split, list, present``."""
    root = Path(data_dir)
    rows = [
        {"relpath": rel, "split": split, "list": list_file(rel, split), "present": (root / rel).is_file()}
        for split, relpaths in split_lists(root).items()
        for rel in relpaths
    ]
    return pd.DataFrame(rows, columns=["relpath", "split", "list", "present"]).astype({"present": bool})


def _describe_file(item: tuple[str, Path, int], splits: dict[str, list[str]]) -> dict:
    relpath, path, label = item
    data = path.read_bytes()
    row = {
        "relpath": relpath,
        "label": label,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "width": None,
        "height": None,
        "format": None,
        "mode": None,
        "dhash": None,
        "split": "+".join(splits.get(relpath, [])) or None,
        "decode_error": None,
    }
    try:
        img = open_image(data, relpath)
    except ImageDecodeError as exc:
        row["decode_error"] = str(exc).removeprefix(f"cannot decode image {relpath}: ")
        return row
    row.update(format=img.format, mode=img.mode, width=img.width, height=img.height)
    try:
        row["dhash"] = perceptual_hash(to_rgb(img))
    except (OSError, ValueError) as exc:  # a mode PIL decodes but cannot convert: validate's decoder check says so
        log.warning("no perceptual hash of %s: %s", relpath, exc)
    return row


def build_manifest(data_dir: str | Path, workers: int | None = None) -> pd.DataFrame:
    """Hash and fully decode every image of ``data_dir`` (in a few threads) into a manifest."""
    items = image_files(data_dir)
    splits: dict[str, list[str]] = {}
    for split, relpaths in split_lists(data_dir).items():
        for rel in relpaths:
            splits.setdefault(rel, []).append(split)
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(lambda item: _describe_file(item, splits), items))
    manifest = pd.DataFrame(rows, columns=list(COLUMNS)).astype(_DTYPES)
    bad = int(manifest["decode_error"].notna().sum())
    log.info("manifest of %s: %d images, %d that do not decode", data_dir, len(manifest), bad)
    return manifest


def write_manifest(manifest: pd.DataFrame, path: str | Path) -> Path:
    """Write the manifest as Parquet, atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        manifest.to_parquet(tmp, index=False)
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest written by ``write_manifest``; a CovidctError if it is not one."""
    path = Path(path)
    try:
        manifest = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise CovidctError(f"cannot read the manifest {path}: {exc}") from None
    missing = [c for c in COLUMNS if c not in manifest.columns]
    if missing == ["dhash"]:
        raise CovidctError(f"{path} was written by an older covidct, without perceptual hashes")
    if missing:
        raise CovidctError(f"{path} is not a covidct manifest: no column {', '.join(missing)}")
    return manifest[list(COLUMNS)].astype(_DTYPES)


def stale_entries(manifest: pd.DataFrame, data_dir: str | Path) -> list[str]:
    """How the folder differs from its manifest by names and sizes (cheap: no reading)."""
    on_disk = {rel: path.stat().st_size for rel, path, _ in image_files(data_dir)}
    listed = dict(zip(manifest["relpath"], manifest["bytes"], strict=True))
    problems = [f"{rel} is missing" for rel in sorted(listed.keys() - on_disk.keys())]
    problems += [f"{rel} is not in the manifest" for rel in sorted(on_disk.keys() - listed.keys())]
    problems += [
        f"{rel} changed size ({listed[rel]} -> {on_disk[rel]} bytes)"
        for rel in sorted(listed.keys() & on_disk.keys())
        if int(listed[rel]) != on_disk[rel]
    ]
    return problems


def dataset_digest(data_dir: str | Path, manifest: pd.DataFrame) -> str:
    """sha256 of what the dataset is: every image's ``relpath, label, sha256`` and every official list's bytes.

    Equal digests mean the same images (by content) with the same labels and the same split lists.
    """
    digest = hashlib.sha256()
    for relpath, label, sha in sorted(zip(manifest["relpath"], manifest["label"], manifest["sha256"], strict=True)):
        digest.update(f"{relpath}\t{int(label)}\t{sha}\n".encode())
    for short, _ in CLASSES.values():
        for split in SPLITS:
            name = split_list_file(short, split)
            path = Path(data_dir) / name
            content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
            digest.update(f"{name}\t{content}\n".encode())
    return digest.hexdigest()


def fresh_manifest(data_dir: str | Path) -> pd.DataFrame | None:
    """``DIR/manifest.parquet`` if it exists and still matches the files (names and sizes), else None."""
    path = check_layout(data_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = read_manifest(path)
    except CovidctError as exc:
        log.warning("%s", exc)
        return None
    problems = stale_entries(manifest, data_dir)
    if problems:
        log.warning("%s no longer matches the files (%s)", path, "; ".join(problems[:3]))
        return None
    return manifest


def load_manifest(data_dir: str | Path) -> pd.DataFrame:
    """``DIR/manifest.parquet`` if it still matches the files, else a freshly built manifest."""
    root = check_layout(data_dir)
    manifest = fresh_manifest(root)
    if manifest is not None:
        return manifest
    if (root / MANIFEST_NAME).is_file():
        log.warning("rebuilding the manifest of %s", root)
    return build_manifest(root)
