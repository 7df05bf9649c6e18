"""An emulated upstream for tests: upstream-shaped zips served over real HTTP on 127.0.0.1.

``upstream_files(dataset)`` turns a dataset folder (``tests/synthetic.make_dataset`` or
the real copy) into the files of the UCSD-AI4H/COVID-CT repository:
``Images-processed/CT_COVID.zip`` (a top folder ``CT_COVID/`` plus the ``__MACOSX/``
and ``.DS_Store`` litter of zips made on macOS), ``Images-processed/CT_NonCOVID.zip`` and
``Data-split/{COVID,NonCOVID}/{train,val,test}CT_*.txt``.

``Upstream(files)`` serves them (``ThreadingHTTPServer``, port 0) under ``base_url``, with
ETags and ``If-None-Match`` like raw.githubusercontent.com, and faults injected per path:
error statuses for the next N requests (optionally with ``Retry-After``), a connection closed
after half the body. ``port`` picks the port (a server "restarting" on a known port), ``tls``
serves HTTPS with that context (e.g. ``self_signed_tls``: a certificate no client trusts).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import ssl
import stat
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CLASSES = {"CT_COVID": "COVID", "CT_NonCOVID": "NonCOVID"}
SPLITS = ("train", "val", "test")
PREFIX = "/UCSD-AI4H/COVID-CT/master/"  # raw.githubusercontent.com's layout


def zip_bytes(entries: list[tuple[str | zipfile.ZipInfo, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip archive of ``(name or ZipInfo, content)`` entries, in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def symlink_entry(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    """A zip entry that unpacks as a symbolic link (Unix mode bits in external_attr)."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def class_zip(dataset: Path, folder: str, *, top_folder: bool = True, macos_litter: bool = True, extra=()) -> bytes:
    """The upstream archive of one class folder: ``CT_COVID/<name>`` entries (or top-level ones)."""
    prefix = f"{folder}/" if top_folder else ""
    entries: list[tuple[str | zipfile.ZipInfo, bytes]] = [(prefix, b"")] if top_folder else []
    for path in sorted((dataset / folder).iterdir()):
        if path.is_file() and not path.name.startswith("."):
            entries.append((prefix + path.name, path.read_bytes()))
            if macos_litter:
                entries.append((f"__MACOSX/{prefix}._{path.name}", b"\x00\x05\x16\x07resource fork"))
    if macos_litter:
        entries.append((f"{prefix}.DS_Store", b"\x00\x00\x00\x01Bud1"))
    entries.extend(extra)
    return zip_bytes(entries)


def upstream_files(dataset: str | Path, **zip_options) -> dict[str, bytes]:
    """``{path in the upstream repository: content}`` for a dataset folder."""
    dataset = Path(dataset)
    files = {f"Images-processed/{folder}.zip": class_zip(dataset, folder, **zip_options) for folder in CLASSES}
    for short in CLASSES.values():
        for split in SPLITS:
            name = f"Data-split/{short}/{split}CT_{short}.txt"
            files[name] = (dataset / name).read_bytes()
    return files


def write_files(files: dict[str, bytes], root: str | Path) -> Path:
    """Lay ``files`` out under ``root`` (a local clone of upstream); return root."""
    root = Path(root)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@dataclass
class Upstream:
    """A loopback HTTP server for ``files``; mutate ``files``/faults between requests at will."""

    files: dict[str, bytes]
    etags: bool = True
    #: path -> statuses to answer the next requests with, e.g. {"Images-processed/CT_COVID.zip": [500, 500]}
    fail_with: dict[str, list[int]] = field(default_factory=dict)
    #: path -> how many of the next requests get half the body, then a closed connection
    drop_midway: dict[str, int] = field(default_factory=dict)
    #: (method, path, status) of every request served
    log: list[tuple[str, str, int]] = field(default_factory=list)
    #: the loopback address to listen on (127.0.0.2 is another host for allowlist tests)
    host: str = "127.0.0.1"
    #: seconds to wait before answering each request (to make a fetch last)
    delay: float = 0.0
    #: the Retry-After header of error answers (seconds), None: none
    retry_after: str | None = None
    port: int = 0
    tls: ssl.SSLContext | None = None

    def __post_init__(self):
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((self.host, self.port), _handler(self))
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}{PREFIX}"

    def __enter__(self) -> Upstream:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def statuses(self, path: str | None = None) -> list[int]:
        return [status for _, p, status in self.log if path is None or p == path]

    def _next_fault(self, path: str) -> tuple[int | None, bool]:
        with self._lock:
            pending = self.fail_with.get(path) or []
            if pending:
                return pending.pop(0), False
            if self.drop_midway.get(path, 0) > 0:
                self.drop_midway[path] -= 1
                return None, True
            return None, False


def _handler(upstream: Upstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if upstream.delay:
                time.sleep(upstream.delay)
            path = unquote(urlsplit(self.path).path)
            name = path[len(PREFIX) :] if path.startswith(PREFIX) else None
            status, drop = upstream._next_fault(name or "")
            data = upstream.files.get(name) if name is not None else None
            if status is None and data is None:
                status = 404
            if status is not None:
                self._reply(name or path, status, f"{status} emulated\n".encode())
                return
            etag = f'"{hashlib.sha256(data).hexdigest()[:32]}"'
            if upstream.etags and self.headers.get("If-None-Match") == etag:
                self._reply(name, 304, b"", etag=etag)
                return
            if drop:
                upstream.log.append(("GET", name, 200))
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self._reply(name, 200, data, etag=etag if upstream.etags else None)

        def _reply(self, name: str, status: int, body: bytes, etag: str | None = None) -> None:
            upstream.log.append(("GET", name, status))
            self.send_response(status)
            if etag:
                self.send_header("ETag", etag)
            if status >= 400 and upstream.retry_after is not None:
                self.send_header("Retry-After", upstream.retry_after)
            if status != 304:
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if status != 304:
                self.wfile.write(body)

        def log_message(self, format, *args) -> None:  # noqa: A002 - http.server's signature
            pass

    return Handler


def self_signed_tls(folder: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1 (no client trusts it)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


# --- bad datasets --------------------------------------------------------------------------------
# Each takes a copy of a dataset folder, breaks it the way a bad upstream release could, and
# returns the fragments a clear message about it must contain.


def _images(root: Path, folder: str) -> list[Path]:
    return sorted(p for p in (root / folder).iterdir() if p.is_file() and not p.name.startswith("."))


def _count(root: Path, folder: str) -> int:
    return len(_images(root, folder))


def missing_image(root: Path) -> list[str]:
    """One COVID image gone; the split lists still name it."""
    n = _count(root, "CT_COVID")
    victim = _images(root, "CT_COVID")[0]
    victim.unlink()
    return [
        f"expected {n} COVID images, found {n - 1}",
        "every file named in Data-split exists",
        f"CT_COVID/{victim.name}",
    ]


def truncated_image(root: Path) -> list[str]:
    """An extra image cut in half (the header is fine, the pixels are not)."""
    data = next(p for p in _images(root, "CT_COVID") if p.read_bytes().startswith(b"\x89PNG")).read_bytes()
    (root / "CT_COVID" / "extra-truncated.png").write_bytes(data[: len(data) // 2])
    return ["every file decodes fully as an image", "CT_COVID/extra-truncated.png", "truncated"]


def duplicate_image(root: Path) -> list[str]:
    """The same image twice under two names, both listed in the official split."""
    original = _images(root, "CT_NonCOVID")[0]
    (root / "CT_NonCOVID" / f"copy-of-{original.name}").write_bytes(original.read_bytes())
    with open(root / "Data-split/NonCOVID/trainCT_NonCOVID.txt", "a") as f:
        f.write(f"copy-of-{original.name}\n")
    return [
        "no duplicate images (sha256 unique)",
        f"CT_NonCOVID/{original.name}",
        f"CT_NonCOVID/copy-of-{original.name}",
    ]


def zero_byte_file(root: Path) -> list[str]:
    """An empty file among the images."""
    (root / "CT_COVID" / "empty.png").write_bytes(b"")
    return ["every file decodes fully as an image", "CT_COVID/empty.png (the file is empty)"]


def not_an_image(root: Path) -> list[str]:
    """A text file with an image extension."""
    (root / "CT_NonCOVID" / "notes.jpg").write_bytes(b"These are my notes, not a CT scan.\n")
    return ["every file decodes fully as an image", "CT_NonCOVID/notes.jpg (not a recognised image format)"]


def listed_but_missing(root: Path) -> list[str]:
    """A split list names a file that is in no archive."""
    with open(root / "Data-split/COVID/trainCT_COVID.txt", "a") as f:
        f.write("ghost%1.png\n")
    return [
        "every file named in Data-split exists",
        "CT_COVID/ghost%1.png (in Data-split/COVID/trainCT_COVID.txt)",
    ]


DEFECTS = {
    "missing image": missing_image,
    "extra truncated image": truncated_image,
    "duplicate image": duplicate_image,
    "zero-byte file": zero_byte_file,
    "non-image with an image extension": not_an_image,
    "split list names a missing file": listed_but_missing,
}
