"""How long each DAG task and a whole run may take: measured durations times a margin.

Measured on this project's 2-core machine (docs/performance.md, 746 real images, cold
cache, float32): fetch ~5 s from a local copy, validate ~4 s (+6 s of Great Expectations
import), one train job 117-166 s, the report a few seconds, the whole ``make run`` 7.4-7.6
min. The bounds (docs/operations.md, "Bounded time", gives the reasoning):

=================  ========  =====================================================
task               bound     why
=================  ========  =====================================================
fetch_dataset      30 min    ~95 MB from GitHub: lets a ~60 kB/s link finish, and
                             covers the download's own retry budget (~8 min a file)
validate_dataset   10 min    60x the measured 10 s; it decodes every image
select_backbones    5 min    a branch; only there so that nothing is unbounded
check_changes       5 min    (the same) reads the manifest, hashes the weights: ~1 s
record_success      5 min    (the same) writes one small file
train_<backbone>   40 min    the executor wait (5 min) + 4x the slowest cold job
                             (166 s) run three at once on the same cores (x3)
ensemble           10 min    ~10 s measured (scikit-learn fits on probabilities), x60
report             10 min    the measured seconds, 2000-resample bootstraps, x100
promote            10 min    a registry query + a paired bootstrap: seconds
the run (dagrun)   3 h 35   the sum of the bounds above on the critical path,
                             train's two retries included: it fires only for what
                             no task bound sees (a run queued or stuck between tasks)
overdue alert      off       opt-in; 2700 s (45 min, ~6x the measured 7.6-min cold
                             run) is a good value under a real scheduler
=================  ========  =====================================================

The overdue alert is an Airflow deadline alert (experimental in Airflow 3.3), awaited by
the triggerer. It is off by default because Airflow 3.3.2's ``dag.test()`` (so ``make run``
and ``airflow dags test``) crashes when a run of a DAG with a deadline alert succeeds: it
passes the alert's definition where the scheduler passes its id (``DagRun.update_state``).

Each bound is overridable in the environment of the Airflow processes that parse the
DAG (dag-processor, scheduler and workers alike), in seconds: ``COVIDCT_TIMEOUT_FETCH_S``,
``..._VALIDATE_S``, ``..._SELECT_S``, ``..._TRAIN_S``, ``..._ENSEMBLE_S``, ``..._REPORT_S``,
``..._PROMOTE_S``, ``..._RUN_S``, the
scoring DAG's ``..._CHAMPION_S``, ``..._SCORE_S``, ``..._SCORING_RUN_S`` and
``COVIDCT_RUN_DEADLINE_S`` (the overdue alert; unset or 0: none). Environment variables,
not Airflow Variables: they are read each time the DAG file is parsed, where a Variable
would cost a metadata-database call per parse.
"""

from __future__ import annotations

import os
from datetime import timedelta

from covidct.core.errors import CovidctError

MINUTE = 60
#: Default bounds in seconds, keyed by the name used in the environment variable.
DEFAULTS_S: dict[str, int] = {
    "fetch": 30 * MINUTE,
    "validate": 10 * MINUTE,
    "select": 5 * MINUTE,
    "train": 40 * MINUTE,
    "ensemble": 10 * MINUTE,
    "report": 10 * MINUTE,
    "promote": 10 * MINUTE,
    "run": 215 * MINUTE,
    # The scoring DAG (covid_ct_scoring): resolving and downloading the champion; the Spark job,
    # whose bound is train's (it featurizes like one); its run: both with their retries.
    "champion": 10 * MINUTE,
    "score": 40 * MINUTE,
    "scoring_run": 150 * MINUTE,
}
DEADLINE_ENV = "COVIDCT_RUN_DEADLINE_S"
DEFAULT_DEADLINE_S = 0  # off: see above


def env_name(what: str) -> str:
    return f"COVIDCT_TIMEOUT_{what.upper()}_S"


def _seconds(name: str, default: int, allow_zero: bool = False) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = int(float(value))
    except ValueError:
        seconds = -1
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise CovidctError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number of seconds, "
                           f"got {value!r}")  # fmt: skip
    return seconds


def timeout(what: str) -> timedelta:
    """The bound of ``what`` (fetch, validate, select, train, ensemble, report, promote, run), overrides applied."""
    if what not in DEFAULTS_S:
        raise KeyError(f"no bound named {what!r}; known: {', '.join(DEFAULTS_S)}")
    return timedelta(seconds=_seconds(env_name(what), DEFAULTS_S[what]))


def overdue_after() -> timedelta | None:
    """When a run counts as overdue (the deadline alert), or None when turned off."""
    seconds = _seconds(DEADLINE_ENV, DEFAULT_DEADLINE_S, allow_zero=True)
    return timedelta(seconds=seconds) if seconds else None


def for_task(task_id: str) -> timedelta:
    """The ``execution_timeout`` of a task of the DAG, by its id (``train_*``: the train bound)."""
    if task_id.startswith("train_"):
        return timeout("train")
    # check_changes (reads the manifest, hashes the weights files: seconds) and record_success
    # (bookkeeping) get the branch's bound.
    names = {"fetch_dataset": "fetch", "validate_dataset": "validate", "check_changes": "select",
             "select_backbones": "select", "record_success": "select"}  # fmt: skip
    return timeout(names.get(task_id, task_id))


def apply(dag) -> None:
    """Give every task of ``dag`` its bound (a task this module does not know keeps its own)."""
    for task in dag.tasks:
        try:
            task.execution_timeout = for_task(task.task_id)
        except KeyError:
            if task.execution_timeout is None:
                raise
