"""Sending a process's output (file descriptors 1 and 2) to a log file for a while.

What starts inside the block (a JVM, ``dag.test()``'s tasks, their subprocesses) inherits the
log file as its stdout and stderr and keeps it; the user's terminal gets only what is written to
the ``screen`` the block yields (``make run``'s lines, the CLI's results).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


@contextmanager
def output_to(path: str | Path) -> Iterator[TextIO]:
    """File descriptors 1 and 2 go to ``path`` (appended) for the block; yields the terminal as a text file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    screen = os.fdopen(os.dup(1), "w", buffering=1)
    try:
        with open(path, "ab") as out:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
        yield screen
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        screen.close()
