"""MLflow tracking, the registry and the promotion gate: a real MLflow (SQLite store in a temp
COVIDCT_HOME), real Spark models, real Airflow ``dag.test()`` runs with the champion asset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from support.net import free_port

DAG_ID = "covid_ct_transfer_learning"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A COVIDCT_HOME of its own, tracking on, the embedded SQLite store (no MLFLOW_TRACKING_URI)."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("home")
        mp.setenv("COVIDCT_HOME", str(folder))
        mp.setenv("COVIDCT_TRACKING", "on")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for var in ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TASK_ID", "AIRFLOW_CTX_TRY_NUMBER"):
            mp.delenv(var, raising=False)
        yield folder


def test_tracking_uri_is_the_embedded_store_unless_mlflow_tracking_uri_says_otherwise(monkeypatch, tmp_path):
    from covidct.lifecycle import links, runs, store

    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store.tracking_uri() == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert store.artifact_root() == (tmp_path / "mlflow" / "artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert store.tracking_uri() == "http://127.0.0.1:5999" and store.artifact_root() is None
    assert links.ui_url() == "http://127.0.0.1:5999"
    # The Airflow task context comes from the AIRFLOW_CTX_* variables Airflow exports (spark-submit inherits them).
    env = {"AIRFLOW_CTX_DAG_ID": "d", "AIRFLOW_CTX_DAG_RUN_ID": "manual__x", "AIRFLOW_CTX_TASK_ID": "train_vgg16"}
    assert runs.airflow_context(env) == {"airflow.dag_id": "d", "airflow.run_id": "manual__x",
                                             "airflow.task_id": "train_vgg16"}  # fmt: skip
    assert runs.airflow_context({}) == {}
    monkeypatch.setenv("COVIDCT_TRACKING", "off")
    assert not store.enabled()


# --------------------------------------------------------------------------- a Spark model in MLflow


@pytest.fixture(scope="module")
def logged_model(home, spark, tmp_path_factory):
    """A small fitted PipelineModel logged with MLflow's Spark flavour: ``(model_uri, model, frame)``."""
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.linalg import Vectors

    from covidct.lifecycle import job_logging, store

    client = store.client()
    import mlflow
    import mlflow.spark

    rows = [(Vectors.dense([float(i % 2) + 0.1 * i, 1.0 - (i % 2)]), float(i % 2)) for i in range(12)]
    frame = spark.createDataFrame(rows, ["features", "label"])
    model = Pipeline(stages=[LogisticRegression(maxIter=5, labelCol="label")]).fit(frame)
    with mlflow.start_run(experiment_id=store.experiment_id(client), run_name="fixture"):
        info = mlflow.spark.log_model(
            model,
            "model",
            dfs_tmpdir=str(tmp_path_factory.mktemp("dfs")),
            pip_requirements=list(job_logging.PIP_REQUIREMENTS),
        )
    return info.model_uri, model, frame


def test_a_logged_pipeline_model_loads_back_with_mlflow_spark(logged_model):
    import mlflow.spark

    uri, model, frame = logged_model
    loaded = mlflow.spark.load_model(uri)
    ours = [r.probability[1] for r in model.transform(frame).select("probability").collect()]
    theirs = [r.probability[1] for r in loaded.transform(frame).select("probability").collect()]
    assert theirs == pytest.approx(ours, abs=1e-12)


# --------------------------------------------------------------------------- the promotion gate

N_PATIENTS = 40


def official_test_set(seed: int = 0) -> pd.DataFrame:
    """80 official test images of 40 patients (two slices each), half COVID."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(N_PATIENTS):
        label = p % 2
        folder = "CT_COVID" if label else "CT_NonCOVID"
        base = rng.normal(0.72 if label else 0.30, 0.15)
        for s in range(2):
            rows.append({"relpath": f"{folder}/patient{p}%{s}.png", "label": label,
                         "probability": float(np.clip(base + rng.normal(0, 0.05), 0.001, 0.999))})  # fmt: skip
    return pd.DataFrame(rows)


def fake_run(run_dir: Path, predictions: pd.DataFrame, model_uri: str, random_weights: bool = False) -> Path:
    """A run folder as the gate finds it: vgg16/official/{metrics.json, predictions.parquet}, vgg16/mlflow.json."""
    from sklearn.metrics import roc_auc_score

    folder = run_dir / "vgg16" / "official"
    folder.mkdir(parents=True)
    frame = predictions.assign(
        path=lambda f: "/data/" + f["relpath"], prediction=lambda f: (f["probability"] > 0.5).astype(int)
    )
    frame.to_parquet(folder / "predictions.parquet", index=False)
    metrics = {
        "backbone": "VGG16",
        "split": "official",
        "auc": float(roc_auc_score(frame["label"], frame["probability"])),
        "random_weights": random_weights,
        "weights_id": "random-seed42" if random_weights else "sha256:abc",
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "vgg16" / "mlflow.json").write_text(json.dumps({"models": {"official": model_uri}}))
    return run_dir


def test_gate_random_weights_never_first_run_promotes_worse_kept_not_worse_promoted(home, logged_model, tmp_path):
    """The gate's four decisions, in order, on one registry (each step sees the champion of the one before)."""
    from covidct.lifecycle import promotion, registry, runs, store

    uri = logged_model[0]
    client = store.client()
    parent = runs.parent_run(DAG_ID, "manual__gate-test")
    # The embedded store keeps its artifacts under COVIDCT_HOME (not ./mlruns), and MLflow's own
    # export of MLFLOW_TRACKING_URI does not outlive client() (it would pin a later COVIDCT_HOME).
    artifacts = client.get_experiment(store.experiment_id(client)).artifact_location
    assert artifacts == (home / "mlflow" / "artifacts").as_uri() and "MLFLOW_TRACKING_URI" not in os.environ
    good = official_test_set()

    # Random weights are never promoted, not even when there is no champion yet.
    decision = promotion.promote(fake_run(tmp_path / "r0", good, uri, random_weights=True), parent)
    assert not decision.promoted and "random weights" in decision.reason
    assert registry.champion_version() is None and registry.champion(tmp_path / "dl") is None

    # The first run promotes.
    decision = promotion.promote(fake_run(tmp_path / "r1", good, uri), parent)
    assert decision.promoted and decision.version == "1" and "first champion" in decision.reason
    assert str(registry.champion_version().version) == "1"
    assert json.loads((tmp_path / "r1" / "promotion.json").read_text())["promoted"] is True

    # Worse on the same images (scores that barely separate the classes): the champion stays.
    rng = np.random.default_rng(1)
    worse = good.assign(probability=np.clip(0.5 + 0.2 * (good["probability"] - 0.5) + rng.normal(0, 0.12, len(good)),
                                            0.001, 0.999))  # fmt: skip
    decision = promotion.promote(fake_run(tmp_path / "r2", worse, uri), parent)
    assert not decision.promoted, decision
    assert decision.n_common == len(good) and decision.n_patients == N_PATIENTS
    assert decision.auc_challenger < decision.auc_champion and decision.ci_low < -promotion.TOLERANCE
    assert str(registry.champion_version().version) == "1"

    # Not worse (the same scores, slightly perturbed): promoted, a new version becomes the champion.
    better = good.assign(probability=np.clip(good["probability"] + rng.normal(0, 0.005, len(good)), 0.001, 0.999))
    decision = promotion.promote(fake_run(tmp_path / "r3", better, uri), parent)
    assert decision.promoted and decision.version == "2", decision
    assert decision.ci_low >= -promotion.TOLERANCE and abs(decision.delta) < 0.02
    assert str(registry.champion_version().version) == "2"

    # The decision and its numbers are tags of the DAG run's MLflow run.
    tags = client.get_run(parent).data.tags
    assert tags["covidct.promotion.decision"] == "promoted" and tags["covidct.promotion.version"] == "2"
    assert float(tags["covidct.promotion.ci_low"]) == pytest.approx(decision.ci_low, abs=1e-4)
    version = client.get_model_version(registry.REGISTERED_MODEL, "2")
    assert version.tags[promotion.GATE_PREDICTIONS_TAG].startswith(f"runs:/{parent}/")

    # champion(dest): the champion as a local PipelineModel folder, reused when downloaded already.
    from pyspark.ml import PipelineModel

    found = registry.champion(tmp_path / "dl")
    assert (found.name, found.version) == ("covid-ct", "2") and found.model_dir.name == "sparkml"
    assert isinstance(PipelineModel.load(found.model_dir.as_uri()), PipelineModel)
    assert registry.champion(tmp_path / "dl").model_dir == found.model_dir


def test_an_ensemble_champion_downloads_as_its_ensemble_folder(tmp_path, monkeypatch):
    """The ensemble task's run holds the ensemble folder as a pyfunc model; as champion, champion(dest)
    gives that folder back (what covidct.inference.predict takes), under the DAG run's parent run."""
    from covidct.lifecycle import pyfunc, registry, runs, store

    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COVIDCT_TRACKING", "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ids = {"AIRFLOW_CTX_DAG_ID": DAG_ID, "AIRFLOW_CTX_DAG_RUN_ID": "manual__ens", "AIRFLOW_CTX_TASK_ID": "ensemble"}
    for key, value in ids.items():
        monkeypatch.setenv(key, value)
    folder = tmp_path / "run" / "ensemble"
    (folder / "members" / "vgg16" / "metadata").mkdir(parents=True)
    manifest = {"format": 1, "method": "mean", "threshold": 0.5, "random_weights": False,
                "members": [{"backbone": "VGG16", "model": "members/vgg16", "weights_id": "sha256:abc"}]}  # fmt: skip
    (folder / "ensemble.json").write_text(json.dumps(manifest))
    logged = pyfunc.log_ensemble(folder, {"official": {"mean": {"accuracy": 0.8, "auc": 0.9, "n_test": 20}}})
    assert logged.parent_run_id == runs.parent_run(DAG_ID, "manual__ens")
    run = store.client().get_run(logged.run_id)
    assert run.data.metrics["official/mean/auc"] == 0.9 and run.data.tags["airflow.task_id"] == "ensemble"
    registry.set_champion(registry.register(logged.models["ensemble"], {"covidct.kind": "ensemble"}))
    champion = registry.champion(tmp_path / "dl")
    assert (
        champion.model_dir.name == "ensemble"
        and json.loads((champion.model_dir / "ensemble.json").read_text()) == manifest
    )
    assert (champion.model_dir / "members" / "vgg16" / "metadata").is_dir()


def test_paired_bootstrap_interval_brackets_the_difference():
    from covidct.lifecycle.promotion import paired_auc_difference

    frame = official_test_set(3)
    groups = [r.split("%")[0] for r in frame["relpath"]]
    same = paired_auc_difference(frame["label"], frame["probability"], frame["probability"], groups)
    assert same == (0.0, 0.0, 0.0)  # identical models: no difference in any resample
    flipped = 1 - frame["probability"]
    delta, low, high = paired_auc_difference(frame["label"], flipped, frame["probability"], groups)
    assert low <= delta <= high < 0


def test_sections_added_to_a_written_report_replace_themselves(tmp_path):
    from covidct.reporting.report import append_section, build_report
    from support.runs import make_run

    report = build_report([make_run(tmp_path / "run")], n_resamples=50)
    data = {"promoted": False, "reason": "possibly worse <b>", "challenger": "VGG19", "challenger_auc": 0.8812,
            "delta": -0.05, "champion": "covid-ct v1", "n_common": 203, "n_patients": 98, "auc_challenger": 0.83,
            "auc_champion": 0.88, "ci_low": -0.09, "ci_high": -0.01, "tolerance": 0.02, "version": None,
            "rule": "the rule"}  # fmt: skip
    for _ in range(2):
        append_section(report.out, "promotion", "promotion", data)
    html, md = report.html.read_text(), report.markdown.read_text()
    assert html.count("<h2>Promotion</h2>") == 1 and md.count("## Promotion") == 1
    assert html.index("<h2>Promotion</h2>") < html.index("</body>")
    assert "possibly worse &lt;b&gt;" in html and "[-0.0900, -0.0100]" in md
    assert json.loads(report.summary_json.read_text())["promotion"]["champion"] == "covid-ct v1"


# --------------------------------------------------------------------------- the DAG, end to end


def test_promote_follows_the_report_and_declares_the_champion_asset(dag):
    from datetime import timedelta

    from covidct.orchestration.assets import CHAMPION_ASSET

    promote = dag.task_dict["promote"]
    assert promote.upstream_task_ids == {"report"} and promote.trigger_rule == "all_success"
    assert promote.outlets == [CHAMPION_ASSET] and CHAMPION_ASSET.name == "covid_ct_champion"
    assert promote.execution_timeout == timedelta(minutes=10)


def _asset_events():
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        query = select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
        events = session.scalars(query.where(AssetModel.name == "covid_ct_champion")).all()
        return [(e.source_run_id, e.source_task_id, dict(e.extra or {})) for e in events]


@pytest.mark.slow
def test_dag_runs_log_nested_mlflow_runs_and_promote_a_champion_with_an_asset_event(
    trained_run, spark, tmp_path, monkeypatch
):
    """Run 1, the session's trained run (weights files: not random), logged parent + child runs and
    promoted v1 (asset event); run 2 (weights none, in the same home) is never promoted: the promote
    task skips, no event, v1 stays. Run 2 changes no champion, data or feature of run 1."""
    import mlflow.spark

    from covidct.core import paths
    from covidct.lifecycle import registry, runs, store
    from support.dags import fresh

    trained_run.use(monkeypatch)
    first_id = trained_run.run_id
    assert trained_run.states["promote"] == "success", trained_run.states
    client = store.client()
    exp = store.experiment_id(client)
    parent = runs.parent_run(DAG_ID, first_id)
    assert parent == trained_run.parent_run_id
    parent_tags = client.get_run(parent).data.tags
    assert parent_tags["airflow.run_id"] == first_id and parent_tags["covidct.promotion.decision"] == "promoted"
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    trains = {c.data.tags["airflow.task_id"]: c for c in children if c.data.tags.get("covidct.kind") == "train"}
    assert set(trains) == {"train_vgg16", "train_vgg19", "train_xception"}
    train = trains["train_vgg16"]
    assert train.data.tags["airflow.dag_id"] == DAG_ID
    run = trained_run.run_dir
    metrics = json.loads((run / "vgg16" / "official" / "metrics.json").read_text())
    assert train.data.params["backbone"] == "VGG16" and train.data.params["weights_id"] == metrics["weights_id"]
    assert train.data.params["lr.regParam"] == "0.05" and train.data.params["pooling"] == "avg"
    assert train.data.metrics["official/accuracy"] == pytest.approx(metrics["accuracy"])
    assert train.data.metrics["official/auc"] == pytest.approx(metrics["auc"])
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id, "official")}
    assert "official/metrics.json" in artifacts
    info = json.loads((run / "vgg16" / "mlflow.json").read_text())
    assert info["run_id"] == train.info.run_id and info["parent_run_id"] == parent
    assert mlflow.spark.load_model(info["models"]["official"]).stages[0].getModelName() == "VGG16"  # needs Spark
    assert 0 < info["seconds"] < 120, info  # what logging took in the job (docs/mlflow-and-scoring.md)
    # The report names the MLflow runs and the decision, and sits in the parent run.
    html = (run / "report" / "report.html").read_text()
    assert "<h2>MLflow runs</h2>" in html and train.info.run_id in html and "<h2>Promotion</h2>" in html
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent, "report")}
    # The registry's champion, the asset event with its extra, and the champion usable by predict.
    assert trained_run.champion_version == "1" and str(registry.champion_version().version) == "1"
    events = [e for e in _asset_events() if e[0] == first_id]
    assert [(r, t) for r, t, _ in events] == [(first_id, "promote")]
    assert events[0][2]["version"] == "1" and events[0][2]["name"] == "covid-ct"
    champion = registry.champion(tmp_path / "champion")
    import subprocess
    import sys

    # covidct predict takes the champion's folder as it is (its own Spark: workers see COVIDCT_WEIGHTS_DIR).
    out = tmp_path / "scores.csv"
    command = [sys.executable, "-m", "covidct.cli", "predict", "--model", str(champion.model_dir), "--images",
               str(trained_run.data_source / "CT_COVID"), "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = pd.read_csv(out)
    assert len(scores) == 12 and scores["probability_covid"].between(0, 1).all()

    # Run 2: random weights, one backbone and split (a fresh parse: dag.test() keeps a run's conf in its DAG).
    dag = fresh()
    before = len(_asset_events())
    conf = {**trained_run.conf, "backbones": ["VGG16"], "splits": ["official"], "weights": "none", "stacked": False}
    second = dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in second.get_task_instances()}
    assert states["report"] == "success" and states["promote"] == "skipped", states
    assert len(_asset_events()) == before  # no event for a run that did not promote
    assert str(registry.champion_version().version) == "1"
    second_dir = paths.run_dir(second.run_id)
    decision = json.loads((second_dir / "promotion.json").read_text())
    assert decision["promoted"] is False and "random weights" in decision["reason"]
    # Random weights: flagged in the report, no gallery of maps (they would show nothing).
    assert json.loads((second_dir / "vgg16" / "metrics.json").read_text())["random_weights"] is True
    assert "RANDOM WEIGHTS" in (second_dir / "report" / "report.html").read_text()
    summary = json.loads((second_dir / "report" / "summary.json").read_text())
    assert all(split["gallery"] is None for split in summary["splits"].values())
    assert os.environ.get("COVIDCT_TRACKING") == "on"


@pytest.mark.slow
def test_a_failed_dag_run_leaves_no_mlflow_run_open(airflow_db, small_dataset, tmp_path, monkeypatch):
    """The run's only backbone fails (its weights are missing), so ensemble and report fail and promote never
    runs: the parent run select_backbones opened ends FAILED, naming a failed task (it stayed RUNNING)."""
    from airflow.utils.state import DagRunState

    from covidct.lifecycle import runs, store
    from support.dags import fresh

    for var, value in (("COVIDCT_HOME", tmp_path / "home"), ("COVIDCT_TRACKING", "on"),
                       ("COVIDCT_ALLOWED_SOURCES", small_dataset), ("COVIDCT_WEIGHTS_DIR", tmp_path / "no-weights"),
                       ("KERAS_HOME", tmp_path / "keras"), ("COVIDCT_WEIGHTS_URL", "http://127.0.0.1:9/")):  # fmt: skip
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "no-weights").mkdir()
    conf = {"data_source": str(small_dataset), "backbones": ["VGG16"], "splits": ["official"], "weights": "imagenet",
            "expect_covid": 12, "expect_noncovid": 12}  # fmt: skip
    dagrun = fresh(DAG_ID).test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in dagrun.get_task_instances()}
    assert dagrun.state == DagRunState.FAILED and states["promote"] == "upstream_failed", states
    client = store.client()
    [parent] = client.search_runs([store.experiment_id(client)], f"tags.`{runs.TAG_KIND}` = 'dag_run'")
    assert parent.info.status == "FAILED" and parent.data.tags[runs.TAG_RUN_ID] == dagrun.run_id
    named = parent.data.tags[runs.TAG_FAILED_TASKS]
    assert states[named] == "failed", (named, states)  # Airflow's last failed task instance
    running = client.search_runs([store.experiment_id(client)], "attributes.status = 'RUNNING'")
    assert running == []


# --------------------------------------------------------------------------- make mlflow-ui


@pytest.mark.slow
def test_make_mlflow_ui_serves_the_store_on_loopback_and_ctrl_c_stops_it(home, logged_model):
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from covidct.lifecycle import store
    from covidct.orchestration.local.launchers import mlflow_ui_command

    assert mlflow_ui_command()[mlflow_ui_command().index("--host") + 1] == "127.0.0.1"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "covidct.orchestration.local", "mlflow-ui", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal would start it
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, experiment = time.monotonic() + 150, None
        while time.monotonic() < deadline and experiment is None:
            time.sleep(2)
            try:
                url = f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={store.EXPERIMENT}"
                with urllib.request.urlopen(url, timeout=5) as response:
                    experiment = json.loads(response.read())["experiment"]
            except OSError:
                pass
        assert experiment is not None, "the MLflow UI never answered"
        with urllib.request.urlopen(f"{base}/", timeout=10) as response:
            assert "MLflow" in response.read().decode(errors="replace")  # the UI's page itself
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    assert "MLflow UI stopped." in output and "Traceback" not in output
    with pytest.raises(ProcessLookupError):  # nothing of its process group is left
        os.killpg(proc.pid, 0)
