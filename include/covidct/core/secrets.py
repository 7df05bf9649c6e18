"""The deployment's secret salt: what pseudonymises DICOM UIDs (``covidct.data.dicom``).

Outputs key DICOM slices, series and studies by a keyed hash (HMAC-SHA256) of their UIDs, never by
the UIDs themselves: a UID can be looked up in the hospital's PACS. The key is one secret per
deployment, never in the repository: ``$COVIDCT_UID_SALT_FILE`` (compose: generated into the
secrets volume at first start), else ``$COVIDCT_HOME/secrets/uid-salt``, generated on first use
(32 random bytes, hex, mode 0600). Changing it changes every hash: the scoring ledger then scores
the same slices again.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from covidct.core import paths
from covidct.core.errors import CovidctError

SALT_FILE_ENV = "COVIDCT_UID_SALT_FILE"


def salt_file() -> Path:
    value = os.environ.get(SALT_FILE_ENV, "").strip()
    return Path(value).expanduser() if value else paths.home() / "secrets" / "uid-salt"


def uid_salt() -> bytes:
    """The deployment's salt, created (atomically, readable by its owner only) when there is none yet."""
    path = salt_file()
    try:
        value = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        value = _create(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise CovidctError(f"cannot read the deployment's UID salt {path}: {exc}") from None
    if len(value) < 32:
        raise CovidctError(f"the deployment's UID salt {path} is too short (at least 32 characters)")
    return value.encode("ascii")


def _create(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_hex(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(value + "\n")
    try:
        os.link(tmp, path)  # fails when another process created it first: then theirs is the salt
    except FileExistsError:
        value = path.read_text(encoding="ascii").strip()
    finally:
        tmp.unlink()
    return value
