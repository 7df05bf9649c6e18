"""Publishing a folder all at once: build it beside its destination, then rename.

A failure at any point leaves the destination as it was (absent, or the previous
good copy). Only the swap of an existing destination takes two renames; a crash
between them leaves the previous copy beside it as ``.NAME.old-*``. Writers of one
destination take turns (``covidct.core.locks``): each publishes a complete folder. A full disk
ends the block with one ``NoSpaceError`` naming the filesystem (``covidct.core.diskspace``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from covidct.core.diskspace import reported
from covidct.core.locks import DEFAULT_WAIT, locked


def sibling(dest: Path, tag: str) -> Path:
    """A hidden path next to ``dest`` (same filesystem, so renames are atomic)."""
    return dest.parent / f".{dest.name}.{tag}-{uuid.uuid4().hex[:12]}"


def replace_dir(new: Path, dest: Path) -> None:
    """Put the complete folder ``new`` at ``dest``, replacing what was there."""
    if not dest.exists():
        os.rename(new, dest)
        return
    old = sibling(dest, "old")
    os.rename(dest, old)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(
    dest: str | Path, *, lock: bool = True, what: str = "writer", wait: float = DEFAULT_WAIT
) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``dest``, on failure it is removed.

    With ``lock`` (the default) the block holds the lock on ``dest``: a second writer of
    the same ``dest`` waits up to ``wait`` seconds, then publishes its own complete copy
    (``lock=False``: the caller holds it already).
    """
    dest = Path(dest).expanduser().absolute()
    with reported(dest, what):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with locked(dest, what=what, wait=wait) if lock else contextlib.nullcontext():
            staging = sibling(dest, "tmp")
            staging.mkdir()
            try:
                yield staging
                replace_dir(staging, dest)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path, *, what: str = "writer") -> Iterator[Path]:
    """A temporary path beside ``path`` to write the whole file to; renamed to ``path`` when the block
    ends without an error. Readers see the old or the new content, never a part."""
    path = Path(path)
    tmp = sibling(path, "tmp")
    with reported(path, what):
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # after a failure: no temporary file left behind


def write_text_atomic(path: str | Path, text: str, *, what: str = "writer") -> None:
    """Write a file so readers see the old or the new content, never a part."""
    with atomic_file(path, what=what) as tmp:
        tmp.write_text(text, encoding="utf-8")
