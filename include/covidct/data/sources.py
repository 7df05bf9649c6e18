"""Where the dataset comes from: the upstream repository, a mirror, or a local copy.

Sources (``fetch(dest, source)``):

- ``None`` / ``"upstream"``: the GitHub repository UCSD-AI4H/COVID-CT (raw files;
  ``$COVIDCT_UPSTREAM_URL`` overrides the base URL);
- ``http(s)://...``: the base URL of a mirror laid out like that repository;
- a local folder laid out like the result (``CT_COVID/``, ``CT_NonCOVID/``, ``Data-split/``);
- a local folder holding ``CT_COVID.zip`` and ``CT_NonCOVID.zip`` (directly or under
  ``Images-processed/``, e.g. a clone of upstream) and ``Data-split/``.

A ``Source`` gathers its files (downloaded into a work folder, or hashed where they lie) and
unpacks them into the layout of the result (``covidct.data.fetch``).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from covidct.core.errors import CovidctError
from covidct.data.archive import ArchiveLimits, extract_archive
from covidct.data.dataset import CLASSES, split_list_file
from covidct.data.download import HttpOptions, SourceFile, download, hashed, http_session, record_fields, sha256_file
from covidct.data.manifest import SPLITS

log = logging.getLogger(__name__)

UPSTREAM_URL = "https://raw.githubusercontent.com/UCSD-AI4H/COVID-CT/master/"
UPSTREAM_ENV = "COVIDCT_UPSTREAM_URL"
#: class folder -> its archive in the upstream repository
ARCHIVES = {folder: f"Images-processed/{folder}.zip" for folder in CLASSES}
SPLIT_LIST_FILES = tuple(split_list_file(short, split) for short, _ in CLASSES.values() for split in SPLITS)
UPSTREAM_FILES = (*ARCHIVES.values(), *SPLIT_LIST_FILES)


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
        with http_session(self.http, self.allow_url) as session:
            for name in only or UPSTREAM_FILES:
                target = work / name
                target.parent.mkdir(parents=True, exist_ok=True)
                got = download(session, self.url(name), target, self.http, self.limits, known.get(name), name=name)
                files[name] = got if got is not None else SourceFile(name, path=None, **record_fields(known[name]))
        return files

    def unpack(self, files: dict[str, SourceFile], staging: Path) -> None:
        unpack_upstream(files, staging, self.limits)


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
            files[name] = hashed(name, inside(self.root, path))
        return files

    def unpack(self, files: dict[str, SourceFile], staging: Path) -> None:
        unpack_upstream(files, staging, self.limits)


def inside(root: Path, path: Path) -> Path:
    """``path`` when it really lies inside ``root`` (every symbolic link followed): the operator allowed the
    folder, not what a link in it leads to. CovidctError otherwise."""
    if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)):
        raise CovidctError(
            f"source {root}: {path.relative_to(root)} is a symbolic link that leads outside the source folder "
            "(the operator allows the folder, not what its links lead to); copy the file into it instead"
        )
    return path


@dataclass
class FolderSource(Source):
    """A local folder already laid out like the result: its files are copied."""

    root: Path

    @property
    def location(self) -> str:
        return str(self.root)

    def gather(self, work: Path, previous: dict | None, only: Iterable[str] | None = None) -> dict[str, SourceFile]:
        names = list(only) if only else self._names()
        return {name: hashed(name, inside(self.root, self.root / name)) for name in names}

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
            if sha256_file(target) != item.sha256:
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


def unpack_upstream(files: dict[str, SourceFile], staging: Path, limits: ArchiveLimits) -> None:
    """The two archives into the class folders, the split lists into ``Data-split/``."""
    for folder, name in ARCHIVES.items():
        n = extract_archive(files[name].path, staging / folder, folder, limits, label=name)
        log.info("extracted %d files from %s", n, name)
    for name in SPLIT_LIST_FILES:
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[name].path, target)
