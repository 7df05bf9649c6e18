"""The transfer-learning job through its CLI (``covidct train``) on a real local Spark."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from covidct.cli import main

METRIC_KEYS = {
    "backbone", "split", "seed", "weights", "pooling", "n_train", "n_test", "accuracy", "weightedPrecision",
    "weightedRecall", "f1", "auc", "sensitivity", "specificity", "confusion", "timings", "versions",
}  # fmt: skip


def train_args(data, out, *extra):
    return ["train", "--data", str(data), "--backbone", "VGG16", "--weights", "none", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def single_run(spark, small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vgg16"
    assert main(train_args(small_dataset, out, "--split", "random70", "--seed", "3", "--no-cache")) == 0
    return out


def test_writes_metrics_model_and_predictions(single_run):
    assert sorted(p.name for p in single_run.iterdir()) == [
        "cams.parquet",
        "evidence.parquet",
        "metrics.json",
        "model",
        "oof.parquet",
        "predictions.parquet",
    ]
    metrics = json.loads((single_run / "metrics.json").read_text())
    assert metrics.keys() >= METRIC_KEYS
    assert set(metrics["timings"]) == {"featurize_s", "fit_s", "evaluate_s", "save_s", "total_s"}
    assert set(metrics["versions"]) == {"spark", "tensorflow", "keras"}
    assert (metrics["backbone"], metrics["split"], metrics["seed"], metrics["pooling"]) == (
        "VGG16",
        "random70",
        3,
        "avg",
    )
    assert metrics["n_train"] + metrics["n_test"] == 24 and metrics["n_test"] == 7  # round(30 % of 24)
    predictions = pd.read_parquet(single_run / "predictions.parquet")
    assert list(predictions.columns) == ["path", "relpath", "label", "probability", "prediction", "weights_id"]
    assert len(predictions) == metrics["n_test"]
    assert predictions["probability"].between(0, 1).all()
    assert ((predictions["probability"] > 0.5).astype(int) == predictions["prediction"]).all()


def test_metric_identities(single_run):
    m = json.loads((single_run / "metrics.json").read_text())
    c = m["confusion"]
    assert c["tp"] + c["fp"] + c["tn"] + c["fn"] == m["n_test"]
    assert m["accuracy"] == pytest.approx((c["tp"] + c["tn"]) / m["n_test"])
    assert m["weightedRecall"] == pytest.approx(m["accuracy"])
    assert m["sensitivity"] == pytest.approx(c["tp"] / (c["tp"] + c["fn"]))
    assert m["specificity"] == pytest.approx(c["tn"] / (c["tn"] + c["fp"]))
    predictions = pd.read_parquet(single_run / "predictions.parquet")
    assert c["tp"] == int(((predictions.label == 1) & (predictions.prediction == 1)).sum())


def test_random_weights_are_recorded_in_every_output(single_run):
    m = json.loads((single_run / "metrics.json").read_text())
    assert m["random_weights"] is True and m["weights"] == "none" and m["weights_id"] == "random-seed3"
    assert set(pd.read_parquet(single_run / "predictions.parquet")["weights_id"]) == {"random-seed3"}
    stage_meta = next((single_run / "model" / "stages").glob("0_*/metadata/part-*")).read_text()
    assert '"weights":"none"' in stage_meta


def test_saved_model_classifies_new_images(single_run, small_dataset, tmp_path, capsys):
    new = tmp_path / "new"
    new.mkdir()
    for source in sorted((small_dataset / "CT_COVID").iterdir())[:2]:
        shutil.copy(source, new / source.name)
    out_csv = tmp_path / "predictions.csv"
    assert main(["predict", "--model", str(single_run / "model"), "--images", str(new), "--out", str(out_csv)]) == 0
    rows = pd.read_csv(out_csv)
    assert len(rows) == 2 and set(rows["prediction"]) <= {"COVID", "non-COVID"}


@pytest.mark.slow
def test_several_splits_share_one_featurization_through_the_cache(spark, small_dataset, tmp_path):
    out, cache = tmp_path / "both", tmp_path / "cache"
    args = train_args(small_dataset, out, "--split", "official,random70", "--cache-dir", str(cache))
    assert main(args) == 0
    for split in ("official", "random70"):
        m = json.loads((out / split / "metrics.json").read_text())
        assert m["split"] == split and m["cache"]["misses"] == 24 and m["cache"]["hits"] == 0
        assert (out / split / "model").is_dir() and (out / split / "predictions.parquet").is_dir()
    official = json.loads((out / "official" / "metrics.json").read_text())
    assert official["n_test"] == 6  # the synthetic lists: 3 + 3 test images
    # A second run on unchanged data featurizes nothing.
    assert main(args) == 0
    m = json.loads((out / "random70" / "metrics.json").read_text())
    assert m["cache"]["misses"] == 0 and m["cache"]["hits"] == 24


def test_official_clean_takes_officials_lr_the_one_it_would_fit_itself(spark, small_dataset, tmp_path):
    """official-clean leaves official's test images out, never its training images: the same LR, fitted once."""
    from pyspark.ml import PipelineModel

    cache = str(tmp_path / "cache")
    both, alone = tmp_path / "both", tmp_path / "alone"
    assert main(train_args(small_dataset, both, "--split", "official,official-clean", "--cache-dir", cache)) == 0
    assert main(train_args(small_dataset, alone, "--split", "official-clean", "--cache-dir", cache)) == 0
    shared = json.loads((both / "official-clean" / "metrics.json").read_text())
    own = json.loads((alone / "metrics.json").read_text())
    assert shared["lr_from"] == "official" and own["lr_from"] is None
    assert json.loads((both / "official" / "metrics.json").read_text())["lr_from"] is None
    lrs = [PipelineModel.load(str(folder / "model")).stages[1] for folder in (both / "official-clean", alone)]
    assert lrs[0].coefficients == lrs[1].coefficients and lrs[0].intercept == lrs[1].intercept
    assert {k: shared[k] for k in ("n_train", "n_test", "accuracy", "auc")} == {
        k: own[k] for k in ("n_train", "n_test", "accuracy", "auc")
    }


def test_undecodable_image_fails_cleanly_and_leaves_no_output(spark, small_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    victim = sorted((data / "CT_NonCOVID").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:100])
    out = tmp_path / "out"
    assert main(train_args(data, out, "--no-cache")) == 2
    err = capsys.readouterr().err
    assert f"error: cannot decode image file:{victim}" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left behind


def test_failure_keeps_the_previous_good_output(single_run, small_dataset, tmp_path, capsys):
    out = tmp_path / "kept"
    shutil.copytree(single_run, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(train_args(tmp_path / "missing-data", out)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backbone", "AlexNet"], "unknown backbone 'AlexNet'"),
        (["--split", "random80"], "unknown split 'random80'"),
        (["--max-iter", "0"], "must be positive"),
        (["--seeds", "9-0"], "invalid seed range '9-0'"),
        (["--seeds", "0-9;x"], "invalid seeds '0-9;x'"),
        (["--seeds", "3,3"], "seed 3 is given twice"),
        (["--seeds", "0-500"], "more than 100 seeds"),
        (["--seeds", "0-9", "--split", "official"], "--seeds repeats the random70 split"),
        (["--stack-folds", "1"], "stack folds must be 0 (off) or 2..20"),
    ],
)
def test_bad_arguments_are_one_line_errors(small_dataset, tmp_path, capsys, extra, message):
    assert main([*train_args(small_dataset, tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_missing_imagenet_weights_fail_before_any_spark_work(small_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COVIDCT_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("COVIDCT_WEIGHTS_URL", "http://127.0.0.1:9/")
    args = ["train", "--data", str(small_dataset), "--backbone", "Xception", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "ImageNet weights for Xception are not available" in err and "COVIDCT_WEIGHTS_DIR" in err
    assert not (tmp_path / "o").exists()
