#!/usr/bin/env bash
# The compose stack's MLflow tracking server (service mlflow), behind MLflow's basic-auth app:
# every UI page and API call needs a login (the admin, or the pipeline's service account), but /health.
#   bash /opt/covidct/docker/mlflow-server.sh [mlflow server options...]
# Its secrets (init_secrets.py, volume mlflow-secrets) never go through the compose file: the
# backend store's URI (role mlflow), the auth config and the Flask key are read here.
set -euo pipefail
secrets=${COVIDCT_MLFLOW_SECRETS_DIR:-/opt/mlflow/secrets}
MLFLOW_BACKEND_STORE_URI=$(cat "$secrets/backend_store_uri")
MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$secrets/flask_secret_key")
export MLFLOW_BACKEND_STORE_URI MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_AUTH_CONFIG_PATH="$secrets/basic_auth.ini"
python /opt/covidct/docker/init_mlflow_auth.py "$secrets"
exec mlflow server --app-name basic-auth "$@"
