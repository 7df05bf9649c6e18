"""Train/test splits: ``random70`` (the study's protocol) and ``official`` (patient-level lists).

Both are computed on the driver from the sorted relative paths, so the same seed gives
the same split whatever the Spark partitioning, local or on a cluster.
"""

from __future__ import annotations

import logging
import re

import numpy as np
from pyspark.sql import DataFrame

from covidct.core.errors import CovidctError
from covidct.data.dataset import group_key, split_lists

log = logging.getLogger(__name__)

SPLITS = ("random70", "official")
TEST_FRACTION = 0.3
#: ``--seeds`` / the DAG's ``seeds``: seeds and inclusive ranges, comma-separated ("0-9", "1,5,20-24").
SEEDS_PATTERN = r"^[0-9]{1,10}(-[0-9]{1,10})?(,[0-9]{1,10}(-[0-9]{1,10})?)*$"
MAX_SEEDS = 100
MAX_SEED = 2**31 - 1
#: Folds of the out-of-fold training predictions the stacked ensemble is fitted on (``kfold``).
STACK_FOLDS = 5


def parse_splits(value: str | list[str]) -> list[str]:
    """'official,random70' / 'both' / ['official'] -> validated list, in a stable order."""
    items = value if isinstance(value, list) else str(value).split(",")
    names = [s.strip().lower() for s in items if s.strip()]
    if names == ["both"]:
        names = list(SPLITS)
    unknown = [s for s in names if s not in SPLITS]
    if unknown or not names:
        raise CovidctError(f"unknown split {', '.join(unknown) or value!r}; choose from {', '.join(SPLITS)}")
    return [s for s in SPLITS if s in names]


def parse_seeds(value: str | int | list[int]) -> list[int]:
    """'0-9' / '1,5,20-24' / 7 / [1, 2] -> the seeds, in the given order; anything else is a CovidctError.

    Strict: no negative or duplicate seeds, no empty or reversed ranges, at most MAX_SEEDS seeds.
    """
    if isinstance(value, bool):
        raise CovidctError(f"seeds must be numbers or ranges like 0-9, not {value!r}")
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, list | tuple):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise CovidctError(f"seeds must be whole numbers, got {list(value)!r}")
        items = list(value)
    else:
        text = re.sub(r"\s+", "", str(value))
        if not re.fullmatch(SEEDS_PATTERN, text):
            raise CovidctError(f"invalid seeds {str(value)!r}: give seeds and ranges like 0-9 or 1,5,20-24")
        items = []
        for part in text.split(","):
            low, _, high = part.partition("-")
            low, high = int(low), int(high or low)
            if high < low:
                raise CovidctError(f"invalid seed range {part!r}: the first seed must not exceed the last")
            if high - low >= MAX_SEEDS:
                raise CovidctError(f"seed range {part!r} has more than {MAX_SEEDS} seeds")
            items.extend(range(low, high + 1))
    if not items:
        raise CovidctError("no seeds given")
    bad = [s for s in items if not 0 <= s <= MAX_SEED]
    if bad:
        raise CovidctError(f"seeds must be within 0..{MAX_SEED}, got {bad[0]}")
    duplicates = sorted({s for s in items if items.count(s) > 1})
    if duplicates:
        raise CovidctError(f"seed {duplicates[0]} is given twice")
    if len(items) > MAX_SEEDS:
        raise CovidctError(f"{len(items)} seeds given; at most {MAX_SEEDS}")
    return items


def kfold(relpaths: list[str], k: int, seed: int, grouped: bool) -> dict[str, int]:
    """Seeded k-fold assignment (relpath -> fold 0..k-1); ``grouped`` keeps each patient in one fold.

    The patient is ``dataset.group_key`` (the file name without its slice suffix). Used for the
    out-of-fold predictions the stacked ensemble is fitted on.
    """
    keys = sorted({group_key(p) if grouped else p for p in relpaths})
    if len(keys) < k:
        raise CovidctError(f"{len(keys)} {'patients' if grouped else 'images'} cannot make {k} folds")
    order = np.random.default_rng(seed).permutation(len(keys))
    fold = {keys[i]: n % k for n, i in enumerate(order)}
    return {p: fold[group_key(p) if grouped else p] for p in relpaths}


def random70(relpaths: list[str], seed: int, test_fraction: float = TEST_FRACTION) -> dict[str, str]:
    """Seeded random image-level split: round(30 %) of the images are test, the rest train.

    Like the study (Spark's ``randomSplit([0.7, 0.3])``) it ignores patients, so images of one
    patient can land on both sides; the ``official`` split does not.
    """
    ordered = sorted(set(relpaths))
    n_test = int(round(len(ordered) * test_fraction))
    order = np.random.default_rng(seed).permutation(len(ordered))
    test = {ordered[i] for i in order[:n_test]}
    return {p: ("test" if p in test else "train") for p in ordered}


def official(relpaths: list[str], data_dir) -> dict[str, str]:
    """The published patient-level lists: train + val are fitted on, test is held out."""
    lists = split_lists(data_dir)
    assignment = {p: ("test" if part == "test" else "train") for part, paths in lists.items() for p in paths}
    present = set(relpaths)
    unlisted = sorted(present - assignment.keys())
    absent = sorted(assignment.keys() - present)
    if unlisted:
        log.warning("%d images are in no official split list and are left out, e.g. %s", len(unlisted), unlisted[:3])
    if absent:
        log.warning("%d listed images are missing from the data, e.g. %s", len(absent), absent[:3])
    return {p: s for p, s in assignment.items() if p in present}


def assign(images: DataFrame, split: str, seed: int, data_dir) -> DataFrame:
    """``images`` with a ``split`` column ('train'/'test'); images outside the split are dropped."""
    relpaths = [r.relpath for r in images.select("relpath").collect()]
    mapping = random70(relpaths, seed) if split == "random70" else official(relpaths, data_dir)
    if not any(v == "test" for v in mapping.values()) or not any(v == "train" for v in mapping.values()):
        raise CovidctError(f"the {split} split of {len(relpaths)} images leaves no train or no test images")
    spark = images.sparkSession
    table = spark.createDataFrame(sorted(mapping.items()), "relpath string, split string")
    return images.join(table, "relpath")
