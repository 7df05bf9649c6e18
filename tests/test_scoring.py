"""Scoring new scans (``covidct score``, the scoring DAG's job): the ledger, unreadable files, the allowlist."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from covidct.cli import main
from covidct.core.errors import CovidctError
from covidct.inference import files
from covidct.lifecycle.scoring import COLUMNS, Ledger, ScoreConfig, score_folder
from covidct.orchestration import policy


def incoming(dataset: Path, dest: Path, n: int = 4) -> Path:
    """``n`` scans (COVID and non-COVID) and one file that is not an image."""
    dest.mkdir(parents=True)
    images = sorted((dataset / "CT_COVID").iterdir())[: n // 2] + sorted((dataset / "CT_NonCOVID").iterdir())[: n // 2]
    for source in images:
        shutil.copy(source, dest / source.name)
    (dest / "notes.txt").write_text("not a scan")
    return dest


def config(folder, out, ledger, version="1", **kw) -> ScoreConfig:
    return ScoreConfig(images=folder, model_dir=kw.pop("model"), model_name="covid-ct", model_version=version,
                       out=out, ledger=ledger, **kw)  # fmt: skip


def test_scoring_scores_each_image_once_per_model_version(spark, small_model, small_dataset, tmp_path):
    folder = incoming(small_dataset, tmp_path / "incoming")
    ledger = tmp_path / "scores" / "_ledger"
    first = score_folder(config(folder, tmp_path / "scores" / "run1", ledger, model=small_model), spark)
    assert (first["files"], first["readable"], first["scored_new"], first["already_scored"]) == (5, 4, 4, 0)
    assert first["unreadable"] == 1 and first["unreadable_files"][0]["path"].endswith("/notes.txt")
    assert first["unreadable_files"][0]["reason"] == "not a recognised image format"
    out = tmp_path / "scores" / "run1"
    assert sorted(p.name for p in out.iterdir()) == [
        "predictions.csv", "predictions.parquet", "series.csv", "series.parquet", "summary.json", "unreadable.csv",
    ]  # fmt: skip
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert list(predictions.columns) == COLUMNS and len(predictions) == 4
    assert set(predictions.model_name) == {"covid-ct"} and set(predictions.model_version) == {"1"}
    assert predictions.probability.between(0, 1).all() and set(predictions.label) <= {"COVID", "non-COVID"}
    assert predictions.new.all() and set(predictions.scored_run) == {"run1"}
    assert predictions.sha256.str.fullmatch(r"[0-9a-f]{64}").all()
    assert len(pd.read_csv(out / "predictions.csv")) == 4
    assert pd.read_csv(out / "unreadable.csv").reason.tolist() == ["not a recognised image format"]

    # The same folder again: nothing is scored; the output still lists every image, from the ledger.
    second = score_folder(config(folder, tmp_path / "scores" / "run2", ledger, model=small_model), spark)
    assert (second["scored_new"], second["already_scored"]) == (0, 4)
    again = pd.read_parquet(tmp_path / "scores" / "run2" / "predictions.parquet")
    assert not again.new.any() and set(again.scored_run) == {"run1"}
    assert again.set_index("path").probability.to_dict() == predictions.set_index("path").probability.to_dict()

    # A new image is scored alone; a renamed copy of a scored one (same bytes) is not scored again.
    new = sorted((small_dataset / "CT_NonCOVID").iterdir())[-1]
    shutil.copy(new, folder / new.name)
    shutil.copy(folder / predictions.path.iloc[0].rsplit("/", 1)[1], folder / "renamed-copy.png")
    third = score_folder(config(folder, tmp_path / "scores" / "run3", ledger, model=small_model), spark)
    assert (third["readable"], third["scored_new"], third["already_scored"]) == (6, 1, 4)
    rows = pd.read_parquet(tmp_path / "scores" / "run3" / "predictions.parquet").set_index("path")
    assert rows.new.sum() == 1 and rows.loc[next(p for p in rows.index if p.endswith(new.name)), "new"]
    copy = next(p for p in rows.index if p.endswith("renamed-copy.png"))
    assert not rows.loc[copy, "new"] and rows.loc[copy, "scored_run"] == "run1"

    # A new model version scores every image again.
    fourth = score_folder(config(folder, tmp_path / "scores" / "run4", ledger, version="2", model=small_model), spark)
    assert (fourth["scored_new"], fourth["already_scored"]) == (5, 0)  # 6 files, 5 distinct images
    assert len(Ledger(ledger, "covid-ct", "1").lookup(set(rows.sha256))) == 5
    assert len(Ledger(ledger, "covid-ct", "2").lookup(set(rows.sha256))) == 5


def test_two_jobs_at_once_never_score_an_image_twice(spark, small_model, small_dataset, tmp_path):
    folder = incoming(small_dataset, tmp_path / "incoming", n=2)
    ledger = tmp_path / "_ledger"
    results, errors = {}, []

    def job(name):
        try:
            results[name] = score_folder(config(folder, tmp_path / name, ledger, model=small_model), spark)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert sorted(r["scored_new"] for r in results.values()) == [0, 2]
    parts = list((ledger / "covid-ct" / "1").glob("part-*.parquet"))
    assert len(parts) == 1 and len(pd.read_parquet(parts[0])) == 2
    assert not [p for p in ledger.rglob(".*") if not p.name.endswith(".lock")]  # no staging left behind


def test_strict_scoring_writes_nothing(spark, small_model, small_dataset, tmp_path):
    folder = incoming(small_dataset, tmp_path / "incoming", n=2)
    with pytest.raises(CovidctError, match=r"1 of 3 files cannot be scored \(strict\): file:\S+/notes.txt"):
        score_folder(config(folder, tmp_path / "out", tmp_path / "_ledger", model=small_model, strict=True), spark)
    assert not (tmp_path / "out").exists() and not list((tmp_path / "_ledger").rglob("*.parquet"))


def test_score_command_prints_what_it_did(spark, small_model, small_dataset, tmp_path, capsys):
    folder = incoming(small_dataset, tmp_path / "incoming", n=2)
    args = ["score", "--images", str(folder), "--model", str(small_model), "--model-name", "covid-ct",
            "--model-version", "7", "--out", str(tmp_path / "out"), "--ledger", str(tmp_path / "_ledger")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "covid-ct version 7: 3 files in" in out and "2 images scored, 0 already scored" in out
    assert "unreadable, not scored: file:" in out and "notes.txt: not a recognised image format" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"] == {"name": "covid-ct", "version": "7", "dir": str(small_model)}


# --------------------------------------------------------------------------- the folder param: untrusted


def test_folder_policy_allows_the_incoming_folder_and_listed_ones_only(tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COVIDCT_INCOMING_DIR", raising=False)
    monkeypatch.delenv(policy.SCORING_DIRS_ENV, raising=False)
    allowed = tmp_path / "scans"
    (allowed / "today").mkdir(parents=True)
    (tmp_path / "home" / "incoming").mkdir(parents=True)
    p = policy.Policy.from_env()
    assert p.check_folder(None) == p.check_folder("") == str((tmp_path / "home" / "incoming").resolve())
    assert p.check_folder(str(tmp_path / "home" / "incoming" / "x")).endswith("/incoming/x")
    for refused in ("/etc", str(allowed), str(tmp_path / "home" / "incoming" / ".." / "runs")):
        with pytest.raises(policy.PolicyError, match="COVIDCT_ALLOWED_SCORING_DIRS"):
            p.check_folder(refused)
    (tmp_path / "home" / "incoming" / "link").symlink_to("/etc")  # a link out of the allowed folder
    with pytest.raises(policy.PolicyError, match=r"resolved: /etc"):
        p.check_folder(str(tmp_path / "home" / "incoming" / "link"))
    monkeypatch.setenv(policy.SCORING_DIRS_ENV, str(allowed))
    assert policy.Policy.from_env().check_folder(str(allowed / "today")) == str((allowed / "today").resolve())
    monkeypatch.setenv("COVIDCT_INCOMING_DIR", str(allowed))
    assert policy.Policy.from_env().check_folder("") == str(allowed.resolve())


@pytest.mark.parametrize("folder", ["relative/scans", "/data/../etc", "/data/$(id)", "-rf", "/data/a b"])
def test_the_folder_pattern_refuses_what_is_not_a_plain_absolute_path(folder):
    import re

    assert not re.search(policy.FOLDER_PATTERN, folder)


def test_the_job_refuses_a_folder_outside_the_allowlist(small_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(policy.SCORING_DIRS_ENV, raising=False)
    for folder, message in (("/etc", "is not inside a folder the operator allows"),
                            ("etc/../x", "--images 'etc/../x' is not allowed")):  # fmt: skip
        args = ["score", "--images", folder, "--model", str(small_model), "--model-name", "m",
                "--model-version", "1", "--out", str(tmp_path / "out")]  # fmt: skip
        assert main(args, confined=True) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "home" / "scores").exists()


def test_the_job_does_not_follow_a_symbolic_link_out_of_the_allowed_folders(spark, small_model, small_dataset,
                                                                            tmp_path, monkeypatch, capsys):  # fmt: skip
    """A link inside the incoming folder to a file or a folder elsewhere is not read (the folder itself was
    allowed; what it links to is held to the allowlist too); a link that stays inside is."""
    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(policy.SCORING_DIRS_ENV, raising=False)
    folder = incoming(small_dataset, tmp_path / "incoming", n=2)
    monkeypatch.setenv("COVIDCT_INCOMING_DIR", str(folder))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = sorted((small_dataset / "CT_NonCOVID").iterdir())[-1]
    shutil.copy(secret, outside / "secret.png")
    (folder / "link-to-file.png").symlink_to(outside / "secret.png")
    (folder / "link-to-folder").symlink_to(outside, target_is_directory=True)
    inside = next(p for p in folder.iterdir() if p.suffix == ".png" and not p.is_symlink())
    (folder / "link-inside.png").symlink_to(inside)
    out = tmp_path / "home" / "scores" / "run1"
    args = ["score", "--images", str(folder), "--model", str(small_model), "--model-name", "m",
            "--model-version", "1", "--out", str(out)]  # fmt: skip
    assert main(args, confined=True) == 0
    summary = json.loads((out / "summary.json").read_text())
    refused = {Path(u["path"]).name: u["reason"] for u in summary["unreadable_files"]}
    assert refused.pop("link-to-file.png") == refused.pop("secret.png") == files.OUTSIDE, summary
    assert refused == {"notes.txt": "not a recognised image format"}
    scored = {Path(p).name for p in pd.read_csv(out / "predictions.csv").path}
    assert scored == {p.name for p in folder.iterdir() if p.suffix == ".png"} - {"link-to-file.png"}
    assert "link-inside.png" in scored


# --------------------------------------------------------------------------- under load


def reencoded(source: Path, dest: Path, copies: int) -> list[Path]:
    """Every image of ``source`` ``copies`` times, each copy re-encoded (same pixels, other bytes: another
    image for the ledger)."""
    from PIL import Image, PngImagePlugin

    dest.mkdir()
    made = []
    for image in sorted(source.rglob("*.png")):
        for copy in range(copies):
            info = PngImagePlugin.PngInfo()
            info.add_text("covidct-test-copy", str(copy))
            target = dest / f"{image.stem}-{copy}.png"
            Image.open(image).save(target, pnginfo=info)
            made.append(target)
    return made


def peak_rss(process: psutil.Process, peaks: dict[int, int]) -> None:
    """Add the RSS of ``process`` and its descendants (Spark's JVM, its Python workers) to ``peaks``."""
    try:
        tree = [process, *process.children(recursive=True)]
        rss = sum(p.memory_info().rss for p in tree if p.is_running())
    except psutil.Error:
        return
    peaks[process.pid] = max(peaks.get(process.pid, 0), rss)


def test_five_scoring_jobs_at_once_over_overlapping_folders_score_each_image_once(small_model, small_dataset, tmp_path):
    """Five ``covidct score`` processes (the scoring DAG's job) started together on folders that overlap: the
    ledger holds every image once, every run lists each of its files once, and each job's memory (its
    process tree: driver, JVM, Python workers) stays bounded; bench/scoring_load.py measures the same at
    2,000 real images."""
    images = reencoded(small_dataset, tmp_path / "pool", copies=3)  # its PNG images, 3 times: 54
    assert len(images) >= 48
    width, stride = 16, 8  # folders [0, 16), [8, 24), ... [32, 48): every image in one or two folders
    folders = []
    for k in range(5):
        folder = tmp_path / f"incoming-{k}"
        folder.mkdir()
        for image in images[k * stride : k * stride + width]:
            os.link(image, folder / image.name)
        folders.append(folder)
    shutil.copy(images[0], folders[4] / "same-bytes-other-name.png")  # scored once, listed under both names
    ledger, scores = tmp_path / "_ledger", tmp_path / "scores"
    jobs = [
        psutil.Popen([str(Path(sys.executable).parent / "covidct"), "-q", "score", "--images", str(folder),
                      "--model", str(small_model), "--model-name", "covid-ct", "--model-version", "1",
                      "--out", str(scores / f"run-{k}"), "--ledger", str(ledger)],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for k, folder in enumerate(folders)
    ]  # fmt: skip
    peaks: dict[int, int] = {}
    deadline = time.monotonic() + 900
    while any(job.poll() is None for job in jobs) and time.monotonic() < deadline:
        for job in jobs:
            peak_rss(job, peaks)
        time.sleep(0.2)
    outputs = [job.communicate(timeout=60)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0] * 5, outputs
    # The ledger: each image once, all of them.
    scored = pd.concat([pd.read_parquet(p) for p in (ledger / "covid-ct" / "1").glob("part-*.parquet")])
    shas = {hashlib.sha256(p.read_bytes()).hexdigest() for folder in folders for p in folder.iterdir()}
    assert len(scored) == scored["sha256"].nunique() == len(shas) == len(images[: 4 * stride + width])
    assert set(scored["sha256"]) == shas
    summaries = [json.loads((scores / f"run-{k}" / "summary.json").read_text()) for k in range(5)]
    assert sum(s["scored_new"] for s in summaries) == len(shas)
    # Every run: one row per file of its folder, none lost or doubled, each with the ledger's probability.
    probability = scored.set_index("sha256")["probability"]
    for k, folder in enumerate(folders):
        rows = pd.read_parquet(scores / f"run-{k}" / "predictions.parquet")
        assert sorted(Path(p.removeprefix("file:")).name for p in rows["path"]) == sorted(
            p.name for p in folder.iterdir()
        )
        assert rows["probability"].tolist() == pytest.approx(probability[rows["sha256"]].tolist())
    # Memory: every job's process tree stayed under a bound that does not depend on the images.
    assert len(peaks) == 5 and max(peaks.values()) < 4 * 2**30, {
        pid: f"{rss / 2**30:.2f} GiB" for pid, rss in peaks.items()
    }
