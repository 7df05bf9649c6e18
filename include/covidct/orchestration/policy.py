"""What a DAG run may make the workers touch: the operator's allowlist for trigger params.

Anyone allowed to trigger the DAG (UI, REST API) chooses its params, so they are untrusted
input. The operator confines them with the workers' environment (never with a param):

    COVIDCT_ALLOWED_SOURCES       data sources a run may name: base URLs (scheme://host[:port][/path])
                                  and absolute folders, separated by commas or new lines
    COVIDCT_ALLOWED_WEIGHTS_DIRS  folders a weights file may come from, separated likewise
    COVIDCT_ALLOWED_SCORING_DIRS  folders the scoring DAG may score images from, separated likewise

Always allowed besides: upstream (``$COVIDCT_UPSTREAM_URL``, else GitHub), the operator's own
``$COVIDCT_DATA_SOURCE``, ``$COVIDCT_WEIGHTS_DIR`` and the incoming folder of new scans
(``$COVIDCT_INCOMING_DIR``, else ``$COVIDCT_HOME/incoming``). ``*`` in any of these settings allows anything
(a deployment whose every UI user may use the workers freely).

- A folder is resolved (symbolic links, ``..``) before it is compared, and must lie inside an
  allowed folder.
- A URL is parsed, then its scheme (http/https), host (case, trailing dot), port (explicit or the
  scheme's) and path (under the entry's path, if it has one) are compared. User names in URLs,
  backslashes, whitespace, queries, fragments, dot segments and encoded dots or slashes are refused,
  and the URL handed on is rebuilt from the parsed parts, so nothing downstream parses it otherwise.
- Every redirect target is checked the same way (``check_url``, given to ``covidct.data.fetch``).

The ``covidct`` command line, run by the operator, does not consult it. ``WEIGHTS_PATTERN`` and
``SOURCE_PATTERN`` are the syntactic checks the DAG's param schema and the job apply on top.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from urllib3.util import parse_url as urllib3_parse_url

from covidct.core.errors import CovidctError
from covidct.core.paths import INCOMING_ENV, incoming_dir
from covidct.features.backbone import WEIGHTS_DIR_ENV, normalize_weights

SOURCES_ENV = "COVIDCT_ALLOWED_SOURCES"
WEIGHTS_DIRS_ENV = "COVIDCT_ALLOWED_WEIGHTS_DIRS"
SCORING_DIRS_ENV = "COVIDCT_ALLOWED_SCORING_DIRS"
DATA_SOURCE_ENV = "COVIDCT_DATA_SOURCE"
ANY = "*"
DEFAULT_PORTS = {"http": 80, "https": 443}

# Syntactic checks (JSON-schema ``pattern``s, Python ``re`` syntax, which jsonschema uses): an
# absolute path of ordinary characters without '..' segments; an http(s) URL without user info.
_PATH = r"(?!.*/\.\.(/|$))/[A-Za-z0-9._+=@,/-]*"
_URL = r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%+=,/-]*)?"
#: The ``weights`` param: imagenet, none, or the absolute path of a weights file.
WEIGHTS_PATTERN = rf"^(imagenet|none|{_PATH})$"
#: The ``data_source`` param: empty or upstream (the default), an http(s) base URL, or an absolute folder.
SOURCE_PATTERN = rf"^(|upstream|{_URL}|{_PATH})$"
#: The scoring DAG's ``folder`` param: empty (the operator's incoming folder) or an absolute folder.
FOLDER_PATTERN = rf"^(|{_PATH})$"
MAX_LENGTH = 1024

_HOST = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_UNSAFE_URL = re.compile(r"[\s\\\x00-\x1f\x7f]|%2e|%2f|%5c|%00", re.IGNORECASE)


class PolicyError(CovidctError):
    """A trigger param outside the operator's allowlist (the message names the setting to change)."""


@dataclass(frozen=True)
class Origin:
    """A parsed http(s) URL reduced to what is compared: scheme, host, port, path."""

    scheme: str
    host: str  # lower case, no trailing dot; IPv6 without brackets
    port: int
    path: str  # as given (percent-encoded), "" for none

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if DEFAULT_PORTS[self.scheme] == self.port else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}"

    def covers(self, other: Origin) -> bool:
        """``other`` is this entry's origin, at or under its path."""
        if (self.scheme, self.host, self.port) != (other.scheme, other.host, other.port):
            return False
        prefix = self.path.rstrip("/")
        path = other.path.rstrip("/")
        return not prefix or path == prefix or path.startswith(prefix + "/")


def parse_url(text: str) -> Origin:
    """Parse an http(s) URL strictly; CovidctError saying what is wrong with it."""
    text = str(text)
    if _UNSAFE_URL.search(text):
        raise CovidctError(
            f"{text!r}: whitespace, control characters, backslashes and encoded dots/slashes are not allowed in a URL"
        )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise CovidctError(f"{text!r} is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise CovidctError(f"{text!r}: only http:// and https:// URLs are allowed")
    if "@" in parts.netloc:
        raise CovidctError(f"{text!r}: user names and passwords in URLs are not allowed")
    if "?" in text or "#" in text:
        raise CovidctError(f"{text!r}: a source URL takes no query or fragment")
    if any(segment in (".", "..") for segment in parts.path.split("/")):
        raise CovidctError(f"{text!r}: '.' and '..' segments are not allowed in a URL path")
    host = _host(parts.hostname or "", text)
    # urllib3 (what requests connects with) must see the very same host.
    try:
        theirs = urllib3_parse_url(text).host or ""
    except ValueError as exc:
        raise CovidctError(f"{text!r} is not a valid URL ({exc})") from None
    if _host(theirs.strip("[]"), text) != host:
        raise CovidctError(f"{text!r}: ambiguous host")
    return Origin(scheme, host, port if port is not None else DEFAULT_PORTS[scheme], parts.path)


def _host(raw: str, text: str) -> str:
    host = raw.lower()
    if host.endswith("."):
        host = host[:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST.match(host):
        raise CovidctError(f"{text!r}: {raw!r} is not a valid host name")
    return host


def resolve_path(text: str) -> Path:
    """An absolute path with symbolic links and '..' resolved (it need not exist)."""
    path = Path(text)
    if not path.is_absolute():
        raise CovidctError(f"{text!r}: give an absolute path")
    return path.resolve()


def _entries(value: str | None) -> list[str]:
    return [item.strip() for item in re.split(r"[,\n]", value or "") if item.strip()]


@dataclass(frozen=True)
class Policy:
    """The allowlist, read from the environment with ``from_env``."""

    source_urls: tuple[Origin, ...] = ()
    source_dirs: tuple[Path, ...] = ()
    weights_dirs: tuple[Path, ...] = ()
    scoring_dirs: tuple[Path, ...] = ()
    any_source: bool = False
    any_weights: bool = False
    any_scoring: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Policy:
        """The operator's allowlist; a malformed entry is a PolicyError naming the setting."""
        from covidct.data.sources import UPSTREAM_ENV, UPSTREAM_URL

        env = os.environ if environ is None else environ
        sources = _entries(env.get(SOURCES_ENV))
        implicit = [env.get(UPSTREAM_ENV) or UPSTREAM_URL, *_entries(env.get(DATA_SOURCE_ENV))]
        urls, dirs = [], []
        for entry in [*sources, *implicit]:
            if entry in (ANY, "upstream"):
                continue
            try:
                if "://" in entry:
                    urls.append(parse_url(entry))
                else:
                    dirs.append(resolve_path(entry))
            except CovidctError as exc:
                if entry not in sources:
                    continue  # the operator's own default source is used as it is, never compared
                raise PolicyError(f"bad entry in {SOURCES_ENV}: {exc}") from None
        weights = _entries(env.get(WEIGHTS_DIRS_ENV)) + _entries(env.get(WEIGHTS_DIR_ENV))
        weights_dirs = []
        for entry in weights:
            if entry == ANY:
                continue
            try:
                weights_dirs.append(resolve_path(entry))
            except CovidctError as exc:
                raise PolicyError(f"bad entry in {WEIGHTS_DIRS_ENV} / {WEIGHTS_DIR_ENV}: {exc}") from None
        scoring = _entries(env.get(SCORING_DIRS_ENV))
        incoming = env.get(INCOMING_ENV)
        scoring_dirs = [Path(incoming).expanduser().resolve() if incoming else incoming_dir().resolve()]
        for entry in scoring:
            if entry == ANY:
                continue
            try:
                scoring_dirs.append(resolve_path(entry))
            except CovidctError as exc:
                raise PolicyError(f"bad entry in {SCORING_DIRS_ENV}: {exc}") from None
        return cls(
            source_urls=tuple(urls),
            source_dirs=tuple(dirs),
            weights_dirs=tuple(weights_dirs),
            scoring_dirs=tuple(scoring_dirs),
            any_source=ANY in sources,
            any_weights=ANY in weights,
            any_scoring=ANY in scoring,
        )

    # --- data sources ------------------------------------------------------------------------

    def check_source(self, source: str | None) -> str | None:
        """The source to fetch from, as vetted (None: upstream); PolicyError if not allowed."""
        text = "" if source is None else str(source).strip()
        if text in ("", "upstream"):
            return None
        if self.any_source:
            return text
        if "://" in text:
            return self.check_url(text)
        try:
            path = resolve_path(text)
        except CovidctError as exc:
            raise PolicyError(f"data source {exc}") from None
        if any(path.is_relative_to(d) for d in self.source_dirs):
            return str(path)
        raise PolicyError(
            f"data source {text!r} (resolved: {path}) is not inside a folder the operator allows; "
            f"allowed folders: {_listed(self.source_dirs)}. To allow it, add it to {SOURCES_ENV} on the workers"
        )

    def check_url(self, url: str) -> str:
        """``url`` rebuilt from its parsed parts, if an allowed source covers it; else PolicyError."""
        if self.any_source:
            return url
        try:
            origin = parse_url(url)
        except CovidctError as exc:
            raise PolicyError(
                f"data source {exc}; allowed: {_listed(self.source_urls)} (set in {SOURCES_ENV})"
            ) from None
        if any(entry.covers(origin) for entry in self.source_urls):
            return origin.url
        raise PolicyError(
            f"{origin.url} is not an allowed data source (host {origin.host}, port {origin.port}); "
            f"allowed URLs: {_listed(self.source_urls)}. To allow it, add it to {SOURCES_ENV} on the workers"
        )

    # --- weights -----------------------------------------------------------------------------

    def check_weights(self, weights: str | None) -> str:
        """'imagenet', 'none', or the resolved path of an allowed weights file; else PolicyError."""
        value = normalize_weights(weights)
        if value in ("imagenet", "none") or self.any_weights:
            return value
        try:
            path = resolve_path(value)
        except CovidctError as exc:
            raise PolicyError(f"weights {exc}") from None
        if any(path.is_relative_to(d) for d in self.weights_dirs):
            return str(path)
        raise PolicyError(
            f"weights file {value!r} (resolved: {path}) is not inside a folder the operator allows; "
            f"allowed folders: {_listed(self.weights_dirs)}. To allow it, add its folder to {WEIGHTS_DIRS_ENV} "
            f"(or put it into ${WEIGHTS_DIR_ENV}) on the workers"
        )

    # --- folders of new scans (the scoring DAG) ------------------------------------------------

    def check_folder(self, folder: str | None) -> str:
        """The resolved folder of scans to score (empty: the incoming folder); PolicyError if not allowed."""
        text = "" if folder is None else str(folder).strip()
        if not text:  # the operator's incoming folder (the first entry)
            return str(self.scoring_dirs[0] if self.scoring_dirs else incoming_dir().resolve())
        try:
            path = resolve_path(text)
        except CovidctError as exc:
            raise PolicyError(f"folder {exc}") from None
        if self.any_scoring or any(path.is_relative_to(d) for d in self.scoring_dirs):
            return str(path)
        raise PolicyError(
            f"folder {text!r} (resolved: {path}) is not inside a folder the operator allows; allowed folders: "
            f"{_listed(self.scoring_dirs)}. To allow it, add it to {SCORING_DIRS_ENV} (or put the scans into "
            f"$COVIDCT_INCOMING_DIR) on the workers"
        )

    def scoring_roots(self) -> tuple[Path, ...] | None:
        """The folders every file a confined scoring job reads must really lie in (a symbolic link inside an
        allowed folder is followed, then held to these); None when any folder is allowed (``*``)."""
        return None if self.any_scoring else tuple(self.scoring_dirs)

    def check_params(self, params: Mapping) -> None:
        """Every trigger param that names a source or a file; PolicyError for the first one refused."""
        self.check_source(params.get("data_source"))
        self.check_weights(params.get("weights", "imagenet"))


def _listed(items) -> str:
    names = [item.url if isinstance(item, Origin) else str(item) for item in items]
    return ", ".join(names) if names else "none"


def check_pattern(value: str, pattern: str, what: str) -> str:
    """``value`` if it is short enough and matches ``pattern`` (the job's re-check of the param schema)."""
    if len(value) > MAX_LENGTH or not re.search(pattern, value):
        raise CovidctError(f"{what} {value!r} is not allowed: it must match {pattern}")
    return value
