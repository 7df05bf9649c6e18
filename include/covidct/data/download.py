"""Downloading one file over HTTP(S): retries where they help, a vetted redirect chain, a hash of what arrived.

``download`` streams a file to disk, hashing it as it comes, honours ETag / Last-Modified
(``304 Not Modified``: nothing downloaded), retries what a retry can fix (``HttpOptions``) and caps
the bytes (``ArchiveLimits``). ``allow_url`` vets every redirect target before it is followed.
Failures are ``DownloadError``s whose ``transient`` says whether trying later may help.
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import MaxRetryError, NameResolutionError, NewConnectionError, ProtocolError
from urllib3.exceptions import SSLError as Urllib3SSLError
from urllib3.util.retry import Retry

from covidct import __version__
from covidct.core.errors import CovidctError, DownloadError
from covidct.data.archive import MB, ArchiveLimits

log = logging.getLogger(__name__)


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


def record_fields(record: dict) -> dict:
    return {
        "sha256": record["sha256"],
        "bytes": record["bytes"],
        "etag": record.get("etag"),
        "last_modified": record.get("last_modified"),
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MB):
            digest.update(chunk)
    return digest.hexdigest()


def hashed(name: str, path: Path) -> SourceFile:
    return SourceFile(name, sha256=sha256_file(path), bytes=path.stat().st_size, path=path)


class _Interrupted(Exception):
    """The connection broke while the body was being read (after the headers)."""

    def __init__(self, error: Exception, received: int, total: int | None):
        inner = error.args[0] if error.args and isinstance(error.args[0], Urllib3Error) else None
        self.cause = inner or ProtocolError(str(error))  # what urllib3's Retry classifies
        reason = self.cause.args[0] if self.cause.args and isinstance(self.cause.args[0], str) else self.cause
        size = f"{total} bytes" if total is not None else "? bytes"
        super().__init__(f"{reason}, after {received} of {size}")


@contextmanager
def http_session(http: HttpOptions, allow_url: Callable[[str], object] | None = None) -> Iterator[requests.Session]:
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
