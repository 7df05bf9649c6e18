"""Error translation: a covidct error raised in a Spark worker reaches the driver as itself.

A worker's exception crosses the JVM as text (a Python traceback inside a Java one). For the
errors a user can fix (``covidct.core.errors``) the driver re-raises the same class with the same
message, without the traces: the CLI prints one line, an Airflow task fails without retries.
"""

from __future__ import annotations

import re

from covidct.core.errors import CovidctError, ImageDecodeError, WeightsNotFoundError

_WORKER_ERRORS = {
    "ImageDecodeError": ImageDecodeError,
    "WeightsNotFoundError": WeightsNotFoundError,
    "CovidctError": CovidctError,
}
#: As a worker's traceback names them: ``covidct.core.errors.ImageDecodeError: <message>``.
_WORKER_ERROR_RE = re.compile(re.escape(CovidctError.__module__) + r"\.(\w+): (.+)")


def user_error(exc: BaseException) -> CovidctError | None:
    """The covidct error a Spark worker raised, if ``exc`` wraps one (else None)."""
    match = _WORKER_ERROR_RE.search(str(exc))
    if match and match.group(1) in _WORKER_ERRORS:
        return _WORKER_ERRORS[match.group(1)](match.group(2).strip())
    return None


class spark_errors:  # noqa: N801 - used as a context manager
    """Re-raise a covidct error from a Spark worker as itself, without the JVM/worker traces."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and not isinstance(exc, CovidctError):
            found = user_error(exc)
            if found is not None:
                raise found from None
        return False
