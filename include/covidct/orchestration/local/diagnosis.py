"""What ``make run`` says about a failed task: its cause in a few words, and what the user can do next."""

from __future__ import annotations

from pathlib import Path

from covidct.core.errors import CovidctError, DownloadError
from covidct.orchestration.job_output import job_error_line


def _chain(error: BaseException | str | None) -> list[BaseException]:
    """The exception and those it was raised from."""
    found = []
    while isinstance(error, BaseException) and error not in found:
        found.append(error)
        error = error.__cause__ or error.__context__
    return found


def cause_of(error: BaseException | str) -> str:
    """A task's failure in a few words: the ``error:`` message it raised, never a traceback."""
    if not isinstance(error, BaseException):
        return str(error)
    chain = _chain(error)
    ours = next((e for e in chain if isinstance(e, CovidctError)), None)
    text = str(ours if ours is not None else error).strip()
    if ours is None and type(error).__name__ not in ("AirflowFailException",):
        text = (
            job_error_line(text.splitlines()) or f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"
        )
    return text


def next_step(task_id: str, error: BaseException | str | None, log_path: Path) -> str:
    """What the user can do about a failed task."""
    chain = _chain(error)
    download = next((e for e in chain if isinstance(e, DownloadError)), None)
    if download is not None:
        later = "try again later, or " if download.transient else ""
        return (
            f"this machine cannot get the dataset from its source: {later}copy the dataset here and set "
            "COVIDCT_DATA_SOURCE to it (the folder with CT_COVID/ and CT_NonCOVID/, or one holding "
            "CT_COVID.zip and CT_NonCOVID.zip), or to a mirror URL; docs/operations.md, section Offline"
        )
    text = str(error or "")
    if task_id == "fetch_dataset":
        return "fix the data source, or point COVIDCT_DATA_SOURCE (or the data_source param) at a good copy"
    if task_id == "validate_dataset":
        return "fix the dataset, or set expect_covid/expect_noncovid in COVIDCT_DAG_CONF if it is meant to differ"
    if task_id.startswith("train_") and "ImageNet weights" in text:
        return (
            "put the weights in COVIDCT_WEIGHTS_DIR, copy ~/.keras/models from a connected machine, or set "
            "COVIDCT_WEIGHTS_URL to a mirror (docs/operations.md, section Offline); weights none for random weights"
        )
    if task_id == "report" and "no backbone succeeded" in text:
        return "see why the train tasks failed (above)"
    if any(type(e).__name__ == "AirflowFailException" for e in chain):
        return "fix what the message names and run again"
    return f"not a known user error: the traceback is in {log_path}"
