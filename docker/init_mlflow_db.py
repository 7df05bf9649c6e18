"""Create the MLflow tracking server's database in the compose stack's PostgreSQL, once.

Run by the ``airflow-init`` service (the ``mlflow`` service starts only after it exits 0)::

    python /opt/covidct/docker/init_mlflow_db.py

Reads ``MLFLOW_BACKEND_STORE_URI`` (``postgresql+psycopg2://user:password@host:port/<database>``),
the URI the ``mlflow`` service runs on, and:

- creates ``<database>`` when it is missing (the server then creates MLflow's tables in it when it
  first starts);
- when the database already holds MLflow's tables (a stack started again with its volumes), runs
  ``mlflow db upgrade``: a no-op on an up-to-date schema, the migration after a newer ``mlflow`` pin
  (the server refuses to start on an out-of-date schema).

Safe to run again. It connects as the same user, to the ``postgres`` maintenance database.
"""

from __future__ import annotations

import os
import subprocess
import sys

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

URI_ENV = "MLFLOW_BACKEND_STORE_URI"
MAINTENANCE_DB = "postgres"


def parse(uri: str) -> URL:
    """The URI as SQLAlchemy reads it; ValueError unless it is PostgreSQL naming a database."""
    try:
        url = make_url(uri)
    except ArgumentError:
        raise ValueError(f"{URI_ENV} is not a database URI") from None
    if not url.drivername.startswith("postgresql") or not url.database:
        raise ValueError(f"{URI_ENV} must be a postgresql URI naming a database, not {url.drivername}://...")
    return url


def connect(url: URL, database: str):
    import psycopg2  # the image's driver (docker/requirements.txt)

    return psycopg2.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password, dbname=database
    )


def ensure_database(uri: str) -> bool:
    """Create the URI's database if it does not exist; True when it was created now."""
    url = parse(uri)
    conn = connect(url, MAINTENANCE_DB)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,))
            if cur.fetchone():
                return False
            from psycopg2 import sql

            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(url.database)))
            return True
    finally:
        conn.close()


def has_mlflow_schema(uri: str) -> bool:
    """Whether the database holds MLflow's tables (its Alembic version table)."""
    url = parse(uri)
    conn = connect(url, url.database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('public.alembic_version') IS NOT NULL")
            return bool(cur.fetchone()[0])
    finally:
        conn.close()


def main() -> int:
    uri = os.environ.get(URI_ENV, "")
    if not uri:
        print(f"error: {URI_ENV} is not set", file=sys.stderr)
        return 2
    try:
        created = ensure_database(uri)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    database = parse(uri).database
    if created:
        print(f"MLflow database {database!r} created (the mlflow service creates its tables)")
    elif has_mlflow_schema(uri):
        print(f"MLflow database {database!r} exists: upgrading its schema if needed")
        subprocess.run(["mlflow", "db", "upgrade", uri], check=True)
    else:
        print(f"MLflow database {database!r} exists, no tables yet (the mlflow service creates them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
