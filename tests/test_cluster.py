"""The job on a real Spark standalone cluster, without Docker.

A master and one worker are started from the installed pyspark (``spark-class``) on
127.0.0.1, and ``jobs/transfer_learning.py`` is submitted as Airflow does it: the
spark-submit command is built by the provider's SparkSubmitHook from a JSON connection of
the same shape as docker-compose.yml's ``spark_default`` (``--master spark://HOST:PORT
--deploy-mode client``; Spark rejects cluster mode for Python apps on standalone). The
tasks must run in the worker's executor (the app is in the master's JSON, the executor's
log in the worker's work dir) and the metrics must equal a ``local[2]`` run's, same seed (the same
``covidct train`` in the session's local Spark). The model that job saved is then explained on the
cluster and locally.
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
# No out-of-fold fits (--stack-folds 0): this test compares the model, not the stacked ensemble's inputs.
JOB_ARGS = ["--backbone", "VGG16", "--split", "random70", "--seed", "7", "--weights", "none", "--no-cache",
            "--stack-folds", "0"]  # fmt: skip
# The same small settings for both runs (the session's local Spark has them too): they keep a 16-image job
# quick and do not change results.
SPARK_CONF = {"spark.sql.shuffle.partitions": "4", "spark.default.parallelism": "2", "spark.ui.enabled": "false"}
# A hang guard, not a speed target: the job took 240 s once on a 2-core host under three test workers' load.
SUBMIT_TIMEOUT_S = 600
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


@pytest.fixture(scope="module")
def cluster_job(standalone_cluster, tiny_dataset, tmp_path_factory) -> dict:
    """The job spark-submitted to the standalone master as Airflow submits it: its command, log, output folder
    and applications."""
    cluster = standalone_cluster
    cluster.mark()
    folder = tmp_path_factory.mktemp("cluster-job")
    out, log = folder / "out", folder / "submit.log"
    host, port = cluster.master_url.removeprefix("spark://").split(":")
    # As in docker-compose.yml, with the test master's address.
    standalone = {
        "conn_type": "spark",
        "host": f"spark://{host}",
        "port": int(port),
        "extra": {"deploy-mode": "client"},
    }
    with pytest.MonkeyPatch.context() as mp:
        cmd = airflow_submit_command(standalone, tiny_dataset, out, mp, executor_memory="1g", total_executor_cores=2)
    run_submit(cmd, log, cluster.env)
    return {"cmd": cmd, "out": out, "log": log, "apps": cluster.new_apps()}


def test_job_runs_on_standalone_worker_like_local(standalone_cluster, cluster_job, tiny_dataset, spark, tmp_path):
    cluster = standalone_cluster
    cmd = cluster_job["cmd"]
    assert cmd[0] == "spark-submit" and cmd[1:3] == ["--master", cluster.master_url]
    assert cmd[cmd.index("--deploy-mode") + 1] == "client"
    # The same job in local mode: `covidct train` with the job's arguments in the session's local[2] Spark
    # (spark.sql.shuffle.partitions and spark.default.parallelism as SPARK_CONF).
    from covidct.cli import main

    out_local = tmp_path / "out-local"
    assert spark.sparkContext.master.startswith("local")
    same = ("spark.sql.shuffle.partitions", "spark.default.parallelism")
    assert {k: spark.sparkContext.getConf().get(k) for k in same} == {k: SPARK_CONF[k] for k in same}
    assert main(["train", "--data", str(tiny_dataset), "--out", str(out_local), *JOB_ARGS]) == 0

    # The work ran on the cluster: the master knows the app, the worker ran its executor.
    driver_log = cluster_job["log"].read_text(errors="replace")
    assert "Starting executor ID driver" not in driver_log, (
        "the job given --master spark://... ran in local mode: its SparkSession ignored spark-submit's master"
    )
    apps = cluster_job["apps"]
    assert len(apps) == 1, f"expected one completed app in {cluster.json_url}, got {apps}"
    app = apps[0]
    assert app["state"] == "FINISHED", app
    executor_logs = sorted((cluster.work_dir / app["id"]).glob("*/stderr"))
    assert executor_logs, f"no executor logs under {cluster.work_dir / app['id']}:\n{tail(cluster.logs['worker'])}"
    executor_text = "\n".join(p.read_text(errors="replace") for p in executor_logs)
    assert f'--app-id" "{app["id"]}"' in executor_text  # the executor was launched for this app
    assert "Finished task" in executor_text  # and ran its tasks

    # Same seed, same data: the same split and the same model quality as a local run.
    cluster_metrics = json.loads((cluster_job["out"] / "metrics.json").read_text())
    local_metrics = json.loads((out_local / "metrics.json").read_text())
    for key in EXACT:
        assert cluster_metrics[key] == local_metrics[key], key
    floats = [k for k, v in local_metrics.items() if isinstance(v, float) and k not in EXACT]
    assert {"auc", "f1"} <= set(floats)
    for key in floats:
        assert math.isclose(cluster_metrics[key], local_metrics[key], rel_tol=0, abs_tol=1e-6), key


def test_maps_of_an_image_are_identical_locally_and_on_the_cluster(
    standalone_cluster, cluster_job, tiny_dataset, spark, tmp_path
):
    """``covidct predict --explain`` on the standalone cluster draws the same maps as in local mode (the session's
    local Spark), with the model the cluster job saved."""
    import numpy as np

    from covidct.inference.predict import predict

    cluster = standalone_cluster
    model = cluster_job["out"] / "model"
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
