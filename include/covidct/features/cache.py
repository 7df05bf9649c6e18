"""Incremental feature cache: features stored as Parquet, keyed by what can change them.

Layout::

    CACHE/<backbone>/<weights identity>/<pooling>/<precision>/<preprocessing>/*.parquet
        columns: sha256 (of the image file), features (array<float>),
                 and for avg pooling grid, grid_shape, inside (covidct.features.workers.Grid: the last conv
                 block the features average, and its cells' shares inside the body)

A run featurizes only the images whose sha256 is missing under its key and reuses
the rest. The grids are what each model's class activation maps are computed from (the evidence-inside-body
share, the report's gallery) without a second pass over the images; reading the features reads no grid
(Parquet reads only the columns asked for). Rows written before grids existed have none (null): their maps
take a forward pass. Other weights, pooling, precision or preprocessing live under another key, so stale
features are never reused (``preprocessing``: ``covidct.data.image.preprocessing_id``, the decoding's
version, the view of the picture and flips). New features are written by Spark into a hidden staging
folder and then renamed into place file by file; Spark's readers skip hidden files and
``.tmp`` names, so a crash mid-write leaves only complete files visible. Two runs
writing the same images at once just leave duplicates, which readers drop.

Each file has its checksum beside it (``<file>.sha256``, written before the file is published). A
file that no longer matches it (altered, truncated: a disk error, a copy cut short), or an older
file without one that does not read whole, is logged by name and set aside (renamed hidden,
``.corrupt-<name>``): its images count as missing and are featurized again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from covidct.core import paths
from covidct.core.atomic import write_text_atomic
from covidct.core.diskspace import reported
from covidct.data.image import PREPROCESSING_VERSION

log = logging.getLogger(__name__)

CACHE_ENV = "COVIDCT_CACHE_DIR"
CHECKSUM_SUFFIX = ".sha256"
SCHEMA = "sha256 string, features array<float>"
GRID_SCHEMA = "sha256 string, grid binary, grid_shape array<int>, inside array<float>"
GRID_COLUMNS = ("grid", "grid_shape", "inside")
STALE_STAGING_S = 24 * 3600


def default_cache_dir() -> Path:
    """$COVIDCT_CACHE_DIR, else $COVIDCT_HOME/feature-cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return paths.home() / "feature-cache"


@dataclass(frozen=True)
class CacheKey:
    backbone: str
    weights_id: str
    pooling: str
    precision: str = "float32"
    preprocessing: str = PREPROCESSING_VERSION

    def parts(self) -> tuple[str, ...]:
        return (self.backbone, self.weights_id, self.pooling, self.precision, self.preprocessing)


class FeatureCache:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        # Files found intact, by path, with the (inode, size, mtime) they had: a job asks ``files`` several
        # times (image table, features, grids), and a file that has not changed is not hashed again.
        self._checked: dict[Path, tuple[int, int, int]] = {}

    def folder(self, key: CacheKey) -> Path:
        return self.root.joinpath(*key.parts())

    def files(self, key: CacheKey) -> list[Path]:
        """The key's files that are intact (their checksum matches); the others are set aside (module doc)."""
        folder = self.folder(key)
        found = sorted(folder.glob("[!._]*.parquet")) if folder.is_dir() else []
        return [file for file in found if self._intact(file)]

    def _intact(self, file: Path) -> bool:
        try:
            stat = file.stat()
        except FileNotFoundError:
            return False  # set aside meanwhile by another run
        seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if self._checked.get(file) == seen:
            return True
        if not _intact(file):
            return False
        self._checked[file] = seen
        return True

    def read(self, spark: SparkSession, key: CacheKey) -> DataFrame | None:
        """Cached ``sha256, features`` under ``key`` (one row per sha256), or None if empty."""
        files = self.files(key)
        if not files:
            return None
        df = spark.read.schema(SCHEMA).option("ignoreCorruptFiles", "true").parquet(*[f.as_uri() for f in files])
        return df.dropDuplicates(["sha256"])

    def read_grids(self, spark: SparkSession, key: CacheKey) -> DataFrame | None:
        """Cached ``sha256, grid, grid_shape, inside`` under ``key`` of the images that have a grid, or None.

        Not deduplicated (that would shuffle every grid, hundreds of KB each): an image written twice (two runs
        at once) has two equal rows; join it with what you need, then keep one result per image."""
        files = self.files(key)
        if not files:
            return None
        df = spark.read.schema(GRID_SCHEMA).option("ignoreCorruptFiles", "true").parquet(*[f.as_uri() for f in files])
        return df.filter(F.col("grid_shape").isNotNull())

    def grid_shas(self, key: CacheKey) -> set[str]:
        """The sha256 of every image cached under ``key`` with its grid (pyarrow, no Spark job; see ``shas``)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        found: set[str] = set()
        for file in self.files(key):
            try:
                if "grid_shape" not in pq.read_schema(file).names:
                    continue  # written before grids
                table = pq.read_table(file, columns=["sha256", "grid_shape"])
                found.update(table.filter(pc.is_valid(table.column("grid_shape"))).column("sha256").to_pylist())
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                log.warning("feature cache: skipping unreadable %s (%s)", file, exc)
        return found

    def shas(self, key: CacheKey) -> set[str]:
        """The sha256 of every image cached under ``key``: the files' ``sha256`` column, read here, no Spark job.

        Like ``read`` (``ignoreCorruptFiles``), a file that cannot be read counts as absent.
        """
        import pyarrow.parquet as pq

        found: set[str] = set()
        for file in self.files(key):
            try:
                found.update(pq.read_table(file, columns=["sha256"]).column("sha256").to_pylist())
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                log.warning("feature cache: skipping unreadable %s (%s)", file, exc)
        return found

    def write(self, features: DataFrame, key: CacheKey) -> int:
        """Add ``sha256, features`` rows (and their grids, where ``features`` has them) under ``key``; returns
        the number of files published.

        On a full disk: a ``NoSpaceError`` naming the filesystem; the files published before stay whole.
        """
        folder = self.folder(key)
        with reported(folder, "feature cache"):
            folder.mkdir(parents=True, exist_ok=True)
            self._remove_stale_staging(folder)
            staging = folder / f".staging-{uuid.uuid4().hex}"
            try:
                columns = ["sha256", "features", *(c for c in GRID_COLUMNS if c in features.columns)]
                features.select(*columns).write.parquet(staging.as_uri())
                run = uuid.uuid4().hex[:12]
                published = 0
                for part in sorted(staging.glob("part-*.parquet")):
                    dest = folder / f"{run}-{part.name}"
                    # Before the file is visible:
                    write_text_atomic(_checksum_file(dest), _digest(part) + "\n", what="feature cache")
                    os.rename(part, dest)  # atomic: readers see whole files only
                    published += 1
                return published
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def clear(self, key: CacheKey | None = None) -> None:
        target = self.folder(key) if key else self.root
        if target.exists():
            shutil.rmtree(target)

    def _remove_stale_staging(self, folder: Path) -> None:
        """Staging folders left by crashed runs (older than a day) are removed."""
        now = time.time()
        for stale in folder.glob(".staging-*"):
            try:
                if now - stale.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(stale, ignore_errors=True)
            except FileNotFoundError:
                pass

    def summary(self) -> list[dict]:
        """One row per key: backbone, weights id, pooling, precision, preprocessing, files, bytes."""
        rows = []
        for folder in sorted(self.root.glob("*/*/*/*/*")):
            files = list(folder.glob("[!._]*.parquet"))
            if files:
                backbone, weights_id, pooling, precision, preprocessing = folder.relative_to(self.root).parts
                rows.append(
                    {
                        "backbone": backbone,
                        "weights_id": weights_id,
                        "pooling": pooling,
                        "precision": precision,
                        "preprocessing": preprocessing,
                        "files": len(files),
                        "bytes": sum(f.stat().st_size for f in files),
                    }
                )
        return rows


def _checksum_file(file: Path) -> Path:
    return file.with_name(file.name + CHECKSUM_SUFFIX)


def _digest(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _intact(file: Path) -> bool:
    """True when ``file`` matches its checksum; an older file without one is checked by reading it whole (and
    then given one). A file that fails is logged by name and set aside; False."""
    import pyarrow.parquet as pq

    checksum = _checksum_file(file)
    try:
        expected = checksum.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        expected = None
    try:
        if expected is None:
            pq.read_table(file)  # written before checksums: trusted if it reads whole
            write_text_atomic(checksum, _digest(file) + "\n")
            return True
        if _digest(file) == expected:
            return True
        why = "does not match its checksum (altered or truncated)"
    except FileNotFoundError:
        return False  # set aside meanwhile by another run
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        why = f"cannot be read ({exc})"
    aside = file.with_name(f".corrupt-{file.name}")
    log.warning("feature cache: %s %s: set aside as %s; its images are featurized again", file, why, aside.name)
    try:
        os.replace(file, aside)
        checksum.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    return False
