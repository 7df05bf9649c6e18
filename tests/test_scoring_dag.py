"""The scoring DAG (``covid_ct_scoring``): wiring, params, and real ``dag.test()`` runs with a champion
registered in a real MLflow registry (embedded SQLite store in a temp COVIDCT_HOME)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT

DAG_ID = "covid_ct_scoring"


@pytest.fixture(scope="module")
def dag():
    from support.dags import fresh

    return fresh(DAG_ID)  # its own: this module's dag.test() runs


def test_three_tasks_one_spark_submit_on_spark_default(dag):
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    downstream = {t.task_id: set(t.downstream_task_ids) for t in dag.tasks}
    assert downstream == {"check_folder": {"champion"}, "champion": {"score"}, "score": set()}
    spark_tasks = [t for t in dag.tasks if isinstance(t, SparkSubmitOperator)]
    assert [t.task_id for t in spark_tasks] == ["score"]
    score = dag.task_dict["score"]
    assert score._conn_id == "spark_default" and Path(score.application) == ROOT / "jobs" / "score.py"
    args = score.application_args
    assert "check_folder" in args[args.index("--images") + 1]  # the vetted folder, never the raw param
    assert all(t.execution_timeout for t in dag.tasks) and dag.dagrun_timeout
    assert all(t.retries >= 2 for t in dag.tasks) and dag.max_active_runs == 1 and dag.catchup is False


def test_scheduled_on_the_champion_asset(dag):
    from covidct.orchestration.assets import CHAMPION_ASSET

    assets = dag.timetable.asset_condition.objects  # what the promote task emits, and nothing else
    assert [(a.name, a.uri) for a in assets] == [(CHAMPION_ASSET.name, CHAMPION_ASSET.uri)]


def test_the_folder_param_schema_refuses_what_is_not_a_plain_absolute_path(dag):
    from airflow.sdk.exceptions import ParamValidationError

    assert dag.params.validate()["folder"] is None and dag.params.get_param("folder").description
    for good in ("/data/incoming/2026-11-26", ""):
        candidate = copy.deepcopy(dag.params)
        candidate.update({"folder": good})
        assert candidate.validate()["folder"] == good
    for bad in ("relative/scans", "/data/../etc", "/data/$(id)", "-rf", "/data/a b", "{{ 7*7 }}", 5):
        with pytest.raises(ParamValidationError):
            candidate = copy.deepcopy(dag.params)
            candidate.update({"folder": bad})
            candidate.validate()


def test_the_window_param_is_level_comma_width_and_reaches_the_job_as_one_argument(dag):
    from airflow.sdk.exceptions import ParamValidationError

    assert dag.params.validate()["window"] == "-600,1500" and dag.params.get_param("window").description
    for good in ("40,400", "-550.5,1400"):
        candidate = copy.deepcopy(dag.params)
        candidate.update({"window": good})
        assert candidate.validate()["window"] == good
    for bad in ("-600", "-600,1500 --strict", "a,b", "-600;1500", "", 5):
        with pytest.raises(ParamValidationError):
            candidate = copy.deepcopy(dag.params)
            candidate.update({"window": bad})
            candidate.validate()
    assert "--window={{ params.window }}" in dag.get_task("score").application_args


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A COVIDCT_HOME with its own embedded MLflow store; nothing allowed beyond its incoming folder."""
    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
    for var in ("MLFLOW_TRACKING_URI", "COVIDCT_INCOMING_DIR", "COVIDCT_ALLOWED_SCORING_DIRS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


def register_champion(model_dir: Path, tmp_path: Path) -> str:
    """``model_dir`` logged with MLflow's Spark flavour, registered as ``covid-ct`` and made its champion."""
    import mlflow
    import mlflow.spark
    from pyspark.ml import PipelineModel

    from covidct.lifecycle import job_logging, registry, store

    client = store.client()
    with mlflow.start_run(experiment_id=store.experiment_id(client), run_name="champion fixture"):
        info = mlflow.spark.log_model(
            PipelineModel.load(model_dir.as_uri()),
            "model",
            dfs_tmpdir=str(tmp_path / "dfs"),
            pip_requirements=list(job_logging.PIP_REQUIREMENTS),
        )
    version = registry.register(info.model_uri, {"covidct.model": "ResNet50 (test)"}, client)
    registry.set_champion(version, client)
    return version


def states_of(dagrun) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dagrun.get_task_instances()}


@pytest.mark.slow
def test_scores_the_incoming_folder_with_the_champion(airflow_db, dag, home, spark, small_model, small_dataset,
                                                      tmp_path, capfd):  # fmt: skip
    from covidct.core import paths
    from dicom_files import series_folder, write_ct
    from test_dicom import assert_no_patient_data, shipped

    version = register_champion(small_model, tmp_path)
    incoming = home / "incoming"  # the operator's default folder: an empty param scores it
    incoming.mkdir(parents=True)
    for folder in ("CT_COVID", "CT_NonCOVID"):
        for source in sorted((small_dataset / folder).iterdir())[:2]:
            shutil.copy(source, incoming / source.name)
    (incoming / "notes.txt").write_text("not a scan")
    # A DICOM export beside the pictures: a CT series, a JPEG 2000 CT (pydicom's), an MR slice, a broken slice.
    slices = series_folder(incoming / "dicom" / "series", 3)
    shutil.copy(shipped("693_J2KI.dcm"), incoming / "dicom" / "j2k.dcm")
    mr = write_ct(incoming / "dicom" / "mr.dcm", np.zeros((8, 8)), series="1.2.3", study="1.2.3", modality="MR")
    (incoming / "dicom" / "broken.dcm").write_bytes(slices[0].read_bytes()[:2000])
    capfd.readouterr()
    dagrun = dag.test(run_conf={"window": "-550,1400"})
    assert states_of(dagrun) == {"check_folder": "success", "champion": "success", "score": "success"}
    out = paths.run_scores_dir(dagrun.run_id)
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert len(predictions) == 4 + 3 + 1 and predictions.new.all()
    assert set(predictions.model_name) == {"covid-ct"} and set(predictions.model_version) == {version}
    assert predictions.window.dropna().tolist() == ["L-550_W1400"] * 4  # the param reached the job
    series = pd.read_parquet(out / "series.parquet")
    assert sorted(series.slices) == [1, 3] and set(series.window) == {"L-550_W1400"}
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["files"], summary["scored_new"], summary["unreadable"]) == (5 + 6, 4 + 4, 3)
    reasons = {Path(u["path"]).name: u["reason"] for u in summary["unreadable_files"]}
    assert reasons.pop("notes.txt") == "not a recognised image format"
    assert reasons.pop(mr.name) == "DICOM modality MR, not CT: not scored"
    assert "its pixel data (Explicit VR Little Endian) cannot be decoded" in reasons.pop("broken.dcm")
    assert not reasons
    assert_no_patient_data(out, text="".join(capfd.readouterr()))  # the outputs, and the tasks' logs
    assert (home / "scores" / "_champions" / f"covid-ct-v{version}").is_dir()  # downloaded once, reused


@pytest.mark.slow
def test_a_folder_outside_the_allowlist_fails_the_run_before_any_spark_job(airflow_db, dag, home):
    dagrun = dag.test(run_conf={"folder": "/etc"})
    assert states_of(dagrun) == {"check_folder": "failed", "champion": "upstream_failed", "score": "upstream_failed"}
    check = next(ti for ti in dagrun.get_task_instances() if ti.task_id == "check_folder")
    assert check.try_number == 1  # refused: not retried
    assert not (home / "scores").exists()


def test_check_folder_and_champion_say_what_is_wrong(home, tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from covidct.orchestration import scoring_tasks

    with pytest.raises(AirflowFailException, match=r"refused trigger params: folder '/etc' .*ALLOWED_SCORING_DIRS"):
        scoring_tasks.check_folder_param("/etc")
    with pytest.raises(AirflowFailException, match="folder of scans .*/incoming/later does not exist"):
        scoring_tasks.check_folder_param(str(home / "incoming" / "later"))
    assert scoring_tasks.check_folder_param(None) == str((home / "incoming").resolve())  # created: an empty inbox
    with pytest.raises(AirflowFailException, match="no champion model yet: registered model 'covid-ct' has no"):
        scoring_tasks.resolve_champion(tmp_path / "dest")
