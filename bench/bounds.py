"""How soon a machine without network fails `make run` (issue 15's goal: within 60 s).

    python bench/bounds.py [--repeat 3]

The tests (tests/test_dag.py::test_make_run_without_network_fails_fast_and_says_why) assert the
behaviour with a margin for a busy machine; this measures the figure itself, on an idle machine:
`python -m covidct.orchestration.local run` with a fresh Airflow and COVIDCT home each time, against a closed
loopback port and an unresolvable host name, wall time of the whole command, median of --repeat.
JSON in bench/results/bounds.json.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, markdown_table, median, save  # noqa: E402

GOAL_S = 60


def closed_port_url() -> str:
    with socket.socket() as sock:  # bound then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def no_network_run(url: str, env_extra: dict) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="covidct-bench-bounds-") as tmp:
        env = {**os.environ, "COVIDCT_HOME": f"{tmp}/home", "AIRFLOW_HOME": f"{tmp}/af", "COVIDCT_DATA_SOURCE": url,
               **env_extra}  # fmt: skip
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "covidct.orchestration.local", "run"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1800)  # fmt: skip
        return time.monotonic() - started, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    weights = Path(tempfile.mkdtemp(prefix="covidct-bench-weights-"))
    for name in ("vgg16", "vgg19", "xception"):  # the preflight passes; the fetch is what fails
        (weights / f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"not read before training")
    cases = {
        "closed loopback port": (closed_port_url, {"COVIDCT_DAG_CONF": '{"weights": "none"}'}),
        "unresolvable name": (lambda: "http://covidct.invalid/", {"COVIDCT_WEIGHTS_DIR": str(weights)}),
    }
    results, rows = {}, []
    for name, (url_of, env_extra) in cases.items():
        runs = [no_network_run(url_of(), env_extra) for _ in range(args.repeat)]
        walls = [round(w, 1) for w, _ in runs]
        results[name] = {"wall_s": walls, "median_s": median(walls), "exit": [rc for _, rc in runs]}
        rows.append([name, median(walls), f"{min(walls)}–{max(walls)}", "yes" if median(walls) <= GOAL_S else "NO"])
    path = save("bounds", {"machine": machine(), "goal_s": GOAL_S, "no_network_make_run": results})
    print(markdown_table(["make run without network", "median s", "min–max s", f"≤ {GOAL_S} s"], rows))
    print(f"(JSON: {path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
