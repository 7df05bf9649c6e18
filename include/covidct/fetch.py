"""Fetching the UCSD COVID-CT dataset into a folder: downloaded or copied, verified, atomic.

Sources (``fetch(dest, source)``):

- ``None`` / ``"upstream"``: the GitHub repository UCSD-AI4H/COVID-CT (raw files;
  ``$COVIDCT_UPSTREAM_URL`` overrides the base URL);
- ``http(s)://...``: the base URL of a mirror laid out like that repository;
- a local folder laid out like the result (``CT_COVID/``, ``CT_NonCOVID/``, ``Data-split/``);
- a local folder holding ``CT_COVID.zip`` and ``CT_NonCOVID.zip`` (directly or under
  ``Images-processed/``, e.g. a clone of upstream) and ``Data-split/``.

Result::

    DEST/CT_COVID/  DEST/CT_NonCOVID/  DEST/Data-split/{COVID,NonCOVID}/*.txt
    DEST/manifest.parquet   one row per image (see ``covidct.manifest``)
    DEST/validation/        the Great Expectations result that gated it
    DEST/fetch.json         where it came from: sha256 (and ETag) of every source file

Everything is downloaded and unpacked beside ``DEST``, validated there, and only then
renamed into place: a failure at any point leaves ``DEST`` as it was. A fetch whose
source files have the same sha256 as last time (or answer 304 to a conditional request)
and whose ``DEST`` still matches its manifest changes nothing.

Archives are unpacked defensively: absolute paths, ``..`` components, links and other
non-regular entries are refused; the entry count and the uncompressed bytes are capped;
``__MACOSX/`` and dotfiles are ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urljoin

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import MaxRetryError, NameResolutionError, NewConnectionError, ProtocolError
from urllib3.exceptions import SSLError as Urllib3SSLError
from urllib3.util.retry import Retry

from covidct import __version__
from covidct.atomic import atomic_dir, sibling, write_text_atomic
from covidct.dataset import CLASSES, LABEL_NAMES, check_layout, split_list_file
from covidct.errors import CovidctError, DownloadError
from covidct.locks import DEFAULT_WAIT, locked
from covidct.manifest import MANIFEST_NAME, SPLITS, build_manifest, read_manifest, stale_entries, write_manifest

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

UPSTREAM_URL = "https://raw.githubusercontent.com/UCSD-AI4H/COVID-CT/master/"
UPSTREAM_ENV = "COVIDCT_UPSTREAM_URL"
STATE_NAME = "fetch.json"
#: class folder -> its archive in the upstream repository
ARCHIVES = {folder: f"Images-processed/{folder}.zip" for folder in CLASSES}
SPLIT_LIST_FILES = tuple(split_list_file(short, split) for short, _ in CLASSES.values() for split in SPLITS)
UPSTREAM_FILES = (*ARCHIVES.values(), *SPLIT_LIST_FILES)
MB = 1024 * 1024


@dataclass(frozen=True)
class HttpOptions:
    """Timeouts (connect, read) in seconds, retries with exponential backoff, progress logging.

    What is retried, and how often:

    - timeouts, 429/5xx answers, connections reset or broken mid-file: ``retries`` times
      (they are what a retry fixes);
    - a refused connection: ``refused_retries`` times (a few seconds: a server restarting
      gets them; a closed port on a first try still fails at once, not after minutes);
    - never: a name that does not resolve, TLS errors (an untrusted certificate), 4xx
      answers other than 429: a retry cannot fix those.
    """

    timeout: tuple[float, float] = (15.0, 60.0)
    retries: int = 5
    refused_retries: int = 2
    backoff_factor: float = 1.0
    backoff_max: float = 60.0
    progress_min_bytes: int = 4 * MB  # log progress of files at least this large

    def retry(self) -> Retry:
        """urllib3's policy for GET, with the classification above."""
        return _Retry(
            total=self.retries,
            connect=self.retries,
            read=self.retries,
            status=self.retries,
            other=0,
            refused=self.refused_retries,
            backoff_factor=self.backoff_factor,
            backoff_max=self.backoff_max,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            raise_on_status=True,
            respect_retry_after_header=True,
        )


class _Retry(Retry):
    """urllib3's Retry, giving up at once where a retry cannot help and soon on refused connections."""

    def __init__(self, *args, refused: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.refused = refused

    def new(self, **kw) -> _Retry:
        kw.setdefault("refused", self.refused)
        return super().new(**kw)

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None) -> _Retry:
        if error is not None and (_permanent(error) or (_refused(error) and self.refused <= 0)):
            raise MaxRetryError(_pool, url, error) from error  # type: ignore[arg-type]
        retry = super().increment(method, url, response, error, _pool, _stacktrace)
        return retry.new(refused=self.refused - 1) if error is not None and _refused(error) else retry


def _permanent(error: Exception) -> bool:
    """Errors that no retry fixes: an unknown host name, a TLS failure (untrusted certificate)."""
    return isinstance(error, (NameResolutionError, Urllib3SSLError))


def _refused(error: Exception) -> bool:
    """No connection could be made (refused, unreachable): nothing listens there now."""
    return isinstance(error, NewConnectionError) and not isinstance(error, NameResolutionError)


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps against zip bombs and runaway downloads (the real archives: ~750 entries, ~100 MB)."""

    max_entries: int = 20_000  # per archive
    max_bytes: int = 2 * 1024 * MB  # uncompressed bytes per archive; also bytes per downloaded file


@dataclass(frozen=True)
class SourceFile:
    """One file of a source: its name in the source's layout, content hash, and where it lies now."""

    name: str
    sha256: str
    bytes: int
    path: Path | None = None  # None: not downloaded (the server said 304 Not Modified)
    etag: str | None = None
    last_modified: str | None = None

    def record(self) -> dict:
        found = {"sha256": self.sha256, "bytes": self.bytes}
        if self.etag:
            found["etag"] = self.etag
        if self.last_modified:
            found["last_modified"] = self.last_modified
        return found


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


# --- sources -------------------------------------------------------------------------------------


class Source:
    """Where the dataset comes from; ``gather`` puts its files at hand, ``unpack`` lays them out."""

    location: str  # shown to the user and recorded in DEST/fetch.json

    def gather(self, work: Path, previous: dict | None, only: Iterable[str] | None = None) -> dict[str, SourceFile]:
        """``{name: SourceFile}`` of the files to fetch (``only`` these), downloaded into ``work`` if remote."""
        raise NotImplementedError

    def unpack(self, files: dict[str, SourceFile], staging: Path) -> None:
        """Lay the gathered files out in ``staging`` like the result."""
        raise NotImplementedError


@dataclass
class RemoteSource(Source):
    """The upstream repository or a mirror of it, over HTTP(S)."""

    location: str  # the base URL
    http: HttpOptions = field(default_factory=HttpOptions)
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)
    #: vets each redirect target (raises CovidctError to refuse it); None: follow any redirect
    allow_url: Callable[[str], object] | None = None

    def url(self, name: str) -> str:
        return self.location.rstrip("/") + "/" + quote(name)

    def gather(self, work: Path, previous: dict | None, only: Iterable[str] | None = None) -> dict[str, SourceFile]:
        known = (previous or {}).get("files", {}) if (previous or {}).get("source") == self.location else {}
        files = {}
        with _session(self.http, self.allow_url) as session:
            for name in only or UPSTREAM_FILES:
                target = work / name
                target.parent.mkdir(parents=True, exist_ok=True)
                got = download(session, self.url(name), target, self.http, self.limits, known.get(name), name=name)
                files[name] = got if got is not None else SourceFile(name, path=None, **_record_fields(known[name]))
        return files

    def unpack(self, files: dict[str, SourceFile], staging: Path) -> None:
        _unpack_upstream(files, staging, self.limits)


@dataclass
class ZipFolderSource(Source):
    """A local folder with the two zips (directly or under ``Images-processed/``) and ``Data-split/``."""

    root: Path
    archives: Path  # root or root/Images-processed
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)

    @property
    def location(self) -> str:
        return str(self.root)

    def gather(self, work: Path, previous: dict | None, only: Iterable[str] | None = None) -> dict[str, SourceFile]:
        files = {}
        for name in only or UPSTREAM_FILES:
            path = self.archives / Path(name).name if name in ARCHIVES.values() else self.root / name
            if not path.is_file():
                raise CovidctError(f"source {self.location} has no {path.relative_to(self.root)}")
            files[name] = _hashed(name, path)
        return files

    def unpack(self, files: dict[str, SourceFile], staging: Path) -> None:
        _unpack_upstream(files, staging, self.limits)


@dataclass
class FolderSource(Source):
    """A local folder already laid out like the result: its files are copied."""

    root: Path

    @property
    def location(self) -> str:
        return str(self.root)

    def gather(self, work: Path, previous: dict | None, only: Iterable[str] | None = None) -> dict[str, SourceFile]:
        names = list(only) if only else self._names()
        return {name: _hashed(name, self.root / name) for name in names}

    def _names(self) -> list[str]:
        names = []
        for folder in CLASSES:
            for path in sorted((self.root / folder).iterdir()):
                if path.name.startswith("."):
                    continue
                if path.is_symlink() or not path.is_file():
                    raise CovidctError(f"source {self.location}: {folder}/{path.name} is not a regular file")
                names.append(f"{folder}/{path.name}")
        for name in SPLIT_LIST_FILES:
            if not (self.root / name).is_file():
                raise CovidctError(f"source {self.location} has no official split list {name}")
            names.append(name)
        return names

    def unpack(self, files: dict[str, SourceFile], staging: Path) -> None:
        for name, item in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item.path, target)
            if _sha256_file(target) != item.sha256:
                raise CovidctError(f"{self.location}/{name} changed while it was being copied; fetch again")
        log.info("copied %d files from %s", len(files), self.location)


def open_source(
    source: str | Path | None,
    http: HttpOptions | None = None,
    limits: ArchiveLimits | None = None,
    allow_url: Callable[[str], object] | None = None,
) -> Source:
    """The Source that ``source`` names (see the module docstring), or a CovidctError saying why not."""
    http, limits = http or HttpOptions(), limits or ArchiveLimits()
    text = str(source).strip() if source is not None else ""
    if text in ("", "upstream"):
        return RemoteSource(os.environ.get(UPSTREAM_ENV) or UPSTREAM_URL, http=http, limits=limits, allow_url=allow_url)
    if text.lower().startswith(("http://", "https://")):
        return RemoteSource(text, http=http, limits=limits, allow_url=allow_url)
    if "://" in text:
        raise CovidctError(f"unsupported source {text}: use an http(s):// URL or a local folder")
    root = Path(text).expanduser().resolve()
    if not root.is_dir():
        raise CovidctError(f"source {text} is neither an http(s) URL nor an existing folder")
    if all((root / folder).is_dir() for folder in CLASSES):
        return FolderSource(root)
    for archives in (root, root / "Images-processed"):
        if all((archives / Path(name).name).is_file() for name in ARCHIVES.values()):
            return ZipFolderSource(root, archives, limits)
    raise CovidctError(
        f"source {root} holds neither CT_COVID/ and CT_NonCOVID/ folders nor CT_COVID.zip and "
        "CT_NonCOVID.zip (directly or under Images-processed/)"
    )


# --- fetch ---------------------------------------------------------------------------------------


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

    With ``gate`` (the default) the staged copy must pass ``covidct.validate.validate``
    with the expected counts before it replaces ``dest``; otherwise a CovidctError names
    each failed expectation and its files, and ``dest`` is left as it was.

    One fetch into ``dest`` at a time: a second one waits up to ``lock_wait`` seconds for
    the first (then finds its result up to date) or fails saying that a fetch is running.
    ``allow_url`` (e.g. ``covidct.policy.Policy.check_url``) vets every redirect target
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
    from covidct.validate import validate

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


def _record_fields(record: dict) -> dict:
    return {
        "sha256": record["sha256"],
        "bytes": record["bytes"],
        "etag": record.get("etag"),
        "last_modified": record.get("last_modified"),
    }


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MB):
            digest.update(chunk)
    return digest.hexdigest()


def _hashed(name: str, path: Path) -> SourceFile:
    return SourceFile(name, sha256=_sha256_file(path), bytes=path.stat().st_size, path=path)


# --- HTTP ----------------------------------------------------------------------------------------


class _Interrupted(Exception):
    """The connection broke while the body was being read (after the headers)."""

    def __init__(self, error: Exception, received: int, total: int | None):
        inner = error.args[0] if error.args and isinstance(error.args[0], Urllib3Error) else None
        self.cause = inner or ProtocolError(str(error))  # what urllib3's Retry classifies
        reason = self.cause.args[0] if self.cause.args and isinstance(self.cause.args[0], str) else self.cause
        size = f"{total} bytes" if total is not None else "? bytes"
        super().__init__(f"{reason}, after {received} of {size}")


@contextmanager
def _session(http: HttpOptions, allow_url: Callable[[str], object] | None = None) -> Iterator[requests.Session]:
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=http.retry())
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = f"covidct/{__version__} (+https://github.com/UCSD-AI4H/COVID-CT)"
    if allow_url is not None:
        session.hooks["response"].append(_redirect_guard(session, allow_url))
    try:
        yield session
    finally:
        session.close()


def _redirect_guard(session: requests.Session, allow_url: Callable[[str], object]):
    """A response hook that vets each redirect before requests follows it (every hop, not just the first)."""

    def hook(response: requests.Response, *args, **kwargs) -> requests.Response:
        location = session.get_redirect_target(response)
        if location is None:
            return response
        target = urljoin(response.url, location)
        try:
            allow_url(target)
        except CovidctError as exc:
            response.close()
            raise CovidctError(f"refusing the redirect from {response.url} to {target}: {exc}") from None
        return response

    return hook


def download(
    session: requests.Session,
    url: str,
    target: Path,
    http: HttpOptions,
    limits: ArchiveLimits,
    known: dict | None = None,
    name: str | None = None,
) -> SourceFile | None:
    """GET ``url`` into ``target``; None if ``known`` (an earlier record) is still current (304).

    Connection errors and 429/5xx answers are retried by urllib3's Retry inside requests (see
    ``HttpOptions``); a connection that breaks mid-body is retried under the same policy (its
    ``increment`` and ``sleep``), from the start of the file. Failures raise DownloadError, whose
    ``transient`` says whether trying again later may help.
    """
    name = name or url.rsplit("/", 1)[-1]
    retry = http.retry()
    while True:
        try:
            return _download_once(session, url, target, http, limits, known, name)
        except _Interrupted as exc:
            try:
                retry = retry.increment(method="GET", url=url, error=exc.cause)
            except (MaxRetryError, ProtocolError, Urllib3Error):
                raise DownloadError(
                    f"cannot download {url}: the connection kept breaking mid-file "
                    f"({http.retries + 1} attempts; last: {exc})",
                    transient=True,
                ) from None
            log.warning("connection broke while downloading %s (%s); retrying", name, exc)
            retry.sleep()


def _download_once(
    session: requests.Session,
    url: str,
    target: Path,
    http: HttpOptions,
    limits: ArchiveLimits,
    known: dict | None,
    name: str,
) -> SourceFile | None:
    headers = {}
    if known and known.get("etag"):
        headers["If-None-Match"] = known["etag"]
    if known and known.get("last_modified"):
        headers["If-Modified-Since"] = known["last_modified"]
    try:
        response = session.get(url, stream=True, timeout=http.timeout, headers=headers)
    except requests.exceptions.RequestException as exc:
        raise _download_error(url, exc, http) from None
    with response:
        if response.status_code == 304 and known:
            log.info("%s: not modified (304)", name)
            return None
        if response.status_code != 200:
            status = response.status_code
            raise DownloadError(
                f"cannot download {url}: HTTP {status} {response.reason}", transient=status == 429 or status >= 500
            )
        total = int(response.headers.get("Content-Length") or 0) or None
        if total is not None and total > limits.max_bytes:
            raise CovidctError(f"refusing to download {url}: {total} bytes is over the {limits.max_bytes} limit")
        digest, received = hashlib.sha256(), 0
        progress = _Progress(name, total, http.progress_min_bytes)
        with open(target, "wb") as out:
            try:
                for chunk in response.iter_content(chunk_size=64 * 1024):
                    received += len(chunk)
                    if received > limits.max_bytes:
                        raise CovidctError(f"refusing to download {url}: over the {limits.max_bytes}-byte limit")
                    out.write(chunk)
                    digest.update(chunk)
                    progress.update(received)
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as exc:
                raise _Interrupted(exc, received, total) from None
        progress.done(received)
        return SourceFile(
            name=name,
            sha256=digest.hexdigest(),
            bytes=received,
            path=target,
            etag=response.headers.get("ETag"),
            last_modified=response.headers.get("Last-Modified"),
        )


class _Progress:
    """Logs a large download every 10 % (every 10 MB when the size is unknown)."""

    def __init__(self, name: str, total: int | None, min_bytes: int):
        self.name, self.total, self.started = name, total, time.monotonic()
        self.enabled = total is None or total >= min_bytes
        self.next = 0.1 * total if total else 10 * MB

    def update(self, received: int) -> None:
        if not self.enabled or received < self.next or (self.total and received >= self.total):
            return
        if self.total:
            log.info(
                "%s: %d%% (%.1f of %.1f MB)", self.name, 100 * received // self.total, received / MB, self.total / MB
            )
            self.next += 0.1 * self.total
        else:
            log.info("%s: %.1f MB", self.name, received / MB)
            self.next += 10 * MB

    def done(self, received: int) -> None:
        if self.enabled:
            seconds = time.monotonic() - self.started
            log.info("%s: downloaded %.1f MB in %.1f s", self.name, received / MB, seconds)


def _download_error(url: str, exc: requests.exceptions.RequestException, http: HttpOptions) -> DownloadError:
    """The DownloadError of a failed GET: what went wrong, how often it was tried, whether to try later."""
    inner = exc.args[0] if exc.args else None
    cause = getattr(inner, "reason", None) or inner  # the urllib3 error behind requests' MaxRetryError
    what = f"cannot download {url}: {_reason(exc)}"
    if isinstance(exc, requests.exceptions.RetryError):
        gave_up = f"gave up after {http.retries} retries ({_reason(exc)})"
        return DownloadError(f"cannot download {url}: {gave_up}", transient=True)
    if isinstance(cause, NameResolutionError):
        # EAI_AGAIN (a temporary failure, e.g. no DNS server reachable) may pass by itself, an
        # unknown name does not; neither is retried here: seconds do not fix DNS.
        temporary = getattr(cause.__cause__, "errno", None) == socket.EAI_AGAIN
        return DownloadError(f"{what} (not retried)", transient=temporary)
    if isinstance(exc, requests.exceptions.SSLError) or isinstance(cause, Urllib3SSLError):
        return DownloadError(f"{what} (TLS; not retried)", transient=False)
    if isinstance(cause, NewConnectionError):
        return DownloadError(f"{what} (after {http.refused_retries} retries)", transient=True)
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return DownloadError(f"{what} (after {http.retries} retries)", transient=True)
    return DownloadError(what, transient=False)  # an invalid URL, too many redirects, ...


def _reason(exc: Exception) -> str:
    """The innermost useful message of a requests/urllib3 error."""
    inner = exc.args[0] if exc.args else exc
    reason = getattr(inner, "reason", None) or inner
    text = str(reason)
    if "object at 0x" in text:  # "<urllib3.connection.HTTPConnection object at 0x..>: Failed to ..."
        text = text.split(">: ", 1)[-1]
    # "HTTPConnection(host='h', port=80): Failed to ..." (urllib3 >= 2.6): the URL already says it
    return re.sub(r"^HTTPS?Connection\([^)]*\): ", "", text)


# --- archives ------------------------------------------------------------------------------------


def _unpack_upstream(files: dict[str, SourceFile], staging: Path, limits: ArchiveLimits) -> None:
    """The two archives into the class folders, the split lists into ``Data-split/``."""
    for folder, name in ARCHIVES.items():
        n = extract_archive(files[name].path, staging / folder, folder, limits, label=name)
        log.info("extracted %d files from %s", n, name)
    for name in SPLIT_LIST_FILES:
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[name].path, target)


def extract_archive(archive: Path, target: Path, folder: str, limits: ArchiveLimits, label: str | None = None) -> int:
    """Extract the files of a class archive into ``target``; return how many.

    Entries may be under ``<folder>/`` or at the top level. Unsafe entries (absolute,
    ``..``, links, devices), other folders, duplicates, encrypted entries and more than
    ``limits`` allow are refused with a CovidctError naming the archive and the entry.
    """
    label = label or archive.name
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise CovidctError(f"{label} is not a valid zip archive ({exc}){_content_hint(archive)}") from None
    with zf:
        entries = zf.infolist()
        if len(entries) > limits.max_entries:
            raise CovidctError(
                f"{label} has {len(entries)} entries, over the limit of {limits.max_entries} (zip bomb?)"
            )
        plan: dict[str, zipfile.ZipInfo] = {}
        for info in entries:
            member = _member_name(info, folder, label)
            if member is None:
                continue
            if member in plan:
                raise CovidctError(f"{label} holds {folder}/{member} twice")
            plan[member] = info
        declared = sum(info.file_size for info in plan.values())
        if declared > limits.max_bytes:
            raise CovidctError(
                f"{label} would extract to {declared} bytes, over the limit of {limits.max_bytes} (zip bomb?)"
            )
        target.mkdir(parents=True, exist_ok=True)
        written = 0
        for member, info in plan.items():
            written += _extract_member(zf, info, target / member, label, limits.max_bytes - written)
    return len(plan)


def _member_name(info: zipfile.ZipInfo, folder: str, label: str) -> str | None:
    """The file name an entry extracts to, None for entries to skip; CovidctError if unsafe."""
    raw = info.filename
    parts = raw.replace("\\", "/").split("/")
    if raw.startswith(("/", "\\")) or (parts and len(parts[0]) == 2 and parts[0][1] == ":"):
        raise CovidctError(f"{label}: refusing entry {raw!r}: absolute path (zip-slip)")
    if any(part == ".." for part in parts):
        raise CovidctError(f"{label}: refusing entry {raw!r}: '..' in the path (zip-slip)")
    if "\x00" in raw:
        raise CovidctError(f"{label}: refusing entry {raw!r}: NUL in the name")
    kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
    if kind == stat.S_IFLNK:
        raise CovidctError(f"{label}: refusing entry {raw!r}: it is a symbolic link")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise CovidctError(f"{label}: refusing entry {raw!r}: not a regular file")
    parts = [p for p in parts if p not in ("", ".")]
    if info.is_dir() or not parts:
        return None
    if parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return None  # macOS resource forks, .DS_Store and other dotfiles
    if info.flag_bits & 0x1:
        raise CovidctError(f"{label}: entry {raw!r} is encrypted")
    if len(parts) == 2 and parts[0] == folder:
        return parts[1]
    if len(parts) == 1:
        return parts[0]
    raise CovidctError(f"{label}: unexpected entry {raw!r}: images must be under {folder}/ or at the top level")


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, label: str, budget: int) -> int:
    written = 0
    try:
        with zf.open(info) as src, open(path, "xb") as out:
            while chunk := src.read(MB):
                written += len(chunk)
                if written > info.file_size or written > budget:
                    raise CovidctError(
                        f"{label}: entry {info.filename!r} extracts to more bytes than declared or allowed (zip bomb?)"
                    )
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as exc:
        raise CovidctError(f"{label} is corrupt: cannot extract {info.filename!r} ({exc})") from None
    return written


def _content_hint(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return ""
    if head.startswith(b"version https://git-lfs"):
        return ": it is a Git LFS pointer, not the archive (the mirror serves LFS pointers)"
    if head.lstrip().startswith(b"<"):
        return ": it looks like an HTML page (is the base URL right?)"
    if not head:
        return ": the file is empty"
    return ""
