"""The builtin front: a small asyncio TCP proxy from the public port to ``run/web.sock``.

Each accepted connection is connected to whatever ``web.sock`` points at *at that moment* (the
kernel follows the symlink in ``connect``), so renaming the symlink moves new connections to the
new release while open ones finish on the old one. A connect that is refused or finds no socket
is retried for a short while, re-resolving the path: nothing has been sent yet, so that is safe,
and it covers the instant a server closes its listener or is restarted by supervisord.

A connection can also be accepted into the old server's listen queue just before the switch and
then be dropped when that server closes its listener (the kernel resets queued unix-socket
connections): the client's bytes are kept until the upstream answers its first byte, and an
upstream that resets (the request was never read) -- or, for idempotent methods, closes -- before
answering anything is replaced by a new connection to ``web.sock`` and the bytes replayed, as
nginx's ``proxy_next_upstream error`` does. Nothing is replayed once the upstream has answered.

With ``--proxy-protocol`` every upstream connection (a replay's too) starts with a PROXY
protocol v1 line naming the client's address and port, which gunicorn reads (its own
``--proxy-protocol``) into ``REMOTE_ADDR``: the app sees the client, not the proxy. The line is
written by the proxy before any client byte, so a client cannot forge it.

Under systemd socket activation (``LISTEN_PID``/``LISTEN_FDS``) the listening socket is fd 3,
owned by the ``.socket`` unit, so it outlives every restart of the proxy.

Bytes are moved with asyncio protocols (no coroutine per chunk), with flow control in both
directions and half-close: one side's EOF is passed on and the other direction keeps flowing.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

CONNECT_RETRY_SECONDS = 2.0
CONNECT_RETRY_DELAY = 0.02
REPLAY_LIMIT = 64 * 1024  # client bytes kept for a replay; a larger request is never replayed
MAX_REPLAYS = 3  # new upstream connections after failures, per client connection
# What nginx will not resend after the upstream saw the request (ngx_http_upstream, 1.9.13+)
NON_IDEMPOTENT = (b"POST", b"PATCH", b"LOCK")
SD_LISTEN_FDS_START = 3
SHUTDOWN_GRACE = 10.0
REFUSED_LINGER = 2.0
BACKLOG = 1024
BAD_GATEWAY = (
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 36\r\n"
    b"Connection: close\r\n\r\nshiplane front: no upstream server\r\n"
)


class _Pipe(asyncio.Protocol):
    """One side of a proxied connection; writes what it reads to ``peer``."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.eof = False
        self.stale = False  # an upstream given up for a replay: its events no longer matter
        self.pending: list[bytes] = []  # read before the peer existed (a server speaking first)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.stale:
            return
        if self.peer is not None:
            self.peer.write(data)
        elif not self.conn.refused:
            self.pending.append(data)
        if self is not self.conn.client:
            self.conn.answered()

    def set_peer(self, peer: asyncio.Transport) -> None:
        self.peer = peer
        for data in self.pending:
            peer.write(data)
        self.pending.clear()

    def eof_received(self) -> bool:
        if self.stale or self.conn.upstream_failed(self, None):
            return False  # replaced by a new upstream connection: close this one
        self.eof = True
        if self.peer is not None and not self.peer.is_closing() and self.peer.can_write_eof():
            self.peer.write_eof()
        self.conn.maybe_close()
        return True  # keep our write side open: the other direction may still be flowing

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stale or self.conn.upstream_failed(self, exc):
            return
        self.eof = True
        self.conn.lost(self)

    # Our transport's write buffer is full (the peer sends faster than we can deliver):
    # stop reading from the peer until it drains.
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.is_closing():
            self.peer.resume_reading()


class _Connection:
    """A client connection and its upstream connection."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.client: _Pipe = _AcceptedPipe(self)
        self.upstream: _Pipe | None = None
        self.closed = False
        self.refused = False  # answered 502: the client's bytes are read and dropped
        self.replay: bytearray | None = bytearray()  # client bytes so far; None: too many
        self.has_answer = False  # the upstream sent a byte: never replay from now on
        self.retries = 0
        self.proxy_line = b""  # the PROXY protocol line, when the proxy sends one

    def client_bytes(self, data: bytes) -> None:
        """Keep what the client sent until the upstream answers (for a replay)."""
        if self.replay is None or self.has_answer:
            return
        self.replay += data
        if len(self.replay) > REPLAY_LIMIT:
            self.replay = None

    def answered(self) -> None:
        if not self.has_answer:
            self.has_answer = True
            self.replay = None

    def upstream_failed(self, side: _Pipe, exc: Exception | None) -> bool:
        """The upstream ``side`` closed (``exc`` None: EOF) or broke: replay on a new upstream
        connection when that is safe; True when a replay was started."""
        if (
            side is self.client
            or side is not self.upstream
            or self.closed
            or self.has_answer
            or self.replay is None
            or self.retries >= MAX_REPLAYS
        ):
            return False
        reset = isinstance(exc, (ConnectionResetError, BrokenPipeError))
        # A clean close without an answer: the server may have run the request.
        if not reset and (not self.replay or self.replay.split(b" ", 1)[0] in NON_IDEMPOTENT):
            return False
        self.retries += 1
        self.proxy.replays += 1
        sys.stderr.write(
            f"shiplane front: upstream {'reset' if reset else 'closed'} before "
            f"answering; replaying {len(self.replay)} bytes on {self.proxy.upstream_path}"
            f"\n"
        )
        side.stale = True
        self.upstream = None
        self.client.peer = None
        self.client.pending = [bytes(self.replay)]
        if side.transport is not None:
            side.transport.close()
        client = self.client.transport
        if client is not None and not client.is_closing():
            client.pause_reading()
        self.proxy.spawn(self.connect_upstream())
        return True

    def maybe_close(self) -> None:
        if self.client.eof and (self.refused or self.upstream is not None and self.upstream.eof):
            self.close()

    def lost(self, side: _Pipe) -> None:
        # Either side gone for good: close the other after it flushes what it already has.
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None:
                side.transport.close()
        self.proxy.connections.discard(self)

    async def connect_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_RETRY_SECONDS
        upstream = _Pipe(self)
        while True:
            if self.closed:
                return
            # the server behind the symlink now, resolved once: its PROXY marker and the
            # socket connected to are the same server's (a switch may move the link meanwhile)
            target = os.path.realpath(self.proxy.upstream_path)
            try:
                await loop.create_unix_connection(lambda: upstream, target)
                break
            except (ConnectionRefusedError, FileNotFoundError, ConnectionResetError) as exc:
                if loop.time() >= deadline:
                    self._bad_gateway(exc)
                    return
                await asyncio.sleep(CONNECT_RETRY_DELAY)
            except OSError as exc:
                self._bad_gateway(exc)
                return
        assert upstream.transport is not None and self.client.transport is not None
        if self.closed:  # the client went away while we connected
            upstream.transport.close()
            return
        self.upstream = upstream
        if self.proxy_line and os.path.exists(target + ".proxy"):  # backend.mark_proxy_protocol
            upstream.transport.write(self.proxy_line)  # before the client's (replayed) bytes
        upstream.set_peer(self.client.transport)
        self.client.set_peer(upstream.transport)
        if self.client.eof and upstream.transport.can_write_eof():
            upstream.transport.write_eof()  # the client half-closed before this (re)connect
        if upstream.eof and self.client.transport.can_write_eof():
            self.client.transport.write_eof()
        if not self.client.eof:
            self.client.transport.resume_reading()

    def _bad_gateway(self, exc: Exception) -> None:
        transport = self.client.transport
        if transport is None or transport.is_closing():
            self.close()
            return
        # Answer, then read (and drop) what the client sent until it closes: closing a socket
        # with unread input would reset the connection before the client reads the answer.
        self.refused = True
        self.client.pending.clear()
        try:
            transport.write(BAD_GATEWAY)
            if transport.can_write_eof():
                transport.write_eof()
            transport.resume_reading()
        except OSError:  # the client is already gone
            self.close()
            return
        asyncio.get_running_loop().call_later(REFUSED_LINGER, self.close)
        self.maybe_close()


class Proxy:
    """Listen on ``host:port``; forward each connection to the unix socket ``upstream_path``."""

    def __init__(
        self, host: str, port: int, upstream_path: str, proxy_protocol: bool = False
    ) -> None:
        self.host = host
        self.port = port
        self.upstream_path = upstream_path
        self.proxy_protocol = proxy_protocol
        self.connections: set[_Connection] = set()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.replays = 0

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task that is kept referenced until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _accept(self) -> _Pipe:
        conn = _Connection(self)
        self.connections.add(conn)
        return conn.client

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        inherited = activated_socket()
        if inherited is not None:
            self.server = await loop.create_server(self._accept, sock=inherited, backlog=BACKLOG)
            return
        self.server = await loop.create_server(
            self._accept, self.host, self.port, reuse_address=True, backlog=BACKLOG
        )

    async def serve(self, ready: str | None = None) -> None:
        """Serve until SIGTERM/SIGINT, then stop listening and let open connections finish.
        Once listening, the pid goes to ``ready`` (the agent waits for it)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        if ready:
            _write_pid(ready)  # a few bytes on local disk: not worth a thread
        await stop.wait()
        await self.close(SHUTDOWN_GRACE)

    async def close(self, grace: float) -> None:
        assert self.server is not None
        self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        for conn in list(self.connections):
            if conn.upstream is None:  # not connected yet, or refused: nothing in flight
                conn.close()
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()

    @property
    def bound_port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


class _AcceptedPipe(_Pipe):
    """The client side: holds the client's bytes (reading paused) until upstream is connected."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.conn.proxy.proxy_protocol:
            self.conn.proxy_line = proxy_line(
                self.transport.get_extra_info("peername"),
                self.transport.get_extra_info("sockname"),
            )
        self.transport.pause_reading()
        self.conn.proxy.spawn(self.conn.connect_upstream())

    def data_received(self, data: bytes) -> None:
        self.conn.client_bytes(data)
        super().data_received(data)


def proxy_line(peer: Any, local: Any) -> bytes:
    """The PROXY protocol v1 line for a TCP connection from ``peer`` to ``local`` (socket
    addresses); empty when they are not IP addresses (gunicorn then takes the connection as it
    is). IPv4-mapped IPv6 addresses (a dual-stack listener) are given as IPv4."""
    if not (isinstance(peer, tuple) and isinstance(local, tuple)):
        return b""
    try:
        src, dst = (ipaddress.ip_address(str(addr[0]).split("%")[0]) for addr in (peer, local))
        sport, dport = int(peer[1]), int(local[1])
    except (ValueError, IndexError, TypeError):
        return b""
    if isinstance(src, ipaddress.IPv6Address) and src.ipv4_mapped is not None:
        src = src.ipv4_mapped
    if isinstance(dst, ipaddress.IPv6Address) and dst.ipv4_mapped is not None:
        dst = dst.ipv4_mapped
    if src.version != dst.version:
        return b""
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def activated_socket() -> socket.socket | None:
    """The listening socket systemd passed (``LISTEN_FDS``, fd 3) for this very process, if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS") or "0")
    except ValueError:
        return None
    if count < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    sock.setblocking(False)
    return sock


def _write_pid(path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv: list[str] | None = None) -> int:
    """``proxy --listen HOST:PORT --upstream PATH``: run the front until SIGTERM."""
    parser = argparse.ArgumentParser(prog="shiplane-agent proxy", description=__doc__)
    parser.add_argument(
        "--listen",
        required=True,
        type=parse_listen,
        help="HOST:PORT to listen on (unless systemd passes a socket: LISTEN_FDS)",
    )
    parser.add_argument("--upstream", required=True, help="unix socket path (a symlink is fine)")
    parser.add_argument("--ready", help="write the pid to this file once listening")
    parser.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="start each upstream connection with a PROXY protocol v1 line (the client's address)",
    )
    args: Any = parser.parse_args(argv)
    host, port = args.listen
    proxy = Proxy(host, port, args.upstream, proxy_protocol=args.proxy_protocol)
    try:
        asyncio.run(proxy.serve(args.ready))
    except OSError as exc:
        sys.stderr.write(f"shiplane front: cannot listen on {host}:{port}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
