"""Create the compose stack's runtime secrets once, in a volume: none is baked into the image.

Run by the ``airflow-init`` service before ``airflow db migrate``::

    python /opt/covidct/docker/init_secrets.py /opt/airflow/secrets

Writes into that folder, only what is missing (so a restart keeps tokens and logins valid),
each file readable by its owner only:

    jwt_secret           [api_auth] jwt_secret: scheduler and API server sign/check task tokens
    api_secret_key       [api] secret_key
    fernet_key           [core] fernet_key: encrypts connections/variables kept in the database
    simple_auth_manager_passwords.json   {"<user>": "<password>"} for the simple auth manager
    uid_salt             the key of the hashes that replace DICOM UIDs in every output
                         (covidct.core.secrets; COVIDCT_UID_SALT_FILE points at it)

The services read the first three with ``AIRFLOW__<SECTION>__<KEY>_CMD: cat <file>`` (Airflow
runs ``_CMD`` for sensitive options). Users come from ``AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS``
(``name:role,...``); a user without a password gets a random one, printed once. When
``AIRFLOW_ADMIN_PASSWORD`` is set it becomes the password of the first admin user.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
from pathlib import Path

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


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


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


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: {Path(__file__).name} SECRETS_DIR", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    messages = ensure_secrets(folder, os.environ.get(USERS_ENV, ""), os.environ.get(ADMIN_PASSWORD_ENV) or None)
    for line in messages:
        print(line)
    print(f"secrets ready in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
