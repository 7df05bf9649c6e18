"""How a task's failure is handled by Airflow: retried only when a retry can help.

Airflow is imported when a failure happens, not before: the modules that use these helpers stay
importable (and cheap to import) outside a task.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from covidct.core.errors import CovidctError


def fail_now(message: str) -> Exception:
    """An exception that fails the Airflow task at once, without its retries (raise it)."""
    from airflow.sdk.exceptions import AirflowFailException

    return AirflowFailException(message)


def skip(message: str) -> Exception:
    """An exception that marks the Airflow task skipped, saying why (raise it)."""
    from airflow.sdk.exceptions import AirflowSkipException

    return AirflowSkipException(message)


@contextmanager
def retry_only_transient() -> Iterator[None]:
    """A CovidctError that a retry cannot fix fails the Airflow task at once, without its retries.

    Transient ones (``CovidctError.transient``: a network outage, a server restarting) are raised
    as they are, for the task's retries. Other exceptions (bugs, a lost worker) too.
    """
    try:
        yield
    except CovidctError as exc:
        if exc.transient:
            raise
        raise fail_now(str(exc)) from exc
