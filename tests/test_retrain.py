"""Retrain on change (issue 12): the fingerprint, the last successful run's record, the skip, force, new images."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from synthetic import encode, make_image

DAG_ID = "covid_ct_transfer_learning"
PARAMS = {
    "backbones": ["VGG16"],
    "splits": ["official"],
    "seed": 42,
    "seeds": None,
    "weights": "none",
    "pooling": "avg",
    "precision": "float32",
    "stacked": False,
    "data_source": None,
    "expect_covid": 12,
    "expect_noncovid": 12,
    "feature_cache": True,
    "force": False,
}


@pytest.fixture
def data(small_dataset, tmp_path) -> Path:
    """A writable copy of the synthetic dataset."""
    return Path(shutil.copytree(small_dataset, tmp_path / "COVID-CT"))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def add_images(data: Path, n: int, seed: int = 99) -> list[str]:
    """``n`` new COVID images (new content) in ``data``, listed in the official train list."""
    rng = np.random.default_rng(seed)
    names = [f"new-{seed}-{i}%0.png" for i in range(n)]
    for i, name in enumerate(names):
        (data / "CT_COVID" / name).write_bytes(encode(make_image(1, 100 + i, rng), "PNG"))
    with open(data / "Data-split" / "COVID" / "trainCT_COVID.txt", "a") as lists:
        lists.write("".join(name + "\n" for name in names))
    return names


# --------------------------------------------------------------------------- the fingerprint


def test_the_fingerprint_changes_with_what_determines_a_model_and_only_that(data, monkeypatch):
    from covidct.data.image import preprocessing_id
    from covidct.lifecycle import fingerprint

    base = fingerprint.compute(data, PARAMS)
    assert base.complete and base.digest == fingerprint.compute(data, dict(PARAMS)).digest
    assert set(base.components) == set(fingerprint.COMPONENTS)
    assert base.components["weights"] == {"VGG16": "random-seed42"}
    assert {"pyspark", "tensorflow", "keras"} <= base.components["code"]["libraries"].keys()
    # Params that cannot change a model leave it alone.
    for key, value in {"force": True, "feature_cache": False, "data_source": "/elsewhere", "expect_covid": 13,
                       "near_duplicates": "fail"}.items():  # fmt: skip
        assert fingerprint.compute(data, {**PARAMS, key: value}).digest == base.digest, key
    # Params that can change one change it, and say how.
    pooled = fingerprint.compute(data, {**PARAMS, "pooling": "avg-b345"})
    assert pooled.digest != base.digest
    assert pooled.differences(base.components) == ["params (pooling: 'avg' -> 'avg-b345')"]
    stacked = fingerprint.compute(data, {**PARAMS, "stacked": True})  # another ensemble model
    assert stacked.differences(base.components) == ["params (stacked: False -> True)"]
    reseeded = fingerprint.compute(data, {**PARAMS, "seed": 7})
    assert reseeded.differences(base.components) == [
        "params (seed: 42 -> 7)",
        "weights (VGG16: 'random-seed42' -> 'random-seed7')",
    ]
    # The preprocessing: the decoding's version, the view of the picture, flips.
    with monkeypatch.context() as patch:
        patch.setattr(fingerprint, "preprocessing_id", lambda view, flips: "pil-rgb-bilinear-v2")
        assert fingerprint.compute(data, PARAMS).differences(base.components) == ["preprocessing"]
    viewed = fingerprint.compute(data, {**PARAMS, "view": "body-blank", "flips": True})
    assert viewed.components["preprocessing"] == preprocessing_id("body-blank", True)
    assert viewed.differences(base.components)[-1] == "preprocessing" and viewed.digest != base.digest
    # One image's content (same name), then a split list.
    victim = sorted((data / "CT_NonCOVID").iterdir())[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    changed = fingerprint.compute(data, PARAMS)
    assert changed.differences(base.components) == ["dataset"]
    lists = data / "Data-split" / "NonCOVID"
    test_list, val_list = lists / "testCT_NonCOVID.txt", lists / "valCT_NonCOVID.txt"
    moved, *kept = test_list.read_text().splitlines()
    test_list.write_text("".join(name + "\n" for name in kept))
    val_list.write_text(val_list.read_text() + moved + "\n")
    assert fingerprint.compute(data, PARAMS).digest not in (base.digest, changed.digest)


def test_weights_not_on_this_machine_make_an_incomplete_fingerprint(data, tmp_path, monkeypatch):
    from covidct.lifecycle import fingerprint

    monkeypatch.setenv("COVIDCT_WEIGHTS_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    found = fingerprint.compute(data, {**PARAMS, "weights": "imagenet"})
    assert not found.complete and found.components["weights"]["VGG16"].startswith("unknown (")
    decision = fingerprint.decide_retrain(found, last={"run_id": "r1", "fingerprint": found.digest, "components": {}})
    assert decision.retrain and "weights are not on this machine yet" in decision.reason


# --------------------------------------------------------------------------- decision and record


def successful_run(home: Path, run_id: str, found) -> Path:
    from covidct.core import paths
    from covidct.lifecycle import fingerprint

    run_dir = paths.run_dir(run_id)
    fingerprint.write_run_fingerprint(run_dir, found, fingerprint.decide_retrain(found))
    (run_dir / "report").mkdir(parents=True)
    (run_dir / "report" / "report.html").write_text("<html></html>")
    fingerprint.record_last_success(run_id, run_dir, run_dir / "report" / "report.html")
    return run_dir


def test_unchanged_force_changed_and_gone(data, home):
    from covidct.lifecycle import fingerprint

    found = fingerprint.compute(data, PARAMS)
    first = fingerprint.decide_retrain(found)
    assert first.retrain and first.reason == "retraining: no successful run recorded yet"
    run_dir = successful_run(home, "r1", found)
    record = json.loads(fingerprint.state_path().read_text())
    assert record["run_id"] == "r1" and record["fingerprint"] == found.digest

    unchanged = fingerprint.decide_retrain(found)
    assert not unchanged.retrain and unchanged.reason.startswith("unchanged since run r1 (succeeded ")
    assert "param force retrains" in unchanged.reason
    forced = fingerprint.decide_retrain(found, force=True)
    assert forced.retrain and forced.reason.startswith("retraining: param force is set (unchanged since run r1")
    other = fingerprint.compute(data, {**PARAMS, "splits": ["official", "random70"]})
    changed = fingerprint.decide_retrain(other)
    assert changed.retrain and changed.reason.startswith("retraining: changed since run r1: params (splits: ")
    # The unchanged run's result page names the run whose models stand.
    report = fingerprint.write_unchanged_report(home / "runs" / "r2", unchanged)
    assert "Unchanged since run r1" in report.read_text() and "<html" in report.read_text()
    assert "Unchanged since run r1" in (report.parent / "report.md").read_text()
    # Its outputs deleted: retrain.
    shutil.rmtree(run_dir)
    gone = fingerprint.decide_retrain(found)
    assert gone.retrain and "its outputs are gone" in gone.reason
    # An unreadable record counts as none.
    fingerprint.state_path().write_text("{not json")
    assert fingerprint.last_success() is None and fingerprint.decide_retrain(found).retrain


def test_the_record_is_written_atomically_and_one_writer_at_a_time(data, home, monkeypatch):
    from covidct.core import atomic, locks
    from covidct.lifecycle import fingerprint

    found = fingerprint.compute(data, PARAMS)
    successful_run(home, "r1", found)
    path = fingerprint.state_path()
    # A writer that fails mid-way leaves the previous record whole, and no temporary file.
    run2 = home / "runs" / "r2"
    fingerprint.write_run_fingerprint(run2, found, fingerprint.decide_retrain(found))

    def broken_replace(src, dst):
        raise OSError("disk full")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="disk full"):
        patch.setattr(atomic.os, "replace", broken_replace)
        fingerprint.record_last_success("r2", run2, run2 / "report.html")
    assert json.loads(path.read_text())["run_id"] == "r1"
    assert not list(path.parent.glob(f".{path.name}.tmp-*"))

    # While another process holds the lock, a writer waits, then writes.
    done = threading.Event()
    with locks.locked(path, what="test"):
        writer = threading.Thread(target=lambda: (fingerprint.record_last_success("r2", run2, run2 / "x"), done.set()))
        writer.start()
        time.sleep(1.0)
        assert not done.is_set() and json.loads(path.read_text())["run_id"] == "r1"
    writer.join(timeout=30)
    assert done.is_set() and json.loads(path.read_text())["run_id"] == "r2"

    # Many writers at once: a whole record of one of them.
    runs = [f"c{i}" for i in range(8)]
    for run_id in runs:
        fingerprint.write_run_fingerprint(home / "runs" / run_id, found, fingerprint.decide_retrain(found))
    threads = [threading.Thread(target=fingerprint.record_last_success, args=(r, home / "runs" / r, "x")) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert json.loads(path.read_text())["run_id"] in runs
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no lock or temporary file left


def test_a_run_with_a_failed_task_is_not_recorded(home):
    from airflow.sdk.exceptions import AirflowSkipException

    from covidct.lifecycle import fingerprint
    from covidct.orchestration import pipeline

    states = {"fetch_dataset": "success", "train_vgg16": "success", "train_vgg19": "failed", "report": "success",
              "record_success": "running"}  # fmt: skip
    with pytest.raises(AirflowSkipException, match="train_vgg19 did not succeed; the next run retrains"):
        pipeline.record_success("r1", states)
    assert not fingerprint.state_path().exists()


def test_data_that_passed_validation_are_not_validated_again(data):
    from covidct.data.validate import passed_before, validate
    from covidct.orchestration import pipeline

    assert passed_before(data, 12, 12) is None  # never validated
    assert validate(data, 12, 12).success
    result = data / "validation" / "result.json"
    first = json.loads(result.read_text())
    assert passed_before(data, 12, 12)["validated_at"] == first["validated_at"]
    assert passed_before(data, 13, 12) is None  # other expectations
    time.sleep(1.1)  # validated_at has one-second resolution
    pipeline.validate_dataset(str(data), 12, 12)
    assert json.loads(result.read_text())["validated_at"] == first["validated_at"]  # not repeated
    add_images(data, 1)
    assert passed_before(data, 12, 12) is None  # other data (and these would now fail)
    pipeline.validate_dataset(str(data), 13, 12)
    assert json.loads(result.read_text())["validated_at"] != first["validated_at"]  # validated again


# --------------------------------------------------------------------------- end to end (dag.test)


@pytest.fixture(scope="module")
def dag():
    from support.dags import fresh

    return fresh()  # its own: this module's dag.test() runs


def run_dag(dag, conf: dict):
    from airflow.utils.state import DagRunState

    dagrun = dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in dagrun.get_task_instances()}
    return dagrun, states, dagrun.state == DagRunState.SUCCESS


@pytest.mark.slow
def test_unchanged_data_skip_training_force_retrains_and_new_images_are_the_only_ones_featurized(
    airflow_db, dag, data, home, monkeypatch
):
    from covidct.core import paths
    from covidct.lifecycle import fingerprint
    from covidct.orchestration.local.runner import summary

    monkeypatch.setenv("COVIDCT_ALLOWED_SOURCES", str(data))
    conf = {"data_source": str(data), "weights": "none", "backbones": ["VGG16"], "splits": ["official"],
            "expect_covid": 12, "expect_noncovid": 12}  # fmt: skip

    def metrics(run) -> dict:
        return json.loads((paths.run_dir(run.run_id) / "vgg16" / "metrics.json").read_text())

    first, states, ok = run_dag(dag, conf)
    assert ok and states["train_vgg16"] == "success" and states["record_success"] == "success", states
    assert metrics(first)["cache"]["misses"] == 24
    assert fingerprint.last_success()["run_id"] == first.run_id

    # The same data and params again: green, nothing trained, and it says since which run.
    again, states, ok = run_dag(dag, conf)
    assert ok, states
    assert {t: s for t, s in states.items() if s != "skipped"} == dict.fromkeys(
        ("fetch_dataset", "validate_dataset", "check_changes"), "success"
    )
    assert {"train_vgg16", "ensemble", "report", "record_success"} <= {t for t, s in states.items() if s == "skipped"}
    assert not (paths.run_dir(again.run_id) / "vgg16").exists()
    own = fingerprint.read_run_fingerprint(paths.run_dir(again.run_id))
    assert own["retrain"] is False and own["reason"].startswith(f"unchanged since run {first.run_id}")
    report = paths.run_dir(again.run_id) / "report" / "report.html"
    assert f"Unchanged since run {first.run_id}" in report.read_text()
    screen = summary(dag, again, {}, 1.0, Path("make-run.log"))  # what `make run` prints
    assert f"unchanged since run {first.run_id}" in screen and f"report: {report}" in screen
    assert fingerprint.last_success()["run_id"] == first.run_id  # still the run whose models stand

    # force: retrains, every feature from the cache.
    forced, states, ok = run_dag(dag, {**conf, "force": True})
    assert ok and states["train_vgg16"] == "success", states
    assert (metrics(forced)["cache"]["hits"], metrics(forced)["cache"]["misses"]) == (24, 0)
    assert fingerprint.read_run_fingerprint(paths.run_dir(forced.run_id))["reason"].startswith(
        "retraining: param force is set"
    )
    assert fingerprint.last_success()["run_id"] == forced.run_id

    # Two new images: retrains, and featurizes only those two.
    add_images(data, 2)
    # (force named: dag.test() in one process keeps the last run's conf values in the DAG's params)
    grown, states, ok = run_dag(dag, {**conf, "expect_covid": 14, "force": False})
    assert ok and states["train_vgg16"] == "success", states
    m = metrics(grown)
    assert m["n_images"] == 26 and (m["cache"]["hits"], m["cache"]["misses"]) == (24, 2)
    reason = fingerprint.read_run_fingerprint(paths.run_dir(grown.run_id))["reason"]
    assert reason == f"retraining: changed since run {forced.run_id}: dataset"
    assert fingerprint.last_success()["run_id"] == grown.run_id
