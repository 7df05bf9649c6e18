"""The Airflow operators that submit the covidct Spark jobs (SparkSubmitOperators): training and scoring."""

from __future__ import annotations

import logging
import re

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from covidct.orchestration.job_output import USER_ERROR_EXIT, job_error_line
from covidct.orchestration.operator_links import MlflowRunLink, ScoresLink, SparkApplicationLink
from covidct.orchestration.processes import KILL_GRACE_S, end_process_tree

log = logging.getLogger(__name__)


class TransferLearningSubmitOperator(SparkSubmitOperator):
    """``spark-submit`` of ``jobs/transfer_learning.py``; the cluster is the connection's.

    A user error or a cluster that grants no executor (exit status 2) fails the task at
    once, with the job's one-line message: retrying cannot fix it. Other failures (a
    killed driver, a crash) are retried as usual.

    Killed or timed out (``execution_timeout``), the task ends the whole process tree of
    its ``spark-submit`` in client mode: the driver JVM (SIGTERM first, so its shutdown hook
    unregisters the application from the cluster), the Python driver and PySpark's local
    workers. The provider's own ``on_kill`` only SIGKILLs the spark-submit PID, which skips
    the JVM's shutdown hooks and leaves the Python processes to notice on their own.

    In the Airflow UI the task links to its MLflow run and its Spark application, as the job
    recorded them (``covidct.orchestration.operator_links``).
    """

    operator_extra_links = (MlflowRunLink(), SparkApplicationLink())

    def execute(self, context):
        try:
            return super().execute(context)
        except AirflowException as exc:
            if re.search(rf"Error code is: {USER_ERROR_EXIT}\b", str(exc)):
                hook = self._hook
                reason = job_error_line(getattr(hook, "_last_submit_log_lines", None)) if hook else None
                reason = reason or job_error_line(str(exc).splitlines()) or "the job rejected its input"
                raise AirflowFailException(f"{reason} (exit status 2, not retried)") from exc
            raise

    def on_kill(self) -> None:
        hook = self._hook
        proc = getattr(hook, "_submit_sp", None) if hook is not None else None
        client_mode = hook is not None and not (
            hook._is_yarn_cluster_mode or hook._should_track_driver_status or hook._should_track_driver_via_k8s_api()
        )
        if client_mode and proc is not None and proc.poll() is None:
            log.info("Stopping spark-submit (pid %d) and its drivers", proc.pid)
            killed = end_process_tree(proc.pid)
            if killed:
                log.warning("Killed after %.0f s without exiting: pids %s", KILL_GRACE_S, killed)
        super().on_kill()  # cluster-mode drivers, YARN applications, Kubernetes pods


class ScoringSubmitOperator(TransferLearningSubmitOperator):
    """``spark-submit`` of ``jobs/score.py`` (the scoring DAG): the same cluster connection, the same
    handling of user errors (exit status 2: failed at once, with the job's line) and of kills; its links:
    the scores and the Spark application (the scoring job logs no MLflow run)."""

    operator_extra_links = (ScoresLink(), SparkApplicationLink())
