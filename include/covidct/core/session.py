"""The SparkSession every covidct entry point uses, with the settings the featurizer needs.

Under ``spark-submit`` the master and resources come from the submit command (the
Airflow connection); elsewhere (``covidct train`` run directly, tests) it is
``local[*]`` unless ``COVIDCT_SPARK_MASTER`` says otherwise. On a cluster, a watchdog
(``covidct.core.executors``) fails the job when no executor is granted within a bound.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from pyspark import SparkConf, SparkContext
from pyspark.sql import SparkSession

from covidct.core import executors
from covidct.core.output import output_to

log = logging.getLogger(__name__)

DEFAULTS = {
    # Image rows are large: keep Arrow batches to Python small (see featurizer).
    "spark.sql.execution.arrow.maxRecordsPerBatch": "256",
    # The featurizer logs progress itself; the console bar garbles task logs.
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.session.timeZone": "UTC",
    # Hundreds to a few thousand rows per job: Spark's default of 200 shuffle partitions
    # means thousands of tiny tasks on a cluster.
    "spark.sql.shuffle.partitions": "16",
}
#: JVM options of a driver on this machine (local mode: ``make run``, the CLI, tests): its jobs are
#: short, and the JIT's optimizing compiler (C2) costs more CPU than it saves there. Measured on 2
#: cores (bench/floor.py, docs/performance.md, "Warm path"): a spark-submit that counts 10 rows 19.3 -> 12.9 CPU s,
#: a warm VGG16 train job 50.7 -> 46.0 s (89 -> 71 CPU s); the price: featurization's warm passes
#: ~6 % slower (the JVM's share of moving image bytes), its cold pass the same. ``make run`` passes it
#: to spark-submit as ``SPARK_SUBMIT_OPTS``; a driver on a cluster keeps the JVM's defaults.
LOCAL_DRIVER_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1"


def get_spark(
    app_name: str = "covidct", conf: dict[str, str] | None = None, *, jvm_output: str | Path | None = None
) -> SparkSession:
    """Get or create the session: spark-submit's settings win, then ``conf``, then DEFAULTS.

    ``jvm_output``: a file that receives the JVM's stdout and stderr (Spark's log, and what its
    Python workers print: TensorFlow's messages, task tracebacks) when this call starts the JVM,
    so that a command line keeps them off the user's terminal. Ignored when a JVM already runs.
    """
    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        # Under spark-submit the JVM already runs and holds its settings (--master, --conf):
        # connect to it first, else SparkConf() is an empty Python dict and sees none of them.
        SparkContext._ensure_initialized()
    given = SparkConf()  # holds what spark-submit passed, if anything
    builder = SparkSession.builder.appName(app_name)
    master = given.get("spark.master", None) or os.environ.get("COVIDCT_SPARK_MASTER", "local[*]")
    if not given.contains("spark.master"):
        builder = builder.master(master)
    starts_jvm = SparkContext._gateway is None and not os.environ.get("PYSPARK_GATEWAY_PORT")
    if starts_jvm and master.startswith("local") and not given.contains("spark.driver.extraJavaOptions"):
        builder = builder.config("spark.driver.extraJavaOptions", LOCAL_DRIVER_JAVA_OPTIONS)
    if not given.contains("spark.pyspark.python"):
        # Python workers run what PYSPARK_PYTHON names (else "python3" from PATH): default
        # to this interpreter, whose environment holds TensorFlow and covidct.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    if not given.contains("spark.driver.memory"):
        builder = builder.config("spark.driver.memory", os.environ.get("COVIDCT_DRIVER_MEMORY", "4g"))
    for key, value in {**DEFAULTS, **(conf or {})}.items():
        if not given.contains(key):
            builder = builder.config(key, value)
    with output_to(jvm_output) if jvm_output is not None and starts_jvm else nullcontext():
        spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("COVIDCT_SPARK_LOG_LEVEL", "WARN"))
    executors.watch(spark)  # a no-op in local mode
    return spark


def application(spark: SparkSession) -> dict[str, str]:
    """The Spark application a job ran as: ``{"application_id", "master"}``, as its outputs record it (the
    Airflow task's "Spark application" link reads it back: covidct.orchestration.operator_links)."""
    return {"application_id": spark.sparkContext.applicationId, "master": spark.sparkContext.master}


@contextmanager
def progress(spark: SparkSession, what: str, every_s: float = 15.0):
    """Log the running Spark stages' task progress every ``every_s`` seconds while a step runs."""
    tracker = spark.sparkContext.statusTracker()
    stop = threading.Event()
    start = time.monotonic()

    def report() -> None:
        while not stop.wait(every_s):
            done = total = 0
            for stage_id in tracker.getActiveStageIds():
                info = tracker.getStageInfo(stage_id)
                if info is not None:
                    done += info.numCompletedTasks
                    total += info.numTasks
            if total:
                log.info("%s: %d/%d tasks done (%.0f s)", what, done, total, time.monotonic() - start)

    thread = threading.Thread(target=report, name=f"progress-{what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1)
        log.info("%s: finished in %.1f s", what, time.monotonic() - start)
