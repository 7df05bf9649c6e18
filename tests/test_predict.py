"""``covidct predict`` on a real folder of new scans: unreadable files are listed, the rest are scored."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from covidct.cli import main
from covidct.data import image as imagelib


def scans_folder(dataset: Path, dest: Path) -> tuple[Path, dict[str, str]]:
    """4 good images (one in a sub-folder) and 3 files that cannot be scored; returns the folder and
    ``{file name: reason}`` for the bad ones."""
    dest.mkdir()
    images = sorted((dataset / "CT_COVID").iterdir())[:2] + sorted((dataset / "CT_NonCOVID").iterdir())[:2]
    for source in images[:3]:
        shutil.copy(source, dest / source.name)
    (dest / "more").mkdir()
    shutil.copy(images[3], dest / "more" / images[3].name)
    (dest / "notes.txt").write_text("patient 12, second scan tomorrow\n")
    (dest / "empty.png").write_bytes(b"")
    (dest / "truncated.png").write_bytes(images[0].read_bytes()[:200])
    (dest / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: skipped, as Spark does, not listed
    bad = {
        "notes.txt": "not a recognised image format",
        "empty.png": "the file is empty",
        "truncated.png": "image file is truncated",
    }
    return dest, bad


def test_problem_names_what_is_wrong_with_bytes(small_dataset):
    good = next((small_dataset / "CT_COVID").iterdir()).read_bytes()
    assert imagelib.problem(good) is None
    assert imagelib.problem(b"") == "the file is empty"
    assert imagelib.problem(b"hello") == "not a recognised image format"
    assert imagelib.problem(good[:200]).startswith("image file is truncated")


def test_unreadable_files_are_listed_and_the_rest_scored(small_model, small_dataset, tmp_path, capsys):
    folder, bad = scans_folder(small_dataset, tmp_path / "scans")
    out, log = tmp_path / "predictions.csv", tmp_path / "predict.log"
    assert main(["predict", "--model", str(small_model), "--images", str(folder), "--out", str(out),
                 "--log", str(log)]) == 0  # fmt: skip
    rows = pd.read_csv(out, keep_default_na=False)
    assert list(rows.columns) == ["path", "probability_covid", "prediction", "error"]
    scored = rows[rows.error == ""]
    assert len(scored) == 4 and set(scored.prediction) <= {"COVID", "non-COVID"}
    assert any(p.endswith("/more/" + Path(p).name) for p in scored.path)  # sub-folders too
    assert all(p.startswith(f"file:{folder}/") for p in rows.path)  # as Spark's `path` columns write them
    unreadable = {Path(r.path).name: r.error for r in rows[rows.error != ""].itertuples()}
    assert unreadable.keys() == bad.keys()
    for name, reason in bad.items():
        assert unreadable[name].startswith(reason)
    assert (rows[rows.error != ""].probability_covid == "").all()
    err = capsys.readouterr().err
    assert "3 of 7 files could not be scored" in err and "Traceback" not in err
    logged = log.read_text()
    for name, reason in bad.items():  # the log names each one, with its reason
        assert re.search(rf"unreadable, not scored: file:\S*/{re.escape(name)}: {reason}", logged), name


def test_predict_returns_the_unreadable_files_beside_the_rows(small_model, small_dataset, tmp_path):
    from covidct.inference.predict import predict

    folder, bad = scans_folder(small_dataset, tmp_path / "scans")
    rows = predict(small_model, folder)
    assert len(rows) == 4 and all(0 <= r["probability"] <= 1 for r in rows)
    assert sorted(Path(u.path).name for u in rows.unreadable) == sorted(bad)
    # The good images get the same probabilities as in a folder without the bad files.
    clean = tmp_path / "clean"
    shutil.copytree(folder, clean, ignore=shutil.ignore_patterns(*bad))
    alone = {Path(r["path"]).name: r["probability"] for r in predict(small_model, clean)}
    assert alone == pytest.approx({Path(r["path"]).name: r["probability"] for r in rows})
    assert predict(small_model, clean).unreadable == []


def test_strict_fails_and_writes_nothing(small_model, small_dataset, tmp_path, capsys):
    folder, _ = scans_folder(small_dataset, tmp_path / "scans")
    out = tmp_path / "predictions.csv"
    args = ["predict", "--model", str(small_model), "--images", str(folder), "--out", str(out), "--strict"]
    assert main([*args, "--log", str(tmp_path / "log")]) == 2
    err = capsys.readouterr().err
    assert "error: 3 of 7 files under" in err and "--strict: nothing was scored" in err
    assert "notes.txt (not a recognised image format)" in err and "Traceback" not in err
    assert not out.exists()


def test_a_folder_with_nothing_to_score_is_an_error(small_model, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "notes.txt").write_text("no scans today")
    (folder / "empty.png").write_bytes(b"")
    log = tmp_path / "log"
    assert main(["predict", "--model", str(small_model), "--images", str(folder), "--log", str(log)]) == 2
    err = capsys.readouterr().err
    assert "error: none of the 2 files under" in err and "could be scored" in err and "empty.png (the file" in err
    assert "error: none of the 2 files under" in log.read_text()  # the log has the outcome too


@pytest.mark.slow
def test_the_terminal_shows_only_our_lines_spark_and_tensorflow_go_to_the_log(small_model, small_dataset, tmp_path):
    """A new user's run: a fresh process (its own JVM), a folder with a file that is not an image."""
    folder, _ = scans_folder(small_dataset, tmp_path / "scans")
    env = {**os.environ, "COVIDCT_HOME": str(tmp_path / "home")}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell: TensorFlow's defaults
    result = subprocess.run(
        [sys.executable, "-m", "covidct.cli", "predict", "--model", str(small_model), "--images", str(folder)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    scored = [line for line in result.stdout.splitlines() if re.match(r"^\d\.\d{4}\t(COVID|non-COVID)\t", line)]
    unreadable = [line for line in result.stdout.splitlines() if "\tunreadable\t" in line]
    assert len(scored) == 4 and len(unreadable) == 3 and len(result.stdout.splitlines()) == 7
    assert any("notes.txt\t(not a recognised image format)" in line for line in unreadable)
    ours = re.compile(r"^(\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING) covidct[.\w]*: |Spark and TensorFlow output: |"
                      r"3 of 7 files could not be scored )")  # fmt: skip
    foreign = [line for line in result.stderr.splitlines() if line.strip() and not ours.match(line)]
    assert not foreign, "\n".join(foreign[:20])
    logs = list((tmp_path / "home" / "logs").glob("predict-*.log"))
    assert len(logs) == 1 and str(logs[0]) in result.stderr
    logged = logs[0].read_text()
    assert "Setting default log level" in logged  # the JVM's own output went there
    assert "unreadable, not scored: " in logged and "notes.txt: not a recognised image format" in logged
