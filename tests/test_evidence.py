"""The shortcut audit on a dataset whose classes differ only by a mark on the border: where the evidence lies
(``covidct.modelling.evidence``), the body views and test-time flips in the featurizer and its saved models."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pyspark.ml import PipelineModel

from covidct.cli import main
from covidct.data.body import BODY_BLANK, BODY_VERSION
from covidct.data.dataset import load_images
from covidct.features.featurizer import DeepImageFeaturizer
from covidct.features.workers import WorkerModel
from covidct.modelling.evidence import shares
from synthetic import border_mark_dataset


@pytest.fixture(scope="module")
def marks(tmp_path_factory):
    return border_mark_dataset(tmp_path_factory.mktemp("marks") / "COVID-CT", per_class=12)


@pytest.fixture(scope="module")
def full_view_run(spark, marks, tmp_path_factory):
    out = tmp_path_factory.mktemp("mark-runs") / "vgg16"
    args = ["train", "--data", str(marks), "--backbone", "VGG16", "--weights", "none", "--split", "official",
            "--stack-folds", "0", "--no-cache", "--tracking", "off", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out


def test_the_mark_gives_the_class_away_and_the_evidence_lies_off_the_body(full_view_run):
    m = json.loads((full_view_run / "metrics.json").read_text())
    assert m["accuracy"] == 1.0 and (m["view"], m["flips"]) == ("full", False)
    ev = m["evidence"]
    assert ev["method"] == "CAM" and ev["images"] >= 3 and ev["images"] + ev["without_evidence"] == m["n_test"]
    # The body covers about a third of these pictures; a model that read the lungs would put far more there.
    assert ev["inside_body"] < ev["body_share"] < 0.6
    per_image = pd.read_parquet(full_view_run / "evidence.parquet")
    assert list(per_image.columns) == ["relpath", "evidence_inside_body", "body_share"]
    assert len(per_image) == m["n_test"]
    assert per_image["evidence_inside_body"].dropna().between(0, 1).all()


def test_shares_follow_the_predicted_class():
    inside = np.zeros((1, 2, 2))
    inside[0, 0, :] = 1.0  # the top row is body
    cams = np.array([[[2.0, 2.0], [-1.0, -1.0]]])[..., None]  # COVID evidence on the body, the rest against
    assert shares(cams, np.array([0.0]), inside)[0, 0] == 1.0  # predicted COVID: all its evidence inside
    assert shares(cams, np.array([-5.0]), inside)[0, 0] == 0.0  # predicted non-COVID: its evidence lies outside
    assert np.isnan(shares(np.zeros((1, 2, 2, 1)), np.array([0.0]), inside)[0, 0])  # no evidence at all


def test_body_blank_featurizes_twins_alike_and_saved_models_keep_the_view(spark, marks, full_view_run, tmp_path):
    twins = ["CT_COVID/mark-000%0.png", "CT_NonCOVID/plain-000%0.png"]
    images = load_images(spark, marks, relpaths=twins)
    model = PipelineModel.load((full_view_run / "model").absolute().as_uri())
    featurizer, lr = model.stages
    assert featurizer.getView() == "full" and featurizer.getFlips() is False  # saved with the params
    blank = DeepImageFeaturizer(modelName="VGG16", weights="none", seed=42, view=BODY_BLANK)
    path = tmp_path / "blank-model"
    PipelineModel(stages=[blank, lr]).save(path.as_uri())
    loaded = PipelineModel.load(path.as_uri())
    assert loaded.stages[0].getView() == BODY_BLANK
    by_view = {}
    for name, m in (("full", model), ("blank", loaded)):
        rows = m.transform(images).select("relpath", "features", "probability").collect()
        by_view[name] = {r.relpath: (r.features.toArray(), float(r.probability[1])) for r in rows}
    (f_marked, p_marked), (f_plain, p_plain) = (by_view["full"][t] for t in twins)
    assert not np.allclose(f_marked, f_plain) and p_marked > 0.5 > p_plain  # the mark decides
    (b_marked, q_marked), (b_plain, q_plain) = (by_view["blank"][t] for t in twins)
    assert np.array_equal(b_marked, b_plain) and q_marked == q_plain  # body-blank: the same picture


def test_flips_average_the_picture_and_its_mirror_image(marks):
    data = (marks / "CT_COVID" / "mark-001%0.png").read_bytes()
    mirrored = Image.open(marks / "CT_COVID" / "mark-001%0.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    mirrored.save(buf, format="PNG")
    model = WorkerModel("VGG16", "none", "avg", 0)
    names = pd.Series(["a", "b"])
    plain = model.features([data, buf.getvalue()], names, "bytes", 2)
    flipped = model.features([data], names[:1], "bytes", 2, flips=True)
    assert not np.allclose(plain[0], plain[1])
    assert np.allclose(flipped[0], (plain[0] + plain[1]) / 2, rtol=1e-4, atol=1e-5)


def test_view_and_flips_reject_unknown_values():
    with pytest.raises(TypeError, match="view must be one of"):
        DeepImageFeaturizer(view="lungs")
    f = DeepImageFeaturizer(view="BODY", flips=True)
    assert f.getView() == "body" and f.preprocessing().endswith(f"_body-{BODY_VERSION}_hflip-mean")


def test_the_reports_sentence_names_the_backbones_that_look_off_the_patient():
    from covidct.reporting.evidence import sentence

    def row(model, inside, view="full"):
        return {"model": model, "view": view, "inside_body": inside, "body_share": 0.80}

    text = sentence("official", [row("VGG16", 0.787), row("Xception", 0.923)])
    assert text.startswith("On official the backbones put 79–92 % of the evidence for their predicted class inside")
    assert "covers 80 % of the picture" in text and ": VGG16 put no more of it on the patient" in text
    blank = sentence("official", [row("VGG16", 0.88, "body-blank"), row("VGG19", 0.87, "body-blank")])
    assert "more than evidence spread evenly would" in blank and "black outside the body" in blank


def test_the_featurization_pass_keeps_each_images_grid_so_the_evidence_needs_no_second_pass(
    spark, marks, full_view_run, tmp_path, monkeypatch, capsys
):
    """With a feature cache the conv block the features average is kept beside them (half precision): the
    evidence and the maps come from it, equal to the forward pass over the images (the run without a cache);
    a cache written before grids (no grid columns) falls back to that pass for its images."""
    import pyarrow.parquet as pq

    from covidct.features.cache import GRID_COLUMNS, FeatureCache
    from covidct.modelling.runfolder import read_cams

    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
    # Two splits, whose test images overlap only in part: each counts its own test images drawn from grids.
    args = ["train", "--data", str(marks), "--backbone", "VGG16", "--weights", "none", "--split",
            "official,random70", "--stack-folds", "0", "--tracking", "off"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "cached")]) == 0
    passed = json.loads((full_view_run / "metrics.json").read_text())
    cached, other = (json.loads((tmp_path / "cached" / split / "metrics.json").read_text())
                     for split in ("official", "random70"))  # fmt: skip
    assert cached["accuracy"] == passed["accuracy"] and cached["cache"]["misses"] == cached["n_images"]
    assert passed["evidence"]["from_grids"] == 0 and cached["evidence"]["from_grids"] == cached["n_test"]
    assert other["evidence"]["from_grids"] == other["n_test"] != cached["n_test"]
    files = FeatureCache(tmp_path / "home" / "feature-cache").files(cache_key(cached))
    assert files and all(set(GRID_COLUMNS) <= set(pq.read_schema(f).names) for f in files)

    def same(run_a, run_b):
        a, b = (pd.read_parquet(r / "evidence.parquet") for r in (run_a, run_b))
        assert list(a["relpath"]) == list(b["relpath"]) and len(a) == cached["n_test"]
        np.testing.assert_allclose(a["evidence_inside_body"], b["evidence_inside_body"], atol=2e-3)
        np.testing.assert_allclose(a["body_share"], b["body_share"], atol=1e-6)
        maps_a, maps_b = read_cams(run_a / "cams.parquet"), read_cams(run_b / "cams.parquet")
        assert maps_a.keys() == maps_b.keys() == set(a["relpath"])
        for relpath, m in maps_a.items():
            assert m.shape == (7, 7)  # VGG16's conv grid
            np.testing.assert_allclose(m, maps_b[relpath], rtol=0, atol=2e-3 * np.abs(maps_b[relpath]).max())

    same(tmp_path / "cached" / "official", full_view_run)

    # A cache from before grids: the same features without the grid columns; the evidence takes the pass.
    for file in files:
        pq.write_table(pq.read_table(file).drop_columns(list(GRID_COLUMNS)), file)
        file.with_name(file.name + ".sha256").unlink()  # an older file: checked by reading it whole
    assert main([*args, "--out", str(tmp_path / "older")]) == 0
    older = json.loads((tmp_path / "older" / "official" / "metrics.json").read_text())
    assert older["cache"]["misses"] == 0 and older["evidence"]["from_grids"] == 0
    same(tmp_path / "older" / "official", full_view_run)

    # Entries lost after a job counted them (from the dataset's manifest it counts with pyarrow, then reads with
    # Spark): an error that says so, not a model fitted on fewer images. Here the cache's files go while it still
    # counts them all. (Without a manifest the job reads every file and featurizes what the cache lacks.)
    from covidct.data.manifest import MANIFEST_NAME, build_manifest, write_manifest

    listed = shutil.copytree(marks, tmp_path / "listed" / "COVID-CT")
    write_manifest(build_manifest(listed), listed / MANIFEST_NAME)
    counted = FeatureCache(tmp_path / "home" / "feature-cache").shas(cache_key(older))
    monkeypatch.setattr(FeatureCache, "shas", lambda self, key: counted)
    for file in files[: max(1, len(files) // 2)]:
        file.unlink()
    args[args.index("--data") + 1] = str(listed)
    assert main([*args, "--out", str(tmp_path / "lost")]) != 0
    assert "lost entries while this job read it" in capsys.readouterr().err
    assert not (tmp_path / "lost").exists()


def test_a_grid_keeps_an_activation_beyond_half_precision_finite():
    """Half precision ends at 65,504: a larger activation is stored as that, not as inf (NaN maps)."""
    from covidct.features.workers import GRID_MAX, Grid

    conv = np.array([[[1.5, 7e4], [-9e4, 0.0]]], dtype=np.float32)  # (1, 2, 2)
    record = Grid.of(conv, np.ones((1, 2), np.float32)).to_record()  # what the feature cache stores
    grid = Grid.from_record(record["grid"], record["grid_shape"], record["inside"])
    assert np.isfinite(grid.conv).all() and grid.conv.dtype == np.float16
    np.testing.assert_array_equal(grid.conv.astype(np.float32), [[[1.5, GRID_MAX], [-GRID_MAX, 0.0]]])


def cache_key(metrics: dict):
    from covidct.features.cache import CacheKey

    return CacheKey(metrics["backbone"], metrics["weights_id"], metrics["pooling"], metrics["precision"],
                    metrics["preprocessing"])  # fmt: skip
