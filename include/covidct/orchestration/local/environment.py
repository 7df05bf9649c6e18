"""The embedded defaults of ``make run`` / ``make ui``: everything on this machine, nothing to set up.

An Airflow home inside the project (``var/airflow``, SQLite metadata DB), ``spark_default`` =
``local[*]`` (JSON form: the URI ``spark://local[2]`` would silently mean YARN), the venv's
``spark-submit`` on PATH, and ``COVIDCT_HOME=var``. ``COVIDCT_DATA_SOURCE`` and
``COVIDCT_WEIGHTS_DIR`` are honoured (offline use). Variables already set win.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from covidct.core.session import LOCAL_DRIVER_JAVA_OPTIONS

#: The project checkout (``dags/``, ``var/``): four folders above this file, include/covidct/orchestration/local.
PROJECT = Path(__file__).resolve().parents[4]


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
        # The spark-submitted drivers' JVM options (short jobs: see covidct.core.session).
        "SPARK_SUBMIT_OPTS": LOCAL_DRIVER_JAVA_OPTIONS,
    }
    env = {key: os.environ.get(key) or value for key, value in defaults.items()}
    env["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    return env
