"""Full disks: a write that runs out of space fails with one line naming the filesystem.

Whatever ran out of space (Python's own writes, pyarrow's, Spark's through the JVM, where it arrives
as text: ``java.io.IOException: No space left on device``), the writer's block ends with a
``NoSpaceError`` naming the filesystem it was writing to and the destination, never a stack
trace. The writers (``covidct.core.atomic``, the feature cache) publish only complete files and
folders, so what was there before is kept; the message says so.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from covidct.core.errors import CovidctError

#: How the JVM (and the C library) words ENOSPC.
NO_SPACE_TEXT = "No space left on device"
_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class NoSpaceError(CovidctError):
    """A write ran out of space (a full filesystem, or a quota)."""


def is_no_space(exc: BaseException | None) -> bool:
    """True when ``exc`` (or an exception it was raised from) is a full disk or an exceeded quota."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
            return True
        if NO_SPACE_TEXT in str(exc):  # Spark's, through Py4J; pyarrow's, as text
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def mount_point(path: str | Path) -> Path:
    """The mount point of the filesystem that holds ``path`` (or would hold it: its nearest existing parent)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


@contextmanager
def reported(dest: str | Path, what: str) -> Iterator[None]:
    """Run the block; a full disk inside it becomes one ``NoSpaceError`` naming ``dest``'s filesystem.

    ``what`` names the writer ("train job", "feature cache", "scoring job"). Other errors pass as
    they are; so does a covidct error (it already says what went wrong).
    """
    try:
        yield
    except CovidctError:
        raise
    except Exception as exc:
        if not is_no_space(exc):
            raise
        raise NoSpaceError(
            f"no space left on {mount_point(dest)} while the {what} wrote {dest}: nothing was published "
            f"(what was there is kept); free space on that filesystem and run again"
        ) from None
