"""Airflow: what the DAGs' tasks do, the spark-submit operators, the trigger-param policy, time bounds,
alerts, and the local stack (``make run`` / ``make ui`` / ``make mlflow-ui``)."""
