"""covidct validate: Great Expectations on the manifest, human messages, JSON + Data Docs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from covidct.cli import main
from covidct.core.errors import CovidctError
from covidct.data.duplicates import near_duplicates
from covidct.data.manifest import MANIFEST_NAME, build_manifest, read_manifest, write_manifest
from covidct.data.validate import passed_before, validate
from synthetic import first_listed, plant_near_duplicate
from upstream import DEFECTS

SMALL = {"expected_covid": 12, "expected_noncovid": 12}


@pytest.fixture
def data(small_dataset, tmp_path) -> Path:
    """A writable copy of the 12 + 12 synthetic dataset (no manifest: validate builds one)."""
    return shutil.copytree(small_dataset, tmp_path / "COVID-CT")


def messages(result) -> str:
    return "\n".join(f.message for f in result.failures)


def test_good_dataset_passes_and_writes_json_and_data_docs(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # GX must not write anything outside DIR/validation
    result = validate(data, **SMALL)
    assert result.success, result.summary()
    assert result.failures == [] and result.warnings == [] and result.evaluated == 15 and result.images == 24
    assert result.summary().startswith(f"validation of {data} passed: 15 of 15 expectations met (24 images")

    assert result.result_json == data / "validation" / "result.json"
    report = json.loads(result.result_json.read_text())
    assert report["success"] is True and report["images"] == 24 and report["expected"] == {"covid": 12, "noncovid": 12}
    assert report["warnings"] == [] and report["near_duplicates"]["pairs"] == []
    assert report["near_duplicates"]["policy"] == "warn"
    assert set(report["great_expectations"]) == {"images", "split_lists"}
    assert result.data_docs == data / "validation" / "data-docs" / "index.html"
    html = result.data_docs.read_text()
    assert "images" in html and "split_lists" in html
    assert sorted(p.name for p in tmp_path.iterdir()) == ["COVID-CT"]
    assert sorted(p.name for p in data.iterdir()) == ["CT_COVID", "CT_NonCOVID", "Data-split", "validation"]


def test_a_second_run_replaces_the_report(data):
    validate(data, **SMALL)
    result = validate(data, expected_covid=349, expected_noncovid=397)
    assert not result.success
    assert json.loads(result.result_json.read_text())["success"] is False
    assert [p.name for p in data.iterdir() if p.name.startswith(".")] == []


def test_wrong_counts_name_expected_and_found(data):
    result = validate(data)  # the real dataset's 349 / 397
    assert not result.success
    assert "expected 349 COVID images, found 12" in messages(result)
    assert "expected 397 non-COVID images, found 12" in messages(result)
    assert len(result.failures) == 2


@pytest.mark.parametrize("defect", list(DEFECTS), ids=list(DEFECTS))
def test_bad_dataset_fails_with_named_expectations_and_files(data, defect):
    fragments = DEFECTS[defect](data)
    result = validate(data, **SMALL)
    assert not result.success
    text = result.summary()
    assert " FAILED: " in text.splitlines()[0]
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    report = json.loads(result.result_json.read_text())
    assert report["success"] is False
    assert [f["message"] for f in report["failures"]] == [f.message for f in result.failures]


def test_duplicate_names_both_files(data):
    DEFECTS["duplicate image"](data)
    [failure] = [f for f in validate(data, expected_covid=12, expected_noncovid=13).failures]
    assert failure.expectation == "expect_column_values_to_be_unique" and failure.column == "sha256"
    assert len(failure.files) == 2 and "2 offending files" in failure.message


def test_image_in_two_split_lists(data):
    name = sorted(p.name for p in (data / "CT_COVID").iterdir())[0]
    with open(data / "Data-split/COVID/testCT_COVID.txt", "a") as f:
        f.write(name + "\n")
    text = messages(validate(data, **SMALL))
    assert "no image is in more than one official split list: 1 offending file: " in text
    assert f"CT_COVID/{name} (in train+test)" in text
    assert f"no file is named twice in Data-split: 1 offending file: CT_COVID/{name}" in text


def test_image_in_no_split_list(data):
    lst = data / "Data-split/NonCOVID/valCT_NonCOVID.txt"
    first, *rest = lst.read_text().splitlines()
    lst.write_text("".join(line + "\n" for line in rest))
    assert f"every image is in an official split list: 1 offending file: CT_NonCOVID/{first}" in messages(
        validate(data, **SMALL)
    )


def test_image_size_bounds_and_pixel_limit(data, monkeypatch):
    from PIL import Image

    Image.new("L", (20, 300), 128).save(data / "CT_COVID" / "sliver.png")
    with open(data / "Data-split/COVID/trainCT_COVID.txt", "a") as f:
        f.write("sliver.png\n")
    monkeypatch.setattr(
        "covidct.data.validate.MAX_PIXELS", 11_000
    )  # instead of PIL's 89 M: the 96x112+ images exceed it
    result = validate(data, expected_covid=13, expected_noncovid=12)
    text = messages(result)
    assert "image width within 32..10000 px: 1 offending file: CT_COVID/sliver.png (20 px wide)" in text
    assert "pixels below the decompression-bomb limit (11,000): " in text
    assert "image height" not in text


def test_manifest_is_read_when_current_and_rebuilt_when_stale(data, caplog):
    write_manifest(build_manifest(data), data / MANIFEST_NAME)
    assert validate(data, **SMALL).success
    assert "no longer matches" not in caplog.text
    victim = sorted((data / "CT_COVID").iterdir())[0]
    victim.unlink()
    result = validate(data, **SMALL)
    assert "no longer matches the files" in caplog.text
    assert "expected 12 COVID images, found 11" in messages(result)
    assert len(read_manifest(data / MANIFEST_NAME)) == 24  # validate reads, never rewrites the data


def test_folders_that_cannot_be_validated_raise(tmp_path, data):
    with pytest.raises(CovidctError, match="does not exist"):
        validate(tmp_path / "nowhere")
    (data / "Data-split/COVID/valCT_COVID.txt").unlink()
    with pytest.raises(CovidctError, match="official split list .*valCT_COVID.txt is missing"):
        validate(data, **SMALL)


def test_report_can_go_elsewhere(data, tmp_path):
    result = validate(data, **SMALL, out=tmp_path / "reports" / "v1")
    assert result.success and result.result_json == tmp_path / "reports" / "v1" / "result.json"
    assert result.data_docs.is_file() and not (data / "validation").exists()


def test_cli_validate_exit_status_and_message(data, capsys):
    assert main(["validate", "--data", str(data), "--expect-covid", "12", "--expect-noncovid", "12"]) == 0
    assert "passed: 15 of 15" in capsys.readouterr().out
    DEFECTS["zero-byte file"](data)
    assert main(["validate", "--data", str(data), "--expect-covid", "12", "--expect-noncovid", "12"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "CT_COVID/empty.png (the file is empty)" in out
    assert "expected 12 COVID images, found 13" in out
    assert main(["validate", "--data", str(data / "nowhere")]) == 2
    assert "error: dataset folder" in capsys.readouterr().err


# --- near-duplicates: the same picture under both classes, or in two official splits ---------------------


def test_a_picture_under_both_classes_is_a_warning_naming_both_files(data):
    covid_test = first_listed(data, "COVID/testCT_COVID.txt", "CT_COVID")
    twin = plant_near_duplicate(data, covid_test, "CT_NonCOVID", "NonCOVID/trainCT_NonCOVID.txt", "71%0.jpg")
    assert (data / twin).read_bytes() != (data / covid_test).read_bytes()  # sha256 cannot see it

    result = validate(data, expected_covid=12, expected_noncovid=13)
    assert result.success and result.failures == [], result.summary()
    [warning] = result.warnings
    assert sorted(warning.files) == sorted([covid_test, twin])
    assert warning.message.startswith(
        "no picture under both classes (perceptual hash, <= 24 of 256 bits apart; a warning, does not fail the gate):"
        " 2 offending files: "
    )
    assert f"{covid_test} (same picture as {twin}: non-COVID, train, " in warning.message
    assert f"{twin} (same picture as {covid_test}: COVID, test, " in warning.message
    assert "passed: 14 of 15 expectations met, 1 with a warning" in result.summary()
    assert "  - warning: no picture under both classes" in result.summary()

    report = json.loads(result.result_json.read_text())
    assert report["success"] is True and [w["files"] for w in report["warnings"]] == [warning.files]
    [pair] = report["near_duplicates"]["pairs"]
    assert (pair["relpath_a"], pair["relpath_b"], pair["kind"]) == (covid_test, twin, "across classes")
    assert (pair["split_a"], pair["split_b"]) == ("test", "train") and 0 <= pair["distance"] <= 24
    pages = [page.read_text() for page in (result.data_docs.parent / "validations").rglob("*.html")]
    assert any(f"same picture as {twin}: non-COVID, train" in page for page in pages)  # in the Data Docs too
    assert any("a warning, does not fail the gate" in page for page in pages)
    # The suite's page shows the pair's two pictures side by side under the check's notes.
    suite = (result.data_docs.parent / "expectations" / "images.html").read_text()
    assert f"<strong>{covid_test}</strong> and <strong>{twin}</strong>" in suite
    assert suite.count('<img src="data:image/png;base64,') == 1


def test_near_duplicates_fail_the_gate_when_asked(data, capsys):
    covid_test = first_listed(data, "COVID/testCT_COVID.txt", "CT_COVID")
    twin = plant_near_duplicate(data, covid_test, "CT_NonCOVID", "NonCOVID/trainCT_NonCOVID.txt", "71%0.jpg")
    result = validate(data, expected_covid=12, expected_noncovid=13, near_duplicates="fail")
    assert not result.success and result.warnings == []
    [failure] = result.failures
    assert sorted(failure.files) == sorted([covid_test, twin])
    assert failure.message.startswith("no picture under both classes (perceptual hash, <= 24 of 256 bits apart): ")

    args = ["validate", "--data", str(data), "--expect-covid", "12", "--expect-noncovid", "13"]
    assert main(args) == 0 and "1 with a warning" in capsys.readouterr().out
    assert passed_before(data, 12, 13, "warn") is not None
    assert passed_before(data, 12, 13, "fail") is None  # a pass with warnings is no pass of the stricter gate
    assert main([*args, "--near-duplicates", "fail"]) == 1
    assert "FAILED: 14 of 15 expectations met" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:  # argparse's choices come from duplicates.POLICIES
        main([*args, "--near-duplicates", "ignore"])
    assert info.value.code == 2 and "invalid choice: 'ignore'" in capsys.readouterr().err
    with pytest.raises(CovidctError, match="near_duplicates must be one of warn, fail, got 'ignore'"):
        validate(data, near_duplicates="ignore")


def test_a_picture_in_two_splits_of_one_class_is_a_warning(data):
    covid_train = first_listed(data, "COVID/trainCT_COVID.txt", "CT_COVID")
    copy = plant_near_duplicate(data, covid_train, "CT_COVID", "COVID/testCT_COVID.txt", "copy-p1-1%0.png", scale=1.25)
    result = validate(data, expected_covid=13, expected_noncovid=12)
    [warning] = result.warnings
    assert warning.message.startswith("no picture in two official splits (perceptual hash, <= 24 of 256 bits apart;")
    assert f"{covid_train} (same picture as {copy}: COVID, test, " in warning.message


def test_near_duplicate_pairs_by_kind_closest_first(data):
    covid_test = first_listed(data, "COVID/testCT_COVID.txt", "CT_COVID")
    covid_train = first_listed(data, "COVID/trainCT_COVID.txt", "CT_COVID")
    plant_near_duplicate(data, covid_test, "CT_NonCOVID", "NonCOVID/trainCT_NonCOVID.txt", "71%0.jpg", scale=0.5)
    plant_near_duplicate(data, covid_train, "CT_COVID", "COVID/trainCT_COVID.txt", "same-split-p1-1.png", scale=1.0)
    plant_near_duplicate(data, covid_train, "CT_COVID", "COVID/valCT_COVID.txt", "other-split-p1-1.png", scale=0.9)
    pairs = near_duplicates(build_manifest(data))
    assert list(pairs["distance"]) == sorted(pairs["distance"])
    kinds = {(a, b): kind for a, b, kind in zip(pairs["relpath_a"], pairs["relpath_b"], pairs["kind"], strict=True)}
    assert kinds == {
        (covid_test, "CT_NonCOVID/71%0.jpg"): "across classes",
        (covid_train, "CT_COVID/same-split-p1-1.png"): "within a split",
        (covid_train, "CT_COVID/other-split-p1-1.png"): "across splits",
        ("CT_COVID/other-split-p1-1.png", "CT_COVID/same-split-p1-1.png"): "across splits",
    }
    with pytest.raises(ValueError, match="within 0..255 bits"):
        near_duplicates(build_manifest(data), max_distance=256)


def test_a_manifest_from_before_perceptual_hashes_is_rebuilt(data, caplog):
    old = build_manifest(data).drop(columns="dhash")
    old.to_parquet(data / MANIFEST_NAME, index=False)
    with pytest.raises(CovidctError, match="written by an older covidct"):
        read_manifest(data / MANIFEST_NAME)
    assert validate(data, **SMALL).success
    assert "was written by an older covidct, without perceptual hashes" in caplog.text
