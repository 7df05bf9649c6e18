"""Shared fixtures: one real local SparkSession for the suite, synthetic datasets."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from covidct.session import LOCAL_DRIVER_JAVA_OPTIONS
from synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# spark-submit, spark-class and airflow come from the venv.
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"

# Airflow reads its configuration when first imported: give the test session its own
# AIRFLOW_HOME (SQLite), this project's DAGs and a local-mode spark_default connection.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="covidct-airflow-")
atexit.register(shutil.rmtree, _AIRFLOW_HOME, ignore_errors=True)
os.environ.update(
    {
        "AIRFLOW_HOME": _AIRFLOW_HOME,
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"}),
    }
)
# spark-submitted drivers get make run's JVM options (covidct.localstack.environment); the
# sessions the tests start get them from covidct.session itself.
os.environ.setdefault("SPARK_SUBMIT_OPTS", LOCAL_DRIVER_JAVA_OPTIONS)
# Everything a test writes under COVIDCT_HOME without choosing one (e.g. the report's gallery cache)
# goes to the session's own folder, never to ~/covidct.
_COVIDCT_HOME = tempfile.mkdtemp(prefix="covidct-home-")
atexit.register(shutil.rmtree, _COVIDCT_HOME, ignore_errors=True)
os.environ.setdefault("COVIDCT_HOME", _COVIDCT_HOME)
# MLflow tracking (covidct.tracking) is off unless a test turns it on (tests/test_tracking.py does):
# the other tests' jobs and DAG runs then log nothing, and pay nothing for it.
os.environ.setdefault("COVIDCT_TRACKING", "off")


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


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite metadata DB in the session's AIRFLOW_HOME."""
    result = subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(_AIRFLOW_HOME)


def processes_of_airflow_home(airflow_home: Path) -> list[str]:
    """PIDs of the processes still running with this AIRFLOW_HOME in their environment."""
    marker = f"AIRFLOW_HOME={airflow_home}".encode()
    left = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                left.append(environ.parent.name)
        except OSError:
            continue
    return left


@pytest.fixture(scope="session")
def small_model(spark, small_dataset, tmp_path_factory) -> Path:
    """A saved PipelineModel (ResNet50 features with random weights + LR) fitted on the synthetic images.

    Cheaper than a whole ``covidct train`` (no splits, evaluation or out-of-fold fits) for tests
    that only need a model folder ``covidct predict`` and ``covidct score`` accept.
    """
    from pyspark.ml import PipelineModel
    from pyspark.ml.classification import LogisticRegression

    from covidct.dataset import load_images
    from covidct.featurizer import DeepImageFeaturizer

    featurizer = DeepImageFeaturizer(inputCol="image", outputCol="features", modelName="ResNet50", weights="none")
    features = featurizer.transform(load_images(spark, small_dataset)).select("features", "label").persist()
    lr = LogisticRegression(maxIter=10, regParam=0.05, labelCol="label").fit(features)  # features computed once
    features.unpersist()
    model = PipelineModel(stages=[featurizer, lr])
    out = tmp_path_factory.mktemp("small-model") / "model"
    model.save(out.as_uri())
    return out
