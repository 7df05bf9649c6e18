"""The Spark session's local-mode settings: the driver JVM's options, for sessions and for spark-submit."""

from __future__ import annotations

import os
import subprocess
import sys

from covidct.core.session import LOCAL_DRIVER_JAVA_OPTIONS
from covidct.orchestration.local.environment import environment

JVM_ARGS = """
from covidct.core.session import get_spark
spark = get_spark("jvm-args")
print("JVM_ARGS", list(spark._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments()))
spark.stop()
"""


def test_a_local_session_starts_its_jvm_without_the_optimizing_compiler(spark):
    args = list(spark._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
    assert LOCAL_DRIVER_JAVA_OPTIONS in args


def test_make_run_spark_submits_drivers_with_the_local_options(tmp_path, monkeypatch):
    script = tmp_path / "jvm_args.py"
    script.write_text(JVM_ARGS)

    def driver_args(env: dict) -> str:
        done = subprocess.run(["spark-submit", "--master", "local[1]", str(script)], env=env, capture_output=True,
                              text=True, timeout=180)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return next(line for line in done.stdout.splitlines() if line.startswith("JVM_ARGS"))

    plain = {k: v for k, v in os.environ.items() if k != "SPARK_SUBMIT_OPTS"}
    plain["PYSPARK_PYTHON"] = plain["PYSPARK_DRIVER_PYTHON"] = sys.executable
    assert LOCAL_DRIVER_JAVA_OPTIONS not in driver_args(plain)  # a spark-submitted driver: the JVM's defaults
    monkeypatch.delenv("SPARK_SUBMIT_OPTS", raising=False)  # conftest sets it for the other tests
    make_run = {**plain, **environment()}
    assert make_run["SPARK_SUBMIT_OPTS"] == LOCAL_DRIVER_JAVA_OPTIONS
    assert LOCAL_DRIVER_JAVA_OPTIONS in driver_args(make_run)  # make run's: the local options
