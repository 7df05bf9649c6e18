"""Bounded time: a lost Spark worker fails a run (it never freezes), and says so without the UI.

The cluster is a real standalone master on 127.0.0.1 started from the installed pyspark,
at first without any worker (what a cluster looks like after its only worker died); the
DAG runs with ``dag.test()`` and its ``spark_default`` connection pointing at it. Alerts
go to a real HTTP webhook on loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT
from support.cluster import tail
from support.net import free_port

DAG_ID = "covid_ct_transfer_learning"
WAIT_S = 20  # the executor wait in these tests (the default is 300 s)
TRAIN_BOUND_S = 90  # a train execution_timeout long enough for the application to register first
# What the bounds below allow beyond the wait: JVM start-up and shutdown, on a machine that may be busy.
# A margin, not a speed target (bench/bounds.py measures how soon it really fails); far below what
# an unbounded job would take (the train task's 40-min bound).
MARGIN_S = 240


# --------------------------------------------------------------------------- bounds and DAG wiring


def load_dag():
    """The DAG as the dag-processor would parse it now (bounds are read from the environment)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    return bag, bag.dags.get(DAG_ID)


def test_every_task_and_the_run_are_bounded():
    from covidct.orchestration import alerts, bounds

    _, dag = load_dag()
    timeouts = {t.task_id: t.execution_timeout for t in dag.tasks}
    assert all(timeouts.values()), timeouts
    assert timeouts["fetch_dataset"] == timedelta(minutes=30)
    assert timeouts["validate_dataset"] == timedelta(minutes=10)
    assert timeouts["train_vgg16"] == timeouts["train_xception"] == timedelta(minutes=40)
    assert timeouts["ensemble"] == timeouts["report"] == timeouts["promote"] == timedelta(minutes=10)
    # The job's own executor wait (300 s) ends well before the task's bound.
    assert timeouts["train_vgg16"].total_seconds() > 300
    assert timeouts["check_changes"] == timeouts["record_success"] == timedelta(minutes=5)
    assert dag.dagrun_timeout == timedelta(hours=3, minutes=35)
    # The run's bound leaves room for every task bound on the critical path, train's retries included.
    train = dag.task_dict["train_vgg16"]
    steps = (
        "fetch_dataset",
        "validate_dataset",
        "check_changes",
        "select_backbones",
        "ensemble",
        "report",
        "promote",
        "record_success",
    )
    others = sum((timeouts[t] for t in steps), timedelta())
    trains = (train.retries + 1) * timeouts["train_vgg16"] + train.retries * train.retry_delay
    critical = others + trains
    assert critical <= dag.dagrun_timeout
    assert all(alerts.task_failed in t.on_failure_callback for t in dag.tasks)
    assert alerts.run_failed in dag.on_failure_callback
    assert not dag.deadline and bounds.overdue_after() is None  # opt-in (see covidct.orchestration.bounds)


def test_bounds_are_overridable_from_the_environment(monkeypatch):
    monkeypatch.setenv("COVIDCT_TIMEOUT_TRAIN_S", "90")
    monkeypatch.setenv("COVIDCT_TIMEOUT_RUN_S", "3600")
    monkeypatch.setenv("COVIDCT_RUN_DEADLINE_S", "2700")
    _, dag = load_dag()
    assert dag.task_dict["train_vgg19"].execution_timeout == timedelta(seconds=90)
    assert dag.task_dict["fetch_dataset"].execution_timeout == timedelta(minutes=30)  # untouched
    assert dag.dagrun_timeout == timedelta(hours=1)
    [deadline] = dag.deadline  # the overdue alert, 45 min after the run was queued
    assert deadline.interval == timedelta(minutes=45)
    assert deadline.callback.path == "covidct.orchestration.alerts.run_overdue"

    monkeypatch.setenv("COVIDCT_TIMEOUT_TRAIN_S", "soon")
    bag, dag = load_dag()
    assert dag is None
    [error] = bag.import_errors.values()
    assert "COVIDCT_TIMEOUT_TRAIN_S must be a positive number of seconds, got 'soon'" in error


# --------------------------------------------------------------------------- alert lines


class Webhook:
    """A real HTTP server on loopback that records what is POSTed to it."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def texts(self, event: str) -> list[str]:
        return [p["text"] for p in self.received if p.get("event") == event]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook(monkeypatch):
    hook = Webhook()
    monkeypatch.setenv("COVIDCT_ALERT_WEBHOOK", hook.url)
    yield hook
    hook.close()


NOTIFIED: list[str] = []


def recording_notifier(context):
    """A notifier for COVIDCT_ALERT_NOTIFIER (any callable or Airflow BaseNotifier class works)."""
    NOTIFIED.append(context["covidct_alert"])


def test_overdue_alert_is_one_line_to_webhook_and_notifier(webhook, monkeypatch, caplog):
    """The deadline callback gets the scheduler's JSON context; its line reaches both routes."""
    import asyncio

    from covidct.orchestration import alerts

    monkeypatch.setenv("COVIDCT_ALERT_NOTIFIER", f"{__name__}.recording_notifier")
    NOTIFIED.clear()
    context = {
        "dag_run": {"dag_id": DAG_ID, "dag_run_id": "scheduled__2026-11-23T00:00:00+00:00", "state": "running",
                    "queued_at": "2026-11-23T00:00:05+00:00"},
        "deadline": {"id": "d1", "deadline_time": "2026-11-23T00:45:05+00:00"},
    }  # fmt: skip
    with caplog.at_level("ERROR", logger="covidct.orchestration.alerts"):
        asyncio.run(alerts.run_overdue(context))
    expected = (
        f"covidct ALERT run-overdue: {DAG_ID} run scheduled__2026-11-23T00:00:00+00:00 still running 45.0 min "
        "after it was queued (deadline 2026-11-23T00:45:05+00:00)"
    )
    assert webhook.texts("run-overdue") == [expected]
    assert webhook.received[0]["run_id"] == "scheduled__2026-11-23T00:00:00+00:00"
    assert list(NOTIFIED) == [expected]
    assert [r.getMessage() for r in caplog.records] == [expected]


def test_an_alert_that_cannot_be_delivered_is_logged_not_raised(monkeypatch, caplog):
    from covidct.orchestration import alerts

    monkeypatch.setenv("COVIDCT_ALERT_WEBHOOK", f"http://127.0.0.1:{free_port()}/nobody")
    monkeypatch.setenv("COVIDCT_ALERT_NOTIFIER", "covidct.no_such_module.Notifier")
    with caplog.at_level("WARNING", logger="covidct.orchestration.alerts"):
        alerts.send("covidct ALERT test: x", {}, "test")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "could not POST the alert" in messages and "the alert notifier covidct.no_such_module" in messages


# --------------------------------------------------------------------------- a cluster that loses its worker


@pytest.fixture
def workerless(spark_standalone, tmp_path, monkeypatch):
    """The session's master with no worker; the DAG's spark_default points at it (client mode, as compose)."""
    cluster = spark_standalone
    assert not cluster.alive_workers(), "a worker left over from another test"
    cluster.mark()
    try:
        host, port = cluster.master_url.removeprefix("spark://").split(":")
        conn = {"conn_type": "spark", "host": f"spark://{host}", "port": int(port), "extra": {"deploy-mode": "client"}}
        monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps(conn))
        for key in ("SPARK_CONF_DIR", "SPARK_LOCAL_IP", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON"):
            monkeypatch.setenv(key, cluster.env[key])
        monkeypatch.delenv("COVIDCT_SPARK_MASTER", raising=False)
        monkeypatch.setenv("COVIDCT_SPARK_MASTER_WEBUI", cluster.webui)
        monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
        yield cluster
    finally:
        if "worker" in cluster.procs:
            cluster.stop_worker()


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    from synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("bounded-data") / "COVID-CT", n_covid=6, n_noncovid=6)


CONF = {"backbones": ["VGG16"], "splits": ["random70"], "weights": "none", "expect_covid": 6, "expect_noncovid": 6,
        "feature_cache": False}  # fmt: skip


def job_processes(marker: str) -> list[str]:
    """Processes whose command line holds ``marker`` (spark-submit's JVM, the Python driver)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline and proc.pid != os.getpid():
            found.append(f"{proc.pid}: {cmdline[:200]}")
    return found


def train_apps(cluster) -> list[dict]:
    """This test's train applications, once none is active any more, oldest first."""
    apps = [a for a in cluster.new_apps() if a["name"] == "covidct-train-VGG16"]
    return sorted(apps, key=lambda a: a["starttime"])


def run(dag, conf: dict, monkeypatch):
    monkeypatch.setenv("COVIDCT_ALLOWED_SOURCES", str(conf["data_source"]))  # the operator allows this data_source
    dagrun = dag.test(run_conf={**conf, "data_source": str(conf["data_source"])})
    tis = {ti.task_id: ti for ti in dagrun.get_task_instances()}
    return dagrun, tis


@pytest.mark.slow
def test_train_fails_within_the_bound_when_no_worker_is_left(
    airflow_db, workerless, tiny_dataset, webhook, monkeypatch, tmp_path
):
    monkeypatch.setenv("COVIDCT_EXECUTOR_WAIT_S", str(WAIT_S))
    _, dag = load_dag()
    started = time.monotonic()
    dagrun, tis = run(dag, {**CONF, "data_source": tiny_dataset}, monkeypatch)
    wall = time.monotonic() - started
    train = tis["train_vgg16"]
    took = (train.end_date - train.start_date).total_seconds()
    print(f"\nno worker -> train task failed in {took:.1f} s (executor wait {WAIT_S} s); run {wall:.0f} s")
    assert train.state == "failed" and dagrun.state == "failed"
    assert train.try_number == 1  # not retried: another try would wait just the same
    # Within the bound: the wait, plus JVM start-up and shutdown (generous: the machine is shared).
    assert took < WAIT_S + MARGIN_S, took

    # One summary line per failure, without opening the UI, naming the master and what to check.
    [line] = [t for t in webhook.texts("task-failed") if t.startswith("covidct ALERT task-failed: train_vgg16")]
    assert line.startswith(f"covidct ALERT task-failed: train_vgg16 of {DAG_ID} run {dagrun.run_id} (try 1 of 3,")
    assert f"the Spark cluster {workerless.master_url} granted no executor within {WAIT_S} s" in line
    assert f"the master ({workerless.webui}/json/) has no ALIVE worker" in line
    assert "Check that the workers are alive" in line and "exit status 2, not retried" in line
    assert "\n" not in line
    run_lines = webhook.texts("run-failed")
    assert run_lines and run_lines[-1].startswith(f"covidct ALERT run-failed: {DAG_ID} run {dagrun.run_id}")

    # Nothing left behind: no spark-submit or driver process, no application running on the master.
    assert job_processes(str(tmp_path / "home")) == []
    [app] = train_apps(workerless)
    assert app["state"] in ("FINISHED", "KILLED"), app


@pytest.mark.slow
def test_a_timed_out_run_leaves_nothing_running_and_does_not_block_the_next(
    airflow_db, workerless, tiny_dataset, webhook, monkeypatch, tmp_path
):
    """execution_timeout kills the train task (the executor wait is off here): its whole tree goes."""
    monkeypatch.setenv("COVIDCT_EXECUTOR_WAIT_S", "0")
    monkeypatch.setenv("COVIDCT_TIMEOUT_TRAIN_S", str(TRAIN_BOUND_S))
    _, dag = load_dag()
    for task in dag.tasks:
        task.retries = 0  # a retry would only time out once more
    conf = {**CONF, "data_source": tiny_dataset}
    dagrun, tis = run(dag, conf, monkeypatch)
    train = tis["train_vgg16"]
    assert train.state == "failed" and dagrun.state == "failed"
    took = (train.end_date - train.start_date).total_seconds()
    print(f"\ntrain task timed out after {took:.1f} s (bound {TRAIN_BOUND_S} s)")
    assert TRAIN_BOUND_S <= took < TRAIN_BOUND_S + MARGIN_S, took
    [line] = [t for t in webhook.texts("task-failed") if t.startswith("covidct ALERT task-failed: train_vgg16")]
    assert "AirflowTaskTimeout" in line
    assert job_processes(str(tmp_path / "home")) == []
    # The application had registered and was waiting for executors when the bound hit; it is gone.
    apps = train_apps(workerless)
    assert len(apps) == 1 and apps[0]["state"] in ("FINISHED", "KILLED"), apps

    # The failed run holds nothing: once a worker is back, the next run starts and succeeds.
    workerless.start_worker()
    monkeypatch.delenv("COVIDCT_TIMEOUT_TRAIN_S")
    monkeypatch.delenv("COVIDCT_EXECUTOR_WAIT_S")
    _, dag = load_dag()
    dagrun2, tis2 = run(dag, conf, monkeypatch)
    assert dagrun2.state == "success", {t: ti.state for t, ti in tis2.items()}
    assert tis2["train_vgg16"].state == "success"
    assert dagrun2.run_id != dagrun.run_id
    apps = train_apps(workerless)
    assert len(apps) == 2 and apps[-1]["state"] == "FINISHED", apps


@pytest.mark.slow
def test_a_worker_lost_mid_job_fails_the_job_within_the_bound(workerless, tiny_dataset, tmp_path):
    """As ``docker compose stop spark-worker`` mid-run: the executors go, the job fails by itself."""
    from conftest import ROOT as root

    workerless.start_worker()
    out, log = tmp_path / "out", tmp_path / "submit.log"
    env = {**workerless.env, "COVIDCT_EXECUTOR_WAIT_S": str(WAIT_S), "COVIDCT_SPARK_MASTER_WEBUI": workerless.webui}
    cmd = ["spark-submit", "--master", workerless.master_url, "--deploy-mode", "client", "--conf",
           "spark.ui.enabled=false", "--executor-memory", "1g", str(root / "jobs" / "transfer_learning.py"),
           "--data", str(tiny_dataset), "--backbone", "VGG16", "--split", "random70", "--weights", "none",
           "--no-cache", "--out", str(out)]  # fmt: skip
    with log.open("wb") as handle:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        # Wait until the driver's watchdog has seen an executor registered.
        deadline = time.monotonic() + 180
        while "1 executor(s) registered on" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"the job ended before its executor registered:\n{tail(log)}"
            assert time.monotonic() < deadline, f"no executor registered in 180 s:\n{tail(log)}"
            time.sleep(0.5)
        time.sleep(2)
        lost_at = time.monotonic()
        workerless.stop_worker()  # SIGTERM, as docker compose stop; waits until the worker is gone
        rc = proc.wait(timeout=WAIT_S + MARGIN_S)
        took = time.monotonic() - lost_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"\nworker stopped mid-job -> job exited {rc} after {took:.1f} s (executor wait {WAIT_S} s)")
    text = log.read_text(errors="replace")
    assert rc == 2, tail(log)
    assert (
        f"error: the Spark cluster {workerless.master_url} lost every executor and got none back within {WAIT_S} s"
        in text
    )
    assert "has no ALIVE worker" in text
    assert WAIT_S <= took < WAIT_S + MARGIN_S, took
    assert not out.exists()  # nothing half-written
    assert job_processes(str(out)) == []
    [app] = train_apps(workerless)
    assert app["state"] in ("FINISHED", "KILLED"), app


# --------------------------------------------------------------------------- on_kill: the whole process tree


TREE = """
import subprocess, sys, time
# Like spark-submit's JVM: a child (the Python driver) and a grandchild in its own process
# group (PySpark's worker daemon calls setpgid), both ignoring nothing and living forever.
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(child.pid, daemon.pid, flush=True)
time.sleep(600)
"""


def test_on_kill_ends_spark_submits_whole_process_tree(monkeypatch):
    """The provider's on_kill SIGKILLs the spark-submit PID alone; its children would outlive it."""
    import psutil

    from covidct.orchestration.operators import TransferLearningSubmitOperator

    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({"conn_type": "spark", "host": "local[2]"}))
    op = TransferLearningSubmitOperator(task_id="train_x", conn_id="spark_default", application="job.py")
    op._hook = op._get_hook()
    proc = subprocess.Popen(["python3", "-c", TREE], stdout=subprocess.PIPE, text=True)
    pids = [proc.pid, *map(int, proc.stdout.readline().split())]
    op._hook._submit_sp = proc  # what SparkSubmitHook.submit() holds while the job runs
    try:
        started = time.monotonic()
        op.on_kill()
        assert time.monotonic() - started < 10  # SIGTERM was enough: no 15-s wait for SIGKILL
        proc.wait(timeout=5)
        left = [p for p in pids[1:] if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert left == [], f"left running after on_kill: {left}"
    finally:
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
