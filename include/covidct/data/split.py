"""Train/test splits: ``random70`` (the study's protocol), ``official`` (patient-level lists) and
``official-clean`` (``official`` without the test images that are near-duplicates of an image of the
other class or of another official split).

All are computed on the driver from the sorted relative paths (and, for ``official-clean``, the
dataset's manifest), so the same seed gives the same split whatever the Spark partitioning, local
or on a cluster.
"""

from __future__ import annotations

import logging
import re

import numpy as np
from pyspark.sql import DataFrame

from covidct.core.errors import CovidctError
from covidct.data.dataset import group_key, split_lists

log = logging.getLogger(__name__)

SPLITS = ("random70", "official", "official-clean")
#: What ``--split both`` means (kept from before ``official-clean`` existed).
BOTH = ("random70", "official")
#: The splits made of the published patient-level lists: whole patients per side, resampled and folded as such.
PATIENT_SPLITS = ("official", "official-clean")
#: A split made from another by leaving test images out: same training images, so the same models.
CLEANED_FROM = {"official-clean": "official"}
TEST_FRACTION = 0.3
#: ``--seeds`` / the DAG's ``seeds``: seeds and inclusive ranges, comma-separated ("0-9", "1,5,20-24").
SEEDS_PATTERN = r"^[0-9]{1,10}(-[0-9]{1,10})?(,[0-9]{1,10}(-[0-9]{1,10})?)*$"
MAX_SEEDS = 100
MAX_SEED = 2**31 - 1
#: Folds of the out-of-fold training predictions the stacked ensemble is fitted on (``kfold``).
STACK_FOLDS = 5


def parse_splits(value: str | list[str]) -> list[str]:
    """'official,random70' / 'both' (random70 + official) / ['official'] -> validated list, in SPLITS' order."""
    items = value if isinstance(value, list) else str(value).split(",")
    names = [s.strip().lower() for s in items if s.strip()]
    if names == ["both"]:
        names = list(BOTH)
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


def official_clean(relpaths: list[str], data_dir, manifest=None) -> dict[str, str]:
    """``official`` without every test image that shows the same picture as an image of the other class or
    of another official split list.

    The pairs are ``covidct.data.duplicates.near_duplicates`` of the dataset's manifest (``manifest``, or
    ``load_manifest(data_dir)``: ``DIR/manifest.parquet``, or built from the files): a test image on either
    side of a pair ``across classes`` or ``across splits`` is left out; the pair's training images stay.
    With no such pair it equals ``official``. On UCSD COVID-CT it leaves out ``CT_COVID/kjr-21-e24-p5-29.png``
    and ``kjr-21-e24-p5-31.png`` (the pictures of ``CT_NonCOVID/71%0.jpg`` and ``71%1.jpg``, which are train).
    """
    from covidct.data.duplicates import ACROSS_CLASSES, ACROSS_SPLITS, BITS, near_duplicates
    from covidct.data.manifest import load_manifest

    mapping = official(relpaths, data_dir)
    pairs = near_duplicates(load_manifest(data_dir) if manifest is None else manifest)
    pairs = pairs[pairs["kind"].isin([ACROSS_CLASSES, ACROSS_SPLITS])]
    left_out: set[str] = set()
    for pair in pairs.itertuples(index=False):  # closest first
        for side, other in (("a", "b"), ("b", "a")):
            relpath = getattr(pair, f"relpath_{side}")
            if mapping.get(relpath) != "test":
                continue
            left_out.add(relpath)
            label = "COVID" if getattr(pair, f"label_{other}") == 1 else "non-COVID"
            log.info("official-clean leaves out test image %s: the same picture as %s (%s, %s), %d of %d bits "
                     "apart (%s)", relpath, getattr(pair, f"relpath_{other}"), label,
                     getattr(pair, f"split_{other}") or "in no split list", pair.distance, BITS, pair.kind)  # fmt: skip
    n_test = sum(v == "test" for v in mapping.values())
    if not left_out:
        log.info("official-clean: no official test image has a near-duplicate across classes or splits; "
                 "it equals official (%d test images)", n_test)  # fmt: skip
    else:
        log.info("official-clean: %d of %d official test images left out (%d test images)", len(left_out), n_test,
                 n_test - len(left_out))  # fmt: skip
    return {p: s for p, s in mapping.items() if p not in left_out}


def split_mapping(split: str, relpaths: list[str], seed: int, data_dir, manifest=None) -> dict[str, str]:
    """relpath -> 'train' / 'test' of ``split`` (images outside it absent); ``manifest``: the dataset's, where
    the caller has it (``official-clean`` reads it otherwise)."""
    if split == "random70":
        return random70(relpaths, seed)
    if split == "official":
        return official(relpaths, data_dir)
    if split == "official-clean":
        return official_clean(relpaths, data_dir, manifest)
    raise CovidctError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")


def assignment(split: str, relpaths: list[str], seed: int, data_dir) -> dict[str, str]:
    """``split_mapping``, checked: a split that leaves no train or no test image is an error."""
    mapping = split_mapping(split, relpaths, seed, data_dir)
    if not any(v == "test" for v in mapping.values()) or not any(v == "train" for v in mapping.values()):
        raise CovidctError(f"the {split} split of {len(relpaths)} images leaves no train or no test images")
    return mapping


def assign(images: DataFrame, split: str, seed: int, data_dir, mapping: dict[str, str] | None = None) -> DataFrame:
    """``images`` with a ``split`` column ('train'/'test'); images outside the split are dropped.

    ``mapping``: the split's ``assignment`` of the images' relpaths, where the caller has it (else their
    relpaths are collected, a Spark job)."""
    if mapping is None:
        mapping = assignment(split, [r.relpath for r in images.select("relpath").collect()], seed, data_dir)
    spark = images.sparkSession
    table = spark.createDataFrame(sorted(mapping.items()), "relpath string, split string")
    return images.join(table, "relpath")
