"""The Airflow DAG: integrity (imports, wiring, retries, params) and end-to-end runs with dag.test()."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from conftest import ROOT

DAG_ID = "covid_ct_transfer_learning"
TRAIN_TASKS = {"train_vgg16", "train_vgg19", "train_xception"}
APPROVED_TAGS = {"covid-ct", "spark", "transfer-learning"}


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags[DAG_ID]


def test_every_dag_file_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    files = {Path(f).name for f in (ROOT / "dags").glob("*.py")}
    loaded = {Path(d.fileloc).name for d in dagbag.dags.values()}
    assert files == loaded


def test_tasks_and_dependencies(dag):
    downstream = {t.task_id: set(t.downstream_task_ids) for t in dag.tasks}
    assert downstream == {
        "fetch_dataset": {"validate_dataset"},
        "validate_dataset": {"select_backbones"},
        "select_backbones": TRAIN_TASKS,
        **{t: {"ensemble"} for t in TRAIN_TASKS},
        "ensemble": {"report"},
        "report": set(),
    }
    assert dag.task_dict["ensemble"].trigger_rule == "all_done"
    assert dag.task_dict["report"].trigger_rule == "all_done"
    dag.check_cycle()  # raises on a cycle


def test_retries_tags_schedule_and_docs(dag):
    assert all(t.retries >= 2 for t in dag.tasks), {t.task_id: t.retries for t in dag.tasks}
    assert set(dag.tags) <= APPROVED_TAGS and dag.tags
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.schedule == "@weekly"
    assert "train_vgg16" in dag.doc_md


def test_train_tasks_are_spark_submits_of_the_job_through_spark_default(dag):
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    for task_id in TRAIN_TASKS:
        task = dag.task_dict[task_id]
        assert isinstance(task, SparkSubmitOperator)
        assert task._conn_id == "spark_default"
        assert Path(task.application) == ROOT / "jobs" / "transfer_learning.py"
        args = task.application_args
        assert args[args.index("--backbone") + 1].lower() == task_id[6:]
        # Every job-level param of the trigger form reaches the job.
        for param in ("splits", "seed", "seeds", "weights", "pooling", "precision", "feature_cache"):
            assert any(f"params.{param}" in str(a) for a in args), param


def test_params_have_descriptions_defaults_and_validate(dag):
    from airflow.sdk.exceptions import ParamValidationError

    params = dag.params
    assert all(params.get_param(k).description for k in params)
    assert params.validate()["backbones"] == ["VGG16", "VGG19", "Xception"]
    assert params.validate()["seeds"] is None  # default: random70 with `seed` only, as before
    for good in ("0-9", "1,5,20-24", "42"):
        candidate = copy.deepcopy(params)
        candidate.update({"seeds": good})
        assert candidate.validate()["seeds"] == good
    for bad in ({"backbones": ["AlexNet"]}, {"backbones": []}, {"splits": ["random80"]}, {"pooling": "max"},
                {"seed": -1}, {"seeds": "0-9; rm -rf /"}, {"seeds": "-1"}, {"seeds": "0 - 9"}, {"seeds": ""},
                {"seeds": "{{ 7*7 }}"}, {"seeds": 5}):  # fmt: skip
        with pytest.raises(ParamValidationError):
            candidate = copy.deepcopy(params)
            candidate.update(bad)
            candidate.validate()


def test_run_folders_never_collide_and_are_hadoop_safe(monkeypatch, tmp_path):
    from covidct import paths

    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path))
    a = paths.run_dir("manual__2026-11-25T10:00:00+00:00")
    b = paths.run_dir("scheduled__2026-11-25T10:00:00+00:00")
    assert a != b and a.parent == tmp_path / "runs"
    assert ":" not in a.name and "+" not in a.name


def test_ensemble_task_combines_the_backbones_that_succeeded(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from covidct import pipeline
    from test_report import make_run

    run = make_run(tmp_path / "run")
    everything = ["VGG16", "VGG19", "Xception"]
    ok = dict.fromkeys(TRAIN_TASKS, "success")
    with pytest.raises(AirflowSkipException, match="two or more backbones"):
        pipeline.build_run_ensemble(str(run), everything, {**ok, "train_vgg19": "failed", "train_xception": "failed"})
    out = pipeline.build_run_ensemble(str(run), everything, ok)
    assert Path(out) == (run / "ensemble").absolute()
    manifest = json.loads((run / "ensemble" / "ensemble.json").read_text())
    assert [m["backbone"] for m in manifest["members"]] == everything and manifest["method"] == "mean"
    with pytest.raises(AirflowFailException, match="needs two or more backbones"):  # a user error: no retries
        (tmp_path / "empty").mkdir()
        pipeline.build_run_ensemble(str(tmp_path / "empty"), everything, ok)


# --------------------------------------------------------------------------- end to end


def run_dag(dag, conf: dict):
    from airflow.utils.state import DagRunState

    dagrun = dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in dagrun.get_task_instances()}
    return dagrun, states, dagrun.state == DagRunState.SUCCESS


@pytest.mark.slow
def test_whole_dag_runs_with_real_spark_submit(airflow_db, dag, small_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
    conf = {"data_source": str(small_dataset), "weights": "none", "expect_covid": 12, "expect_noncovid": 12, "seed": 5}
    dagrun, states, ok = run_dag(dag, conf)
    assert ok, states
    assert all(state == "success" for state in states.values()), states
    from covidct import paths

    run = paths.run_dir(dagrun.run_id)
    for backbone in ("vgg16", "vgg19", "xception"):
        for split in ("official", "random70"):
            metrics = json.loads((run / backbone / split / "metrics.json").read_text())
            assert metrics["split"] == split and metrics["seed"] == 5 and metrics["random_weights"] is True
    html = (run / "report" / "report.html").read_text()
    assert "RANDOM WEIGHTS" in html
    assert all(name in html for name in ("VGG16", "VGG19", "Xception", "Ensemble (stacked)"))
    assert (run / "ensemble" / "ensemble.json").is_file()
    # The data were fetched into COVIDCT_HOME and the features cached there.
    assert (tmp_path / "home" / "data" / "COVID-CT" / "CT_COVID").is_dir()
    assert (tmp_path / "home" / "feature-cache" / "VGG16").is_dir()


@pytest.mark.slow
def test_a_failed_backbone_still_gets_a_report_naming_it(airflow_db, dag, small_dataset, tmp_path, monkeypatch):
    """VGG16's weights file is there, VGG19's is not (and cannot be downloaded): VGG19 fails, once."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    weights = tmp_path / "weights"
    weights.mkdir()
    model = keras.applications.VGG16(include_top=False, weights=None)
    with h5py.File(weights / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COVIDCT_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("COVIDCT_WEIGHTS_URL", "http://127.0.0.1:9/")  # downloads fail at once
    conf = {
        "data_source": str(small_dataset),
        "backbones": ["VGG16", "VGG19"],
        "splits": ["official"],
        "weights": "imagenet",
        "expect_covid": 12,
        "expect_noncovid": 12,
    }
    dagrun, states, _ = run_dag(dag, conf)
    assert states["train_vgg16"] == "success"
    assert states["train_vgg19"] == "failed"
    assert states["train_xception"] == "skipped"  # not chosen
    assert states["report"] == "success"
    vgg19 = next(ti for ti in dagrun.get_task_instances() if ti.task_id == "train_vgg19")
    assert vgg19.try_number == 1  # a user error (missing weights) is not retried
    from covidct import paths

    report = paths.run_dir(dagrun.run_id) / "report"
    markdown = (report / "report.md").read_text()
    assert "VGG19" in markdown and "task train_vgg19 failed; see its log" in markdown
    assert "Xception: failed" not in markdown and "| **Xception**" not in markdown  # not chosen: no row


# --------------------------------------------------------------------------- make run


def _localstack(args, tmp_path, **env):
    import os
    import subprocess
    import sys

    environment = {**os.environ, "COVIDCT_HOME": str(tmp_path / "home"), "AIRFLOW_HOME": str(tmp_path / "af"), **env}
    return subprocess.run(
        [sys.executable, "-m", "covidct.localstack", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def test_make_run_fails_in_seconds_without_weights_and_runs_nothing(tmp_path):
    result = _localstack(
        ["run", "--conf", '{"backbones": ["VGG16"]}'],
        tmp_path,
        COVIDCT_WEIGHTS_DIR=str(tmp_path / "none"),
        KERAS_HOME=str(tmp_path / "keras"),
        COVIDCT_WEIGHTS_URL="http://127.0.0.1:9/",
    )
    assert result.returncode == 2
    assert "error: ImageNet weights for VGG16 are not available" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "af").exists() and not (tmp_path / "home" / "runs").exists()


def test_make_run_rejects_a_conf_that_is_not_json(tmp_path):
    result = _localstack(["run", "--conf", "{backbones: VGG16"], tmp_path)
    assert result.returncode == 2 and "--conf is not JSON" in result.stderr


@pytest.mark.slow
def test_make_ui_starts_the_real_airflow_and_ctrl_c_stops_every_component(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "COVIDCT_HOME": str(tmp_path / "home"),
        "AIRFLOW_HOME": str(tmp_path / "af"),
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "covidct.localstack", "ui"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal would start it
    )
    try:
        deadline, version = time.monotonic() + 180, None
        while time.monotonic() < deadline and version is None:
            time.sleep(2)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/version", timeout=2) as response:
                    version = response.read().decode()
            except OSError:
                pass
        assert version and '"3.3.2"' in version, "the api-server never answered"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    assert "Airflow stopped." in output and "Traceback" not in output
    # No process of this Airflow home is left (they all carry its AIRFLOW_HOME in their environment).
    marker = f"AIRFLOW_HOME={tmp_path / 'af'}".encode()
    left = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                left.append(environ.parent.name)
        except OSError:
            continue
    assert not left, f"processes left running: {left}"
