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

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def spark_env(tmp: Path) -> dict[str, str]:
    """Environment of the daemons and of spark-submit: loopback only, logs and conf in ``tmp``."""
    conf_dir = tmp / "conf"  # empty: no spark-defaults.conf from anywhere else
    conf_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "SPARK_HOME": str(spark_home()),
        "SPARK_CONF_DIR": str(conf_dir),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_LOG_DIR": str(tmp / "logs"),
        "SPARK_WORKER_DIR": str(tmp / "work"),
        # The master's REST submission server (default port 6066) is not needed here.
        "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false",
        # Executors' Python workers must use this interpreter (TensorFlow and covidct live here).
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    # The cluster must come from spark-submit's --master alone, as under Airflow.
    env.pop("COVIDCT_SPARK_MASTER", None)
    return env


def read_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def stop(proc: subprocess.Popen) -> None:
    """Stop a daemon we started in a session of its own: TERM, wait, KILL; then the rest of its session.

    As a container's processes die with its PID 1. A worker asked to launch an executor while it
    shuts down can start that JVM after its shutdown hook killed the others (its log: "Shutdown
    hooks cannot be modified during shutdown"); such an orphan would serve a job on.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    end_session(proc.pid)


def end_session(sid: int) -> None:
    """Kill every process left in session ``sid`` and wait until they are gone."""
    import psutil

    left = []
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(proc.pid) == sid:
                proc.kill()
                left.append(proc)
    _, alive = psutil.wait_procs(left, timeout=10)
    assert not alive, f"still running in session {sid}: {alive}"


@dataclass
class Cluster:
    master_url: str
    json_url: str
    work_dir: Path
    env: dict[str, str]
    logs: dict[str, Path]


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("standalone")
    env = spark_env(tmp)
    spark_class = str(spark_home() / "bin" / "spark-class")
    port, ui_port, worker_ui_port = free_port(), free_port(), free_port()
    master_url = f"spark://127.0.0.1:{port}"
    work_dir = tmp / "work"
    logs = {"master": tmp / "master.log", "worker": tmp / "worker.log"}
    commands = {
        "master": [spark_class, "org.apache.spark.deploy.master.Master",
                   "--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui_port)],
        "worker": [spark_class, "org.apache.spark.deploy.worker.Worker", master_url,
                   "--host", "127.0.0.1", "--cores", "2", "--memory", "3g",
                   "--work-dir", str(work_dir), "--webui-port", str(worker_ui_port)],
    }  # fmt: skip
    procs: dict[str, subprocess.Popen] = {}
    json_url = f"http://127.0.0.1:{ui_port}/json/"
    try:
        for name in ("master", "worker"):  # spark-class execs java: these PIDs are the daemons'
            with logs[name].open("wb") as log:
                procs[name] = subprocess.Popen(
                    commands[name], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        deadline = time.monotonic() + 90
        state: dict = {}
        while time.monotonic() < deadline:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"spark {name} exited with {proc.returncode}:\n{tail(logs[name])}")
            try:
                state = read_json(json_url)
            except OSError:
                state = {}
            if any(w.get("state") == "ALIVE" for w in state.get("workers", [])):
                break
            time.sleep(1)
        else:
            pytest.fail(f"no ALIVE worker in {json_url} after 90 s: {state}\n{tail(logs['worker'])}")
        yield Cluster(master_url, json_url, work_dir, env, logs)
    finally:
        for name in ("worker", "master"):
            if name in procs:
                stop(procs[name])


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


def finished_apps(cluster: Cluster, timeout_s: float = 20) -> list[dict]:
    """The master's completed apps, once none is active any more."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = read_json(cluster.json_url)
        if not state.get("activeapps") or time.monotonic() > deadline:
            return state.get("completedapps", [])
        time.sleep(0.5)


def test_job_runs_on_standalone_worker_like_local(standalone_cluster, tiny_dataset, tmp_path, monkeypatch):
    cluster = standalone_cluster
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
    apps = finished_apps(cluster)
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

    before = {app["id"] for app in finished_apps(cluster)}
    env = {**cluster.env, "COVIDCT_SPARK_MASTER": cluster.master_url, "COVIDCT_DRIVER_MEMORY": "1g"}
    log = tmp_path / "predict-cluster.log"
    with log.open("wb") as handle:
        proc = subprocess.run(
            [sys.executable, "-m", "covidct.cli", "predict", "--model", str(model), "--images", str(probes),
             "--out", str(tmp_path / "cluster.csv"), "--explain", str(tmp_path / "cluster")],
            cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=EXPLAIN_TIMEOUT_S,
        )  # fmt: skip
    assert proc.returncode == 0, tail(log)
    apps = [app for app in finished_apps(cluster) if app["id"] not in before]
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
