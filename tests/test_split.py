"""random70 and official splits."""

import pytest

from covidct.core.errors import CovidctError
from covidct.data import split
from covidct.data.dataset import split_lists


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
    [("random70", ["random70"]), ("official,random70", ["random70", "official"]), ("both", ["random70", "official"])],
)
def test_parse_splits(value, expected):
    assert split.parse_splits(value) == expected


def test_unknown_split_is_a_clear_error():
    with pytest.raises(CovidctError, match="unknown split 'random80'"):
        split.parse_splits("random80")


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
