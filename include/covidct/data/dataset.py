"""Reading a dataset folder laid out like upstream UCSD COVID-CT into a Spark DataFrame.

Layout::

    DIR/CT_COVID/*          label 1
    DIR/CT_NonCOVID/*       label 0
    DIR/Data-split/COVID/{train,val,test}CT_COVID.txt          official patient-level lists
    DIR/Data-split/NonCOVID/{train,val,test}CT_NonCOVID.txt

Images are read with Spark's ``binaryFile`` source, so they are decoded by the
featurizer in the workers, by content.
"""

from __future__ import annotations

import re
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from covidct.core.errors import CovidctError

#: class folder -> (split-list folder/suffix, label)
CLASSES: dict[str, tuple[str, int]] = {"CT_COVID": ("COVID", 1), "CT_NonCOVID": ("NonCOVID", 0)}
LABEL_NAMES = {1: "COVID", 0: "non-COVID"}
#: A case's slices or sub-figures: ``<case>%<n>.<ext>``.
_SLICE_SUFFIX = re.compile(r"%\d+$")


def check_layout(data_dir: str | Path) -> Path:
    """The dataset folder as a Path, or a CovidctError saying what is missing."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise CovidctError(f"dataset folder {root} does not exist")
    missing = [name for name in CLASSES if not (root / name).is_dir()]
    if missing:
        raise CovidctError(
            f"{root} is not laid out like UCSD COVID-CT: missing {', '.join(m + '/' for m in missing)} "
            "(run `covidct fetch --dest DIR` first)"
        )
    return root


#: Characters that Hadoop's path globbing would interpret in a file name.
_GLOB = re.compile(r"[][*?{}\\]")


def image_path(root: Path, relpath: str) -> str:
    """The ``path`` Spark's ``binaryFile`` source gives a local file: ``file:/abs/CT_COVID/x.png``."""
    return "file:" + str(Path(root).resolve() / relpath)


def load_images(spark: SparkSession, data_dir: str | Path, relpaths: list[str] | None = None) -> DataFrame:
    """``path, relpath, label, image, sha256`` for every file in the class folders (or only ``relpaths``).

    ``relpath`` is ``CT_COVID/<file name>`` (what the split lists and the manifest name);
    ``image`` is the file's bytes; hidden files are skipped by Spark. With ``relpaths``, only
    those files are listed and read (e.g. the images missing from the feature cache).
    """
    root = check_layout(data_dir).resolve()
    frames = []
    for folder, (_, label) in CLASSES.items():
        if relpaths is None:
            df = spark.read.format("binaryFile").load(str(root / folder))
        else:
            names = [r.split("/", 1)[1] for r in relpaths if r.split("/", 1)[0] == folder]
            if not names:
                continue
            if any(_GLOB.search(name) for name in names):  # Hadoop would glob them: read the folder, keep those
                wanted = [image_path(root, f"{folder}/{name}") for name in names]
                df = spark.read.format("binaryFile").load(str(root / folder)).filter(F.col("path").isin(wanted))
            else:
                df = spark.read.format("binaryFile").load([str(root / folder / name) for name in names])
        frames.append(
            df.select(
                F.col("path"),
                F.concat(F.lit(folder + "/"), F.element_at(F.split("path", "/"), -1)).alias("relpath"),
                F.lit(label).cast("int").alias("label"),
                F.col("content").alias("image"),
                F.sha2("content", 256).alias("sha256"),
            )
        )
    if not frames:
        raise CovidctError(f"none of the {len(relpaths or [])} images asked for is in {root}")
    return frames[0] if len(frames) == 1 else frames[0].unionByName(frames[1])


def split_list_file(short: str, part: str) -> str:
    """Where an official list lives, relative to the dataset: ``Data-split/COVID/trainCT_COVID.txt``."""
    return f"Data-split/{short}/{part}CT_{short}.txt"


def split_lists(data_dir: str | Path) -> dict[str, list[str]]:
    """The official lists: ``{"train": [...], "val": [...], "test": [...]}`` of relpaths."""
    root = Path(data_dir)
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for folder, (short, _) in CLASSES.items():
        for part in lists:
            path = root / split_list_file(short, part)
            if not path.is_file():
                raise CovidctError(f"official split list {path} is missing")
            names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
            lists[part].extend(f"{folder}/{name}" for name in names if name)
    return lists


def group_key(relpath: str) -> str:
    """The case an image belongs to, guessed from its name (patient-aware resampling).

    Upstream names the slices or sub-figures of one case ``<case>%<n>.<ext>``
    (``CT_COVID/2020.02.10.20021584-p6-52%3.png``, ``CT_NonCOVID/12%1.jpg``): strip the
    extension and a trailing ``%<n>``; the class folder stays part of the key.
    """
    path = str(relpath).replace("\\", "/")
    folder, _, name = path.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    stem = _SLICE_SUFFIX.sub("", stem)
    return f"{folder}/{stem}" if folder else stem
