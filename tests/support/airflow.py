"""Airflow processes the tests start (``airflow standalone``, ``make run``)."""

from __future__ import annotations

from pathlib import Path


def processes_of_airflow_home(airflow_home: Path) -> list[str]:
    """PIDs of the processes still running with this AIRFLOW_HOME in their environment."""
    marker = f"AIRFLOW_HOME={airflow_home}".encode()
    left = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                left.append(environ.parent.name)
        except OSError:
            continue
    return left
