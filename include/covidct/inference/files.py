"""Reading a folder of new scans in Spark workers: every file read once, decoded, hashed, or listed with why not.

A folder of new scans often holds files that are not images the model can take: notes, a
truncated copy, an empty file, one this process may not read. ``read_images`` reads and checks
every file in the Spark workers (one pass: the bytes, a full decode, the sha256) and lists those
that cannot be scored with the reason (``Unreadable``). ``covidct predict`` and the scoring job
score the rest. DICOM CT files are read as their slices (``covidct.data.dicom``).
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from covidct.core.errors import ImageDecodeError
from covidct.core.secrets import uid_salt
from covidct.data import dicom
from covidct.data import image as imagelib
from covidct.data.dicom import Window

#: Larger files are not read (a CT slice is well under 10 MB; this is a guard, not a limit in practice).
MAX_FILE_BYTES = 256 * 1024 * 1024
#: Files per Spark task when reading and checking a folder (at least one task per core).
FILES_PER_TASK = 64
#: How many unreadable files an error message names before "and N more".
LISTED = 10


@dataclass(frozen=True)
class Unreadable:
    """A file that could not be scored, and why (``not a recognised image format``, ``Permission denied``...)."""

    path: str
    reason: str


@dataclass
class ImageFiles:
    """What ``read_images`` found: the readable images and slices (``path, image, sha256`` and
    ``DICOM_COLUMNS``, persisted), the files that are not, and the slices' DICOM columns (no pixels)."""

    frame: DataFrame
    unreadable: list[Unreadable]
    n_files: int
    n_readable: int  # rows to score: images, and a DICOM file's slices
    dicom: pd.DataFrame  # path + DICOM_COLUMNS of every readable slice (empty: no DICOM)

    def unpersist(self) -> None:
        self.frame.unpersist()


def listing(unreadable: list[Unreadable], limit: int = LISTED) -> str:
    """``path (reason), ...`` for an error message, the first ``limit`` of them."""
    shown = ", ".join(f"{u.path} ({u.reason})" for u in unreadable[:limit])
    return shown + (f", and {len(unreadable) - limit} more" if len(unreadable) > limit else "")


#: Why a file reached through a symbolic link that leads outside ``confine_to`` is not read.
OUTSIDE = "a symbolic link that leads outside the folders the operator allows for scoring: not read"


def _read_file(path: str, confine_to: tuple[Path, ...] | None = None) -> tuple[bytes | None, str | None]:
    """The bytes of a file Spark listed (``file:/...``), or None and why they cannot be had. ``confine_to``:
    the file's real path (every symbolic link followed) must lie inside one of these folders."""
    if not path.startswith("file:"):
        return None, "only local files (file:) can be read"
    local = path.removeprefix("file:")
    if confine_to is not None:
        real = Path(os.path.realpath(local))
        if not any(real.is_relative_to(root) for root in confine_to):
            return None, OUTSIDE
    try:
        info = os.stat(local)
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file"
        if info.st_size > MAX_FILE_BYTES:
            return None, f"{info.st_size} bytes, more than the {MAX_FILE_BYTES} bytes an image may have"
        with open(local, "rb") as f:
            return f.read(MAX_FILE_BYTES + 1), None
    except OSError as exc:
        return None, f"cannot read the file: {exc.strerror or exc}"


def _as_path(uri: str) -> str:
    """``file:///a/b%25c.png`` (the file index's URIs) as Spark's ``path`` columns write it: ``file:/a/b%c.png``."""
    parts = urlsplit(uri)
    return f"{parts.scheme}:{unquote(parts.path)}" if parts.scheme == "file" else unquote(uri)


#: What a DICOM slice's row carries besides ``path, image, sha256`` (``covidct.data.dicom.Slice``; None for images).
DICOM_COLUMNS = ("frame", "sop_uid_hash", "series_uid_hash", "study_uid_hash", "modality", "instance_number",
                 "slice_thickness", "kernel", "window")  # fmt: skip
#: The numeric ones' pandas types (nullable: an image's are null, never NaN; the others are text).
DICOM_DTYPES = {"frame": "Int32", "instance_number": "Int32", "slice_thickness": "Float64"}
_SCHEMA = (
    "path string, image binary, problem string, sha256 string, frame int, sop_uid_hash string, "
    "series_uid_hash string, study_uid_hash string, modality string, instance_number int, slice_thickness double, "
    "kernel string, window string"
)


def frame_path(path: str, frame: int | None) -> str:
    """A multi-frame DICOM file's frame as a row's ``path``: ``file:/a/ct.dcm[3]`` (frames count from 1)."""
    return path if frame is None else f"{path}[{frame}]"


def _check_files(salt: bytes, window: Window, confine_to: tuple[Path, ...] | None = None):
    """``mapInPandas``: each file read once, checked; a DICOM file becomes one row per slice (windowed PNG)."""

    def rows_of(path: str) -> list[dict]:
        data, why = _read_file(path, confine_to)
        if why is None and dicom.is_dicom(data):
            try:
                slices = dicom.read_slices(data, salt, window)
            except ImageDecodeError as exc:
                return [{"path": path, "problem": str(exc)}]
            return [
                {"path": frame_path(path, s.frame), "image": s.png(), "sha256": s.key, "frame": s.frame,
                 "sop_uid_hash": s.sop, "series_uid_hash": s.series, "study_uid_hash": s.study,
                 "modality": s.modality, "instance_number": s.instance_number,
                 "slice_thickness": s.slice_thickness, "kernel": s.kernel, "window": s.window}
                for s in slices
            ]  # fmt: skip
        if why is None:
            why = imagelib.problem(data)
        if why is not None:
            return [{"path": path, "problem": why}]
        return [{"path": path, "image": data, "sha256": hashlib.sha256(data).hexdigest()}]

    columns = [f.split()[0] for f in _SCHEMA.split(", ")]

    def check(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            rows = [row for path in batch["path"] for row in rows_of(path)]
            # object columns: Arrow reads each one's values (None: null); Spark's schema gives the types
            yield pd.DataFrame([[row.get(c) for c in columns] for row in rows], columns=columns, dtype=object)

    return check


def read_images(
    spark, images: Path, window: Window = dicom.LUNG, confine_to: tuple[Path, ...] | None = None
) -> ImageFiles:
    """Every file under ``images`` (recursive; hidden files skipped, as Spark does), read and checked in the workers.

    ``confine_to`` (the scoring DAG's job): a file whose real path lies outside these folders (reached
    through a symbolic link inside the scanned folder) is not read, and is listed with ``OUTSIDE``.

    DICOM files become one row per CT slice (``covidct.data.dicom``: Hounsfield units, ``window``, keyed
    hashes instead of UIDs, with the deployment's salt), carrying ``DICOM_COLUMNS``; their ``sha256`` is
    the slice's key (its SOP instance, frame and window), so a re-export of a slice is the same slice.

    The files are listed with Spark's file index (the ``binaryFile`` source, which reads nothing
    to list them), then read by the check itself: Spark's own scan would silently skip empty
    files and fail the job on a file it cannot open.
    """
    listed = (
        spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(Path(images).absolute().as_uri())
    )
    files = sorted(_as_path(uri) for uri in listed.inputFiles())
    slices = max(spark.sparkContext.defaultParallelism, math.ceil(len(files) / FILES_PER_TASK))
    paths = spark.sparkContext.parallelize([(f,) for f in files], slices).toDF("path string")
    checked = paths.mapInPandas(_check_files(uid_salt(), window, confine_to), _SCHEMA)
    checked = checked.persist(StorageLevel.MEMORY_AND_DISK)
    status = checked.drop("image").toPandas()  # small: no pixels
    problems = status[status["problem"].notna()]
    unreadable = sorted((Unreadable(p, r) for p, r in zip(problems["path"], problems["problem"], strict=True)),
                        key=lambda u: u.path)  # fmt: skip
    readable = status[status["problem"].isna()]
    slices = readable[readable["window"].notna()][["path", *DICOM_COLUMNS]].reset_index(drop=True)
    slices = slices.astype(DICOM_DTYPES)  # toPandas gives floats for nullable integers
    frame = checked.filter(F.col("problem").isNull()).drop("problem")
    return ImageFiles(frame=frame, unreadable=unreadable, n_files=len(files), n_readable=len(readable), dicom=slices)
