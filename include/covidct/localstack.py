"""``make run`` / ``make ui``: the whole DAG on this machine, on embedded defaults.

Embedded defaults: an Airflow home inside the project (``var/airflow``, SQLite metadata
DB), ``spark_default`` = ``local[*]`` (JSON form: the URI ``spark://local[2]`` would
silently mean YARN), the venv's ``spark-submit`` on PATH, and ``COVIDCT_HOME=var``.
``COVIDCT_DATA_SOURCE`` and ``COVIDCT_WEIGHTS_DIR`` are honoured (offline use).

    python -m covidct.localstack run [--conf JSON]   # one DAG run with dag.test(); prints the report
    python -m covidct.localstack ui                  # airflow standalone on http://localhost:8080
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
from pathlib import Path

DAG_ID = "covid_ct_transfer_learning"
PROJECT = Path(__file__).resolve().parents[2]


def environment(project: Path = PROJECT) -> dict[str, str]:
    """The variables ``make run``/``make ui`` add (already-set ones win, except PATH's head)."""
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
    }
    env = {key: os.environ.get(key) or value for key, value in defaults.items()}
    env["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    return env


def _migrate_db(env: dict[str, str]) -> None:
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    subprocess.run(["airflow", "db", "migrate"], env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)


def _preflight_weights(conf: dict) -> None:
    """Fail in a second, not after retries, when ImageNet weights are missing or a pooling does not fit."""
    from covidct.backbone import get_backbone, resolve_weights
    from covidct.pipeline import DAG_BACKBONES

    weights = conf.get("weights", "imagenet")
    for name in conf.get("backbones", DAG_BACKBONES):
        get_backbone(name).check_pooling(str(conf.get("pooling", "avg")))
        resolve_weights(get_backbone(name), weights)


def run(conf: dict) -> int:
    """One DAG run in this process (``dag.test()``); returns 0 when it succeeded."""
    env = environment()
    os.environ.update(env)  # before Airflow is imported: it reads its config at import
    from covidct.errors import CovidctError

    try:
        _preflight_weights(conf)
    except CovidctError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _migrate_db(env)
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    from covidct import paths

    bag = DagBag(dag_folder=env["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        print(f"error: DAG import errors: {bag.import_errors}", file=sys.stderr)
        return 1
    started = time.monotonic()
    dagrun = bag.dags[DAG_ID].test(run_conf=conf)
    wall = time.monotonic() - started
    states = {ti.task_id: ti.state for ti in dagrun.get_task_instances()}
    report = paths.run_dir(dagrun.run_id) / "report"
    print(f"\nDAG run {dagrun.run_id}: {dagrun.state} in {wall / 60:.1f} min")
    for task_id, state in sorted(states.items()):
        print(f"  {task_id:18} {state}")
    if (report / "report.html").is_file():
        print(f"report: {report / 'report.html'}\n        {report / 'report.md'}")
    return 0 if dagrun.state == DagRunState.SUCCESS else 1


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
    sub.add_parser("ui", help="start the Airflow UI and scheduler (airflow standalone)")
    args = parser.parse_args(argv)
    if args.command == "ui":
        return ui()
    try:
        conf = json.loads(args.conf)
    except json.JSONDecodeError as exc:
        print(f"error: --conf is not JSON: {exc}", file=sys.stderr)
        return 2
    return run(conf)


if __name__ == "__main__":
    sys.exit(main())
