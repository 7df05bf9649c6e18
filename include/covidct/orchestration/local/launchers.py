"""The local UIs in the foreground: ``make ui`` (``airflow standalone``) and ``make mlflow-ui`` (``mlflow server``).

Each runs in a process group of its own; Ctrl-C (or SIGTERM) stops it and whatever of the group
outlives it, even where SIGINT was inherited as ignored. Both listen where said: Airflow's
api-server on :8080 (its default), the MLflow UI on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from covidct.lifecycle.store import artifact_root, mlflow_dir, quiet, tracking_uri
from covidct.orchestration.local.environment import environment
from covidct.orchestration.processes import end_group

MLFLOW_UI_PORT_ENV = "COVIDCT_MLFLOW_UI_PORT"
DEFAULT_MLFLOW_UI_PORT = 5000
#: ``mlflow server`` without MLflow 3's job runner (huey consumer processes for GenAI jobs, unused here);
#: docker-compose.yml's mlflow service sets the same.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def foreground(command: list[str], env: dict[str, str], stop: signal.Signals, grace_s: float, *, group: bool) -> int:
    """Run ``command`` in a process group of its own until it ends or we are interrupted; its exit status (0: stopped).

    On Ctrl-C or SIGTERM: ``stop`` goes to the process (``group``: to its whole group), which gets
    ``grace_s`` seconds to shut down; then whatever is left of the group is ended (``end_group``).
    """

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    # Its own process group: one signal from us (not the terminal's too) starts its shutdown,
    # and whatever of the group outlives it is ended with the group.
    proc = subprocess.Popen(
        command,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        return proc.wait()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C (or make's) must not cut the shutdown
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, stop) if group else proc.send_signal(stop)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
        end_group(proc.pid)
        return 0


def airflow_ui() -> int:
    """``airflow standalone`` (api-server on :8080, scheduler, dag-processor, triggerer); Ctrl-C stops it."""
    env = environment()
    # The tasks' links into the MLflow UI point where `make mlflow-ui` serves it (covidct.orchestration.operator_links).
    port = os.environ.get(MLFLOW_UI_PORT_ENV) or DEFAULT_MLFLOW_UI_PORT
    env.setdefault("COVIDCT_MLFLOW_UI_URL", os.environ.get("COVIDCT_MLFLOW_UI_URL") or f"http://127.0.0.1:{port}")
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    subprocess.run(["airflow", "db", "migrate"], env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)
    passwords = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    print(f"Airflow UI: http://localhost:8080 (admin password printed below, saved in {passwords}).")
    print("Ctrl-C (or SIGTERM) stops every component.")
    status = foreground(["airflow", "standalone"], {**os.environ, **env}, signal.SIGINT, 60.0, group=False)
    print("Airflow stopped.")
    return status


def mlflow_ui_command(host: str = "127.0.0.1", port: int | None = None) -> list[str]:
    """``mlflow server`` on the tracking store (the embedded default, or ``MLFLOW_TRACKING_URI``'s)."""
    port = port or int(os.environ.get(MLFLOW_UI_PORT_ENV) or DEFAULT_MLFLOW_UI_PORT)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri(), "--host", host,
               "--port", str(port),
               "--workers", "1"]  # a UI for one person: one worker process is plenty  # fmt: skip
    root = artifact_root()
    if root:  # experiments record their artifact folder; this is for new ones created in the UI
        command += ["--default-artifact-root", root]
    return command


def mlflow_ui(host: str = "127.0.0.1", port: int | None = None) -> int:
    """The MLflow UI in the foreground, on 127.0.0.1 only; Ctrl-C (or SIGTERM) stops it and its workers."""
    quiet()
    if not os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        mlflow_dir().mkdir(parents=True, exist_ok=True)
    command = mlflow_ui_command(host, port)
    url = f"http://{host}:{command[command.index('--port') + 1]}"
    print(f"MLflow UI: {url} (runs in {tracking_uri()}). Ctrl-C stops it.", flush=True)
    # The server and its workers are one process group: SIGTERM to all of them.
    status = foreground(command, {**os.environ, **MLFLOW_SERVER_ENV}, signal.SIGTERM, 20.0, group=True)
    print("MLflow UI stopped.", flush=True)
    return status
