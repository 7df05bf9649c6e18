"""One writer at a time per destination: an exclusive file lock (``fcntl.flock``) beside it.

Two ``covidct fetch`` into one folder, or two jobs writing one run folder, take turns: the
second waits (up to a bound, logging whom it waits for) or, past the bound, fails naming the
holder. Nothing is half-published either way, because every writer publishes with
``covidct.core.atomic`` while it holds the lock.

The lock file ``.NAME.lock`` sits beside ``DEST`` (same filesystem, so it works wherever the
destination is shared) and holds the holder's pid, host and start time, for the messages. The
holder removes it when it is done; a holder that dies (even by SIGKILL) releases the lock with
its process, and the next writer takes it over.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

from covidct.core.errors import CovidctError

log = logging.getLogger(__name__)

#: How long a writer waits for another one to finish, by default (seconds).
DEFAULT_WAIT = 900.0


class LockBusy(CovidctError):
    """Another process kept the destination locked for longer than we were willing to wait."""


def lock_path(dest: str | Path) -> Path:
    dest = Path(dest).expanduser().absolute()
    return dest.parent / f".{dest.name}.lock"


def holder(dest: str | Path) -> str | None:
    """Who holds the lock on ``dest`` (as it wrote itself down), None if nobody seems to."""
    try:
        text = lock_path(dest).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


@contextmanager
def locked(dest: str | Path, *, what: str, wait: float = DEFAULT_WAIT, poll: float = 0.25) -> Iterator[Path]:
    """Hold the exclusive lock on ``dest`` for the block; waits up to ``wait`` seconds for it.

    ``what`` names the writer in the messages ("fetch", "train job", "report"). Raises
    LockBusy, naming the holder, when the lock is still taken after ``wait`` seconds
    (``wait=0``: at once).
    """
    path = lock_path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + max(0.0, wait)
    announced = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            busy_with = holder(dest) or "another process"
            if time.monotonic() >= deadline:
                raise LockBusy(
                    f"another {what} is writing {dest} ({busy_with}); gave up after waiting {wait:.0f} s: "
                    f"try again when it has finished (the lock {path} is released when that process ends)"
                ) from None
            if not announced:
                log.info("waiting up to %.0f s for %s, which is writing %s", wait, busy_with, dest)
                announced = True
            time.sleep(poll)
            continue
        # The previous holder removes the file before releasing it: make sure we locked the
        # file that is at the path now, not one that was unlinked while we waited.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        break
    try:
        started = datetime.now(UTC).isoformat(timespec="seconds")
        with suppress(OSError):  # only a note for the messages: a full disk must not stop the writer here
            os.ftruncate(fd, 0)
            os.write(fd, f"{what}: pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode())
        if announced:
            log.info("got the lock on %s", dest)
        yield path
    finally:
        with suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
