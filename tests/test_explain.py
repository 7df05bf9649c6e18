"""Class activation maps (``covidct.inference.maps``), ``covidct predict --explain`` and the report's gallery.

Real local Spark, random VGG16 weights, LRs fitted on synthetic images whose evidence is placed by
hand: every COVID image has a bright square somewhere (``synthetic.make_patch_dataset``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pyspark.ml import PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.functions import vector_to_array

from covidct.cli import main
from covidct.data.dataset import load_images
from covidct.features.featurizer import DeepImageFeaturizer
from covidct.inference import drawing, explanations, maps
from covidct.inference.files import read_images
from covidct.inference.predict import predict
from synthetic import PATCH, make_patch_dataset, patch_image

pytestmark = pytest.mark.slow

POOLINGS = ("avg", "avg-b345", "flatten")
#: Where the probes' squares are: (top, left); away from the training squares' average place.
PROBES = {"covid-top-left": (16, 24), "covid-bottom-right": (150, 160), "clean": None}


@pytest.fixture(scope="module")
def patch_data(tmp_path_factory):
    return make_patch_dataset(tmp_path_factory.mktemp("patch") / "COVID-CT", n=16)


@pytest.fixture(scope="module")
def models(spark, patch_data, tmp_path_factory) -> dict:
    """A VGG16 (random weights) + LR model per pooling, fitted on the patch images."""
    folder = tmp_path_factory.mktemp("models")
    images = load_images(spark, patch_data).cache()
    out = {}
    for pooling in POOLINGS:
        # As covidct train does: featurize once (persisted), fit the LR on the features, save both stages.
        featurizer = DeepImageFeaturizer(modelName="VGG16", weights="none", pooling=pooling, batchSize=16)
        features = featurizer.transform(images).select("label", "features").persist()
        features.count()
        lr = LogisticRegression(maxIter=50, regParam=0.05, elasticNetParam=0.3)  # the study's LR, more iterations
        PipelineModel(stages=[featurizer, lr.fit(features)]).save(str(folder / pooling))
        features.unpersist()
        out[pooling] = folder / pooling
    images.unpersist()
    return out


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """Three new images: squares in two places the classifier never saw them at, and none."""
    folder = tmp_path_factory.mktemp("probes")
    rng = np.random.default_rng(99)
    for name, where in PROBES.items():
        top, left = where or (None, None)
        patch_image(top, left, rng).save(folder / f"{name}.png")
    return folder


def logits(spark, model_dir, folder) -> dict[str, float]:
    """The model's own margin (rawPrediction[1]) per image, through the plain PipelineModel."""
    model = PipelineModel.load(str(model_dir))
    rows = model.transform(read_images(spark, folder).frame).select(
        "path", vector_to_array("rawPrediction")[1].alias("m")
    )
    return {r.path: r.m for r in rows.collect()}


def test_cam_spatial_mean_plus_intercept_is_the_models_logit(spark, models, probes, tmp_path):
    intercept = PipelineModel.load(str(models["avg"])).stages[1].intercept
    expected = logits(spark, models["avg"], probes)
    rows = predict(models["avg"], probes, explain_dir=tmp_path / "maps")
    plain = {r["path"]: r["probability"] for r in predict(models["avg"], probes)}
    assert len(rows) == len(PROBES) == len(expected)
    for r in rows:
        raw = np.load(r["explanation_npy"])
        assert raw.shape == (7, 7) and raw.dtype == np.float32  # VGG16's last conv block, before upsampling
        assert r["explain_method"] == "CAM"
        # The map's spatial mean (no ReLU) plus the intercept is the logit Spark's LR computes.
        assert float(raw.mean()) + intercept == pytest.approx(expected[r["path"]], rel=1e-4, abs=1e-4)
        # The same forward pass gives the probability plain `covidct predict` gives.
        assert r["probability"] == pytest.approx(plain[r["path"]], abs=1e-6)
    assert sum(r["prediction"] for r in rows) == 2  # the two squares are COVID, the clean probe is not


@pytest.mark.parametrize("pooling", POOLINGS)
def test_map_peaks_at_the_square_the_classifier_learned(spark, models, probes, pooling):
    df = read_images(spark, probes).frame
    found = {explanations.local_path(p).stem: e for p, e in maps.explain_model(models[pooling], df).items()}
    df.unpersist()
    assert {e.method for e in found.values()} == {"CAM" if pooling == "avg" else "Grad-CAM"}
    grid = {"avg": (7, 7), "flatten": (7, 7), "avg-b345": (28, 28)}[pooling]  # block5_pool / block3_pool
    for name, where in PROBES.items():
        if where is None:
            continue
        e = found[name]
        assert e.map.shape == grid and e.prediction == 1
        heat = drawing.evidence(e.map, covid=True, size=(224, 224))
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        top, left = where
        cell = 224 // grid[0]  # a peak within one grid cell of the square
        assert top - cell <= y < top + PATCH + cell and left - cell <= x < left + PATCH + cell, (name, y, x)
        inside = heat[top : top + PATCH, left : left + PATCH].mean()
        assert inside > 1.2 * heat.mean(), (name, inside, heat.mean())  # more evidence on the square than around


def test_predict_explain_cli_writes_pngs_npys_and_csv_columns(models, probes, tmp_path, capsys):
    out, csv = tmp_path / "explained", tmp_path / "predictions.csv"
    args = ["predict", "--model", str(models["avg-b345"]), "--images", str(probes), "--out", str(csv)]
    assert main([*args, "--explain", str(out)]) == 0
    table = pd.read_csv(csv)
    assert {"explain_method", "explanation_png", "explanation_npy"} <= set(table.columns)
    assert set(table.explain_method) == {"Grad-CAM"}
    manifest = json.loads((out / explanations.MANIFEST).read_text())
    assert manifest["images"] == 3 and manifest["maps"]["VGG16"]["layer"] == "block3_pool"
    for row in table.itertuples():
        png, npy = row.explanation_png, row.explanation_npy
        assert png.startswith(str(out)) and png.endswith(".png.map.png") and np.load(npy).shape == (28, 28)
        image = Image.open(png)
        geo = drawing.layout(224, 224, 1)
        assert image.size == geo["size"]  # the scan at its own size, plus title and colour bar
        # The scan is drawn 1:1 in its box: the clean corner of the overlay is the original's pixels.
        left, top, w, h = geo["boxes"][0]
        drawn = np.asarray(image.convert("L"))[top : top + h, left : left + w].astype(float)
        original = np.asarray(Image.open(probes / explanations.local_path(row.path).name).convert("L")).astype(float)
        assert np.corrcoef(drawn.ravel(), original.ravel())[0, 1] > 0.5
    # Again into the same folder: replaced; into a folder that holds other things: refused, untouched.
    assert main([*args, "--explain", str(out)]) == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main([*args, "--explain", str(other)]) == 2
    assert "is not a covidct explanations folder" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_ensemble_gets_one_map_per_member_side_by_side(models, probes, tmp_path):
    ensemble = tmp_path / "ensemble"
    members = {"VGG16": "avg", "VGG16-b345": "avg-b345"}
    for name, pooling in members.items():
        shutil.copytree(models[pooling], ensemble / "members" / name.lower())
    manifest = {"method": "mean", "threshold": 0.5, "trained_on_split": "random70",
                "members": [{"backbone": n, "model": f"members/{n.lower()}"} for n in members]}  # fmt: skip
    (ensemble / "ensemble.json").write_text(json.dumps(manifest))
    rows = predict(ensemble, probes, explain_dir=tmp_path / "maps")
    alone = {n: {r["path"]: r["probability"] for r in predict(models[p], probes)} for n, p in members.items()}
    for r in rows:
        assert r["explain_method"] == "VGG16: CAM; VGG16-b345: Grad-CAM"
        assert r["probability"] == pytest.approx(np.mean([r["members"][n] for n in members]))
        for n in members:
            assert r["members"][n] == pytest.approx(alone[n][r["path"]], abs=1e-6)
        npys = r["explanation_npy"].split(";")
        assert [np.load(p).shape for p in npys] == [(7, 7), (28, 28)]
        assert Image.open(r["explanation_png"]).size == drawing.layout(224, 224, 2)["size"]


def test_undecodable_image_is_handled_as_plain_predict_handles_it(models, probes, tmp_path, capsys):
    folder = tmp_path / "new"
    shutil.copytree(probes, folder)
    (folder / "broken%0.png").write_bytes((probes / "clean.png").read_bytes()[:300])
    model = str(models["avg"])
    plain = main(["predict", "--model", model, "--images", str(folder)])
    plain_out = capsys.readouterr().out
    out = tmp_path / "maps"
    explained = main(["predict", "--model", model, "--images", str(folder), "--explain", str(out)])
    captured = capsys.readouterr()
    assert explained == plain == 0  # the unreadable file is listed, the others are scored and explained
    unreadable = [line for line in captured.out.splitlines() if "\tunreadable\t" in line]
    assert unreadable == [line for line in plain_out.splitlines() if "\tunreadable\t" in line]
    assert len(unreadable) == 1 and "broken%0.png" in unreadable[0] and "Traceback" not in captured.err
    assert not list(out.rglob("broken*")) and len(list(out.rglob("*.map.png"))) == len(PROBES)
    strict = tmp_path / "strict-maps"
    assert main(["predict", "--model", model, "--images", str(folder), "--explain", str(strict), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "broken%0.png" in err and "Traceback" not in err
    assert not strict.exists()  # nothing half-written


@pytest.fixture(scope="module")
def patch_runs(spark, patch_data, tmp_path_factory) -> dict[str, Path]:
    """Three ``covidct train`` runs of VGG16 on the patch images, one split each, through one feature cache:
    ``first`` (seed 3) featurizes, ``again`` (seed 3: the same data and params, as a forced retrain) reads
    the cache; ``other`` (seed 4: another split and other random weights, so another model) featurizes."""
    folder = tmp_path_factory.mktemp("patch-runs")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COVIDCT_HOME", str(folder / "train-home"))
        for name, seed in (("first", 3), ("again", 3), ("other", 4)):
            run = folder / name
            args = ["train", "--data", str(patch_data), "--backbone", "VGG16", "--weights", "none",
                    "--split", "random70", "--seed", str(seed), "--stack-folds", "0"]  # fmt: skip
            assert main([*args, "--out", str(run / "vgg16")]) == 0
            runs[name] = run
    metrics = {n: json.loads((r / "vgg16" / "metrics.json").read_text())["cache"] for n, r in runs.items()}
    assert metrics["again"]["misses"] == 0 and metrics["again"]["hits"] == metrics["first"]["misses"] > 0, metrics
    return runs


def test_report_gallery_shows_the_most_confident_of_each_outcome(patch_runs, tmp_path):
    from covidct.reporting.report import build_report

    run = patch_runs["first"]
    report = build_report([run], out=tmp_path / "report", n_resamples=50, gallery=2)
    summary = json.loads(report.summary_json.read_text())
    gallery = summary["splits"]["random70"]["gallery"]
    assert gallery["model"] == "VGG16" and gallery["methods"] == {"VGG16": "CAM"} and gallery["reason"] is None
    predictions = pd.read_parquet(run / "vgg16" / "predictions.parquet")
    for key, label, prediction in (("TP", 1, 1), ("FP", 0, 1), ("FN", 1, 0), ("TN", 0, 0)):
        part = predictions[(predictions.label == label) & (predictions.prediction == prediction)]
        best = part.sort_values("probability", ascending=prediction == 0).relpath.head(2).tolist()
        shown = gallery["categories"][key]
        assert shown["total"] == len(part) and [i["relpath"] for i in shown["images"]] == best
        for image in shown["images"]:
            assert (report.out / image["png"]).is_file() and max(Image.open(report.out / image["png"]).size) < 700
    html = report.html.read_text()
    n_images = sum(len(c["images"]) for c in gallery["categories"].values())
    assert n_images >= 2 and html.count("<figure><img alt=") == n_images
    assert html.count("src='data:image/png;base64,") >= n_images + 3  # self-contained, beside the 3 figures
    assert "Gallery: VGG16" in report.markdown.read_text()
    assert "gallery" not in {p.name for p in build_report([run], out=tmp_path / "r0", gallery=0).out.iterdir()}


def test_report_gallery_reuses_the_maps_of_the_same_models_and_images(patch_runs, tmp_path, monkeypatch):
    """A run retrained on unchanged data (force) gets its gallery from the cache; another model does not."""
    from covidct.reporting import gallery_cache
    from covidct.reporting.report import build_report

    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))

    def gallery_of(run: Path, out: Path) -> tuple[dict, dict[str, bytes]]:
        report = build_report([run], out=out, n_resamples=20, gallery=2)
        shown = json.loads(report.summary_json.read_text())["splits"]["random70"]["gallery"]
        files = {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "gallery").rglob("*") if p.is_file()}
        return shown, files

    first, again = patch_runs["first"], patch_runs["again"]  # the same data and params: the same model
    model = first / "vgg16" / "model"
    assert gallery_cache.model_digest(model) == gallery_cache.model_digest(
        again / "vgg16" / "model"
    )  # other uids, times
    tweaked = tmp_path / "tweaked"  # the same stages and params, one coefficient changed
    shutil.copytree(model, tweaked)
    part = next(tweaked.glob("stages/1_*/data/part-*.parquet"))
    table = pq.read_table(part)
    rows = table.to_pylist()
    rows[0]["coefficientMatrix"]["values"][0] += 1e-9
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), part)
    assert gallery_cache.model_digest(tweaked) != gallery_cache.model_digest(model)
    made, made_files = gallery_of(first, tmp_path / "r1")
    reused, reused_files = gallery_of(again, tmp_path / "r2")
    assert made["cached"] is False and reused["cached"] is True
    assert reused["categories"] == made["categories"] and reused["methods"] == made["methods"]
    assert reused_files == made_files and any(name.endswith(".npy") for name in made_files)
    assert len(list((tmp_path / "home" / gallery_cache.CACHE_FOLDER).iterdir())) == 1

    other = patch_runs["other"]  # another split seed: another model (and other test images)
    assert gallery_cache.model_digest(other / "vgg16" / "model") != gallery_cache.model_digest(
        first / "vgg16" / "model"
    )
    assert gallery_of(other, tmp_path / "r3")[0]["cached"] is False


def test_report_gallery_draws_the_maps_the_train_job_recorded_equal_to_a_pass_over_the_images(
    patch_runs, tmp_path, monkeypatch
):
    """The train job recorded every test image's CAM (cams.parquet, from the featurization pass's grids): the
    report draws those without a Spark pass; a run folder without them gets the pass; the maps agree."""
    from covidct.reporting import gallery
    from covidct.reporting.report import build_report

    run = patch_runs["first"]
    older = tmp_path / "older"  # the same run as one written before cams.parquet existed
    shutil.copytree(run, older)
    (older / "vgg16" / "cams.parquet").unlink()

    def gallery_of(folder: Path, name: str) -> dict:
        monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / f"home-{name}"))  # each its own (empty) gallery cache
        report = build_report([folder], out=tmp_path / name, n_resamples=20, gallery=2)
        return json.loads(report.summary_json.read_text())["splits"]["random70"]["gallery"]

    with monkeypatch.context() as m:
        m.setattr(gallery, "_draw", lambda *a, **k: pytest.fail("the gallery made a pass over the images"))
        recorded = gallery_of(run, "recorded")
    passed = gallery_of(older, "passed")
    assert recorded["methods"] == passed["methods"] == {"VGG16": "CAM"} and recorded["reason"] is None
    shown = [(c, i) for c, cat in recorded["categories"].items() for i in cat["images"]]
    assert len(shown) >= 4
    for key, image in shown:
        twin = next(i for i in passed["categories"][key]["images"] if i["relpath"] == image["relpath"])
        assert image["probability"] == pytest.approx(twin["probability"], abs=1e-6)
        ours, theirs = (np.load(tmp_path / n / i["npy"][0]) for n, i in (("recorded", image), ("passed", twin)))
        assert ours.shape == theirs.shape == (7, 7)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-3 * np.abs(theirs).max())
        assert (tmp_path / "recorded" / image["png"]).is_file()
