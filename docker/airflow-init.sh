#!/usr/bin/env bash
# One-shot setup of the docker-compose stack (service airflow-init, after init-secrets and a
# healthy Postgres); safe to run again.
#   1. the databases' roles: `airflow` owns database airflow, `mlflow` owns mlflow and mlflow_auth,
#      neither can reach the other's (docker/init_databases.py, as the superuser postgres);
#   2. the metadata database schema (`airflow db migrate`, as the role airflow);
#   3. MLflow's schema upgraded when its database already holds one (step 1's script).
# The other Airflow services and the mlflow service start only after this exits 0.
set -euo pipefail

python /opt/covidct/docker/init_databases.py /opt/airflow/secrets /opt/mlflow/secrets /opt/postgres/secrets
airflow db migrate
airflow version
echo "Airflow UI: http://localhost:8080 (simple auth manager; the password file is" \
    "${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-unset} in the api-server container)"
