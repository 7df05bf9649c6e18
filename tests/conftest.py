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

from covidct.core.session import LOCAL_DRIVER_JAVA_OPTIONS
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
# spark-submitted drivers get make run's JVM options (covidct.orchestration.local.environment); the
# sessions the tests start get them from covidct.core.session itself.
os.environ.setdefault("SPARK_SUBMIT_OPTS", LOCAL_DRIVER_JAVA_OPTIONS)
# Everything a test writes under COVIDCT_HOME without choosing one (e.g. the report's gallery cache)
# goes to the session's own folder, never to ~/covidct.
_COVIDCT_HOME = tempfile.mkdtemp(prefix="covidct-home-")
atexit.register(shutil.rmtree, _COVIDCT_HOME, ignore_errors=True)
os.environ.setdefault("COVIDCT_HOME", _COVIDCT_HOME)
# MLflow tracking (covidct.lifecycle) is off unless a test turns it on (tests/test_tracking.py does):
# the other tests' jobs and DAG runs then log nothing, and pay nothing for it.
os.environ.setdefault("COVIDCT_TRACKING", "off")


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from covidct.core.session import get_spark

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
def dagbag():
    """Both DAG files parsed once for the session: for tests that read the DAGs (support.dags.fresh for
    ``dag.test()``)."""
    from support.dags import parse

    return parse()


@pytest.fixture(scope="session")
def dag(dagbag):
    """The transfer-learning DAG of the session's parse (read it; never ``dag.test()`` it)."""
    return dagbag.dags["covid_ct_transfer_learning"]


@pytest.fixture(scope="session")
def spark_standalone(tmp_path_factory):
    """One real Spark standalone master on loopback for the session, with no worker: tests start and
    stop workers (``start_worker``/``stop_worker``) and tell their applications apart (``mark``/``new_apps``)."""
    from support.cluster import Standalone

    cluster = Standalone(tmp_path_factory.mktemp("spark-standalone"))
    try:
        cluster.start_master()
        yield cluster
    finally:
        cluster.close()


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


@pytest.fixture(scope="session")
def trained_run(airflow_db, small_dataset, tmp_path_factory):
    """The transfer-learning DAG run once for the session (``support.trained``): three backbones, the
    default splits, stand-in ImageNet weights, MLflow tracking on. Read it; ``trained_run.use(monkeypatch)``
    gives a test its environment."""
    from support.trained import train_once

    return train_once(tmp_path_factory.mktemp("trained-run"), small_dataset)


@pytest.fixture(scope="session")
def small_model(spark, small_dataset, tmp_path_factory) -> Path:
    """A saved PipelineModel (ResNet50 features with random weights + LR) fitted on the synthetic images.

    Cheaper than a whole ``covidct train`` (no splits, evaluation or out-of-fold fits) for tests
    that only need a model folder ``covidct predict`` and ``covidct score`` accept.
    """
    from pyspark.ml import PipelineModel
    from pyspark.ml.classification import LogisticRegression

    from covidct.data.dataset import load_images
    from covidct.features.featurizer import DeepImageFeaturizer

    featurizer = DeepImageFeaturizer(inputCol="image", outputCol="features", modelName="ResNet50", weights="none")
    features = featurizer.transform(load_images(spark, small_dataset)).select("features", "label").persist()
    lr = LogisticRegression(maxIter=10, regParam=0.05, labelCol="label").fit(features)  # features computed once
    features.unpersist()
    model = PipelineModel(stages=[featurizer, lr])
    out = tmp_path_factory.mktemp("small-model") / "model"
    model.save(out.as_uri())
    return out


# --------------------------------------------------------------------------- three workers, or one process

#: ``make test`` runs three pytest-xdist workers (``-n 3 --dist loadgroup``), one per group below: each
#: group's modules share their session fixtures (the trained run, the standalone master, the compose
#: stack) in one worker, and the groups overlap where the others wait (containers restarting, executor
#: waits, JVM start-ups); they are balanced by the durations of a whole run. The compose stack's module
#: is the ``docker``-marked one.
XDIST_GROUPS = {
    # The stack's worker waits much (image build, containers, faults): `make ui`'s Airflow and the retrain runs
    # fit beside it (a whole run: this worker finished ~8 min before the Spark one without them).
    "compose": ("test_compose", "test_make_ui", "test_retrain", "test_architecture", "test_docs"),
    "airflow": ("test_dag", "test_tracking", "test_bounded", "test_cluster", "test_session", "test_policy"),
}  # fmt: skip
OTHER_GROUP = "spark"  # every other module: Spark and TensorFlow jobs, fetch, validation, the report


def xdist_group(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    return next((group for group, modules in XDIST_GROUPS.items() if module in modules), OTHER_GROUP)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: no error where xdist is not installed
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` by :data:`XDIST_GROUPS` (pytest-xdist 3.8's own loadgroup cannot tag pytest 9.2's
    node ids, so its ``xdist_group`` marks would be ignored)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    return ByGroup(config, log)


def pytest_collection_modifyitems(config, items):
    """In one process, the compose stack's tests run last, while ..."""
    items[:] = [i for i in items if not i.get_closest_marker("docker")] + [
        i for i in items if i.get_closest_marker("docker")
    ]


PREBUILD = pytest.StashKey()


def pytest_collection_finish(session):
    """... their image builds in the background from the session's start (support.compose.Prebuild)."""
    config = session.config
    if config.option.collectonly or os.environ.get("PYTEST_XDIST_WORKER") or getattr(config.option, "numprocesses", 0):
        return  # under xdist the compose worker builds it at once, beside the other tests
    if any("stack" in getattr(item, "fixturenames", ()) for item in session.items):
        from support.compose import Prebuild, engine_available

        if engine_available():
            config.stash[PREBUILD] = Prebuild()


def pytest_unconfigure(config):
    prebuild = config.stash.get(PREBUILD, None)
    if prebuild is not None:
        prebuild.close()
