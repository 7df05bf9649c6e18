"""Give each service of the compose stack its own PostgreSQL role and databases; safe to run again.

Run by the ``airflow-init`` service before ``airflow db migrate`` (the ``mlflow`` service starts
only after it exits 0), with the three folders ``init_secrets.py`` wrote::

    python /opt/covidct/docker/init_databases.py /opt/airflow/secrets /opt/mlflow/secrets /opt/postgres/secrets

It connects as the superuser ``postgres`` (the only user of that password) and, for the roles the
services' URIs name (``sql_alchemy_conn``: ``airflow``; ``backend_store_uri`` and the basic-auth
config's ``database_uri``: ``mlflow``):

- creates each role, or sets its attributes and password again: LOGIN, no superuser, no
  CREATEDB/CREATEROLE; the password goes as a SCRAM verifier made here, never in clear;
- creates each database owned by its role (or gives it back to it), and revokes what PUBLIC has
  on it: the ``airflow`` role cannot connect to MLflow's databases, nor ``mlflow`` to Airflow's;
- when ``mlflow`` already holds MLflow's tables (a stack started again with its volumes), runs
  ``mlflow db upgrade`` as the ``mlflow`` role: a no-op on an up-to-date schema, the migration
  after a newer ``mlflow`` pin (the server refuses to start on an out-of-date schema).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import init_secrets as names  # beside this file (/opt/covidct/docker)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

MAINTENANCE_DB = "postgres"


def parse(uri: str, source: str) -> URL:
    """The URI as SQLAlchemy reads it; ValueError unless it is PostgreSQL naming a role and a database."""
    try:
        url = make_url(uri)
    except ArgumentError:
        raise ValueError(f"{source} is not a database URI") from None
    if not url.drivername.startswith("postgresql") or not url.database or not url.username:
        raise ValueError(f"{source} must be a postgresql URI naming a user and a database, not {url.drivername}://...")
    if url.username == names.SUPERUSER:
        raise ValueError(f"{source} must not connect as the superuser {names.SUPERUSER!r}")
    return url


def service_uris(airflow: Path, mlflow: Path) -> list[URL]:
    """The URIs the services connect with: Airflow's metadata, MLflow's tracking and auth stores."""
    auth = mlflow / names.AUTH_CONFIG_FILE
    sources = {
        str(airflow / names.AIRFLOW_DB_FILE): names.read(airflow / names.AIRFLOW_DB_FILE),
        str(mlflow / names.MLFLOW_DB_FILE): names.read(mlflow / names.MLFLOW_DB_FILE),
        f"database_uri in {auth}": names.ini(auth, "database_uri"),
    }
    for source, uri in sources.items():
        if not uri:
            raise ValueError(f"{source} is missing or empty: run init_secrets.py first")
    return [parse(uri, source) for source, uri in sources.items()]


def connect(host: str, port: int, user: str, password: str, database: str):
    import psycopg2  # the image's driver (docker/requirements.txt)

    return psycopg2.connect(host=host, port=port, user=user, password=password, dbname=database)


def ensure_roles_and_databases(conn, urls: list[URL]) -> list[str]:
    """Roles and databases as ``urls`` name them; returns what was created or changed, a line each."""
    from psycopg2 import sql
    from psycopg2.extensions import encrypt_password

    done = []
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    with conn.cursor() as cur:
        for role, password in {url.username: url.password for url in urls}.items():
            verifier = encrypt_password(password, role, conn, "scram-sha-256")
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(
                sql.SQL(verb + " ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(verifier)
                )
            )
            if verb == "CREATE":
                done.append(f"role {role!r} created")
        for url in urls:
            db, owner = sql.Identifier(url.database), sql.Identifier(url.username)
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,))
            if cur.fetchone():
                cur.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(db, owner))
            else:
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(db, owner))
                done.append(f"database {url.database!r} created, owned by {url.username!r}")
            cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))
    return done


def has_mlflow_schema(url: URL) -> bool:
    """Whether the database holds MLflow's tables (its Alembic version table)."""
    conn = connect(url.host, url.port or 5432, url.username, url.password, url.database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('public.alembic_version') IS NOT NULL")
            return bool(cur.fetchone()[0])
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    dirs = names.secrets_dirs(argv, __file__)
    if dirs is None:
        return 2
    airflow, mlflow, postgres = dirs
    superuser_password = names.read(postgres / names.SUPERUSER_FILE)
    try:
        if not superuser_password:
            raise ValueError(f"{postgres / names.SUPERUSER_FILE} is missing or empty: run init_secrets.py first")
        urls = service_uris(airflow, mlflow)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    first = urls[0]
    conn = connect(first.host, first.port or 5432, names.SUPERUSER, superuser_password, MAINTENANCE_DB)
    try:
        for line in ensure_roles_and_databases(conn, urls):
            print(line)
    finally:
        conn.close()
    print("databases ready: " + ", ".join(f"{u.database} (role {u.username})" for u in urls))
    store = make_url(names.read(mlflow / names.MLFLOW_DB_FILE))
    if has_mlflow_schema(store):
        print(f"MLflow database {store.database!r} holds MLflow's tables: upgrading its schema if needed")
        subprocess.run(["mlflow", "db", "upgrade", store.render_as_string(hide_password=False)], check=True)
    else:
        print(f"MLflow database {store.database!r} has no tables yet (the mlflow service creates them)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
