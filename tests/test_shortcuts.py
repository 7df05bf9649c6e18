"""Shortcut baselines: the cue table (``covidct.data.cues``) and the report's baselines that never see the
anatomy (``covidct.reporting.shortcuts``). No Spark: the run folders are written here, as the training job
writes them, for the synthetic datasets of ``tests/synthetic.py``."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidct.core.errors import CovidctError
from covidct.data import cues as cuelib
from covidct.data.dataset import split_list_file
from covidct.data.manifest import load_manifest
from covidct.data.split import split_mapping
from covidct.reporting import report as reportlib
from covidct.reporting import shortcuts
from support.runs import spark_like_metrics
from synthetic import border_mark_dataset, encode


@pytest.fixture(scope="module")
def marked(tmp_path_factory) -> Path:
    """Two classes that differ only by a white square in a corner, outside the body (read-only for tests)."""
    return border_mark_dataset(tmp_path_factory.mktemp("data") / "COVID-CT", per_class=24)


def split_parts(data_dir: Path, split: str, seed: int = 42) -> tuple[list[str], pd.DataFrame]:
    """The split's training images and its test images (``relpath, label``), as the training job makes them."""
    manifest = load_manifest(data_dir)
    mapping = split_mapping(split, sorted(manifest["relpath"]), seed, data_dir)
    labels = dict(zip(manifest["relpath"], manifest["label"], strict=True))
    test = sorted(r for r, side in mapping.items() if side == "test")
    train = sorted(r for r, side in mapping.items() if side == "train")
    return train, pd.DataFrame({"relpath": test, "label": [int(labels[r]) for r in test]})


# --------------------------------------------------------------------------- the cue table


def test_pixel_statistics_see_a_corner_and_colour():
    grey = np.zeros((224, 224, 3), np.uint8)
    grey[:16, :16] = 255  # a white top left corner
    stats = cuelib.pixel_statistics(Image.fromarray(grey))
    assert set(stats) == set(cuelib.PIXEL_STATISTICS)
    assert stats["corner_top_left"] == 255 and stats["corner_bottom_right"] == 0
    assert stats["border_top_mean"] == pytest.approx(255 * 16 / 224) and stats["border_bottom_mean"] == 0
    assert stats["white"] == pytest.approx(256 / 224**2) and stats["black"] == pytest.approx(1 - 256 / 224**2)
    assert stats["colour"] == 0 and stats["centre_mean"] == 0
    red = np.zeros((100, 50, 3), np.uint8)
    red[..., 0] = 240  # any size: resized to 224 × 224 first
    assert cuelib.pixel_statistics(Image.fromarray(red))["colour"] == pytest.approx(160)


def test_a_png_and_a_jpeg_of_the_same_picture_differ_in_the_format_cue(marked, tmp_path):
    picture = Image.open(marked / "CT_COVID" / "mark-000%0.png").convert("RGB")
    data = tmp_path / "COVID-CT"
    for folder in ("CT_COVID", "CT_NonCOVID"):
        (data / folder).mkdir(parents=True)
    (data / "CT_COVID" / "a%0.png").write_bytes(encode(picture, "PNG"))
    (data / "CT_NonCOVID" / "a%0.jpg").write_bytes(encode(picture, "JPEG"))
    (data / "CT_NonCOVID" / "broken%0.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    for short in ("COVID", "NonCOVID"):  # empty official lists
        for part in ("train", "val", "test"):
            (data / split_list_file(short, part)).parent.mkdir(parents=True, exist_ok=True)
            (data / split_list_file(short, part)).write_text("")
    table = cuelib.build_cues(data)
    assert list(table.columns) == list(cuelib.COLUMNS)
    assert list(table["relpath"]) == ["CT_COVID/a%0.png", "CT_NonCOVID/a%0.jpg"]  # what does not decode is left out
    png, jpeg = table.iloc[0], table.iloc[1]
    assert (png["format"], jpeg["format"]) == ("PNG", "JPEG") and png["bytes"] != jpeg["bytes"]
    assert (png["width"], png["height"]) == (jpeg["width"], jpeg["height"]) == picture.size
    numbers = cuelib.file_cues(table)
    assert list(numbers["format:PNG"]) == [1, 0] and list(numbers["format:JPEG"]) == [0, 1]
    for view in cuelib.VIEWS:  # the same picture: its pixels' statistics differ by JPEG's losses only
        for statistic in ("mean", "std", "centre_mean", "border_top_mean", "corner_top_left"):
            png_value, jpeg_value = table[cuelib.pixel_column(view, statistic)]
            assert abs(png_value - jpeg_value) < 2, (view, statistic)


def test_the_cue_table_is_cached_reused_and_rebuilt_when_corrupt(marked, tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
    built = []
    build = cuelib.build_cues
    monkeypatch.setattr(cuelib, "build_cues", lambda *a, **k: built.append(1) or build(*a, **k))
    first = cuelib.load_cues(marked)
    cached = cuelib.cache_path(cuelib.dataset_digest(marked, load_manifest(marked)))
    assert built == [1] and len(first) == 48
    assert sorted((tmp_path / "home" / "cues").iterdir()) == sorted([cached, cuelib.pictures_path()])
    pd.testing.assert_frame_equal(cuelib.load_cues(marked), first)
    assert built == [1]  # reused
    cached.write_bytes(b"PAR1 torn write")
    pd.testing.assert_frame_equal(cuelib.load_cues(marked), first)
    assert built == [1, 1]  # rebuilt, not fatal
    pd.testing.assert_frame_equal(pd.read_parquet(cached), first)  # and cached again
    monkeypatch.setattr(cuelib, "CUES_VERSION", "cues-v-next")
    cuelib.load_cues(marked)
    assert built == [1, 1, 1] and len(list((tmp_path / "home" / "cues").iterdir())) == 4  # another version


def test_a_dataset_that_gains_images_decodes_only_those_for_its_cue_table(marked, tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
    data = tmp_path / "grown"
    shutil.copytree(marked, data)
    before = cuelib.load_cues(data)
    source = next((data / "CT_COVID").iterdir())
    with Image.open(source) as img:
        img.convert("RGB").point(lambda v: min(v + 9, 255)).save(data / "CT_COVID" / "grown-new.png")
    decoded = []
    picture_cues = cuelib.picture_cues
    monkeypatch.setattr(cuelib, "picture_cues", lambda data, name, *a: decoded.append(name) or picture_cues(data, name))
    after = cuelib.load_cues(data)
    assert decoded == ["CT_COVID/grown-new.png"] and len(after) == len(before) + 1
    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "empty-home"))  # from scratch: the same table
    pd.testing.assert_frame_equal(cuelib.load_cues(data), after)


# --------------------------------------------------------------------------- the baselines


def test_a_border_mark_is_a_pixel_shortcut_of_the_full_view_and_not_of_the_body_blank_view(marked):
    train, test = split_parts(marked, "official")
    table = cuelib.load_cues(marked)
    entries = shortcuts.fit_baselines(table, train, test, "official", n_resamples=200)
    auc = {e.metrics["baseline"]: e.value("auc") for e in entries}
    assert list(auc) == ["file-cues", "pixels-full", "pixels-body", "pixels-body-blank"]
    assert auc["pixels-full"] >= 0.9 and auc["file-cues"] >= 0.9
    assert auc["pixels-body-blank"] <= 0.7 and auc["pixels-body"] <= 0.7
    for e in entries:
        assert e.metrics["n_train"] == 36 and e.metrics["n_test"] == 12 == len(e.predictions)
        assert e.bootstrap.unit == "patient" and e.interval("auc").low is not None
        assert e.bootstrap.n_resamples == 200


def test_no_baseline_from_training_images_of_one_class(marked):
    train, test = split_parts(marked, "official")
    with pytest.raises(CovidctError, match="all of one class"):
        shortcuts.fit_baselines(cuelib.load_cues(marked), [r for r in train if "CT_COVID" in r], test, "official")


@pytest.mark.parametrize(
    ("file_auc", "relation", "meaning"),
    [
        (0.924, "above", "part of what the models score may be the source of the picture, not the lungs"),
        (0.89, "close to", "much of what the models score may be the source of the picture"),
        (0.87, "close to", "much of what the models score may be the source of the picture"),
        (0.75, "below", "yet part of their score may be the source of the picture"),
        (0.55, "below", "the source of the picture tells little about the class here"),
    ],
)
def test_the_sentence_says_above_close_to_or_below_the_best_model(file_auc, relation, meaning):
    aucs = {"file-cues": file_auc, "pixels-full": 0.72, "pixels-body": 0.7, "pixels-body-blank": 0.61}
    found, sentence = shortcuts.verdict("official", aucs, ("Ensemble", 0.885))
    assert found == relation
    assert sentence.startswith(f"File cues with picture statistics reach AUC {file_auc:.3f} on official, {relation} "
                               "the best model (Ensemble, 0.885), and the decoded pixels' statistics alone 0.720 "
                               "(full view; body 0.700; body-blank 0.610): ")  # fmt: skip
    assert meaning in sentence and sentence.endswith(".")


# --------------------------------------------------------------------------- in the report


def write_job(target: Path, data_dir: Path, split: str, backbone: str, seed: int = 42, strength: float = 1.5) -> None:
    """``target/metrics.json`` and a Spark-style ``predictions.parquet/`` of ``backbone`` on ``split``'s test images."""
    _train, test = split_parts(data_dir, split, seed)
    rng = np.random.default_rng([len(backbone), seed])
    logits = (2 * test["label"].to_numpy() - 1) * strength + rng.normal(0, 1.2, len(test))
    probability = 1 / (1 + np.exp(-logits))
    frame = test.assign(label=test["label"].astype("int32"), probability=probability,
                        prediction=(probability > 0.5).astype("int32"))  # fmt: skip
    folder = target / "predictions.parquet"
    folder.mkdir(parents=True)
    frame.to_parquet(folder / f"part-00000-{uuid.uuid4()}-c000.snappy.parquet", index=False)
    metrics = {"backbone": backbone, "split": split, "seed": seed, "weights": "imagenet", "weights_id": "sha256-0",
               "n_test": len(frame), "data_dir": str(data_dir), **spark_like_metrics(frame)}  # fmt: skip
    (target / "metrics.json").write_text(json.dumps(metrics))


def test_the_report_shows_the_baselines_beside_the_backbones(marked, tmp_path):
    run = tmp_path / "run"
    for backbone in ("VGG16", "VGG19"):
        for split in ("random70", "official"):
            write_job(run / backbone.lower() / split, marked, split, backbone)
    rep = reportlib.build_report([run], n_resamples=200, gallery=0)
    data = json.loads(rep.summary_json.read_text(encoding="utf-8"))["shortcuts"]
    assert data == json.loads(json.dumps(rep.summary["shortcuts"]))
    assert [p["split"] for p in data["splits"]] == ["random70", "official"]
    html, md = rep.html.read_text(encoding="utf-8"), rep.markdown.read_text(encoding="utf-8")
    assert html.count("<h2>Shortcut baselines: models that never see the anatomy</h2>") == 1
    assert md.count("\n## Shortcut baselines: models that never see the anatomy\n") == 1
    assert md.index("\n## official:") < md.index("\n## Shortcut baselines")
    for part in data["splits"]:
        assert part["reason"] is None and part["notes"] == [], part
        assert part["test_images_of"] == "VGG16" and part["data_dir"] == str(marked)
        rows = {r["key"]: r for r in part["rows"]}
        assert list(rows) == ["file-cues", "pixels-full", "pixels-body", "pixels-body-blank"]
        n_test = rep.splits[part["split"]].entries[0].metrics["n_test"]
        assert {(r["n_train"], r["n_test"]) for r in rows.values()} == {(48 - n_test, n_test)}
        full = rows["pixels-full"]["metrics"]["auc"]
        assert full["value"] >= 0.9 and full["ci_low"] <= full["value"] <= full["ci_high"]
        assert rows["pixels-body-blank"]["metrics"]["auc"]["value"] <= 0.7
        best = max(e.value("auc") for e in rep.splits[part["split"]].entries)
        assert part["best"]["auc"] == pytest.approx(best)
        assert part["sentence"].startswith("File cues with picture statistics reach AUC ") and part["sentence"] in md
        assert part["sentence"].replace("'", "&#x27;") in html
        accuracy = rows["file-cues"]["metrics"]["accuracy"]
        cell = f"{100 * accuracy['value']:.2f} [{100 * accuracy['ci_low']:.2f}, {100 * accuracy['ci_high']:.2f}]"
        fitted_on = "format, colour mode, width, height, byte size; pixel statistics"
        assert f"| File cues + picture statistics | {fitted_on} | {48 - n_test} | {n_test} | {cell} |" in md
    official = next(p for p in data["splits"] if p["split"] == "official")
    assert official["rows"][0]["bootstrap_unit"] == "patient"


def test_the_section_says_why_where_it_cannot_compute_and_the_report_does_not_fail(marked, tmp_path):
    run = tmp_path / "run"
    write_job(run / "vgg16" / "official", marked, "official", "VGG16")
    write_job(run / "vgg16" / "random70", marked, "random70", "VGG16")
    other = json.loads((run / "vgg16" / "random70" / "metrics.json").read_text())
    other["seed"] = 7  # not the seed the test images were drawn with
    (run / "vgg16" / "random70" / "metrics.json").write_text(json.dumps(other))
    gone = json.loads((run / "vgg16" / "official" / "metrics.json").read_text())
    gone["data_dir"] = str(tmp_path / "gone" / "COVID-CT")
    (run / "vgg16" / "official" / "metrics.json").write_text(json.dumps(gone))
    rep = reportlib.build_report([run], n_resamples=100, gallery=0)
    parts = {p["split"]: p for p in rep.summary["shortcuts"]["splits"]}
    assert parts["official"]["rows"] == [] and "cannot be read" in parts["official"]["reason"]
    assert "does not exist" in parts["official"]["reason"]
    [note] = parts["random70"]["notes"]
    assert "recomputed from" in note and "seed 7" in note and len(parts["random70"]["rows"]) == 4
    md = rep.markdown.read_text(encoding="utf-8")
    assert f"No shortcut baselines on official: {parts['official']['reason']}." in md and note in md


def test_a_baseline_failure_is_named_not_raised(marked, tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_job(run / "vgg16" / "official", marked, "official", "VGG16")

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(shortcuts, "fit_baselines", boom)
    rep = reportlib.build_report([run], n_resamples=100, gallery=0)
    [part] = rep.summary["shortcuts"]["splits"]
    assert part["reason"] == "they could not be computed (RuntimeError: out of memory)"
    assert "No shortcut baselines on official: they could not be computed" in rep.html.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- the real data


@pytest.mark.slow
def test_file_cues_and_pixels_separate_the_real_classes_on_official(real_data_dir):
    """On UCSD COVID-CT the file cues with picture statistics reach AUC ~0.93 on the official test list and the
    decoded pixels' statistics alone ~0.76: a shortcut open to every backbone."""
    if real_data_dir is None:
        pytest.skip("COVIDCT_DATA_DIR does not point at the real dataset")
    train, test = split_parts(real_data_dir, "official")
    entries = shortcuts.fit_baselines(cuelib.load_cues(real_data_dir), train, test, "official", n_resamples=200)
    auc = {e.metrics["baseline"]: e.value("auc") for e in entries}
    assert len(test) == 203 and {e.metrics["n_test"] for e in entries} == {203}
    assert auc["file-cues"] >= 0.88, auc
    assert 0.65 <= auc["pixels-full"] <= 0.85, auc
