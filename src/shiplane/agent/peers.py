"""Blobs from host to host during a deploy (docs/DESIGN.md, "Blob transfer"): a host that has the
deploy's blobs serves them to the others over HTTP on its private address, so each blob leaves
the controller once whatever the number of hosts.

- ``BlobServer``: a stdlib ``ThreadingHTTPServer`` in a thread of this agent session, read-only,
  serving only the blobs it was named, by sha256, at ``GET /blob/<sha256>``. Each request carries
  ``X-Shiplane-Auth: HMAC-SHA256(token, sha256)`` with the deploy's random token (given over the
  SSH session, never logged): an eavesdropper who saw one request can only ask for the blob it
  has already seen go by. It stops at ``stop_serving``, when its ``ttl`` runs out, or with the
  session (its thread is a daemon of the agent process).
- ``fetch``: the other end, run by a host that lacks blobs. Every byte is hashed on arrival and a
  blob is renamed into the store only when it hashes to its name (``store.store_one``), exactly as
  blobs the controller sends. A source that cannot be reached within ``connect_timeout``, answers
  anything but the blob, or sends bytes of another hash is reported, never fatal: the controller
  then sends those blobs itself.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import os
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import AgentError, fsync_dir, store
from .paths import Layout
from .protocol import BlobRef, Emit, FetchResult, Serving, ServingStopped

AUTH_HEADER = "X-Shiplane-Auth"
READ_TIMEOUT = 30.0  # seconds a started transfer may stall, either side
MAX_TTL = 3600.0


def sign(token: str, sha: str) -> str:
    """The proof of one request for blob ``sha``: HMAC-SHA256 keyed by the deploy's token."""
    return hmac.new(token.encode(), sha.encode(), hashlib.sha256).hexdigest()


def ssh_address() -> str | None:
    """The address the controller reached this host at (sshd's ``SSH_CONNECTION``: client ip,
    client port, server ip, server port): the one its peers are asked to use too."""
    parts = os.environ.get("SSH_CONNECTION", "").split()
    return parts[2] if len(parts) == 4 else None


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    blob_server: BlobServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: a peer that goes away mid-blob says so itself (its fetch fails over to the
        controller); a traceback on the agent's stderr would only reach the controller's log."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per fetching host
    timeout = READ_TIMEOUT
    server: _Server

    def do_GET(self) -> None:
        owner = self.server.blob_server
        sha = self.path[len("/blob/") :] if self.path.startswith("/blob/") else ""
        given = self.headers.get(AUTH_HEADER, "")
        if not store.valid_sha(sha) or not hmac.compare_digest(given, sign(owner.token, sha)):
            owner.count(refused=1)
            self._empty(403)
            return
        if owner.stopped:  # a connection kept alive past the deploy's transfers gets nothing
            self.close_connection = True
            self._empty(410)
            return
        if sha not in owner.shas:
            self._empty(404)
            return
        try:
            handle = open(owner.layout.blob(sha), "rb")  # noqa: SIM115 - closed below
        except OSError:
            self._empty(404)
            return
        with handle:
            size = os.fstat(handle.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.flush()
            self.connection.sendfile(handle)
        owner.count(served=1, sent=size)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
        """Quiet: the agent's stderr is the controller's, and its requests are counted instead."""


class BlobServer:
    """The blobs ``shas`` of ``layout``'s store, served read-only on ``address:port`` (0: any free
    port) for at most ``ttl`` seconds."""

    def __init__(
        self, layout: Layout, shas: list[str], token: str, address: str, port: int, ttl: float
    ) -> None:
        if len(token) < 32:
            raise AgentError("serve_blobs: the token must be at least 32 characters", kind="usage")
        for sha in shas:
            if not store.valid_sha(sha):
                raise AgentError(f"serve_blobs: not a sha256: {sha!r}", kind="usage")
        self.layout = layout
        self.shas = frozenset(shas)
        self.token = token
        self.stats = {"served": 0, "bytes": 0, "refused": 0}
        self._stats_lock = threading.Lock()
        self.stopped = False
        try:
            self._httpd = _Server((address, port), _Handler)
        except OSError as exc:
            raise AgentError(
                f"serve_blobs: cannot listen on {address}:{port}: {exc.strerror or exc}",
                kind="usage",
            ) from None
        self._httpd.blob_server = self
        self.address, self.port = address, int(self._httpd.server_address[1])
        # a short poll: ``stop`` (shutdown) waits for the loop to see it, and a deploy for ``stop``
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        # bounded lifetime: a controller that never says stop (killed mid-deploy) leaves nothing
        self._timer = threading.Timer(min(max(ttl, 1.0), MAX_TTL), self.stop)
        self._timer.daemon = True
        self._timer.start()

    def count(self, served: int = 0, sent: int = 0, refused: int = 0) -> None:
        with self._stats_lock:
            self.stats["served"] += served
            self.stats["bytes"] += sent
            self.stats["refused"] += refused

    def stop(self) -> ServingStopped:
        """Stop listening (idempotent; the ttl's timer may call it too); what it served."""
        with self._stats_lock:
            first, self.stopped = not self.stopped, True
        if first:
            self._timer.cancel()
            self._httpd.shutdown()
            self._httpd.server_close()
        with self._stats_lock:
            return {
                "served": self.stats["served"],
                "bytes": self.stats["bytes"],
                "refused": self.stats["refused"],
            }


def serve(
    layout: Layout, shas: list[str], token: str, address: str | None, port: int, ttl: float
) -> tuple[BlobServer, Serving]:
    """Start a server for the blobs of ``shas`` this store holds; its address and port."""
    where = address or ssh_address()
    if not where:
        raise AgentError(
            "serve_blobs: no address to serve on (not reached over SSH, and none given)",
            kind="usage",
        )
    if address is None and _loopback(where):  # a tunnel: the other hosts would reach themselves
        raise AgentError(
            f"serve_blobs: reached over SSH at {where}, which no other host can reach",
            kind="usage",
        )
    held = [sha for sha in dict.fromkeys(shas) if layout.blob(sha).is_file()]
    server = BlobServer(layout, held, token, where, port, ttl)
    return server, {"address": server.address, "port": server.port, "blobs": len(held)}


def fetch(
    layout: Layout,
    address: str,
    port: int,
    token: str,
    blobs: list[BlobRef],
    connect_timeout: float,
    emit: Emit,
    stored: Callable[[str], None] = lambda sha: None,
) -> FetchResult:
    """Fetch ``blobs`` from a peer's ``BlobServer`` into the store, each verified by its sha256
    (``stored(sha)`` as each one is in place).

    Never fails for the peer's sake: what could not be had is listed in ``failed`` (with
    ``error`` saying why), blobs that arrived with other bytes than their hash in ``bad``."""
    layout.store.mkdir(parents=True, exist_ok=True)
    received, done = 0, 0
    failed: list[str] = []
    bad: list[str] = []
    error: str | None = None
    total = sum(int(b["size"]) for b in blobs)
    store.check_room(layout, total)
    conn = http.client.HTTPConnection(address, port, timeout=connect_timeout)
    try:
        conn.connect()
    except OSError as exc:
        timed_out = isinstance(exc, (socket.timeout, TimeoutError))  # apart before Python 3.10
        reason = "timed out" if timed_out else (exc.strerror or str(exc))
        return {
            "received": 0,
            "bytes": 0,
            "failed": [b["sha256"] for b in blobs],
            "bad": [],
            "error": f"cannot reach {address}:{port}: {reason}",
        }
    assert conn.sock is not None
    conn.sock.settimeout(READ_TIMEOUT)
    try:
        for index, blob in enumerate(blobs):
            sha, size = blob["sha256"], int(blob["size"])
            if not store.valid_sha(sha):
                raise AgentError(f"fetch_blobs: not a sha256: {sha!r}", kind="usage")
            try:
                conn.request("GET", f"/blob/{sha}", headers={AUTH_HEADER: sign(token, sha)})
                response = conn.getresponse()
                if response.status != 200 or response.length != size:
                    response.read()
                    failed.append(sha)
                    error = (
                        f"{address}:{port} answered {response.status} for {sha[:12]}"
                        if response.status != 200
                        else f"{address}:{port} holds {response.length} bytes for {sha[:12]}, "
                        f"not its {size}"
                    )
                    continue
                if store.store_one(layout, sha, size, response):
                    received += 1
                    done += size
                    stored(sha)
                else:
                    bad.append(sha)
                response.read()  # the end of the response: the connection is reused
            except (OSError, http.client.HTTPException, AgentError) as exc:
                if isinstance(exc, AgentError) and exc.kind == "disk":
                    raise
                failed.extend(b["sha256"] for b in blobs[index:])
                error = f"transfer from {address}:{port} broke: {exc}"
                break
            emit({"phase": "fetch", "status": "progress", "bytes": done, "total": total})
    finally:
        conn.close()
    if received:
        fsync_dir(layout.store)
    return {"received": received, "bytes": done, "failed": failed, "bad": bad, "error": error}
