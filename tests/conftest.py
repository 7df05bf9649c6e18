"""Shared fixtures: one real local SparkSession for the suite, synthetic datasets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from covidct.session import get_spark

    session = get_spark(
        "covidct-tests",
        {
            "spark.sql.shuffle.partitions": "4",
            "spark.default.parallelism": "2",
            "spark.sql.warehouse.dir": str(tmp_path_factory.mktemp("warehouse")),
        },
    )
    yield session
    session.stop()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """12 COVID + 12 non-COVID synthetic images with official split lists (read-only for tests)."""
    return make_dataset(tmp_path_factory.mktemp("data") / "COVID-CT", n_covid=12, n_noncovid=12)


@pytest.fixture(scope="session")
def real_data_dir() -> Path | None:
    """The real 746-image copy when COVIDCT_DATA_DIR points at one (CI sets it), else None."""
    value = os.environ.get("COVIDCT_DATA_DIR")
    return Path(value) if value and Path(value, "CT_COVID").is_dir() else None
