"""Full disks: a train job's publish, a feature-cache write and a scoring write on a small filesystem that
fills up (a real tmpfs, mounted for the module). Each fails with one "no space left on ..." line and
no trace; what was there before (run folders, cache files, the ledger) is kept byte for byte, nothing
half-written lies beside it; once space is freed, the same command is green."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from covidct.cli import main

pytestmark = pytest.mark.slow

IN_CI = os.environ.get("CI") == "true"
SIZE = 16 * 2**20  # bytes: a run's output of these tests is ~1-2 MiB


def mount_tmpfs(where: Path) -> None:
    where.mkdir(parents=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=1777", "tmpfs", str(where)]
    if os.geteuid() != 0:
        command = ["sudo", "-n", *command]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        why = f"cannot mount a small tmpfs ({' '.join(command[:3])}...): {result.stderr.strip()}"
        pytest.fail(why) if IN_CI else pytest.skip(why)


@pytest.fixture(scope="module")
def small_fs(tmp_path_factory):
    """A 16 MiB tmpfs: a filesystem of its own, that this module fills and frees."""
    where = tmp_path_factory.mktemp("full-disk") / "fs"
    mount_tmpfs(where)
    yield where
    command = ["umount", str(where)] if os.geteuid() == 0 else ["sudo", "-n", "umount", str(where)]
    subprocess.run(command, capture_output=True)


class Filler:
    """Fills ``fs`` up, leaving ``left`` bytes free (tmpfs counts whole pages), and frees it again."""

    def __init__(self, fs: Path):
        self.file = fs / "filler"

    def fill(self, left: int = 0) -> None:
        free = os.statvfs(self.file.parent).f_bavail * os.statvfs(self.file.parent).f_frsize
        with open(self.file, "ab") as f:
            try:
                f.write(b"\0" * max(0, free - left))
                f.flush()
            except OSError:
                pass  # full already
        assert self.free() <= left + 4096, self.free()

    def free(self) -> int:
        stat = os.statvfs(self.file.parent)
        return stat.f_bavail * stat.f_frsize

    def release(self) -> None:
        self.file.unlink(missing_ok=True)


@pytest.fixture
def filler(small_fs):
    filler = Filler(small_fs)
    yield filler
    filler.release()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) and the sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "filler"
    }


def used_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def one_error(err: str, fs: Path, what: str) -> str:
    """The one ``error:`` line, which names the full filesystem and the writer; no trace."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f"error: no space left on {fs} while the {what} wrote "), errors[0]
    assert "nothing was published" in errors[0] and "free space on that filesystem and run again" in errors[0]
    assert "Traceback" not in err and "Py4JJavaError" not in err, err[-3000:]
    return errors[0]


def train_args(data, out, *extra):
    return ["train", "--data", str(data), "--backbone", "VGG16", "--weights", "none", "--out", str(out),
            "--split", "random70", "--stack-folds", "0", *extra]  # fmt: skip


def test_a_train_job_that_fills_the_disk_while_publishing_keeps_the_previous_run(
    spark, small_dataset, small_fs, filler, capsys
):
    out = small_fs / "runs" / "vgg16"
    assert main(train_args(small_dataset, out, "--seed", "3", "--no-cache")) == 0
    before, size = snapshot(out), used_bytes(out)
    # Room for half a run: the staging copy, beside the previous run, fills the disk mid-publish.
    filler.fill(left=size // 2)
    capsys.readouterr()
    assert main(train_args(small_dataset, out, "--seed", "4", "--no-cache")) == 2
    line = one_error(capsys.readouterr().err, small_fs, "train job")
    assert str(out) in line
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["vgg16"]  # no staging, no lock, no old copy
    filler.release()
    assert main(train_args(small_dataset, out, "--seed", "4", "--no-cache")) == 0
    assert snapshot(out) != before and '"seed": 4' in (out / "metrics.json").read_text()


def test_a_feature_cache_write_on_a_full_disk_keeps_the_cached_files(
    spark, small_dataset, small_fs, filler, tmp_path, capsys
):
    cache = small_fs / "feature-cache"
    assert main(train_args(small_dataset, tmp_path / "a", "--cache-dir", str(cache))) == 0
    before = snapshot(cache)
    assert any(name.endswith(".parquet") for name in before)
    filler.fill(left=0)
    capsys.readouterr()
    # Other (random) weights: another cache key, whose features must be written.
    assert main(train_args(small_dataset, tmp_path / "b", "--cache-dir", str(cache), "--seed", "5")) == 2
    one_error(capsys.readouterr().err, small_fs, "feature cache")
    assert snapshot(cache) == before  # no staging folder, no partial file, the old files whole
    assert not (tmp_path / "b").exists()
    filler.release()
    assert main(train_args(small_dataset, tmp_path / "b", "--cache-dir", str(cache), "--seed", "5")) == 0
    assert len(snapshot(cache)) > len(before)


def test_a_scoring_run_on_a_full_disk_keeps_the_ledger_and_the_earlier_scores(
    spark, small_model, small_dataset, small_fs, filler, tmp_path, capsys
):
    scores = small_fs / "scores"
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, source in ((first, "CT_COVID"), (second, "CT_NonCOVID")):
        folder.mkdir()
        for image in sorted((small_dataset / source).iterdir())[:3]:
            shutil.copy(image, folder / image.name)

    def score(folder: Path, run: str) -> int:
        model = ["--model", str(small_model), "--model-name", "covid-ct", "--model-version", "1"]
        return main(
            ["score", "--images", str(folder), *model, "--out", str(scores / run), "--ledger", str(scores / "_ledger")]
        )

    assert score(first, "run-1") == 0
    before = snapshot(scores)
    filler.fill(left=0)
    capsys.readouterr()
    assert score(second, "run-2") == 2
    one_error(capsys.readouterr().err, small_fs, "scoring job")
    assert snapshot(scores) == before  # the ledger and run-1 as they were; no run-2, nothing hidden
    filler.release()
    assert score(second, "run-2") == 0
    assert "3 images scored, 0 already scored" in capsys.readouterr().out
