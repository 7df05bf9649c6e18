"""Create the compose stack's runtime secrets once, in volumes: none is baked into the image.

Run by the one-shot ``init-secrets`` service, before Postgres and everything else starts::

    python /opt/covidct/docker/init_secrets.py /opt/airflow/secrets /opt/mlflow/secrets /opt/postgres/secrets

Each folder is a volume that only the services needing it mount. Only what is missing is
written (so a restart keeps tokens, logins and database passwords valid), each file atomically
and readable by its owner only.

``airflow-secrets`` (the Airflow services, their tasks and the Spark drivers in the scheduler):

    jwt_secret           [api_auth] jwt_secret: scheduler and API server sign/check task tokens
    api_secret_key       [api] secret_key
    fernet_key           [core] fernet_key: encrypts connections/variables kept in the database
    sql_alchemy_conn     [database] sql_alchemy_conn: the ``airflow`` role's URI (its own database)
    simple_auth_manager_passwords.json   {"<user>": "<password>"} for the simple auth manager
    uid_salt             the key of the hashes that replace DICOM UIDs in every output
                         (covidct.core.secrets; COVIDCT_UID_SALT_FILE points at it)
    mlflow_credentials   MLflow's client credentials file (``[mlflow]`` mlflow_tracking_username /
                         mlflow_tracking_password): the pipeline's MLflow service account; the image
                         links ``~/.mlflow/credentials`` to it

``mlflow-secrets`` (the ``mlflow`` service):

    backend_store_uri    the ``mlflow`` role's URI (database ``mlflow``)
    basic_auth.ini       MLflow's basic-auth config: its user store (database ``mlflow_auth``), the
                         ``admin`` user's password, READ for every other user by default
    service_account.json {"username", "password"} of the service account (docker/init_mlflow_auth.py)
    flask_secret_key     the server's Flask key (CSRF tokens of its login forms)

``postgres-secrets`` (Postgres and ``airflow-init``):

    postgres_password    the superuser ``postgres``: only airflow-init uses it, to create the
                         ``airflow`` and ``mlflow`` roles and their databases (docker/init_databases.py)

The services read the first four Airflow options with ``AIRFLOW__<SECTION>__<KEY>_CMD: cat <file>``
(Airflow runs ``_CMD`` for sensitive options). Airflow users come from
``AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS`` (``name:role,...``); a user without a password gets a
random one, printed once. When ``AIRFLOW_ADMIN_PASSWORD`` is set it becomes the password of the
first admin user. The MLflow ``admin`` password is never printed: read it with
``docker compose exec mlflow cat /opt/mlflow/secrets/basic_auth.ini``.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import secrets
import sys
from pathlib import Path
from urllib.parse import urlsplit

USERS_ENV = "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"
ADMIN_PASSWORD_ENV = "AIRFLOW_ADMIN_PASSWORD"
PASSWORDS_FILE = "simple_auth_manager_passwords.json"
KEYS = {
    "jwt_secret": lambda: secrets.token_urlsafe(64),
    "api_secret_key": lambda: secrets.token_urlsafe(32),
    # A Fernet key is 32 random bytes, URL-safe base64 encoded.
    "fernet_key": lambda: base64.urlsafe_b64encode(os.urandom(32)).decode(),
}
#: The pipeline's own (not Airflow options).
COVIDCT_KEYS = {"uid_salt": lambda: secrets.token_hex(32)}

#: The stack's PostgreSQL, as the services reach it, and its roles: each owns only its databases.
DB_HOST, DB_PORT = "postgres", 5432
SUPERUSER = "postgres"
AIRFLOW_ROLE, AIRFLOW_DATABASE = "airflow", "airflow"
MLFLOW_ROLE, MLFLOW_DATABASE, MLFLOW_AUTH_DATABASE = "mlflow", "mlflow", "mlflow_auth"
#: File names, per volume (the module docstring says who reads each).
SUPERUSER_FILE = "postgres_password"
AIRFLOW_DB_FILE = "sql_alchemy_conn"
CREDENTIALS_FILE = "mlflow_credentials"
MLFLOW_DB_FILE = "backend_store_uri"
AUTH_CONFIG_FILE = "basic_auth.ini"
SERVICE_ACCOUNT_FILE = "service_account.json"
FLASK_KEY_FILE = "flask_secret_key"
#: MLflow's users: its admin, and the account every task and Spark driver uses (not an admin).
MLFLOW_ADMIN = "admin"
MLFLOW_SERVICE_ACCOUNT = "covidct"
#: What an MLflow user who created nothing may do with others' experiments and models: read them.
#: The registered model's creator (the service account) manages it, its ``champion`` alias included.
MLFLOW_DEFAULT_PERMISSION = "READ"


def new_password() -> str:
    """32 random characters from ``[A-Za-z0-9_-]``: nothing to quote in a URI or an .ini file."""
    return secrets.token_urlsafe(24)


def database_uri(role: str, password: str, database: str) -> str:
    return f"postgresql+psycopg2://{role}:{password}@{DB_HOST}:{DB_PORT}/{database}"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def read(path: Path) -> str:
    """A secret file's text without surrounding whitespace; "" when it is missing."""
    return path.read_text().strip() if path.is_file() else ""


def ensure(path: Path, make) -> str:
    """The value in ``path``, made and written first when the file is missing or empty."""
    if not read(path):
        write_private(path, make())
    return read(path)


def put(path: Path, text: str) -> None:
    """Write ``text`` unless ``path`` holds it already (a file derived from other secrets)."""
    if not path.is_file() or path.read_text() != text:
        write_private(path, text)


def ini(path: Path, key: str) -> str:
    """``[mlflow] key`` of an .ini file; "" when the file or the key is missing."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return parser.get("mlflow", key, fallback="").strip()


def ini_text(values: dict[str, str]) -> str:
    return "[mlflow]\n" + "".join(f"{key} = {value}\n" for key, value in values.items())


def ensure_database_secrets(airflow: Path, mlflow: Path, postgres: Path) -> None:
    """The database roles' URIs, the superuser's password and MLflow's logins, in their volumes.

    Passwords are made once and kept; files derived from them (the MLflow auth config, the client
    credentials) are written again only when they differ, so the call is safe to repeat.
    """
    for folder in (airflow, mlflow, postgres):
        folder.mkdir(parents=True, exist_ok=True)
    ensure(postgres / SUPERUSER_FILE, new_password)
    ensure(airflow / AIRFLOW_DB_FILE, lambda: database_uri(AIRFLOW_ROLE, new_password(), AIRFLOW_DATABASE))
    store = ensure(mlflow / MLFLOW_DB_FILE, lambda: database_uri(MLFLOW_ROLE, new_password(), MLFLOW_DATABASE))
    ensure(mlflow / FLASK_KEY_FILE, lambda: secrets.token_hex(32))
    account = mlflow / SERVICE_ACCOUNT_FILE
    service = (
        (json.loads(read(account)).get("password") if read(account) else "")
        or ini(airflow / CREDENTIALS_FILE, "mlflow_tracking_password")
        or new_password()
    )
    put(account, json.dumps({"username": MLFLOW_SERVICE_ACCOUNT, "password": service}) + "\n")
    put(airflow / CREDENTIALS_FILE, ini_text(
        {"mlflow_tracking_username": MLFLOW_SERVICE_ACCOUNT, "mlflow_tracking_password": service}
    ))  # fmt: skip
    auth = mlflow / AUTH_CONFIG_FILE
    put(auth, ini_text({
        "default_permission": MLFLOW_DEFAULT_PERMISSION,
        "database_uri": database_uri(MLFLOW_ROLE, urlsplit(store).password, MLFLOW_AUTH_DATABASE),
        "admin_username": MLFLOW_ADMIN,
        "admin_password": ini(auth, "admin_password") or new_password(),
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }))  # fmt: skip


def parse_users(value: str) -> list[tuple[str, str]]:
    """``"admin:admin,bob:viewer"`` -> ``[("admin", "admin"), ("bob", "viewer")]``."""
    users = []
    for item in value.split(","):
        if item.strip():
            name, _, role = item.strip().partition(":")
            users.append((name.strip(), role.strip().lower()))
    return users


def ensure_secrets(folder: Path, users_value: str = "", admin_password: str | None = None) -> list[str]:
    """Create what is missing under ``folder``; returns the lines to print (new passwords)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in (KEYS | COVIDCT_KEYS).items():
        if not (folder / name).is_file() or not (folder / name).read_text().strip():
            write_private(folder / name, make())
    path = folder / PASSWORDS_FILE
    passwords = json.loads(path.read_text() or "{}") if path.is_file() else {}
    before = dict(passwords)
    messages = []
    users = parse_users(users_value)
    admins = [name for name, role in users if role == "admin"]
    for name, _ in users:
        if admin_password and admins and name == admins[0]:
            passwords[name] = admin_password
        elif name not in passwords:
            passwords[name] = secrets.token_urlsafe(12)
            messages.append(f"Airflow login created: user {name!r}, password {passwords[name]!r}")
    if passwords != before or not path.is_file():
        write_private(path, json.dumps(passwords) + "\n")
    return messages


def secrets_dirs(argv: list[str], script: str) -> tuple[Path, Path, Path] | None:
    """The three secrets folders from ``script``'s arguments; None (usage printed) unless there are three."""
    if len(argv) != 3:
        print(
            f"usage: {Path(script).name} AIRFLOW_SECRETS_DIR MLFLOW_SECRETS_DIR POSTGRES_SECRETS_DIR", file=sys.stderr
        )
        return None
    airflow, mlflow, postgres = map(Path, argv)
    return airflow, mlflow, postgres


def main(argv: list[str]) -> int:
    dirs = secrets_dirs(argv, __file__)
    if dirs is None:
        return 2
    airflow, mlflow, postgres = dirs
    messages = ensure_secrets(airflow, os.environ.get(USERS_ENV, ""), os.environ.get(ADMIN_PASSWORD_ENV) or None)
    ensure_database_secrets(airflow, mlflow, postgres)
    for line in messages:
        print(line)
    print(f"secrets ready in {airflow}, {mlflow} and {postgres}")
    print(f"MLflow login: user {MLFLOW_ADMIN!r}, password in {mlflow / AUTH_CONFIG_FILE} (service mlflow)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
