"""DICOM CT (issue 24): Hounsfield units and windows pixel by pixel, slices and series, the ledger, and no
patient data in any output or log.

Real DICOM from pydicom's own test files (a CT, a JPEG 2000 CT, an MR, a DICOMDIR) and synthetic CT
written with pydicom (``dicom_files``: known stored values, slope/intercept, MONOCHROME1,
multi-frame, a truncated file, patient data planted in every identifying tag).
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.data import get_testdata_file

from covidct.cli import main
from covidct.core import secrets
from covidct.core.errors import CovidctError, ImageDecodeError
from covidct.data import dicom
from covidct.data.dicom import Window
from covidct.inference import series as serieslib
from dicom_files import PHI, PREFIX, chest, series_folder, uid, write_ct

SALT = b"0123456789abcdef0123456789abcdef"


def shipped(name: str) -> Path:
    """One of the DICOM files pydicom's wheel ships (never one it would download)."""
    path = Path(get_testdata_file(name, download=False))
    assert path.is_file(), name
    return path


def one(path: Path, window: Window = dicom.LUNG, salt: bytes = SALT) -> dicom.Slice:
    (found,) = dicom.read_slices(path.read_bytes(), salt, window)
    return found


# --------------------------------------------------------------------------- from stored values to the picture


def test_stored_values_become_hounsfield_units_then_the_window_pixel_by_pixel(tmp_path):
    stored = np.array([[0, 100, 250, 400], [450, 500, 700, 1000]], dtype=np.int16)
    path = write_ct(tmp_path / "a.dcm", stored, series=uid(), study=uid(), slope=2.0, intercept=-1000.0)
    hu = stored * 2.0 - 1000.0  # -1000 .. 1000 HU
    for window in (dicom.LUNG, Window(40, 400)):  # DICOM's linear VOI function (PS3.3 C.11.2.1.2.1), 8 bits
        c, w = window.level, window.width
        expected = np.floor(np.clip(((hu - (c - 0.5)) / (w - 1) + 0.5) * 255, 0, 255) + 0.5).astype(np.uint8)
        assert np.array_equal(one(path, window).picture, expected), window
    assert one(path).picture.tolist() == [[60, 94, 145, 196], [213, 230, 255, 255]]  # worked out by hand
    assert one(path, Window(40, 400)).picture.tolist() == [[0, 0, 0, 0], [38, 102, 255, 255]]
    assert one(path, Window(-500, 1)).picture.tolist() == [[0, 0, 255, 255], [255, 255, 255, 255]]  # a threshold


def test_without_rescale_tags_stored_values_are_the_units(tmp_path):
    stored = np.array([[-1000, -600], [150, 900]], dtype=np.int16)
    path = write_ct(tmp_path / "a.dcm", stored, series=uid(), study=uid(), slope=None)
    assert one(path).picture.tolist() == [[60, 128], [255, 255]]


def test_monochrome1_is_inverted_after_the_window(tmp_path):
    stored = chest(seed=3)
    series, study = uid(), uid()
    plain = one(write_ct(tmp_path / "m2.dcm", stored, series=series, study=study))
    inverted = one(write_ct(tmp_path / "m1.dcm", stored, series=series, study=study, photometric="MONOCHROME1"))
    assert np.array_equal(inverted.picture, 255 - plain.picture)


def test_a_multi_frame_file_gives_one_slice_per_frame(tmp_path):
    frames = np.stack([chest(seed=i) for i in range(3)])
    path = write_ct(tmp_path / "mf.dcm", frames, series=uid(), study=uid())
    slices = dicom.read_slices(path.read_bytes(), SALT)
    assert [s.frame for s in slices] == [1, 2, 3]
    assert len({s.key for s in slices}) == 3 and len({s.sop for s in slices}) == 1
    for s, stored in zip(slices, frames, strict=True):
        assert np.array_equal(s.picture, dicom.LUNG.to_8bit(stored - 1024.0))


def test_enhanced_multi_frame_rescale_comes_from_each_frames_functional_group():
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PerFrameFunctionalGroupsSequence = []
    for slope, intercept in ((1.0, -1024.0), (2.0, -2048.0)):
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = slope, intercept
        group = Dataset()
        group.PixelValueTransformationSequence = [transform]
        ds.PerFrameFunctionalGroupsSequence.append(group)
    stored = np.full((2, 1, 2), 1024.0)
    assert dicom.hounsfield(ds, stored).tolist() == [[[0.0, 0.0]], [[0.0, 0.0]]]


def test_a_real_ct_and_a_jpeg2000_compressed_ct_decode():
    small = one(shipped("CT_small.dcm"))  # pydicom's CT: 128 x 128, uncompressed
    assert small.picture.shape == (128, 128) and small.modality == "CT" and small.kernel and small.slice_thickness
    compressed = one(shipped("693_J2KI.dcm"))  # a 512 x 512 CT in JPEG 2000 (decoded by GDCM)
    assert compressed.picture.shape == (512, 512) and compressed.window == "L-600_W1500"
    assert compressed.picture.min() == 0 and compressed.picture.max() == 255  # air and bone, both clipped
    png = compressed.png()
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(__import__("io").BytesIO(png))), compressed.picture)  # lossless


# --------------------------------------------------------------------------- what is not scored, and why


def test_what_cannot_or_must_not_be_scored_is_refused_with_its_reason(tmp_path):
    cases = {
        shipped("MR_small.dcm"): "DICOM modality MR, not CT",
        shipped("DICOMDIR"): "a DICOMDIR",
        shipped("ExplVR_BigEnd.dcm"): "DICOM modality US, not CT",
    }
    good = write_ct(tmp_path / "good.dcm", chest(), series=uid(), study=uid())
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    cases[truncated] = r"its pixel data \(Explicit VR Little Endian\) cannot be decoded: The number of bytes"
    cut_in_header = tmp_path / "header.dcm"
    cut_in_header.write_bytes(good.read_bytes()[:200])
    cases[cut_in_header] = r"no DICOM modality \(not an image, or a truncated file\)"
    burned = write_ct(tmp_path / "burned.dcm", chest(), series=uid(), study=uid(), extra={"BurnedInAnnotation": "YES"})
    cases[burned] = "BurnedInAnnotation YES: its pixels may show patient data"
    colour = tmp_path / "colour.dcm"
    shutil.copy(shipped("SC_rgb_jpeg_gdcm.dcm"), colour)
    cases[colour] = "DICOM modality OT, not CT"
    for path, reason in cases.items():
        with pytest.raises(ImageDecodeError, match=reason):
            dicom.read_slices(path.read_bytes(), SALT)
    assert not dicom.is_dicom(b"\x89PNG\r\n\x1a\n" + b"\0" * 200) and dicom.is_dicom(good.read_bytes())


def test_an_unexpected_error_in_a_header_is_a_reason_without_its_message(tmp_path, monkeypatch):
    path = write_ct(tmp_path / "a.dcm", chest(), series=uid(), study=uid())

    def malformed(*_):
        raise ValueError(f"invalid literal for int(): {PHI['PatientName']!r}")  # messages can quote values

    monkeypatch.setattr(dicom, "_read_slices", malformed)
    with pytest.raises(ImageDecodeError, match=r"^its header cannot be read \(ValueError\)$"):
        dicom.read_slices(path.read_bytes(), SALT)


def test_reasons_never_quote_a_header_value(tmp_path):
    path = write_ct(tmp_path / "mr.dcm", chest(), series=uid(), study=uid(), modality="MR")
    with pytest.raises(ImageDecodeError) as refused:
        dicom.read_slices(path.read_bytes(), SALT)
    assert not any(value in str(refused.value) for value in PHI.values())


def test_a_window_is_read_from_level_comma_width_and_refuses_nonsense():
    assert Window.parse("-600,1500") == dicom.LUNG == Window.parse(None) == Window.parse(" ")
    assert Window.parse("40, 400").id == "L40_W400"
    for bad in ("600", "-600;1500", "a,b", "-600,0", "9000,100", "-600,-5"):
        with pytest.raises(CovidctError, match="window"):
            Window.parse(bad)


# --------------------------------------------------------------------------- keys without patient data


def test_keys_are_keyed_hashes_a_reexport_keeps_them_and_another_window_or_salt_changes_them(tmp_path):
    series, study, sop = uid(), uid(), uid()
    first = one(write_ct(tmp_path / "a.dcm", chest(), series=series, study=study, sop=sop))
    reexport = one(write_ct(tmp_path / "b.dcm", chest(), series=series, study=study, sop=sop,
                            extra={"InstitutionName": "Elsewhere"}))  # fmt: skip
    assert (tmp_path / "a.dcm").read_bytes() != (tmp_path / "b.dcm").read_bytes()
    assert (reexport.key, reexport.sop, reexport.series) == (first.key, first.sop, first.series)
    assert first.sop == dicom.pseudonym(SALT, sop) and len(first.key) == 64 and sop not in first.key
    other_window = one(tmp_path / "a.dcm", Window(40, 400))
    other_salt = one(tmp_path / "a.dcm", salt=b"f" * 32)
    assert other_window.key != first.key and other_window.sop == first.sop
    assert other_salt.sop != first.sop and other_salt.key != first.key


def test_the_salt_is_made_once_per_deployment_and_readable_only_by_its_owner(tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(secrets.SALT_FILE_ENV, raising=False)
    made = secrets.uid_salt()
    path = tmp_path / "home" / "secrets" / "uid-salt"
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600 and len(made) == 64
    assert secrets.uid_salt() == made  # kept
    monkeypatch.setenv(secrets.SALT_FILE_ENV, str(tmp_path / "short"))
    (tmp_path / "short").write_text("abc")
    with pytest.raises(CovidctError, match="too short"):
        secrets.uid_salt()


# --------------------------------------------------------------------------- series


def test_a_series_is_the_mean_of_its_top_tenth_of_slices():
    assert [serieslib.top_k(n) for n in (1, 9, 10, 11, 25)] == [1, 1, 1, 2, 3]
    slices = pd.DataFrame(
        {
            "study_uid_hash": ["s"] * 12 + ["t"],
            "series_uid_hash": ["a"] * 12 + ["b"],
            "probability": [0.9, 0.7] + [0.1] * 10 + [0.4],
            "modality": "CT",
            "slice_thickness": [1.25] * 11 + [2.5, 1.0],
            "kernel": "B30f",
            "window": "L-600_W1500",
        }
    )
    table = serieslib.series_table(pd.concat([slices, pd.DataFrame({"probability": [0.99]})]), threshold=0.5)
    a, b = table.to_dict("records")  # the image without a series (NaN hashes) has no series row
    assert (a["slices"], a["top_k"], a["probability"], a["label"]) == (12, 2, pytest.approx(0.8), "COVID")
    assert a["slice_thickness"] == "mixed" and a["kernel"] == "B30f" and a["notice"] == dicom.NOTICE
    assert (b["slices"], b["probability"], b["label"], b["slice_thickness"]) == (1, 0.4, "non-COVID", "1")
    assert serieslib.series_table(pd.DataFrame({"probability": [0.3]})).empty  # pictures only: no series


# --------------------------------------------------------------------------- predict and score on a DICOM export


def export_folder(root: Path, dataset: Path) -> Path:
    """A PACS-like export: two synthetic CT series (one multi-frame), pydicom's CT and JPEG 2000 CT, its MR,
    its DICOMDIR, a truncated slice, and one PNG of the synthetic dataset."""
    series_folder(root / "study1" / "series1", 4)
    write_ct(root / "study1" / "series2" / "multi.dcm", np.stack([chest(seed=9 + i) for i in range(3)]),
             series=uid(), study=uid(), thickness=5.0)  # fmt: skip
    for name in ("CT_small.dcm", "693_J2KI.dcm", "MR_small.dcm", "DICOMDIR"):
        shutil.copy(shipped(name), root / name)
    good = (root / "study1" / "series1" / "IM0000.dcm").read_bytes()
    (root / "broken.dcm").write_bytes(good[: len(good) // 2])
    shutil.copy(sorted((dataset / "CT_COVID").iterdir())[0], root / "picture.png")
    return root


def assert_no_patient_data(*places: Path, text: str = "") -> None:
    """No planted identifier (every value of ``PHI``, its distinctive token ``zqxv`` in any case, the
    synthetic files' UID root) in any file under ``places`` nor in ``text``."""
    needles = [v.lower().encode() for v in PHI.values()] + [b"zqxv", PREFIX.encode()]
    searched = 0
    for place in places:
        for path in [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]:
            data = path.read_bytes().lower()
            for needle in needles:
                assert needle not in data, f"{needle!r} in {path}"
            searched += 1
    for needle in needles:
        assert needle.decode() not in text.lower(), needle
    assert searched


@pytest.mark.slow
def test_predict_scores_a_dicom_export_slice_by_slice_and_by_series(small_model, small_dataset, tmp_path, capsys):
    scans = export_folder(tmp_path / "export", small_dataset)
    out, log = tmp_path / "out" / "scores.csv", tmp_path / "predict.log"
    out.parent.mkdir()
    maps = out.parent / "maps"
    assert main(["predict", "--model", str(small_model), "--images", str(scans), "--out", str(out),
                 "--log", str(log), "--window=-600,1500", "--explain", str(maps)]) == 0  # fmt: skip
    printed = capsys.readouterr()
    assert "Research use only, not for diagnosis" in printed.err
    rows = pd.read_csv(out)
    scored = rows[rows.error.isna()]
    assert len(scored) == 4 + 3 + 2 + 1  # four slices, three frames, pydicom's two CTs, the PNG
    multi = scored[scored.path.str.contains("multi.dcm")]
    assert multi.path.str.endswith(("[1]", "[2]", "[3]")).all() and multi.frame.tolist() == [1, 2, 3]
    assert (
        scored[scored.path.str.endswith(".dcm") | scored.path.str.contains(r"\.dcm\[")].window.eq("L-600_W1500").all()
    )
    assert scored[scored.path.str.endswith("picture.png")].series_uid_hash.isna().all()
    refused = rows[rows.error.notna()].set_index(rows[rows.error.notna()].path.str.rsplit("/", n=1).str[-1]).error
    assert refused["MR_small.dcm"] == "DICOM modality MR, not CT: not scored"
    assert refused["DICOMDIR"].startswith("a DICOMDIR") and "cannot be decoded" in refused["broken.dcm"]

    series = pd.read_csv(out.with_name("scores.series.csv"))
    assert sorted(series.slices.tolist()) == [1, 1, 3, 4]  # pydicom's two CTs, the multi-frame file, series1
    assert series.notice.eq(dicom.NOTICE).all() and series.rule.eq(serieslib.RULE).all()
    for _, s in series.iterrows():
        members = scored[scored.series_uid_hash == s.series_uid_hash].probability_covid
        assert s.probability == pytest.approx(serieslib.series_probability(members), abs=1e-6)
    assert len(pd.read_parquet(out.with_name("scores.parquet"))) == len(scored)
    assert (maps / "study1" / "series2" / "multi.dcm[3].map.png").is_file()  # each frame explained
    assert len(list(maps.rglob("*.png"))) == len(scored)
    assert len(pd.read_parquet(out.with_name("scores.series.parquet"))) == 4
    assert_no_patient_data(out.parent, log, text=printed.out + printed.err)


@pytest.mark.slow
def test_scoring_keys_slices_by_their_hashed_uid_a_reexport_is_not_scored_twice(spark, small_model, tmp_path,
                                                                                 caplog, monkeypatch):  # fmt: skip
    from covidct.lifecycle.scoring import ScoreConfig, score_folder

    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
    series, study = uid(), uid()
    sops = [uid() for _ in range(3)]
    first = tmp_path / "export1"
    for i, sop in enumerate(sops):
        write_ct(first / f"{i}.dcm", chest(seed=i), series=series, study=study, sop=sop, instance=i + 1)
    second = tmp_path / "export2"  # the same slices exported again: other bytes, names and tags, same UIDs
    for i, sop in enumerate(sops):
        write_ct(second / f"slice-{i}.dcm", chest(seed=i), series=series, study=study, sop=sop, instance=i + 1,
                 extra={"StationName": "OTHERSTATION"})  # fmt: skip
    ledger = tmp_path / "scores" / "_ledger"

    def score(folder, run, window=None):
        config = ScoreConfig(images=folder, model_dir=small_model, model_name="covid-ct", model_version="1",
                             out=tmp_path / "scores" / run, ledger=ledger, window=window)  # fmt: skip
        return score_folder(config, spark)

    with caplog.at_level("INFO"):
        s1 = score(first, "run1")
        s2 = score(second, "run2")
        s3 = score(second, "run3", Window(40, 400))
    assert (s1["scored_new"], s2["scored_new"], s2["already_scored"]) == (3, 0, 3)
    assert s3["scored_new"] == 3 and s3["dicom"]["window"] == "L40_W400"  # another window: other pictures
    assert s1["dicom"] == s2["dicom"] and s1["dicom"]["series"] == 1 and s1["dicom"]["notice"] == dicom.NOTICE
    run2 = pd.read_parquet(tmp_path / "scores" / "run2" / "predictions.parquet")
    assert not run2.new.any() and set(run2.scored_run) == {"run1"} and run2.series_uid_hash.nunique() == 1
    (one_series,) = pd.read_parquet(tmp_path / "scores" / "run2" / "series.parquet").to_dict("records")
    assert one_series["slices"] == 3 and one_series["probability"] == pytest.approx(run2.probability.max())
    assert json.loads((tmp_path / "scores" / "run1" / "summary.json").read_text())["dicom"]["slices"] == 3
    assert_no_patient_data(tmp_path / "scores", text=caplog.text)
