"""The job on a real Spark standalone cluster, without Docker.

A master and one worker are started from the installed pyspark (``spark-class``) on
127.0.0.1, and ``jobs/transfer_learning.py`` is submitted as Airflow does it: the
spark-submit command is built by the provider's SparkSubmitHook from a JSON connection of
the same shape as docker-compose.yml's ``spark_default`` (``--master spark://HOST:PORT
--deploy-mode client``; Spark rejects cluster mode for Python apps on standalone). The
tasks must run in the worker's executor (the app is in the master's JSON, the executor's
log in the worker's work dir) and the metrics must equal a ``local[2]`` run's, same seed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from support.cluster import tail
from synthetic import make_dataset

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "transfer_learning.py"
JOB_ARGS = ["--backbone", "VGG16", "--split", "random70", "--seed", "7", "--weights", "none", "--no-cache"]
# The same small settings for both runs: they keep a 16-image job quick and do not change results.
SPARK_CONF = {"spark.sql.shuffle.partitions": "4", "spark.default.parallelism": "2", "spark.ui.enabled": "false"}
SUBMIT_TIMEOUT_S = 240
# predict --explain on the cluster: two Spark passes, each worker builds VGG16 + its explainer (~4 min on a
# heavily loaded 2-core host); a generous bound.
EXPLAIN_TIMEOUT_S = 600
EXACT = ("n_images", "n_train", "n_test", "confusion", "accuracy", "split", "seed", "weights_id", "feature_dim")


@pytest.fixture(scope="module")
def standalone_cluster(spark_standalone):
    """The session's master with one worker for this module's jobs."""
    spark_standalone.start_worker()
    try:
        yield spark_standalone
    finally:
        spark_standalone.stop_worker()


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("cluster-data") / "COVID-CT", n_covid=8, n_noncovid=8)


def airflow_submit_command(connection: dict, data: Path, out: Path, monkeypatch, **resources) -> list[str]:
    """The spark-submit command Airflow's SparkSubmitHook builds for ``connection``."""
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

    monkeypatch.setenv("AIRFLOW_CONN_COVIDCT_CLUSTER_TEST", json.dumps(connection))
    hook = SparkSubmitHook(
        conn_id="covidct_cluster_test",
        conf=SPARK_CONF,
        driver_memory="1g",
        name="covidct-cluster-test",
        application_args=["--data", str(data), "--out", str(out), *JOB_ARGS],
        **resources,
    )
    return hook._build_spark_submit_command(str(JOB))


def run_submit(cmd: list[str], log: Path, env: dict[str, str]) -> None:
    """Run a spark-submit command, output to ``log``, and wait for it."""
    master = cmd[cmd.index("--master") + 1]
    with log.open("wb") as handle:
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=SUBMIT_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"spark-submit --master {master} took more than {SUBMIT_TIMEOUT_S} s:\n{tail(log)}")
    assert proc.returncode == 0, f"spark-submit --master {master} failed with {proc.returncode}:\n{tail(log)}"


def test_job_runs_on_standalone_worker_like_local(standalone_cluster, tiny_dataset, tmp_path, monkeypatch):
    cluster = standalone_cluster
    cluster.mark()
    out_cluster, out_local = tmp_path / "out-cluster", tmp_path / "out-local"
    log_cluster, log_local = tmp_path / "submit-cluster.log", tmp_path / "submit-local.log"
    host, port = cluster.master_url.removeprefix("spark://").split(":")
    # As in docker-compose.yml, with the test master's address.
    standalone = {
        "conn_type": "spark",
        "host": f"spark://{host}",
        "port": int(port),
        "extra": {"deploy-mode": "client"},
    }
    cmd = airflow_submit_command(
        standalone, tiny_dataset, out_cluster, monkeypatch, executor_memory="1g", total_executor_cores=2
    )
    assert cmd[0] == "spark-submit" and cmd[1:3] == ["--master", cluster.master_url]
    assert cmd[cmd.index("--deploy-mode") + 1] == "client"
    run_submit(cmd, log_cluster, cluster.env)
    # Then locally (one after the other: on two cores, running both at once is no faster).
    local = {"conn_type": "spark", "host": "local[2]"}
    run_submit(airflow_submit_command(local, tiny_dataset, out_local, monkeypatch), log_local, cluster.env)

    # The work ran on the cluster: the master knows the app, the worker ran its executor.
    driver_log = log_cluster.read_text(errors="replace")
    assert "Starting executor ID driver" not in driver_log, (
        "the job given --master spark://... ran in local mode: its SparkSession ignored spark-submit's master"
    )
    apps = cluster.new_apps()
    assert len(apps) == 1, f"expected one completed app in {cluster.json_url}, got {apps}"
    app = apps[0]
    assert app["state"] == "FINISHED", app
    executor_logs = sorted((cluster.work_dir / app["id"]).glob("*/stderr"))
    assert executor_logs, f"no executor logs under {cluster.work_dir / app['id']}:\n{tail(cluster.logs['worker'])}"
    executor_text = "\n".join(p.read_text(errors="replace") for p in executor_logs)
    assert f'--app-id" "{app["id"]}"' in executor_text  # the executor was launched for this app
    assert "Finished task" in executor_text  # and ran its tasks

    # Same seed, same data: the same split and the same model quality as a local run.
    cluster_metrics = json.loads((out_cluster / "metrics.json").read_text())
    local_metrics = json.loads((out_local / "metrics.json").read_text())
    for key in EXACT:
        assert cluster_metrics[key] == local_metrics[key], key
    floats = [k for k, v in local_metrics.items() if isinstance(v, float) and k not in EXACT]
    assert {"auc", "f1"} <= set(floats)
    for key in floats:
        assert math.isclose(cluster_metrics[key], local_metrics[key], rel_tol=0, abs_tol=1e-6), key


def test_maps_of_an_image_are_identical_locally_and_on_the_cluster(standalone_cluster, tiny_dataset, spark, tmp_path):
    """``covidct predict --explain`` on the standalone cluster draws the same maps as in local mode."""
    import numpy as np
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression

    from covidct.dataset import load_images
    from covidct.featurizer import DeepImageFeaturizer
    from covidct.predict import predict

    cluster = standalone_cluster
    model = tmp_path / "model"
    featurizer = DeepImageFeaturizer(modelName="VGG16", weights="none", pooling="avg", batchSize=8)
    lr = LogisticRegression(maxIter=20, regParam=0.05, elasticNetParam=0.3)
    Pipeline(stages=[featurizer, lr]).fit(load_images(spark, tiny_dataset)).save(str(model))
    probes = tmp_path / "probes"
    probes.mkdir()
    for folder in ("CT_COVID", "CT_NonCOVID"):
        for source in sorted((tiny_dataset / folder).iterdir())[:2]:
            (probes / source.name).write_bytes(source.read_bytes())
    local = {r["path"].rsplit("/", 1)[-1]: r for r in predict(model, probes, explain_dir=tmp_path / "local")}

    cluster.mark()
    env = {**cluster.env, "COVIDCT_SPARK_MASTER": cluster.master_url, "COVIDCT_DRIVER_MEMORY": "1g"}
    log = tmp_path / "predict-cluster.log"
    with log.open("wb") as handle:
        proc = subprocess.run(
            [sys.executable, "-m", "covidct.cli", "predict", "--model", str(model), "--images", str(probes),
             "--out", str(tmp_path / "cluster.csv"), "--explain", str(tmp_path / "cluster")],
            cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=EXPLAIN_TIMEOUT_S,
        )  # fmt: skip
    assert proc.returncode == 0, tail(log)
    apps = cluster.new_apps()
    assert [app["name"] for app in apps] == ["covidct-predict"], apps
    executor_logs = (cluster.work_dir / apps[0]["id"]).glob("*/stderr")
    executor_text = "\n".join(p.read_text(errors="replace") for p in executor_logs)
    assert "Finished task" in executor_text  # the maps were computed and drawn by the worker's executor

    import pandas as pd

    remote = pd.read_csv(tmp_path / "cluster.csv")
    assert len(remote) == len(local) == 4
    for row in remote.itertuples():
        mine = local[row.path.rsplit("/", 1)[-1]]
        assert row.explain_method == mine["explain_method"] == "CAM"
        np.testing.assert_array_equal(np.load(row.explanation_npy), np.load(mine["explanation_npy"]))
        assert row.probability_covid == pytest.approx(mine["probability"], abs=1e-6)
