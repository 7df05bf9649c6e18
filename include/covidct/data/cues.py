"""The cues of a picture that say nothing about the lungs: what the file is, and its pixels in bulk.

The UCSD COVID-CT images are figure crops from papers, and each class was taken from other papers:
the file's format, colour mode, size and byte count, and the picture's overall brightness, its
margins and borders, tell the classes apart without any anatomy. ``load_cues`` gives one row per
image of a dataset folder that decodes::

    relpath, label, split         from the manifest (``covidct.data.manifest``)
    format, mode, width, height, bytes   the file cues, by content
    <view>:<statistic>            the grey levels of the picture as the backbone sees it, per view

"As the backbone sees it": bytes → ``image.open_image`` → ``image.to_rgb`` → the view
(``body.apply_view``: ``full``, ``body``, ``body-blank``) → ``SIDE`` × ``SIDE`` (``image.RESAMPLE``),
then grey = the mean of R, G and B. The statistics (``PIXEL_STATISTICS``): mean, standard deviation
and percentiles of the grey level; the share of near-black and near-white pixels; mean and standard
deviation of the four border strips (``STRIP`` pixels) and of the centre; the mean of the four
corners (``CORNER`` pixels square); and ``colour``, the mean absolute difference between the RGB
channels (0 for a grey picture).

It costs some 50 ms per image and view, so the table is cached under ``$COVIDCT_HOME/cues/``, keyed
by the dataset's digest (``manifest.dataset_digest``: the images by content, their labels and the split
lists) and by the versions of the cues, the views and the decoding; an unreadable cache file is rebuilt.
Beside the tables, every picture's statistics so far by its file's sha256 (``pictures_path``): a dataset
that gains images (the weekly retrain) decodes only those.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from covidct.core import paths
from covidct.core.atomic import atomic_file
from covidct.data.body import BODY_VERSION, VIEWS, apply_view
from covidct.data.image import PREPROCESSING_VERSION, RESAMPLE, open_image, to_rgb
from covidct.data.manifest import dataset_digest, image_files, load_manifest

log = logging.getLogger(__name__)

#: Bumped whenever a statistic or the table changes (part of the cache's key, with the views' and decoding's).
CUES_VERSION = "cues-v1"
CACHE_FOLDER = "cues"  # under $COVIDCT_HOME
SIDE = 224  # the backbones' input size
STRIP = 8  # border strips, pixels
CORNER = 16  # corner squares, pixels
CENTRE = SIDE // 2  # the central square, pixels
DARK, LIGHT = 16, 240  # grey levels below / above which a pixel is near-black / near-white
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
BORDERS = ("top", "bottom", "left", "right")
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
PIXEL_STATISTICS = (
    ("mean", "std", *(f"p{q:02d}" for q in PERCENTILES), "black", "white")
    + tuple(f"border_{b}_{s}" for b in BORDERS for s in ("mean", "std"))
    + ("centre_mean", "centre_std")
    + tuple(f"corner_{c}" for c in CORNERS)
    + ("colour",)
)
FILE_COLUMNS = ("format", "mode", "width", "height", "bytes")
#: The file cues' numbers (format and mode become one column per value: ``file_cues``).
FILE_NUMBERS = ("width", "height", "bytes")
KINDS = ("format", "mode")


def pixel_column(view: str, statistic: str) -> str:
    return f"{view}:{statistic}"


def pixel_columns(view: str) -> list[str]:
    """The table's columns of one view's statistics."""
    return [pixel_column(view, s) for s in PIXEL_STATISTICS]


COLUMNS = ("relpath", "label", "split", *FILE_COLUMNS, *(c for v in VIEWS for c in pixel_columns(v)))


def pixel_statistics(img: Image.Image) -> dict[str, float]:
    """``PIXEL_STATISTICS`` of an RGB picture, resized to ``SIDE`` × ``SIDE`` first if it is not."""
    if img.size != (SIDE, SIDE):
        img = img.resize((SIDE, SIDE), RESAMPLE)
    rgb = np.asarray(img, dtype=np.float32)
    grey = rgb.mean(axis=2)
    out = {"mean": float(grey.mean()), "std": float(grey.std())}
    out.update({f"p{q:02d}": float(v) for q, v in zip(PERCENTILES, np.percentile(grey, PERCENTILES), strict=True)})
    out["black"] = float((grey < DARK).mean())
    out["white"] = float((grey > LIGHT).mean())
    strips = {"top": grey[:STRIP], "bottom": grey[-STRIP:], "left": grey[:, :STRIP], "right": grey[:, -STRIP:]}
    for name, strip in strips.items():
        out[f"border_{name}_mean"], out[f"border_{name}_std"] = float(strip.mean()), float(strip.std())
    low, high = (SIDE - CENTRE) // 2, (SIDE + CENTRE) // 2
    centre = grey[low:high, low:high]
    out["centre_mean"], out["centre_std"] = float(centre.mean()), float(centre.std())
    corners = {
        "top_left": grey[:CORNER, :CORNER],
        "top_right": grey[:CORNER, -CORNER:],
        "bottom_left": grey[-CORNER:, :CORNER],
        "bottom_right": grey[-CORNER:, -CORNER:],
    }
    out.update({f"corner_{name}": float(patch.mean()) for name, patch in corners.items()})
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    out["colour"] = float((np.abs(red - green) + np.abs(green - blue) + np.abs(red - blue)).mean() / 3)
    return out


def picture_cues(data: bytes, name: str = "<bytes>", views: tuple[str, ...] = VIEWS) -> dict[str, float]:
    """``<view>:<statistic>`` of an image's bytes, for each of ``views``; ImageDecodeError if it does not decode."""
    img = to_rgb(open_image(data, name))
    out = {}
    for view in views:
        stats = pixel_statistics(apply_view(img, view))
        out.update({pixel_column(view, s): v for s, v in stats.items()})
    return out


def _image_cues(row: dict, path: Path) -> dict | None:
    try:
        return {**row, **picture_cues(path.read_bytes(), row["relpath"])}
    except Exception as exc:  # noqa: BLE001 - an image that does not decode or convert is left out, not fatal
        log.warning("no cues of %s: %s", row["relpath"], exc)
        return None


def build_cues(
    data_dir: str | Path,
    manifest: pd.DataFrame | None = None,
    workers: int | None = None,
    known: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The cue table of ``data_dir`` (in a few threads); images that do not decode are left out.

    ``known``: ``sha256`` and the pixel columns of pictures computed before (``picture_table``): their
    pictures are not decoded again.
    """
    manifest = load_manifest(data_dir) if manifest is None else manifest
    files = {rel: path for rel, path, _ in image_files(data_dir)}
    decoded = manifest[manifest["decode_error"].isna() & manifest["relpath"].isin(files.keys())]
    rows = decoded[["relpath", "label", "split", *FILE_COLUMNS, "sha256"]].to_dict("records")
    pixels = [c for v in VIEWS for c in pixel_columns(v)]
    seen = {} if known is None else {r["sha256"]: r for r in known[["sha256", *pixels]].to_dict("records")}
    todo = [row for row in rows if row["sha256"] not in seen]
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = {row["relpath"]: row for row in pool.map(lambda row: _image_cues(row, files[row["relpath"]]), todo)
                 if row is not None}  # fmt: skip
    done = [found.get(row["relpath"]) or ({**seen[row["sha256"]], **row} if row["sha256"] in seen else None)
            for row in rows]  # fmt: skip
    table = pd.DataFrame([r for r in done if r is not None], columns=[*COLUMNS, "sha256"])
    table = table.sort_values("relpath", kind="stable").reset_index(drop=True)
    for column in FILE_NUMBERS:
        table[column] = table[column].astype("float64")
    table["label"] = table["label"].astype("int64")
    log.info("cues of %s: %d images (%d decoded now, the others' from earlier tables), %d that do not decode left "
             "out", data_dir, len(table), len(todo), len(manifest) - len(table))  # fmt: skip
    if known is None:
        return table[list(COLUMNS)]
    return table


def cache_path(digest: str) -> Path:
    """Where the cue table of the dataset with ``digest`` is cached (this version of the cues, views and decoding)."""
    key = hashlib.sha256(f"{digest}\n{CUES_VERSION}\n{BODY_VERSION}\n{PREPROCESSING_VERSION}".encode()).hexdigest()
    return paths.home() / CACHE_FOLDER / f"{key[:40]}.parquet"


def _read_cached(path: Path, columns: tuple[str, ...] = COLUMNS) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable cache file is rebuilt
        log.warning("the cached cues %s cannot be read (%s): rebuilding them", path, exc)
        return None
    if list(table.columns) != list(columns):
        log.warning("the cached cues %s are not this covidct's table: rebuilding them", path)
        return None
    return table


def pictures_path() -> Path:
    """Every picture's statistics computed so far, by the sha256 of its file (this version of the cues, views and
    decoding): a dataset that gains images decodes only those."""
    return cache_path("pictures")


def load_cues(data_dir: str | Path, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """The cue table of ``data_dir``: from the cache where the same dataset's table is there, else built (decoding
    only the pictures no earlier table had: ``pictures_path``) and cached.

    ``manifest``: the dataset's (``load_manifest(data_dir)`` where not given).
    """
    manifest = load_manifest(data_dir) if manifest is None else manifest
    path = cache_path(dataset_digest(data_dir, manifest))
    table = _read_cached(path)
    if table is not None:
        log.info("cues of %s from %s", data_dir, path)
        return table
    pictures, columns = pictures_path(), ["sha256", *(c for v in VIEWS for c in pixel_columns(v))]
    known = _read_cached(pictures, tuple(columns))
    known = pd.DataFrame(columns=columns) if known is None else known
    found = build_cues(data_dir, manifest, known=known)
    table = found[list(COLUMNS)]
    parts = [frame for frame in (known, found[columns]) if len(frame)]
    merged = pd.concat(parts, ignore_index=True).drop_duplicates("sha256") if parts else found[columns]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for target, frame in ((path, table), (pictures, merged.reset_index(drop=True))):
            with atomic_file(target) as tmp:
                frame.to_parquet(tmp, index=False)
    except OSError as exc:  # a read-only home: the table is still good
        log.warning("cannot cache the cues in %s: %s", path, exc)
    return table


def file_cues(table: pd.DataFrame) -> pd.DataFrame:
    """The file cues as numbers: width, height, bytes, and one 0/1 column per format and per colour mode found."""
    numbers = table[list(FILE_NUMBERS)].astype("float64")
    kinds = [pd.get_dummies(table[c].fillna("?"), prefix=c, prefix_sep=":", dtype="float64") for c in KINDS]
    return pd.concat([numbers, *kinds], axis=1)


def pixel_cues(table: pd.DataFrame, view: str) -> pd.DataFrame:
    """One view's pixel statistics (``PIXEL_STATISTICS``)."""
    return table[pixel_columns(view)].astype("float64")
