"""Prepare the MLflow server's user store (MLflow's basic-auth app) before it starts; safe to run again.

Run by the ``mlflow`` service (docker/mlflow-server.sh) just before ``mlflow server --app-name basic-auth``::

    python /opt/covidct/docker/init_mlflow_auth.py /opt/mlflow/secrets

With ``MLFLOW_AUTH_CONFIG_PATH`` pointing at ``basic_auth.ini`` (init_secrets.py wrote it), it

- creates the store's tables in database ``mlflow_auth`` (MLflow's own migrations);
- creates the ``admin`` user from that config when missing (as the server does at its start);
- creates the pipeline's service account from ``service_account.json``, **not** an admin: every
  task and Spark driver logs in with it (``~/.mlflow/credentials`` in the Airflow services). What
  it creates (the experiment, the registered model) it manages; every other user may only read
  (``default_permission = READ``), so only it and the admin can move the ``champion`` alias. Its
  password is set again when the file holds another one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import init_secrets as names  # beside this file (/opt/covidct/docker)


def ensure_users(secrets_dir: Path) -> list[str]:
    # The package reads MLFLOW_AUTH_CONFIG_PATH when it is imported; its store is the server's.
    from mlflow.server.auth import auth_config, bootstrap_admin_user, store

    account = json.loads(names.read(secrets_dir / names.SERVICE_ACCOUNT_FILE))
    bootstrap_admin_user()  # the store's tables (MLflow's migrations), and the admin user when missing
    done = [f"MLflow admin {auth_config.admin_username!r} ready"]
    username, password = account["username"], account["password"]
    if not store.has_user(username, use_primary=True):
        store.create_user(username, password, is_admin=False)
        done.append(f"MLflow service account {username!r} created")
    elif not store.authenticate_user(username, password, use_primary=True):
        store.update_user(username, password=password)
        done.append(f"MLflow service account {username!r}: password set again")
    if store.get_user(username).is_admin:
        store.update_user(username, is_admin=False)
        done.append(f"MLflow service account {username!r} is no admin any more")
    return done


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: {Path(__file__).name} MLFLOW_SECRETS_DIR", file=sys.stderr)
        return 2
    for line in ensure_users(Path(argv[0])):
        print(line)
    print("MLflow users ready")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
