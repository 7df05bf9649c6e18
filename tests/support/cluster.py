"""A real Spark standalone cluster on 127.0.0.1, started from the installed pyspark (``spark-class``).

One master serves the whole test session (``conftest.spark_standalone``); workers come and go per
test, each daemon in a session of its own, as in a container of its own. Tests tell their own
applications from earlier ones with :meth:`Standalone.mark` and :meth:`Standalone.new_apps`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.net import free_port


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def spark_env(tmp: Path) -> dict[str, str]:
    """Environment of the daemons and of spark-submit: loopback only, logs and conf in ``tmp``."""
    from covidct.core.session import LOCAL_DRIVER_JAVA_OPTIONS

    conf_dir = tmp / "conf"  # no spark-defaults.conf from anywhere else
    conf_dir.mkdir(parents=True, exist_ok=True)
    # The daemons and executors of this short-lived cluster get a local driver's JVM options (no C2 JIT:
    # covidct.core.session): their jobs are as short, and every JVM here shares the test machine's cores.
    (conf_dir / "spark-defaults.conf").write_text(f"spark.executor.extraJavaOptions {LOCAL_DRIVER_JAVA_OPTIONS}\n")
    env = {
        **os.environ,
        "SPARK_HOME": str(spark_home()),
        "SPARK_CONF_DIR": str(conf_dir),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_LOG_DIR": str(tmp / "logs"),
        "SPARK_WORKER_DIR": str(tmp / "work"),
        # The master's REST submission server (default port 6066) is not needed here.
        "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false",
        "SPARK_DAEMON_JAVA_OPTS": LOCAL_DRIVER_JAVA_OPTIONS,
        # Executors' Python workers must use this interpreter (TensorFlow and covidct live here).
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    # The cluster must come from spark-submit's --master alone, as under Airflow.
    env.pop("COVIDCT_SPARK_MASTER", None)
    return env


def read_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def stop(proc: subprocess.Popen) -> None:
    """Stop a daemon we started in a session of its own: TERM, wait, KILL; then the rest of its session.

    As a container's processes die with its PID 1. A worker asked to launch an executor while it
    shuts down can start that JVM after its shutdown hook killed the others (its log: "Shutdown
    hooks cannot be modified during shutdown"); such an orphan would serve a job on.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    end_session(proc.pid)


def end_session(sid: int) -> None:
    """Kill every process left in session ``sid`` and wait until they are gone."""
    import psutil

    left = []
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(proc.pid) == sid:
                proc.kill()
                left.append(proc)
    _, alive = psutil.wait_procs(left, timeout=10)
    assert not alive, f"still running in session {sid}: {alive}"


@dataclass
class Standalone:
    """A standalone master on loopback; workers come and go."""

    tmp: Path
    env: dict[str, str] = field(default_factory=dict)
    master_url: str = ""
    webui: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    marked: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.env = self.env or spark_env(self.tmp)

    @property
    def json_url(self) -> str:
        return self.webui + "/json/"

    @property
    def work_dir(self) -> Path:
        """The worker's work dir: ``<app id>/<executor id>/stderr`` are the executors' logs."""
        return self.tmp / "work"

    @property
    def logs(self) -> dict[str, Path]:
        return {name: self.tmp / f"{name}.log" for name in self.procs}

    def spark_class(self, name: str, *args: str) -> subprocess.Popen:
        """Start a daemon in a session of its own, as in a container of its own."""
        log = self.tmp / f"{name}.log"
        with log.open("ab") as handle:  # spark-class execs java: this PID is the daemon's
            self.procs[name] = subprocess.Popen([str(spark_home() / "bin" / "spark-class"), *args], env=self.env,
                                                stdout=handle, stderr=subprocess.STDOUT,
                                                start_new_session=True)  # fmt: skip
        return self.procs[name]

    def state(self) -> dict:
        return read_json(self.json_url)

    def wait_for(self, what: str, ok, timeout_s: float = 90) -> dict:
        deadline, state = time.monotonic() + timeout_s, {}
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"spark {name} exited with {proc.returncode}:\n{tail(self.tmp / f'{name}.log')}")
            try:
                state = self.state()
            except OSError:
                state = {}
            if ok(state):
                return state
            time.sleep(0.5)
        logs = "\n".join(tail(self.tmp / f"{n}.log", 15) for n in self.procs)
        pytest.fail(f"{what} not reached in {timeout_s} s: {state}\n{logs}")

    def start_master(self) -> None:
        port, ui = free_port(), free_port()
        self.master_url, self.webui = f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui}"
        self.spark_class("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port",
                         str(port), "--webui-port", str(ui))  # fmt: skip
        self.wait_for("master ALIVE", lambda s: s.get("status") == "ALIVE")

    def alive_workers(self, state: dict | None = None) -> list[dict]:
        return [w for w in (state or self.state()).get("workers", []) if w.get("state") == "ALIVE"]

    def start_worker(self) -> None:
        assert "worker" not in self.procs, "a worker runs already"
        self.spark_class("worker", "org.apache.spark.deploy.worker.Worker", self.master_url, "--host", "127.0.0.1",
                         "--cores", "2", "--memory", "3g", "--work-dir", str(self.work_dir),
                         "--webui-port", str(free_port()))  # fmt: skip
        self.wait_for("an ALIVE worker", lambda s: bool(self.alive_workers(s)))

    def stop_worker(self) -> None:
        """As ``docker compose stop spark-worker``: TERM, and nothing the worker started outlives it."""
        stop(self.procs.pop("worker"))
        self.wait_for("no ALIVE worker", lambda s: "workers" in s and not self.alive_workers(s), 60)

    def mark(self) -> None:
        """From now on, :meth:`new_apps` leaves out every application the master knows of now."""
        state = self.state()
        self.marked = {a["id"] for a in state.get("activeapps", []) + state.get("completedapps", [])}

    def new_apps(self, timeout_s: float = 30) -> list[dict]:
        """The applications completed since :meth:`mark`, once none is active any more."""
        state = self.wait_for("no active application", lambda s: "activeapps" in s and not s["activeapps"], timeout_s)
        return [a for a in state.get("completedapps", []) if a["id"] not in self.marked]

    def close(self) -> None:
        for name in ("worker", "master"):
            if name in self.procs:
                stop(self.procs.pop(name))
