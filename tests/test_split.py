"""random70, official and official-clean splits."""

import logging
import shutil

import pytest

from covidct.core.errors import CovidctError
from covidct.data import split
from covidct.data.dataset import split_lists
from covidct.data.manifest import image_files
from synthetic import first_listed, plant_near_duplicate


def test_random70_is_seeded_exact_and_order_independent():
    paths = [f"CT_COVID/{i}.png" for i in range(100)]
    a = split.random70(paths, seed=7)
    assert sum(v == "test" for v in a.values()) == 30
    assert a == split.random70(list(reversed(paths)), seed=7)
    assert a != split.random70(paths, seed=8)


def test_official_split_fits_on_train_and_val(small_dataset):
    lists = split_lists(small_dataset)
    every = [p for part in lists.values() for p in part]
    mapping = split.official(every, small_dataset)
    assert {p for p, s in mapping.items() if s == "test"} == set(lists["test"])
    assert {p for p, s in mapping.items() if s == "train"} == set(lists["train"]) | set(lists["val"])


@pytest.mark.parametrize(
    "value, expected",
    [
        ("random70", ["random70"]),
        ("official,random70", ["random70", "official"]),
        ("both", ["random70", "official"]),  # as before official-clean existed
        ("official-clean,random70,official", ["random70", "official", "official-clean"]),
        (["Official-Clean "], ["official-clean"]),
    ],
)
def test_parse_splits(value, expected):
    assert split.parse_splits(value) == expected


def test_unknown_split_is_a_clear_error():
    with pytest.raises(CovidctError, match="unknown split 'random80'; choose from random70, official, official-clean"):
        split.parse_splits("random80")
    with pytest.raises(CovidctError, match="unknown split 'official_clean'"):
        split.split_mapping("official_clean", ["CT_COVID/a.png"], 0, ".")


# --- official-clean: official without the test images that are near-duplicates across classes or splits ------


def relpaths(data) -> list[str]:
    return [relpath for relpath, _, _ in image_files(data)]


def test_official_clean_leaves_out_the_test_twin_of_a_training_image_of_the_other_class(
    small_dataset, tmp_path, caplog
):
    data = shutil.copytree(small_dataset, tmp_path / "COVID-CT")
    # as on UCSD COVID-CT: a non-COVID training picture, rescaled and re-encoded, filed as a COVID test image
    source = first_listed(data, "NonCOVID/trainCT_NonCOVID.txt", "CT_NonCOVID")
    twin = plant_near_duplicate(data, source, "CT_COVID", "COVID/testCT_COVID.txt", "kjr-21-e24-p5-29.png")
    every = relpaths(data)
    official = split.official(every, data)
    assert official[twin] == "test" and official[source] == "train"

    with caplog.at_level(logging.INFO, logger="covidct.data.split"):
        clean = split.official_clean(every, data)
    assert clean == {p: s for p, s in official.items() if p != twin}  # exactly the twin; its source stays train
    assert f"official-clean leaves out test image {twin}: the same picture as {source} (non-COVID, train), " in (
        caplog.text
    )
    assert "bits apart (across classes)" in caplog.text
    n_test = sum(s == "test" for s in official.values())
    assert f"official-clean: 1 of {n_test} official test images left out ({n_test - 1} test images)" in caplog.text
    assert split.split_mapping("official-clean", every, 0, data) == clean
    assert split.split_mapping("official", every, 0, data) == official


def test_official_clean_leaves_out_test_twins_across_splits_not_within_one(small_dataset, tmp_path):
    data = shutil.copytree(small_dataset, tmp_path / "COVID-CT")
    covid_val = first_listed(data, "COVID/valCT_COVID.txt", "CT_COVID")
    covid_test = first_listed(data, "COVID/testCT_COVID.txt", "CT_COVID")
    across = plant_near_duplicate(data, covid_val, "CT_COVID", "COVID/testCT_COVID.txt", "copy-p1-1%0.png", 1.25)
    within = plant_near_duplicate(data, covid_test, "CT_COVID", "COVID/testCT_COVID.txt", "copy-p2-2%0.png", 0.9)
    every = relpaths(data)
    official = split.official(every, data)
    assert official[across] == official[within] == official[covid_test] == "test"
    assert split.official_clean(every, data) == {p: s for p, s in official.items() if p != across}


def test_official_clean_is_official_without_near_duplicates(small_dataset, caplog):
    every = relpaths(small_dataset)
    with caplog.at_level(logging.INFO, logger="covidct.data.split"):
        clean = split.official_clean(every, small_dataset)
    assert clean == split.official(every, small_dataset)
    assert "no official test image has a near-duplicate across classes or splits; it equals official" in caplog.text
    assert not any(p.name == "manifest.parquet" for p in small_dataset.iterdir())  # built, not written


def test_official_clean_on_the_real_dataset_leaves_out_the_two_kjr_pictures(real_data_dir):
    if real_data_dir is None:
        pytest.skip("set COVIDCT_DATA_DIR to the real COVID-CT copy")
    every = relpaths(real_data_dir)
    official = split.official(every, real_data_dir)
    clean = split.official_clean(every, real_data_dir)  # the manifest is built in memory: the folder is read-only
    test = {p for p, s in official.items() if s == "test"}
    clean_test = {p for p, s in clean.items() if s == "test"}
    assert (len(test), len(clean_test)) == (203, 201)
    assert test - clean_test == {"CT_COVID/kjr-21-e24-p5-29.png", "CT_COVID/kjr-21-e24-p5-31.png"}
    assert {p for p, s in clean.items() if s == "train"} == {p for p, s in official.items() if s == "train"}
    assert clean["CT_NonCOVID/71%0.jpg"] == clean["CT_NonCOVID/71%1.jpg"] == "train"


def test_assign_makes_the_official_clean_split_in_spark(spark, small_dataset, tmp_path):
    data = shutil.copytree(small_dataset, tmp_path / "COVID-CT")
    source = first_listed(data, "NonCOVID/trainCT_NonCOVID.txt", "CT_NonCOVID")
    twin = plant_near_duplicate(data, source, "CT_COVID", "COVID/testCT_COVID.txt", "kjr-21-e24-p5-31.png")
    every = relpaths(data)
    images = spark.createDataFrame([(p,) for p in every], "relpath string")
    assigned = {r.relpath: r.split for r in split.assign(images, "official-clean", 42, data).collect()}
    assert assigned == split.official_clean(every, data) and twin not in assigned


@pytest.mark.parametrize(
    "value, expected",
    [("0-9", list(range(10))), ("42", [42]), (" 1, 5,20-22 ", [1, 5, 20, 21, 22]), (7, [7]), ([3, 1], [3, 1])],
)
def test_parse_seeds(value, expected):
    assert split.parse_seeds(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("", "invalid seeds"),
        ("-1", "invalid seeds"),
        ("1;2", "invalid seeds"),
        ("1-2-3", "invalid seeds"),
        ("a-b", "invalid seeds"),
        ("9-0", "first seed must not exceed the last"),
        ("1,2,1", "seed 1 is given twice"),
        ("0-100", "more than 100 seeds"),
        ("0-99,100", "101 seeds given"),
        ("4294967296", "within 0..2147483647"),
        ([True], "whole numbers"),
        (True, "seeds must be numbers"),
    ],
)
def test_bad_seeds_are_clear_errors(value, message):
    with pytest.raises(CovidctError, match=message):
        split.parse_seeds(value)


def test_kfold_is_seeded_balanced_and_keeps_patients_together():
    paths = [f"CT_COVID/case{c}%{k}.png" for c in range(20) for k in range(3)]
    folds = split.kfold(paths, 5, seed=1, grouped=True)
    assert set(folds.values()) == set(range(5))
    for c in range(20):  # the slices of one case share a fold
        assert len({folds[f"CT_COVID/case{c}%{k}.png"] for k in range(3)}) == 1
    assert folds == split.kfold(list(reversed(paths)), 5, seed=1, grouped=True)
    images = split.kfold(paths, 5, seed=1, grouped=False)
    assert sorted(list(images.values()).count(k) for k in range(5)) == [12] * 5
    with pytest.raises(CovidctError, match="cannot make 5 folds"):
        split.kfold(paths[:3], 5, seed=1, grouped=True)
