"""Packages for the build tests: a pure-Python wheel made here, and a private package index
(PEP 503 "simple" pages over HTTP basic auth) served on 127.0.0.1 from a folder of wheels."""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import http.server
import io
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename


def make_wheel(folder: Path, name: str, version: str, module: str) -> Path:
    """``name-version-py3-none-any.whl`` in ``folder``: one module ``name`` with ``module`` as
    its source, and the dist-info a wheel needs (METADATA, WHEEL, RECORD with hashes)."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": module.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        writer.writerow([path, f"sha256={digest}", len(data)])
    writer.writerow([f"{dist}/RECORD", "", ""])
    files[f"{dist}/RECORD"] = rows.getvalue().encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(zipfile.ZipInfo(path, (2020, 1, 1, 0, 0, 0)), data)
    return wheel


@dataclass
class Index:
    """A running private index: ``url`` without credentials; ``served`` the files it sent to a
    client with the right ones, ``refused`` how many requests it answered 401."""

    url: str
    served: list[str] = field(default_factory=list)
    refused: int = 0


@contextmanager
def private_index(wheels: Path, user: str, password: str) -> Iterator[Index]:
    """Serve ``wheels`` as a PEP 503 index at ``http://127.0.0.1:PORT/simple/``; every request
    needs HTTP basic auth with ``user``/``password`` (else 401, as a private index answers)."""
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    index = Index("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: pytest shows the test's own output only

        def _send(self, status: int, body: bytes, kind: str = "text/html") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="private"')
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            if self.headers.get("Authorization") != expected:
                index.refused += 1
                self._send(401, b"credentials required\n", "text/plain")
                return
            found = {
                canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in wheels.glob("*.whl")
            }
            parts = [p for p in self.path.split("?")[0].split("/") if p]
            if parts == ["simple"]:
                links = "".join(f'<a href="/simple/{n}/">{n}</a>\n' for n in sorted(found))
                self._send(200, f"<html><body>\n{links}</body></html>\n".encode())
            elif len(parts) == 2 and parts[0] == "simple" and parts[1] in found:
                wheel = found[parts[1]]
                sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
                link = f'<a href="/files/{html.escape(wheel.name)}#sha256={sha}">{wheel.name}</a>'
                self._send(200, f"<html><body>\n{link}\n</body></html>\n".encode())
            elif len(parts) == 2 and parts[0] == "files" and (wheels / parts[1]).is_file():
                if self.command == "GET":
                    index.served.append(parts[1])
                self._send(200, (wheels / parts[1]).read_bytes(), "application/octet-stream")
            else:
                self._send(404, b"not here\n", "text/plain")

        do_HEAD = do_GET  # uv asks HEAD before a download (range requests)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    index.url = f"http://127.0.0.1:{server.server_address[1]}/simple/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield index
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
