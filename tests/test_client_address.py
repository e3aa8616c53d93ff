"""The client's address and scheme reach the app (issue 20): through the builtin front as a PROXY
protocol line gunicorn reads (a replayed request's new connection starts with one too), through
the TLS front (Caddy) as X-Forwarded-For/-Proto that Caddy sets itself. Requests come from
127.0.0.2, so the echoed address is the client's and no default; a client's own X-Forwarded-For
is not believed.

The deploys are real ``shiplane deploy --stage local`` runs of the scaffold's Flask app with a
``/whoami`` view echoing ``request.remote_addr`` and ``request.scheme``.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from apps.common import App
from apps.fastapi_app import make_fastapi
from deployhelp import Project, edit, free_port, scaffold, wait_for
from shiplane.agent import nginx, preboot
from shiplane.agent.backend import (
    client_address_options,
    front_argv,
    gunicorn_argv,
    mark_proxy_protocol,
    proxy_marker,
)
from shiplane.agent.paths import Layout
from shiplane.agent.protocol import ServicesSpec, WebSpec
from shiplane.agent.proxy import proxy_line
from test_https_caddy import Pebble, https_stage, needs_pebble, pebble  # noqa: F401 (a fixture)
from test_nginx_front import site  # noqa: F401 (a fixture)

CLIENT = "127.0.0.2"  # a second loopback address: what the app echoes is the client's own

WHOAMI = '''

@bp.get("/whoami")
def whoami() -> Response:
    """The client's address and the scheme, as the app sees them."""
    return Response(f"{request.remote_addr} {request.scheme}\\n", mimetype="text/plain")


@bp.get("/forwarded")
def forwarded() -> Response:
    """The X-Forwarded-For header the app received."""
    return Response(f"{request.headers.get('X-Forwarded-For')}\\n", mimetype="text/plain")
'''

FASTAPI_WHOAMI = """

@app.get("/whoami", response_class=PlainTextResponse)
def whoami(request: Request):
    host = request.client.host if request.client else None
    return f"{host} {request.url.scheme}\\n"
"""

# --- fast: the PROXY line, and who gets it --------------------------------------------------------


def test_the_proxy_line_names_the_client_and_the_front() -> None:
    line = proxy_line(("127.0.0.2", 50123), ("127.0.0.1", 8000))
    assert line == b"PROXY TCP4 127.0.0.2 127.0.0.1 50123 8000\r\n"
    # a dual-stack listener sees IPv4 clients as IPv4-mapped IPv6 addresses
    mapped = proxy_line(("::ffff:192.0.2.7", 4000, 0, 0), ("::ffff:10.0.0.1", 80, 0, 0))
    assert mapped == b"PROXY TCP4 192.0.2.7 10.0.0.1 4000 80\r\n"
    v6 = proxy_line(("2001:db8::7", 4000, 0, 0), ("fe80::1%eth0", 80, 0, 2))
    assert v6 == b"PROXY TCP6 2001:db8::7 fe80::1 4000 80\r\n"
    assert proxy_line("", "/run/x.sock") == b""  # not TCP: no line (gunicorn takes it as is)


def _web(**keys: object) -> WebSpec:
    web: dict[str, object] = {
        "kind": "wsgi",
        "target": "app:app",
        "workers": 1,
        "worker_class": None,
        "forwarded_allow_ips": None,
        "front": "builtin",
    }
    web.update(keys)
    return web  # type: ignore[return-value]


def test_the_builtin_front_sends_the_line_only_to_workers_that_read_it(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    for web, flagged, reads in [
        (_web(), True, True),  # gunicorn's sync worker
        (_web(worker_class="gthread"), True, True),
        # uvicorn's workers would answer 400: preboot teaches them, then marks the server itself
        (_web(kind="asgi"), True, False),
        (_web(kind="asgi", worker_class="uvicorn.workers.UvicornWorker"), True, False),
        (_web(kind="asgi", preboot=False), False, False),  # nobody to teach them
        (_web(front="caddy"), False, False),
        (_web(front="nginx"), False, False),
    ]:
        argv = gunicorn_argv(layout, "r1", web)
        assert ("--proxy-protocol" in argv) is flagged, (web, argv)
        # the line goes to a server marked as reading it, when it starts (the front's command
        # line stays the same whatever the worker kind: no front restart when it changes)
        proxy_marker(layout, "r1").parent.mkdir(parents=True, exist_ok=True)
        proxy_marker(layout, "r1").touch()  # an earlier server's: never kept by mistake
        mark_proxy_protocol(layout, "r1", web)
        assert proxy_marker(layout, "r1").exists() is reads
        spec: ServicesSpec = {"front": str(web["front"]), "web": web}  # type: ignore[typeddict-item]
        assert "--proxy-protocol" in front_argv(layout, spec)
    # gthread reads the line into a connection's first request only: no keep-alive then
    threaded = client_address_options(_web(threads=4))
    assert threaded == ["--proxy-protocol", "--keep-alive=0"]
    assert client_address_options(_web(threads=4, keepalive=5)) == ["--proxy-protocol"]
    assert client_address_options(_web()) == ["--proxy-protocol"]
    # gunicorn's --proxy-protocol takes an optional value: never followed by the app's target
    argv = gunicorn_argv(layout, "r1", _web())
    assert argv[argv.index("--proxy-protocol") + 1].startswith("--")
    # behind nginx and Caddy (their own X-Forwarded-*), uvicorn must trust the unix socket
    assert client_address_options(_web(front="caddy", kind="asgi")) == ["--forwarded-allow-ips=*"]
    assert client_address_options(_web(front="caddy", forwarded_allow_ips="10.0.0.1")) == []
    # builtin: the PROXY line (preboot's), a client's X-Forwarded-For is not trusted
    assert client_address_options(_web(kind="asgi")) == [
        "--proxy-protocol",
        "--forwarded-allow-ips=",
    ]
    assert client_address_options(_web(kind="asgi", preboot=False)) == []


class _Protocol:
    """What preboot patches on uvicorn's HTTP protocols: ``client`` and ``data_received``."""

    def __init__(self) -> None:
        self.client: tuple[str, int] | None = None  # a unix socket's peer: no address
        self.parsed = b""

    def data_received(self, data: bytes) -> None:
        assert data, "h11 takes empty data for the end of the stream"
        self.parsed += data


def test_preboot_teaches_uvicorn_the_proxy_line() -> None:
    """The line sets the connection's client and is never parsed as HTTP, even split across
    reads; a connection without one (a health check) is parsed as it came."""
    taught = type("Taught", (_Protocol,), {})
    assert preboot.read_proxy_lines([taught])
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    conn = taught()
    conn.data_received(b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\n" + request)
    assert (conn.client, conn.parsed) == (("203.0.113.7", 5555), request)
    conn.data_received(request)  # keep-alive: the next request is plain HTTP, same client
    assert (conn.client, conn.parsed) == (("203.0.113.7", 5555), request * 2)
    split = taught()
    for part in (b"PRO", b"XY TCP6 2001:db8::1 ::1 6000 80\r", b"\n" + request):
        split.data_received(part)
    assert (split.client, split.parsed) == (("2001:db8::1", 6000), request)
    alone = taught()  # the line in a read of its own: h11 would take b"" for the end
    alone.data_received(b"PROXY TCP4 203.0.113.9 10.0.0.1 7000 80\r\n")
    assert (alone.client, alone.parsed) == (("203.0.113.9", 7000), b"")
    plain = taught()
    plain.data_received(request)
    assert (plain.client, plain.parsed) == (None, request)
    unknown = taught()
    unknown.data_received(b"PROXY UNKNOWN\r\n" + request)
    assert (unknown.client, unknown.parsed) == (None, request)
    assert not preboot.read_proxy_lines([])  # no uvicorn here: the server is not marked


class _Recording:
    """A unix-socket HTTP server that records what each connection sent before answering."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        os.chmod(path, 0o777)  # nginx's workers may run as another user
        self.server.listen(16)
        self.server.settimeout(0.1)
        self.seen: list[bytes] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                if not data:
                    continue  # a probe
                self.seen.append(data)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.server.close()


@pytest.fixture
def pp_proxy(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    link = tmp_path / "web.sock"
    port = free_port()
    argv = [sys.executable, "-m", "shiplane.agent", "proxy", "--proxy-protocol"]
    argv += ["--listen", f"127.0.0.1:{port}", "--upstream", str(link)]
    proc = subprocess.Popen(argv)

    def listening() -> bool:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True

    try:
        wait_for(listening, 10, "the proxy to listen")
        yield port, link
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def _point(link: Path, target: Path) -> None:
    tmp = link.with_name("web.sock.tmp")
    os.symlink(target.name, tmp)
    os.replace(tmp, link)


def _queued(path: Path) -> int:
    out = subprocess.run(["ss", "-xlnH"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if str(path) in fields:
            return int(fields[2])
    return 0


def test_a_replayed_request_starts_with_the_proxy_line_again(
    pp_proxy: tuple[int, Path], tmp_path: Path
) -> None:
    port, link = pp_proxy
    old = socket.socket(socket.AF_UNIX)  # a server closing its listener with our request queued
    old.bind(str(tmp_path / "old.sock"))
    old.listen(16)
    _point(link, tmp_path / "old.sock")
    new = _Recording(tmp_path / "new.sock")
    (tmp_path / "new.sock.proxy").touch()  # its server reads PROXY lines (mark_proxy_protocol)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(CLIENT, 0))
        cport = sock.getsockname()[1]
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
        wait_for(lambda: _queued(tmp_path / "old.sock") >= 1, 10, "the queued connection")
        _point(link, tmp_path / "new.sock")
        old.close()  # the kernel resets the queued connection: the proxy replays
        answer = sock.recv(65536)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer
        # (the fixture's probe connection, queued too, is replayed as its line alone)
        assert [data for data in new.seen if b"GET" in data] == [
            f"PROXY TCP4 {CLIENT} 127.0.0.1 {cport} {port}\r\n".encode()
            + b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
        ]
    finally:
        old.close()
        new.close()


def test_a_server_not_marked_as_reading_proxy_lines_gets_none(
    pp_proxy: tuple[int, Path], tmp_path: Path
) -> None:
    """A server started by an earlier shiplane, or with uvicorn's workers, would answer 400 to a
    PROXY line: the front sends it the client's bytes alone."""
    port, link = pp_proxy
    plain = _Recording(tmp_path / "plain.sock")
    _point(link, tmp_path / "plain.sock")
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(CLIENT, 0))
        sock.sendall(b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n")
        answer = sock.recv(65536)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert [data for data in plain.seen if b"GET" in data] == [
            b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n"
        ]
    finally:
        plain.close()


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx")
def test_nginx_replaces_the_client_x_forwarded_for(
    site: tuple[Layout, dict[str, object], Path],  # noqa: F811
) -> None:
    layout, spec, _ = site
    port = int(spec["web"]["port"])  # type: ignore[index]
    upstream = _Recording(layout.run / "web-r1.sock")
    try:
        os.symlink("web-r1.sock", layout.web_socket)
        nginx.ensure_site(layout, spec, lambda event: None)  # type: ignore[arg-type]
        spoof = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"}
        wait_for(lambda: _get(port, "/", spoof)[0] == 200, 15, "nginx to serve")
        request = upstream.seen[-1].lower()
        assert f"x-forwarded-for: {CLIENT}\r\n".encode() in request, request
        assert b"x-forwarded-proto: http\r\n" in request, request
        assert b"6.6.6.6" not in request and b"https" not in request, request
    finally:
        upstream.close()


# --- slow: the scaffold's Flask app behind each front ---------------------------------------------


def _whoami_app(tmp: Path) -> Project:
    project = scaffold(tmp)
    views = project.root / "src" / "demo" / "views.py"
    views.write_text(views.read_text() + WHOAMI)
    edit(project, "src/demo/views.py", "Response, current_app", "Response, current_app, request")
    return project


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """GET from 127.0.0.2 over plain HTTP."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(CLIENT, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def _https_get(
    ca: Pebble, host: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """GET https://host/path from 127.0.0.2, verified against pebble's root."""
    ctx = ssl.create_default_context(cafile=str(ca.issued_root))
    raw = socket.create_connection(
        ("127.0.0.1", ca.https_port), timeout=10, source_address=(CLIENT, 0)
    )
    conn = http.client.HTTPSConnection(host, ca.https_port, context=ctx, timeout=10)
    conn.sock = ctx.wrap_socket(raw, server_hostname=host)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def _keep_alive_whoami(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(CLIENT, 0))
    try:
        for _ in range(3):
            conn.request("GET", "/whoami")
            resp = conn.getresponse()
            assert (resp.status, resp.read().decode()) == (200, f"{CLIENT} http\n")
    finally:
        conn.close()


@pytest.mark.slow
def test_the_builtin_front_passes_the_client_address() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="shl-addr-", dir="/tmp"))
    project = _whoami_app(tmp)
    try:
        project.deploy()
        assert _get(project.port, "/whoami") == (200, f"{CLIENT} http\n")
        spoofed = _get(project.port, "/whoami", {"X-Forwarded-For": "6.6.6.6"})
        assert spoofed == (200, f"{CLIENT} http\n")
        # the health checks on the release's own socket send no PROXY line, and pass: the
        # deploy did; a keep-alive client's later requests carry the address too, with sync
        # workers (which close after each answer) and with threads (gthread)
        _keep_alive_whoami(project.port)
        edit(project, "shiplane.toml", "workers = 2\n", "workers = 2\nthreads = 2\n")
        project.deploy()
        _keep_alive_whoami(project.port)
    finally:
        project.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
@needs_pebble
def test_the_tls_front_passes_the_client_address_and_https(pebble: Pebble) -> None:  # noqa: F811
    tmp = Path(tempfile.mkdtemp(prefix="shl-addr-tls-", dir="/tmp"))
    project = _whoami_app(tmp)
    # behind a front that sends X-Forwarded-For, a Flask app takes it with werkzeug's ProxyFix
    # (one proxy: Caddy, which replaces any X-Forwarded-For the client sent)
    edit(
        project,
        "src/demo/__init__.py",
        "    app = Flask(__name__)\n",
        "    app = Flask(__name__)\n"
        "    from werkzeug.middleware.proxy_fix import ProxyFix\n\n"
        "    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1)  # type: ignore[method-assign]\n",
    )
    https_stage(project, pebble, ["app.test"], 60)
    try:
        project.deploy()
        assert _https_get(pebble, "app.test", "/whoami") == (200, f"{CLIENT} https\n")
        spoofed = _https_get(
            pebble, "app.test", "/whoami", {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "x"}
        )
        assert spoofed == (200, f"{CLIENT} https\n")
        # Caddy replaced the client's header (uvicorn's workers, trusting the unix socket, take
        # its first address): what ProxyFix or uvicorn read is the client's address alone
        forwarded = _https_get(pebble, "app.test", "/forwarded", {"X-Forwarded-For": "6.6.6.6"})
        assert forwarded == (200, f"{CLIENT}\n")
    finally:
        project.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
@needs_pebble
def test_an_asgi_app_on_uvicorn_workers(pebble: Pebble) -> None:  # noqa: F811
    """uvicorn's workers read no PROXY line of their own: preboot teaches them, so behind the
    builtin front a FastAPI app sees the client (and believes no X-Forwarded-For); behind Caddy
    it sees the client and https (gunicorn passes ``--forwarded-allow-ips=*`` to the workers:
    only the front can connect to the unix socket)."""
    tmp = Path(tempfile.mkdtemp(prefix="shl-addr-asgi-", dir="/tmp"))
    app: App = make_fastapi(tmp / "visits", tmp / "d")
    try:
        main = app.root / "main.py"
        main.write_text(main.read_text() + FASTAPI_WHOAMI)
        app.edit(
            "main.py", "from fastapi import FastAPI\n", "from fastapi import FastAPI, Request\n"
        )
        app.deploy("--skip-tests")
        assert _get(app.port, "/whoami") == (200, f"{CLIENT} http\n")
        spoofed = _get(app.port, "/whoami", {"X-Forwarded-For": "6.6.6.6"})
        assert spoofed == (200, f"{CLIENT} http\n")
        toml = app.root / "shiplane.toml"
        toml.write_text(
            toml.read_text().rstrip("\n")
            + f'''
domains = ["app.test"]

[stages.local.caddy]
acme_ca = "{pebble.directory}"
acme_ca_root = "{pebble.ca_root}"
acme_email = "ops@example.com"
http_port = {pebble.http_port}
https_port = {pebble.https_port}
issue_timeout = 60
'''
        )
        app.commit("https")
        app.deploy("--skip-tests")
        assert _https_get(pebble, "app.test", "/whoami") == (200, f"{CLIENT} https\n")
        spoofed = _https_get(pebble, "app.test", "/whoami", {"X-Forwarded-For": "6.6.6.6"})
        assert spoofed == (200, f"{CLIENT} https\n")
    finally:
        app.stop()
        shutil.rmtree(tmp, ignore_errors=True)
