"""random70 and official splits."""

import pytest

from covidct import split
from covidct.dataset import split_lists
from covidct.errors import CovidctError


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
