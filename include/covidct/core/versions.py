"""Versions: of the libraries that compute features and fits, and of this package's own code.

What a model depends on besides its data and params: the fingerprint (``covidct.lifecycle.fingerprint``)
and the report gallery's cache key (``covidct.reporting.gallery_cache``) include ``code_version()``;
the train job records ``library_versions()`` in every ``metrics.json``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import covidct

#: Libraries whose version can change features or fits: name -> distributions that provide it.
LIBRARIES = {
    "pyspark": ("pyspark",),
    "tensorflow": ("tensorflow-cpu", "tensorflow"),
    "keras": ("keras",),
    "scikit-learn": ("scikit-learn",),
    "numpy": ("numpy",),
    "pillow": ("pillow",),
}
#: The package's own folder: every file under it counts in ``code_version``.
PACKAGE_DIR = Path(covidct.__file__).resolve().parent


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    """``{name: version}`` of the installed ``LIBRARIES`` named (those not installed are left out)."""
    found = {}
    for name in names:
        for dist in LIBRARIES[name]:
            try:
                found[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def files_digest(files: Iterable[Path], root: Path = PACKAGE_DIR) -> str:
    """sha256 over the files' paths (relative to ``root``) and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(Path(f).resolve() for f in files):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def code_version() -> dict:
    """The package's own files (sha256 over their names and bytes) and the libraries' versions."""
    files = [p for p in PACKAGE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return {"covidct": covidct.__version__, "sources": files_digest(files), "libraries": library_versions()}
