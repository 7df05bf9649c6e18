"""``make run``: one run of the whole DAG in this process (``dag.test()``), on the embedded defaults.

``run`` is interactive: someone is waiting. Its tasks are not retried (the scheduled DAG
keeps its retries); the screen shows one line per task and, at the end, each failed
task's cause and what to do next; Airflow's and Spark's own output (tracebacks included)
goes to ``$COVIDCT_HOME/logs/make-run-<time>.log``, whose path is printed.

Airflow is imported only after ``run`` has put the embedded defaults (``environment``) into this
process's environment: it reads its configuration at import.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import TextIO

import pluggy

from covidct.core import paths
from covidct.core.errors import CovidctError
from covidct.core.output import output_to
from covidct.features.backbone import get_backbone, resolve_weights
from covidct.lifecycle.fingerprint import read_run_fingerprint
from covidct.orchestration.local.diagnosis import cause_of, next_step
from covidct.orchestration.local.environment import environment
from covidct.orchestration.pipeline import DAG_BACKBONES
from covidct.orchestration.policy import Policy

#: Airflow's listener marker (``airflow.listeners.hookimpl``), without importing Airflow before
#: ``run`` has set its configuration.
hookimpl = pluggy.HookimplMarker("airflow")


DAG_ID = "covid_ct_transfer_learning"


def _preflight_weights(conf: dict) -> None:
    """Fail in a second, not after retries: missing weights, a param not allowed, a pooling that does not fit."""
    Policy.from_env().check_params(conf)  # what the DAG's first task checks (docs/operations.md, "Security")
    weights = conf.get("weights", "imagenet")
    for name in conf.get("backbones", DAG_BACKBONES):
        get_backbone(name).check_pooling(str(conf.get("pooling", "avg")))
        resolve_weights(get_backbone(name), weights)


def run(conf: dict, verbose: bool = False) -> int:
    """One DAG run in this process (``dag.test()``); returns 0 when it succeeded."""
    env = environment()
    os.environ.update(env)  # before Airflow is imported: it reads its config at import
    try:
        _preflight_weights(conf)
    except CovidctError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log_path = paths.home() / "logs" / f"make-run-{time.strftime('%Y%m%dT%H%M%S')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"Airflow and Spark output: {log_path}", flush=True)
    started = time.monotonic()
    with contextlib.nullcontext(sys.stdout) if verbose else output_to(log_path) as screen:
        progress = TaskProgress(screen)
        try:
            dag, dagrun = _test_dag(env, conf, progress)
        except KeyboardInterrupt:
            traceback.print_exc()
            error, dagrun = "interrupted", None
        except Exception as exc:  # noqa: BLE001 - whatever broke, the screen gets one line, the log the traceback
            traceback.print_exc()
            error = f"error: {exc}" if isinstance(exc, CovidctError) else f"error: {type(exc).__name__}: {exc}"
            dagrun = None
    if dagrun is None:
        print(f"{error}\n(the full output: {log_path})", file=sys.stderr)
        return 1
    print(summary(dag, dagrun, progress.errors, time.monotonic() - started, log_path))
    from airflow.utils.state import DagRunState

    return 0 if dagrun.state == DagRunState.SUCCESS else 1


def _test_dag(env: dict[str, str], conf: dict, progress: TaskProgress):
    """Migrate the DB, load the DAG, make it fail fast, ``dag.test()`` it; returns the DAG and its run."""
    progress.say(f"preparing Airflow in {env['AIRFLOW_HOME']} ...")
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    migrate_if_needed()
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.listener import get_listener_manager

    bag = DagBag(dag_folder=env["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        raise CovidctError(f"DAG import errors: {bag.import_errors}")
    dag = bag.dags[DAG_ID]
    without_retries(dag)
    manager = get_listener_manager()
    manager.add_listener(progress)
    try:
        return dag, dag.test(run_conf=conf)
    finally:
        manager.pm.unregister(progress)


def migrate_if_needed() -> bool:
    """``airflow db migrate`` in this process, unless the DB is already at this Airflow's heads; True if it ran.

    Checking the revision takes a fraction of a second; ``upgradedb`` on an up-to-date DB still
    runs Alembic's upgrade machinery and its checks (seconds on every ``make run``).
    """
    from airflow.utils import db

    try:
        db.check_migrations(timeout=0)  # one look; raises TimeoutError (after 1 s) when not up to date
        return False
    except Exception:  # noqa: BLE001 - TimeoutError, or a new file without Airflow's tables
        db.upgradedb()
        return True


def without_retries(dag) -> None:
    """Someone is waiting: no task retries in this run (the DAG file, and so the scheduler, keep theirs)."""
    for task in dag.tasks:
        task.retries = 0


class TaskProgress:
    """An Airflow listener: one line per task start and end on the screen; keeps each failure's exception."""

    def __init__(self, screen: TextIO):
        self.screen = screen
        self.errors: dict[str, BaseException | str | None] = {}
        self._started: dict[str, float] = {}

    def say(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", file=self.screen, flush=True)

    def _took(self, task_id: str) -> str:
        return f"{time.monotonic() - self._started.get(task_id, time.monotonic()):.0f} s"

    @hookimpl
    def on_task_instance_running(self, previous_state, task_instance) -> None:
        self._started[task_instance.task_id] = time.monotonic()
        self.say(f"{task_instance.task_id} running")

    @hookimpl
    def on_task_instance_success(self, previous_state, task_instance) -> None:
        self.say(f"{task_instance.task_id} succeeded ({self._took(task_instance.task_id)})")

    @hookimpl
    def on_task_instance_failed(self, previous_state, task_instance, error) -> None:
        self.errors[task_instance.task_id] = error
        self.say(f"{task_instance.task_id} failed ({self._took(task_instance.task_id)})")

    @hookimpl
    def on_task_instance_skipped(self, previous_state, task_instance) -> None:
        self.say(f"{task_instance.task_id} skipped")


def summary(dag, dagrun, errors: dict[str, BaseException | str | None], seconds: float, log_path: Path) -> str:
    """The closing lines: each task's state (in DAG order); for each failed one its cause and what to do next."""
    order = {task_id: i for i, task_id in enumerate(_dag_order(dag))}
    lines = [f"\nDAG run {dagrun.run_id}: {dagrun.state} in {seconds / 60:.1f} min"]
    for ti in sorted(dagrun.get_task_instances(), key=lambda ti: (order.get(ti.task_id, len(order)), ti.task_id)):
        lines.append(f"  {ti.task_id:18} {ti.state}")
        if ti.state == "failed":
            error = errors.get(ti.task_id)
            cause = cause_of(error) if error is not None else f"no exception recorded; see {log_path}"
            first, *more = cause.splitlines() or [""]
            lines.append(f"      error: {first}")
            lines.extend(f"        {line.strip()}" for line in more[:12])
            if len(more) > 12:
                lines.append(f"        ... ({len(more) - 12} more lines in {log_path})")
            lines.append(f"      next:  {next_step(ti.task_id, error, log_path)}")
    decision = read_run_fingerprint(paths.run_dir(dagrun.run_id))
    if decision:  # "unchanged since run X ..." or why it retrained
        lines.append(decision["reason"])
    report = paths.run_dir(dagrun.run_id) / "report"
    if (report / "report.html").is_file():
        lines.append(f"report: {report / 'report.html'}\n        {report / 'report.md'}")
    lines.append(f"Airflow and Spark output: {log_path}")
    return "\n".join(lines)


def _dag_order(dag) -> list[str]:
    """Task ids, upstream before downstream (ties by name)."""
    left = {task.task_id: set(task.upstream_task_ids) for task in dag.tasks}
    order: list[str] = []
    while left:
        ready = sorted(task_id for task_id, upstream in left.items() if not upstream - set(order)) or sorted(left)
        order.extend(ready)
        for task_id in ready:
            del left[task_id]
    return order
