"""Reading a folder of new scans in Spark workers: every file read once, decoded, hashed, or listed with why not.

A folder of new scans often holds files that are not images the model can take: notes, a
truncated copy, an empty file, one this process may not read. ``read_images`` reads and checks
every file in the Spark workers (one pass: the bytes, a full decode, the sha256) and lists those
that cannot be scored with the reason (``Unreadable``). ``covidct predict`` and the scoring job
score the rest.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import BinaryType, StringType, StructField, StructType

from covidct.data import image as imagelib

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
    """What ``read_images`` found: the readable images (``path, image, sha256``, persisted) and the rest."""

    frame: DataFrame
    unreadable: list[Unreadable]
    n_files: int

    @property
    def n_readable(self) -> int:
        return self.n_files - len(self.unreadable)

    def unpersist(self) -> None:
        self.frame.unpersist()


def listing(unreadable: list[Unreadable], limit: int = LISTED) -> str:
    """``path (reason), ...`` for an error message, the first ``limit`` of them."""
    shown = ", ".join(f"{u.path} ({u.reason})" for u in unreadable[:limit])
    return shown + (f", and {len(unreadable) - limit} more" if len(unreadable) > limit else "")


def _read_file(path: str) -> tuple[bytes | None, str | None]:
    """The bytes of a file Spark listed (``file:/...``), or None and why they cannot be had."""
    if not path.startswith("file:"):
        return None, "only local files (file:) can be read"
    local = path.removeprefix("file:")
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


def _check_udf():
    schema = StructType([StructField("content", BinaryType()), StructField("problem", StringType())])

    @F.pandas_udf(schema)
    def read_and_check(paths: pd.Series) -> pd.DataFrame:
        contents, problems = [], []
        for path in paths:
            data, why = _read_file(path)
            if why is None:
                why = imagelib.problem(data)
            contents.append(data if why is None else None)
            problems.append(why)
        return pd.DataFrame({"content": contents, "problem": problems})

    return read_and_check


def read_images(spark, images: Path) -> ImageFiles:
    """Every file under ``images`` (recursive; hidden files skipped, as Spark does), read and checked in the workers.

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
    checked = (
        paths.select("path", _check_udf()("path").alias("file"))
        .select("path", F.col("file.content").alias("image"), F.col("file.problem").alias("problem"))
        .withColumn("sha256", F.sha2("image", 256))
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    status = checked.select("path", "problem").collect()
    unreadable = sorted((Unreadable(r.path, r.problem) for r in status if r.problem is not None), key=lambda u: u.path)
    frame = checked.filter(F.col("problem").isNull()).select("path", "image", "sha256")
    return ImageFiles(frame=frame, unreadable=unreadable, n_files=len(status))
