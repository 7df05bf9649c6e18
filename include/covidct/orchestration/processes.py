"""Ending what a task or a launcher started: a process with all its descendants, or a whole process group."""

from __future__ import annotations

import contextlib
import os
import signal
import time

#: On kill: how long spark-submit and the drivers get to stop after SIGTERM (the driver JVM's
#: shutdown hook stops the SparkContext, so the master marks the application finished).
KILL_GRACE_S = 15.0


def end_process_tree(pid: int, grace_s: float = KILL_GRACE_S) -> list[int]:
    """SIGTERM ``pid`` and every descendant, then SIGKILL what is left after ``grace_s``.

    The tree is read before anything is signalled: once the driver JVM is gone its
    children (the Python driver, PySpark's worker daemon, which sits in its own process
    group, and its workers) are re-parented and could no longer be found. Returns the PIDs
    that had to be killed.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in alive]


def end_group(pgid: int, term_grace_s: float = 15.0, kill_grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, to every process left in the group; returns once it is empty (or the graces end)."""
    for sig, grace in ((signal.SIGTERM, term_grace_s), (signal.SIGKILL, kill_grace_s)):
        deadline = time.monotonic() + grace
        try:
            os.killpg(pgid, sig)
            while time.monotonic() < deadline:
                time.sleep(0.2)
                os.killpg(pgid, 0)  # raises once the group is empty
        except ProcessLookupError:
            return
