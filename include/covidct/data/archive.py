"""Unpacking the dataset's zip archives defensively.

Archives are unpacked defensively: absolute paths, ``..`` components, links and other
non-regular entries are refused; the entry count and the uncompressed bytes are capped;
``__MACOSX/`` and dotfiles are ignored.
"""

from __future__ import annotations

import logging
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from covidct.core.errors import CovidctError

log = logging.getLogger(__name__)

MB = 1024 * 1024


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps against zip bombs and runaway downloads (the real archives: ~750 entries, ~100 MB)."""

    max_entries: int = 20_000  # per archive
    max_bytes: int = 2 * 1024 * MB  # uncompressed bytes per archive; also bytes per downloaded file


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
