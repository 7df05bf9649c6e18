"""One writer at a time per destination (covidct.core.locks): concurrent `covidct fetch` into one folder,
concurrent writers of one run folder (covidct.core.atomic), a killed holder. Real processes, real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from covidct.core.locks import LockBusy, lock_path, locked
from covidct.data.manifest import MANIFEST_NAME, read_manifest
from upstream import Upstream, upstream_files

SMALL = ["--expect-covid", "12", "--expect-noncovid", "12"]


def _wait_for(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _fetch(dest: Path, source: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "covidct.cli", "fetch", "--dest", str(dest), "--source", source, *SMALL, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def slow_upstream(small_dataset):
    """The emulated upstream, answering each request after 0.3 s: a fetch lasts a few seconds."""
    with Upstream(upstream_files(small_dataset), delay=0.3) as up:
        yield up


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


@pytest.mark.slow
def test_two_concurrent_fetches_into_one_folder_give_one_complete_validated_result(slow_upstream, tmp_path):
    dest = tmp_path / "data" / "COVID-CT"
    first = _fetch(dest, slow_upstream.base_url)
    _wait_for(lambda: lock_path(dest).exists() or first.poll() is not None, what="the first fetch's lock")
    second = _fetch(dest, slow_upstream.base_url)
    out1, err1 = first.communicate(timeout=300)
    out2, err2 = second.communicate(timeout=300)
    assert first.returncode == 0, err1[-3000:]
    assert second.returncode == 0, err2[-3000:]
    assert "fetched 12 COVID + 12 non-COVID images" in out1
    # The second waited for the first, then found its result up to date: one result.
    assert "waiting up to 900 s for fetch: pid" in err2 and f"which is writing {dest}" in err2
    assert "is up to date" in out2 and "nothing changed" in out2
    downloads = [path for method, path, status in slow_upstream.log if status == 200]
    assert len(downloads) == len(set(downloads))  # every file was downloaded once
    manifest = read_manifest(dest / MANIFEST_NAME)
    assert len(manifest) == 24
    assert json.loads((dest / "validation" / "result.json").read_text())["success"] is True
    assert _leftovers(dest) == [] and not lock_path(dest).exists()


@pytest.mark.slow
def test_a_fetch_that_will_not_wait_reports_the_running_one(slow_upstream, tmp_path):
    dest = tmp_path / "data" / "COVID-CT"
    first = _fetch(dest, slow_upstream.base_url)
    _wait_for(lambda: lock_path(dest).exists() or first.poll() is not None, what="the first fetch's lock")
    second = _fetch(dest, slow_upstream.base_url, "--lock-wait", "0")
    out2, err2 = second.communicate(timeout=120)
    out1, err1 = first.communicate(timeout=300)
    assert second.returncode == 2 and "Traceback" not in err2
    assert f"error: another fetch is writing {dest} (fetch: pid {first.pid} on " in err2
    assert first.returncode == 0, err1[-3000:]
    assert len(read_manifest(dest / MANIFEST_NAME)) == 24  # the first one's result, complete
    assert _leftovers(dest) == []


WRITER = textwrap.dedent(
    """
    import logging, sys, time
    from pathlib import Path
    from covidct.core.atomic import atomic_dir

    logging.basicConfig(level=logging.INFO)

    dest, name, hold, wait = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    with atomic_dir(dest, what=f"writer {name}", wait=wait) as staging:
        print("in", flush=True)
        for i in range(5):  # a complete result is five files of one writer
            (Path(staging) / f"part{i}").write_text(name)
            time.sleep(hold / 5)
    print("published", flush=True)
    """
)


def _writer(dest: Path, name: str, hold: float, wait: float = 60.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(dest), name, str(hold), str(wait)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _complete_of_one_writer(dest: Path) -> str:
    parts = sorted(dest.iterdir())
    assert [p.name for p in parts] == [f"part{i}" for i in range(5)]
    writers = {p.read_text() for p in parts}
    assert len(writers) == 1, writers
    return writers.pop()


def test_concurrent_writers_of_one_run_folder_take_turns(tmp_path):
    dest = tmp_path / "run" / "vgg16"
    a = _writer(dest, "a", hold=2.0)
    _wait_for(lambda: lock_path(dest).exists(), what="writer a's lock")
    b = _writer(dest, "b", hold=0.2)
    _, err_b = b.communicate(timeout=60)
    out_a, err_a = a.communicate(timeout=60)
    assert a.returncode == 0 and b.returncode == 0, (err_a, err_b)
    assert f"waiting up to 60 s for writer a: pid {a.pid} on " in err_b  # b waited for a ...
    assert _complete_of_one_writer(dest) == "b"  # ... then published its own, complete
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no staging, no lock left


def test_a_writer_that_will_not_wait_fails_naming_the_holder_and_changes_nothing(tmp_path):
    dest = tmp_path / "run" / "report"
    a = _writer(dest, "a", hold=3.0)
    _wait_for(lambda: lock_path(dest).exists(), what="writer a's lock")
    b = _writer(dest, "b", hold=0.1, wait=0.0)
    _, err = b.communicate(timeout=60)
    assert b.returncode != 0 and "LockBusy" in err
    assert f"another writer b is writing {dest} (writer a: pid {a.pid} on " in err
    a.communicate(timeout=60)
    assert a.returncode == 0 and _complete_of_one_writer(dest) == "a"


def test_a_killed_holder_releases_the_lock(tmp_path):
    dest = tmp_path / "run" / "vgg19"
    a = _writer(dest, "a", hold=60.0)
    _wait_for(lambda: lock_path(dest).exists(), what="writer a's lock")
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    assert lock_path(dest).exists()  # left behind by the kill, but nobody holds it
    started = time.monotonic()
    with locked(dest, what="test", wait=5.0):
        assert time.monotonic() - started < 2
        assert f"test: pid {os.getpid()}" in lock_path(dest).read_text()
    assert not lock_path(dest).exists()


def test_lock_waits_are_bounded(tmp_path):
    dest = tmp_path / "x"
    with locked(dest, what="holder", wait=0):
        started = time.monotonic()
        # Another open file description in this process conflicts like another process would.
        with pytest.raises(LockBusy, match=r"gave up after waiting 1 s"), locked(dest, what="waiter", wait=1.0):
            pass
        assert 0.9 < time.monotonic() - started < 5
