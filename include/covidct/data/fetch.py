"""Fetching the UCSD COVID-CT dataset into a folder: downloaded or copied, verified, atomic.

Sources: ``covidct.data.sources``.

Result::

    DEST/CT_COVID/  DEST/CT_NonCOVID/  DEST/Data-split/{COVID,NonCOVID}/*.txt
    DEST/manifest.parquet   one row per image (see ``covidct.data.manifest``)
    DEST/validation/        the Great Expectations result that gated it
    DEST/fetch.json         where it came from: sha256 (and ETag) of every source file

Everything is downloaded and unpacked beside ``DEST``, validated there, and only then
renamed into place: a failure at any point leaves ``DEST`` as it was. A fetch whose
source files have the same sha256 as last time (or answer 304 to a conditional request)
and whose ``DEST`` still matches its manifest changes nothing.

Archives are unpacked defensively (``covidct.data.archive``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from covidct import __version__
from covidct.core.atomic import atomic_dir, sibling, write_text_atomic
from covidct.core.errors import CovidctError, DownloadError
from covidct.core.locks import DEFAULT_WAIT, locked
from covidct.data.archive import ArchiveLimits
from covidct.data.dataset import LABEL_NAMES, check_layout
from covidct.data.download import HttpOptions, SourceFile
from covidct.data.manifest import MANIFEST_NAME, build_manifest, read_manifest, stale_entries, write_manifest
from covidct.data.sources import Source, open_source

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

STATE_NAME = "fetch.json"


@dataclass(frozen=True)
class FetchResult:
    dest: Path
    source: str
    changed: bool
    counts: dict[str, int]  # "COVID"/"non-COVID" -> images
    bytes: int
    seconds: float
    manifest: Path
    validation: Path | None = None  # the gate's result.json

    def summary(self) -> str:
        images = " + ".join(f"{n} {name}" for name, n in self.counts.items())
        what = f"{images} images ({self.bytes / 1e6:.1f} MB)"
        if not self.changed:
            return f"{self.dest} is up to date with {self.source}: {what}; nothing changed ({self.seconds:.1f} s)"
        lines = [f"fetched {what} from {self.source} into {self.dest} in {self.seconds:.1f} s"]
        lines.append(f"manifest: {self.manifest}")
        if self.validation is not None:
            lines.append(f"validation passed: {self.validation}")
        return "\n".join(lines)


def fetch(
    dest: str | Path,
    source: str | Path | None = None,
    *,
    expected_covid: int = 349,
    expected_noncovid: int = 397,
    gate: bool = True,
    http: HttpOptions | None = None,
    limits: ArchiveLimits | None = None,
    lock_wait: float = DEFAULT_WAIT,
    allow_url: Callable[[str], object] | None = None,
) -> FetchResult:
    """Fetch the dataset from ``source`` into ``dest``, validated, atomically, idempotently.

    With ``gate`` (the default) the staged copy must pass ``covidct.data.validate.validate``
    with the expected counts before it replaces ``dest``; otherwise a CovidctError names
    each failed expectation and its files, and ``dest`` is left as it was.

    One fetch into ``dest`` at a time: a second one waits up to ``lock_wait`` seconds for
    the first (then finds its result up to date) or fails saying that a fetch is running.
    ``allow_url`` (e.g. ``covidct.orchestration.policy.Policy.check_url``) vets every redirect target
    and raises a CovidctError for one that may not be followed.
    """
    started = time.monotonic()
    dest = Path(dest).expanduser().absolute()
    src = open_source(source, http, limits, allow_url=allow_url)
    with locked(dest, what="fetch", wait=lock_wait):
        return _fetch_locked(dest, src, expected_covid, expected_noncovid, gate, started)


def _fetch_locked(
    dest: Path, src: Source, expected_covid: int, expected_noncovid: int, gate: bool, started: float
) -> FetchResult:
    previous = _previous_state(dest)
    expectations = {"covid": expected_covid, "noncovid": expected_noncovid} if gate else None
    log.info("fetching COVID-CT from %s into %s", src.location, dest)
    try:
        with _workdir(dest) as work:
            files = src.gather(work, previous)
            if _unchanged(dest, previous, files, expectations):
                log.info("%s is up to date with %s", dest, src.location)
                return _result(dest, src, False, read_manifest(dest / MANIFEST_NAME), started)
            not_here = [name for name, item in files.items() if item.path is None]
            if not_here:  # some answered 304 but something else changed: get them too
                files.update(src.gather(work, None, only=not_here))
            with atomic_dir(dest, lock=False) as staging:
                src.unpack(files, staging)
                check_layout(staging)
                manifest = build_manifest(staging)
                write_manifest(manifest, staging / MANIFEST_NAME)
                state = {
                    "source": src.location,
                    "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "covidct": __version__,
                    "expectations": expectations,
                    "files": {name: item.record() for name, item in sorted(files.items())},
                }
                write_text_atomic(staging / STATE_NAME, json.dumps(state, indent=1) + "\n")
                if gate:
                    _gate(staging, dest, src, expected_covid, expected_noncovid)
                shutil.rmtree(work, ignore_errors=True)  # free the downloads before the swap
    except _Rejected as exc:
        raise CovidctError(f"{exc}\n{_untouched(dest, previous)}") from None
    except DownloadError as exc:
        raise DownloadError(f"{exc} ({_untouched(dest, previous)})", transient=exc.transient) from None
    except CovidctError as exc:
        raise CovidctError(f"{exc} ({_untouched(dest, previous)})") from None
    except OSError as exc:  # disk full, permissions: the user's to fix
        raise CovidctError(f"cannot fetch into {dest}: {exc} ({_untouched(dest, previous)})") from None
    log.info("published %s", dest)
    validation = dest / "validation" / "result.json" if gate else None
    return _result(dest, src, True, manifest, started, validation=validation)


class _Rejected(CovidctError):
    """The staged copy failed validation."""


def _untouched(dest: Path, previous: dict | None) -> str:
    return f"{dest} was left as it was" if previous is not None else f"nothing was written to {dest}"


def _gate(staging: Path, dest: Path, src: Source, expected_covid: int, expected_noncovid: int) -> None:
    """Validate the staged copy (labelled as ``dest``, which it becomes); _Rejected if it fails."""
    from covidct.data.validate import validate

    result = validate(staging, expected_covid=expected_covid, expected_noncovid=expected_noncovid, label=str(dest))
    if not result.success:
        failures = "\n".join(f"  - {failure.message}" for failure in result.failures)
        raise _Rejected(f"the data from {src.location} failed validation and was not published:\n{failures}")


def _result(
    dest: Path, src: Source, changed: bool, manifest: pd.DataFrame, started: float, validation: Path | None = None
) -> FetchResult:
    counts = {LABEL_NAMES[label]: int((manifest["label"] == label).sum()) for label in (1, 0)}
    return FetchResult(
        dest=dest,
        source=src.location,
        changed=changed,
        counts=counts,
        bytes=int(manifest["bytes"].sum()),
        seconds=time.monotonic() - started,
        manifest=dest / MANIFEST_NAME,
        validation=validation,
    )


def _previous_state(dest: Path) -> dict | None:
    """What the last fetch into ``dest`` recorded; refuses to replace a folder it did not write."""
    if not dest.exists():
        return None
    if not dest.is_dir():
        raise CovidctError(f"{dest} exists and is not a folder")
    state_path = dest / STATE_NAME
    if not state_path.is_file():
        if any(dest.iterdir()):
            raise CovidctError(
                f"{dest} exists and was not written by `covidct fetch` (no {STATE_NAME}); "
                "refusing to replace it: choose a new or empty folder"
            )
        return None
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s is unreadable; fetching everything again", state_path)
        return {}
    return state if isinstance(state, dict) else {}


def _unchanged(dest: Path, previous: dict | None, files: dict[str, SourceFile], expectations: dict | None) -> bool:
    """Same source content, same gate, and ``dest`` still matches its manifest."""
    if not previous or previous.get("expectations") != expectations:
        return False
    known = previous.get("files", {})
    if set(known) != set(files) or any(known[n].get("sha256") != f.sha256 for n, f in files.items()):
        return False
    try:
        problems = stale_entries(read_manifest(dest / MANIFEST_NAME), dest)
    except CovidctError as exc:
        problems = [str(exc)]
    if problems:
        log.warning("%s no longer matches its manifest (%s); fetching again", dest, "; ".join(problems[:3]))
    return not problems


@contextmanager
def _workdir(dest: Path) -> Iterator[Path]:
    """A scratch folder beside ``dest`` for downloads, removed afterwards."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = sibling(dest, "download")
    work.mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
