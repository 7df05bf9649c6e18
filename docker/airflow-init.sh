#!/usr/bin/env bash
# One-shot setup of the docker-compose stack (service airflow-init); safe to run again.
#   1. runtime secrets and the admin login, in the airflow-secrets volume (never in the image);
#   2. the metadata database schema in PostgreSQL (`airflow db migrate`);
#   3. the MLflow tracking server's database in the same PostgreSQL (created if missing).
# The other Airflow services and the mlflow service start only after this exits 0.
set -euo pipefail

python /opt/covidct/docker/init_secrets.py "${COVIDCT_SECRETS_DIR:-/opt/airflow/secrets}"
airflow db migrate
python /opt/covidct/docker/init_mlflow_db.py
airflow version
echo "Airflow UI: http://localhost:8080 (simple auth manager; the password file is" \
    "${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-unset} in the api-server container)"
