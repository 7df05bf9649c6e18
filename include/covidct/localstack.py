"""``make run`` / ``make ui``: the whole DAG on this machine, on embedded defaults.

Embedded defaults: an Airflow home inside the project (``var/airflow``, SQLite metadata
DB), ``spark_default`` = ``local[*]`` (JSON form: the URI ``spark://local[2]`` would
silently mean YARN), the venv's ``spark-submit`` on PATH, and ``COVIDCT_HOME=var``.
``COVIDCT_DATA_SOURCE`` and ``COVIDCT_WEIGHTS_DIR`` are honoured (offline use).

    python -m covidct.localstack run [--conf JSON] [--verbose]   # one DAG run with dag.test(); prints the report
    python -m covidct.localstack ui                              # airflow standalone on http://localhost:8080

``run`` is interactive: someone is waiting. Its tasks are not retried (the scheduled DAG
keeps its retries); the screen shows one line per task and, at the end, each failed
task's cause and what to do next; Airflow's and Spark's own output (tracebacks included)
goes to ``$COVIDCT_HOME/logs/make-run-<time>.log``, whose path is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pluggy

#: Airflow's listener marker (``airflow.listeners.hookimpl``), without importing Airflow before
#: ``run`` has set its configuration.
hookimpl = pluggy.HookimplMarker("airflow")

DAG_ID = "covid_ct_transfer_learning"
PROJECT = Path(__file__).resolve().parents[2]


def environment(project: Path = PROJECT) -> dict[str, str]:
    """The variables ``make run``/``make ui`` add (already-set ones win, except PATH's head)."""
    from covidct.session import LOCAL_DRIVER_JAVA_OPTIONS

    venv_bin = str(Path(sys.executable).parent)
    var = project / "var"
    defaults = {
        "COVIDCT_HOME": str(var),
        "AIRFLOW_HOME": str(var / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(project / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # One Spark job at a time: each uses every core already.
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "1",
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[*]"}),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        # The spark-submitted drivers' JVM options (short jobs: see covidct.session).
        "SPARK_SUBMIT_OPTS": LOCAL_DRIVER_JAVA_OPTIONS,
    }
    env = {key: os.environ.get(key) or value for key, value in defaults.items()}
    env["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    return env


def _migrate_db(env: dict[str, str]) -> None:
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    subprocess.run(["airflow", "db", "migrate"], env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)


def _preflight_weights(conf: dict) -> None:
    """Fail in a second, not after retries: missing weights, a param not allowed, a pooling that does not fit."""
    from covidct.backbone import get_backbone, resolve_weights
    from covidct.pipeline import DAG_BACKBONES
    from covidct.policy import Policy

    Policy.from_env().check_params(conf)  # what the DAG's first task checks (README "Security")
    weights = conf.get("weights", "imagenet")
    for name in conf.get("backbones", DAG_BACKBONES):
        get_backbone(name).check_pooling(str(conf.get("pooling", "avg")))
        resolve_weights(get_backbone(name), weights)


def run(conf: dict, verbose: bool = False) -> int:
    """One DAG run in this process (``dag.test()``); returns 0 when it succeeded."""
    env = environment()
    os.environ.update(env)  # before Airflow is imported: it reads its config at import
    from covidct.errors import CovidctError

    try:
        _preflight_weights(conf)
    except CovidctError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from covidct import paths

    log_path = paths.home() / "logs" / f"make-run-{time.strftime('%Y%m%dT%H%M%S')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"Airflow and Spark output: {log_path}", flush=True)
    started = time.monotonic()
    with contextlib.nullcontext(sys.stdout) if verbose else _output_to(log_path) as screen:
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
    from covidct.errors import CovidctError

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


@contextlib.contextmanager
def _output_to(log_path: Path) -> Iterator[TextIO]:
    """Send this process's stdout and stderr (and its children's) to ``log_path``; yields the screen."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    screen = os.fdopen(os.dup(1), "w", buffering=1)
    try:
        with open(log_path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        yield screen
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        screen.close()


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
    from covidct import paths

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
    from covidct.fingerprint import read_run_fingerprint

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


def _chain(error: BaseException | str | None) -> list[BaseException]:
    """The exception and those it was raised from."""
    found = []
    while isinstance(error, BaseException) and error not in found:
        found.append(error)
        error = error.__cause__ or error.__context__
    return found


def cause_of(error: BaseException | str) -> str:
    """A task's failure in a few words: the ``error:`` message it raised, never a traceback."""
    from covidct.errors import CovidctError
    from covidct.operators import job_error_line

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
    from covidct.errors import DownloadError

    chain = _chain(error)
    download = next((e for e in chain if isinstance(e, DownloadError)), None)
    if download is not None:
        later = "try again later, or " if download.transient else ""
        return (
            f"this machine cannot get the dataset from its source: {later}copy the dataset here and set "
            "COVIDCT_DATA_SOURCE to it (the folder with CT_COVID/ and CT_NonCOVID/, or one holding "
            "CT_COVID.zip and CT_NonCOVID.zip), or to a mirror URL; README, section Offline"
        )
    text = str(error or "")
    if task_id == "fetch_dataset":
        return "fix the data source, or point COVIDCT_DATA_SOURCE (or the data_source param) at a good copy"
    if task_id == "validate_dataset":
        return "fix the dataset, or set expect_covid/expect_noncovid in COVIDCT_DAG_CONF if it is meant to differ"
    if task_id.startswith("train_") and "ImageNet weights" in text:
        return (
            "put the weights in COVIDCT_WEIGHTS_DIR, copy ~/.keras/models from a connected machine, or set "
            "COVIDCT_WEIGHTS_URL to a mirror (README, section Offline); weights none for random weights"
        )
    if task_id == "report" and "no backbone succeeded" in text:
        return "see why the train tasks failed (above)"
    if any(type(e).__name__ == "AirflowFailException" for e in chain):
        return "fix what the message names and run again"
    return f"not a known user error: the traceback is in {log_path}"


def ui() -> int:
    """``airflow standalone`` (api-server on :8080, scheduler, dag-processor, triggerer); Ctrl-C stops it."""
    env = environment()
    _migrate_db(env)
    passwords = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    print(f"Airflow UI: http://localhost:8080 (admin password printed below, saved in {passwords}).")
    print("Ctrl-C (or SIGTERM) stops every component.")

    def interrupt(*_):
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both stop the stack, even where SIGINT was inherited as ignored.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    # Its own process group: one SIGINT from us (not the terminal's too) starts its shutdown,
    # and whatever of the group outlives it is ended with the group.
    proc = subprocess.Popen(
        ["airflow", "standalone"],
        env={**os.environ, **env},
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        return proc.wait()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C (or make's) must not cut the shutdown
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("Stopping Airflow ...", flush=True)
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        _end_group(proc.pid)
        print("Airflow stopped.")
        return 0


def _end_group(pgid: int) -> None:
    """SIGTERM, then SIGKILL, to every process left in the group."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + grace
        try:
            os.killpg(pgid, sig)
            while time.monotonic() < deadline:
                time.sleep(0.2)
                os.killpg(pgid, 0)  # raises once the group is empty
        except ProcessLookupError:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covidct.localstack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the whole DAG once (dag.test)")
    p.add_argument("--conf", default=os.environ.get("COVIDCT_DAG_CONF", "{}"), help="DAG params as JSON")
    p.add_argument("--verbose", action="store_true", help="show Airflow's and Spark's output instead of logging it")
    sub.add_parser("ui", help="start the Airflow UI and scheduler (airflow standalone)")
    args = parser.parse_args(argv)
    if args.command == "ui":
        return ui()
    try:
        conf = json.loads(args.conf)
    except json.JSONDecodeError as exc:
        print(f"error: --conf is not JSON: {exc}", file=sys.stderr)
        return 2
    return run(conf, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
