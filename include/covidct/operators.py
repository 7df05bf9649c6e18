"""The Airflow operator that submits the transfer-learning job (a SparkSubmitOperator)."""

from __future__ import annotations

import re

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

#: ``covidct`` exits with 2 for user errors (bad input, undecodable image, missing weights).
USER_ERROR_EXIT = 2


class TransferLearningSubmitOperator(SparkSubmitOperator):
    """``spark-submit`` of ``jobs/transfer_learning.py``; the cluster is the connection's.

    A user error (exit status 2: bad input, undecodable image, missing weights) fails the
    task at once with the job's own ``error:`` line as the message: retrying cannot fix
    it. Other failures (a lost executor, a killed driver) are retried as usual.
    """

    def execute(self, context):
        try:
            return super().execute(context)
        except AirflowException as exc:
            if re.search(rf"Error code is: {USER_ERROR_EXIT}\b", str(exc)):
                raise AirflowFailException(job_error(str(exc)) or f"the job rejected its input: {exc}") from exc
            raise


def job_error(output: str) -> str | None:
    """The message of the last ``error: ...`` line the job printed (the hook quotes its output's tail)."""
    found = re.findall(r"^error: (.+)$", output, flags=re.MULTILINE)
    return found[-1].strip() if found else None
