"""The nginx front: the site shiplane writes, ``nginx -t``, reload, and a real private nginx
serving through ``run/web.sock`` as a switch moves it.

A private nginx master runs with its own ``-c`` conf in a temp dir, on a free loopback port; it
is stopped by its pid file's pid at the end, on failure too.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployhelp import wait_for
from shiplane.agent import nginx, pid_alive, services
from shiplane.agent.errors import AgentError
from shiplane.agent.paths import Layout
from shiplane.agent.switch import save_spec
from shiplane.config.schema import Nginx, Stage

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx")

MAIN = """\
{user}worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    include {dir}/sites/*.conf;
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str = "/") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Upstream:
    """A unix-socket HTTP server answering every request with its name."""

    def __init__(self, path: Path, name: bytes) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        os.chmod(path, 0o777)
        self.server.listen(64)
        self.server.settimeout(0.1)  # close() does not wake a blocked accept(): poll a flag
        self.name = name
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n"
                    b"\r\n%s" % (len(self.name), self.name)
                )

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.server.close()


@pytest.fixture
def site() -> Iterator[tuple[Layout, dict[str, Any], Path]]:
    """A deploy root with ``current/static`` and a private nginx conf (nginx not started yet)."""
    base = Path(tempfile.mkdtemp(prefix="shl-ngx-", dir="/tmp"))  # short unix socket paths
    layout = Layout(base / "root")
    static = layout.root / "releases" / "r1" / "static"
    static.mkdir(parents=True)
    (static / "hello.txt").write_text("static hello\n")
    layout.run.mkdir(parents=True)
    os.symlink("releases/r1", layout.current)
    conf_dir = base / "nginx"
    for sub in ("sites", "tmp"):
        (conf_dir / sub).mkdir(parents=True)
    (conf_dir / "nginx.conf").write_text(
        MAIN.format(dir=conf_dir, user="user root;\n" if os.geteuid() == 0 else "")
    )
    spec = {
        "app": "demo",
        "stage": "test",
        "front": "nginx",
        "web": {"bind": "127.0.0.1", "port": free_port()},
        "nginx": Nginx(
            server_name="demo.test",
            static={"/static/": "static"},
            site_dir=str(conf_dir / "sites"),
            conf=str(conf_dir / "nginx.conf"),
            pid_file=str(conf_dir / "nginx.pid"),
        ).model_dump(),
    }
    try:
        yield layout, spec, conf_dir
    finally:
        pid = nginx.master_pid(spec)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: nginx.master_pid(spec) is None, 15, "nginx to exit")
        shutil.rmtree(base, ignore_errors=True)


def test_site_proxies_to_the_web_symlink_with_retries_and_serves_static_files(
    site: tuple[Layout, dict[str, Any], Path],
) -> None:
    layout, spec, _ = site
    text = nginx.site_conf(layout, spec)
    assert text.count(f'server "unix:{layout.web_socket}" max_fails=0;') == 3
    assert "proxy_next_upstream error timeout;" in text
    assert f"listen 127.0.0.1:{spec['web']['port']};" in text
    assert "server_name demo.test;" in text
    assert f'alias "{layout.current}/static/";' in text
    assert "ssl_certificate" not in text


def test_private_nginx_serves_the_live_release_and_follows_a_switch_without_reload(
    site: tuple[Layout, dict[str, Any], Path],
) -> None:
    layout, spec, _ = site
    port = spec["web"]["port"]
    blue = Upstream(layout.run / "web-r1.sock", b"blue")
    green = Upstream(layout.run / "web-r2.sock", b"green")
    try:
        os.symlink("web-r1.sock", layout.web_socket)
        events: list[dict[str, Any]] = []
        assert nginx.ensure_site(layout, spec, events.append)["changed"] is True
        assert nginx.site_path(spec).read_text() == nginx.site_conf(layout, spec)
        master = wait_for(lambda: nginx.master_pid(spec), 15, "nginx to start")
        assert wait_for(lambda: get(port) == (200, b"blue"), 15, "nginx to serve blue")
        assert get(port, "/static/hello.txt") == (200, b"static hello\n")
        # a switch: the symlink moves, nginx follows on the next request, nothing reloads
        os.symlink("web-r2.sock", layout.run / "web.sock.tmp")
        os.replace(layout.run / "web.sock.tmp", layout.web_socket)
        assert get(port) == (200, b"green")
        assert nginx.ensure_site(layout, spec, events.append)["changed"] is False
        assert nginx.master_pid(spec) == master
        # nothing listens on the target any more: nginx answers 502 and keeps running
        green.close()
        os.unlink(layout.run / "web-r2.sock")
        assert get(port)[0] == 502
        # `shiplane stop --all` (the agent's shutdown) stops the private nginx too
        save_spec(layout, spec)
        assert "nginx" in services.shutdown(layout, events.append)["stopped"]
        assert not pid_alive(master) and nginx.master_pid(spec) is None
    finally:
        blue.close()
        green.close()


def test_a_site_nginx_rejects_changes_nothing(site: tuple[Layout, dict[str, Any], Path]) -> None:
    layout, spec, _ = site
    port = spec["web"]["port"]
    blue = Upstream(layout.run / "web-r1.sock", b"blue")
    try:
        os.symlink("web-r1.sock", layout.web_socket)
        nginx.ensure_site(layout, spec, lambda e: None)
        wait_for(lambda: get(port) == (200, b"blue"), 15, "nginx to serve")
        good = nginx.site_path(spec).read_text()
        master = nginx.master_pid(spec)
        broken = {
            **spec,
            "nginx": {
                **spec["nginx"],
                "tls_cert": "/nonexistent/cert.pem",
                "tls_key": "/nonexistent/key.pem",
            },
        }
        with pytest.raises(AgentError) as err:
            nginx.ensure_site(layout, broken, lambda e: None)
        assert err.value.kind == "front" and "/nonexistent/cert.pem" in err.value.message
        assert nginx.site_path(spec).read_text() == good  # the previous site is back
        assert nginx.master_pid(spec) == master and get(port) == (200, b"blue")
    finally:
        blue.close()


def test_stage_nginx_keys_are_checked() -> None:
    stage = Stage(
        hosts=["web1"],
        deploy_to="/srv/demo",
        front="nginx",
        nginx={
            "server_name": "demo.example",
            "tls_cert": "/etc/ssl/c.pem",
            "tls_key": "/etc/ssl/k.pem",
            "static": {"/static/": "static"},
        },
    )
    assert stage.nginx.static == {"/static/": "static"}
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        Stage(hosts=["web1"], deploy_to="/srv/demo", nginx={"tls_cert": "/etc/ssl/c.pem"})
    with pytest.raises(ValueError, match="inside the project"):
        Stage(hosts=["web1"], deploy_to="/srv/demo", nginx={"static": {"/s/": "../etc"}})
    with pytest.raises(ValueError):
        Stage(hosts=["web1"], deploy_to="/srv/demo", nginx={"sever_name": "typo"})


def get_host(port: int, host: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_two_apps_share_one_nginx_by_name_and_one_leaving_keeps_the_other(
    site: tuple[Layout, dict[str, Any], Path],
) -> None:
    """Two deploy roots, one private nginx, routed by server_name (docs/https.md, "Several apps
    on one host"): each writes its own site; a name the other routes is refused; a shutdown of
    one removes its site and reloads, and the last one's stops the nginx."""
    layout, spec, _ = site
    other = Layout(layout.root.parent / "other")
    other.run.mkdir(parents=True)
    other_spec = {
        **spec,
        "app": "shop",
        "nginx": {**spec["nginx"], "server_name": "shop.test", "static": {}},
    }
    port = spec["web"]["port"]
    events: list[Any] = []
    demo = Upstream(layout.run / "web-r1.sock", b"demo")
    shop = Upstream(other.run / "web-r1.sock", b"shop")
    try:
        for root in (layout, other):
            os.symlink("web-r1.sock", root.web_socket)
        nginx.ensure_site(layout, spec, events.append)
        nginx.ensure_site(other, other_spec, events.append)
        master = nginx.master_pid(spec)
        assert get_host(port, "demo.test") == (200, b"demo")
        # nginx -s reload returns before the new workers answer
        wait_for(lambda: get_host(port, "shop.test") == (200, b"shop"), 10, "shop's site")
        routes = nginx.describe(layout, spec)["routes"]
        assert {(r["app"], tuple(r["domains"]), r["root"]) for r in routes} == {
            ("demo", ("demo.test",), str(layout.root)),
            ("shop", ("shop.test",), str(other.root)),
        }
        taken = {**other_spec, "nginx": {**other_spec["nginx"], "server_name": "demo.test"}}
        with pytest.raises(AgentError, match="demo.test is already routed") as err:
            nginx.ensure_site(other, taken, events.append)
        assert err.value.kind == "usage" and "'demo'" in err.value.message
        # demo leaves: its site goes, nginx reloads (same master) and serves shop still
        assert nginx.NginxFront().stop(layout, spec, events.append) == []
        assert not nginx.site_path(spec).exists() and nginx.master_pid(spec) == master
        # (the catch-all is shop's now; workers of the earlier configs finish asynchronously)
        wait_for(lambda: get_host(port, "demo.test") == (200, b"shop"), 10, "demo's site gone")
        assert get_host(port, "shop.test") == (200, b"shop")
        # the last site leaving stops the private nginx
        assert nginx.NginxFront().stop(other, other_spec, events.append) == ["nginx"]
        assert nginx.master_pid(spec) is None
    finally:
        demo.close()
        shop.close()
