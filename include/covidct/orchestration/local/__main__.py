"""``make run``, ``make ui`` and ``make mlflow-ui``: ``python -m covidct.orchestration.local {run,ui,mlflow-ui}``."""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m covidct.orchestration.local",
        description="The whole DAG and the UIs on this machine, on embedded defaults.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the whole DAG once (dag.test)")
    p.add_argument("--conf", default=os.environ.get("COVIDCT_DAG_CONF", "{}"), help="DAG params as JSON")
    p.add_argument("--verbose", action="store_true", help="show Airflow's and Spark's output instead of logging it")
    sub.add_parser("ui", help="start the Airflow UI and scheduler (airflow standalone)")
    p = sub.add_parser("mlflow-ui", help="the MLflow UI on the tracking store (127.0.0.1)")
    p.add_argument("--port", type=int, help="default $COVIDCT_MLFLOW_UI_PORT, else 5000")
    sub.add_parser("mlflow-uri", help="print the MLflow tracking URI")
    args = parser.parse_args(argv)
    if args.command == "ui":
        from covidct.orchestration.local.launchers import airflow_ui

        return airflow_ui()
    if args.command == "mlflow-ui":
        from covidct.orchestration.local.launchers import mlflow_ui

        return mlflow_ui(port=args.port)
    if args.command == "mlflow-uri":
        from covidct.lifecycle.store import tracking_uri

        print(tracking_uri())
        return 0
    try:
        conf = json.loads(args.conf)
    except json.JSONDecodeError as exc:
        print(f"error: --conf is not JSON: {exc}", file=sys.stderr)
        return 2
    from covidct.orchestration.local.runner import run

    return run(conf, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
