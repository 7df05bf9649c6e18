"""Repeated random70 splits and the backbone ensemble, end to end on a real local Spark.

Two backbones are trained through ``covidct train`` (random weights, a synthetic dataset,
``--seeds``), combined by ``covidct ensemble``, used by ``covidct predict --model
RUN_DIR/ensemble``, and compared by ``covidct report``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from covidct.cli import main
from covidct.core.errors import CovidctError
from covidct.modelling import ensemble as ens
from dicom_files import series_folder

BACKBONES = ("VGG16", "VGG19")
SEEDS = [0, 1]  # two seeds and two stacking folds: every repeat and stacking path, with the fewest LR fits


def oof_frames(seed: int = 0) -> dict[str, pd.DataFrame]:
    """Out-of-fold-like predictions of two backbones on 40 training images (no Spark)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(40) % 2
    frames = {}
    for name, strength in (("VGG16", 1.5), ("VGG19", 0.5)):
        logits = (2 * labels - 1) * strength + rng.normal(0, 1, 40)
        frames[name] = pd.DataFrame({"relpath": [f"CT/{i}.png" for i in range(40)], "label": labels,
                                     "probability": 1 / (1 + np.exp(-logits))})  # fmt: skip
    return frames


def test_fit_stacker_uses_only_its_training_rows_and_refuses_test_rows():
    oof = oof_frames()
    stacker = ens.fit_stacker(oof, test_relpaths={"CT/test-1.png", "CT/test-2.png"})
    assert stacker.members == ("VGG16", "VGG19") and stacker.n_train == 40
    assert stacker.coef[0] > stacker.coef[1] > 0  # the stronger backbone weighs more
    x = np.column_stack([oof["VGG16"].probability, oof["VGG19"].probability])
    assert ((stacker.predict(x) > 0.5) == oof["VGG16"].label).mean() > 0.7
    with pytest.raises(CovidctError, match="2 test images are among the stacker's training rows"):
        ens.fit_stacker(oof, test_relpaths={"CT/3.png", "CT/7.png", "CT/test-1.png"})
    assert ens.Stacker.from_json(stacker.to_json()) == stacker


@pytest.fixture(scope="module")
def run(spark, small_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    for backbone in BACKBONES:
        args = ["train", "--data", str(small_dataset), "--backbone", backbone, "--weights", "none", "--no-cache",
                "--split", "official,random70", "--seed", "7", "--seeds", "0-1", "--stack-folds", "2", "--stack-seeds",
                "--out", str(run_dir / backbone.lower())]  # fmt: skip
        assert main(args) == 0
    assert main(["ensemble", str(run_dir)]) == 0
    return run_dir


def frame(path) -> pd.DataFrame:
    return pd.read_parquet(path).sort_values("relpath").reset_index(drop=True)


@pytest.mark.slow
def test_seeds_repeat_random70_from_the_same_features(run):
    main_metrics = json.loads((run / "vgg16" / "random70" / "metrics.json").read_text())
    seeds = json.loads((run / "vgg16" / "random70-seeds" / "seeds.json").read_text())
    assert seeds["seeds"] == SEEDS and seeds["main_seed"] == 7 and [r["seed"] for r in seeds["runs"]] == SEEDS
    assert seeds["cache"] == main_metrics["cache"]  # one featurization for the main splits and every seed
    predictions = frame(run / "vgg16" / "random70-seeds" / "predictions.parquet")
    tests = {s: set(predictions.loc[predictions.seed == s, "relpath"]) for s in SEEDS}
    assert all(len(t) == 7 for t in tests.values()) and tests[0] != tests[1]  # round(30 % of 24), other splits
    for r in seeds["runs"]:
        part = predictions[predictions.seed == r["seed"]]
        assert r["accuracy"] == pytest.approx((part.label == part.prediction).mean())
        assert r["n_train"] + r["n_test"] == 24
    # The main table's seed is untouched: its own split, model and metrics, as before.
    assert main_metrics["seed"] == 7 and (run / "vgg16" / "random70" / "model").is_dir()


@pytest.mark.slow
def test_out_of_fold_predictions_cover_the_training_images_only(run):
    for split in ("official", "random70"):
        oof = frame(run / "vgg16" / split / "oof.parquet")
        test = set(frame(run / "vgg16" / split / "predictions.parquet")["relpath"])
        metrics = json.loads((run / "vgg16" / split / "metrics.json").read_text())
        assert not set(oof.relpath) & test
        assert len(oof) == oof.relpath.nunique() == metrics["n_train"]
        assert set(oof.fold) == {0, 1}
    seeds_oof = pd.read_parquet(run / "vgg16" / "random70-seeds" / "oof.parquet")
    seeds_pred = pd.read_parquet(run / "vgg16" / "random70-seeds" / "predictions.parquet")
    for s in SEEDS:
        assert not set(seeds_oof.loc[seeds_oof.seed == s, "relpath"]) & set(
            seeds_pred.loc[seeds_pred.seed == s, "relpath"]
        )


@pytest.mark.slow
def test_ensemble_is_the_mean_of_the_members_probabilities(run):
    for split in ("official", "random70"):
        mean = frame(run / "ensemble" / split / "mean" / "predictions.parquet")
        members = [frame(run / b.lower() / split / "predictions.parquet") for b in BACKBONES]
        assert list(mean.relpath) == list(members[0].relpath)
        expected = np.mean([m.probability.to_numpy() for m in members], axis=0)
        assert mean.probability.to_numpy() == pytest.approx(expected)
        assert (mean.prediction == (expected > 0.5)).all()
        metrics = json.loads((run / "ensemble" / split / "mean" / "metrics.json").read_text())
        assert metrics["backbone"] == "Ensemble" and metrics["members"] == list(BACKBONES)
        assert metrics["accuracy"] == pytest.approx((mean.label == mean.prediction).mean())
        assert metrics["random_weights"] is True
    per_seed = pd.read_parquet(run / "ensemble" / "random70-seeds" / "mean" / "predictions.parquet")
    assert sorted(per_seed.seed.unique()) == SEEDS


@pytest.mark.slow
def test_stacked_model_never_sees_test_rows(run):
    split = run / "ensemble" / "random70" / "stacked"
    metrics = json.loads((split / "metrics.json").read_text())
    oof = {b: frame(run / b.lower() / "random70" / "oof.parquet") for b in BACKBONES}
    test = {b: frame(run / b.lower() / "random70" / "predictions.parquet") for b in BACKBONES}
    # It is exactly the LR fitted on the out-of-fold training predictions...
    refit = ens.fit_stacker(oof)
    assert metrics["stacker"]["coef"] == pytest.approx(list(refit.coef))
    assert metrics["stacker"]["n_train"] == len(oof["VGG16"]) == metrics["n_train"]
    # ...whatever the test predictions are: scrambling them changes nothing of the stacker.
    scrambled = {b: f.assign(probability=np.random.default_rng(0).random(len(f))) for b, f in test.items()}
    assert ens.fit_stacker(oof, set(scrambled["VGG16"].relpath)) == refit
    # And training rows that are test rows are refused.
    leaky = {b: pd.concat([oof[b], test[b][["relpath", "label", "probability"]]]) for b in BACKBONES}
    with pytest.raises(CovidctError, match="test images are among the stacker's training rows"):
        ens.fit_stacker(leaky, set(test["VGG16"].relpath))
    stacked = frame(split / "predictions.parquet")
    x = stacked[[f"probability_{b}" for b in BACKBONES]].to_numpy()
    assert stacked.probability.to_numpy() == pytest.approx(refit.predict(x))


@pytest.mark.slow
def test_saved_ensemble_classifies_new_images_with_each_backbone_beside_it(run, small_dataset, tmp_path, capsys):
    manifest = json.loads((run / "ensemble" / "ensemble.json").read_text())
    assert manifest["method"] == "mean" and manifest["trained_on_split"] == "official"
    assert [m["backbone"] for m in manifest["members"]] == list(BACKBONES)
    new = tmp_path / "new"
    new.mkdir()
    for source in (
        sorted((small_dataset / "CT_COVID").iterdir())[:2] + sorted((small_dataset / "CT_NonCOVID").iterdir())[:1]
    ):
        shutil.copy(source, new / source.name)
    series_folder(new / "dicom", 2)  # and a DICOM series of two slices
    out_csv = tmp_path / "predictions.csv"
    model = run / "ensemble"
    assert main(["predict", "--model", str(model), "--images", str(new), "--out", str(out_csv)]) == 0
    rows = pd.read_csv(out_csv)
    assert len(rows) == 3 + 2
    members = rows[["probability_VGG16", "probability_VGG19"]].mean(axis=1)
    assert rows.probability_covid.to_numpy() == pytest.approx(members, abs=1e-6)  # the CSV has 6 decimals
    slices = pd.read_parquet(tmp_path / "predictions.parquet")  # with DICOM: the same rows as Parquet
    assert slices[["probability_VGG16", "probability_VGG19"]].mean(axis=1).to_numpy() == pytest.approx(
        slices.probability.to_numpy()
    )
    (series,) = pd.read_csv(tmp_path / "predictions.series.csv").to_dict("records")
    dicom = rows[rows.path.str.contains("/dicom/")].probability_covid
    assert series["slices"] == 2 and series["probability"] == pytest.approx(dicom.max(), abs=1e-6)
    # Each member's probability is what its own saved model says.
    capsys.readouterr()
    assert main(["predict", "--model", str(run / "vgg16" / "official" / "model"), "--images", str(new)]) == 0
    alone = [float(line.split("\t")[0]) for line in capsys.readouterr().out.splitlines() if "\tfile:" in line]
    assert rows.probability_VGG16.round(4).tolist() == pytest.approx(alone, abs=1e-4)
    assert main(["predict", "--model", str(model), "--images", str(new)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "\tfile:" in line]
    assert len(printed) == 5 and all("VGG16 " in line and "VGG19 " in line and "stacked " in line for line in printed)


@pytest.mark.slow
def test_report_has_ensemble_rows_mcnemar_and_the_seeds_table(run, tmp_path):
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    for split in ("official", "random70"):
        labels = [r["label"] for r in summary["splits"][split]["rows"]]
        assert labels == ["VGG16", "VGG19", "Ensemble", "Ensemble (stacked)"]
        ensemble_row = summary["splits"][split]["rows"][2]
        assert ensemble_row["metrics"]["accuracy"]["ci_low"] is not None  # the same bootstrap CIs
        pairs = {(m["backbone_a"], m["backbone_b"]) for m in summary["splits"][split]["mcnemar"] if m["tested"]}
        assert {("VGG16", "Ensemble"), ("VGG19", "Ensemble"), ("VGG16", "Ensemble (stacked)")} <= pairs
    repeats = {r["label"]: r for r in summary["repeats"]}
    assert list(repeats) == ["VGG16", "VGG19", "Ensemble", "Ensemble (stacked)"]
    for r in repeats.values():
        assert r["seeds"] == SEEDS and r["accuracy"]["mean"] == pytest.approx(np.mean(r["accuracy"]["values"]))
        assert r["accuracy"]["sd"] == pytest.approx(np.std(r["accuracy"]["values"], ddof=1))
    assert repeats["Ensemble"]["study"] == "VGG16" and repeats["VGG19"]["study_accuracy"] == 0.8426
    md = (tmp_path / "report" / "report.md").read_text()
    assert (
        "## random70 repeated over 2 seeds" in md and "![Accuracy and AUC per seed, random70](seeds_random70.png)" in md
    )
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Ensemble (stacked)" in html and "percentile among our seeds" in html


@pytest.mark.slow
def test_ensemble_needs_two_backbones(run, tmp_path, capsys):
    single = tmp_path / "single"
    shutil.copytree(run / "vgg16", single / "vgg16")
    assert main(["ensemble", str(single)]) == 2
    err = capsys.readouterr().err
    assert "an ensemble needs two or more backbones on one split" in err and "Traceback" not in err
    assert not (single / "ensemble").exists()
