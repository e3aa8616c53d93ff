"""Zero-downtime switches: the front's replay of reset connections, deploys and rollbacks under
load through the builtin front and through nginx (the real CLI), and kill -9 at each moment of a
switch.

The load tests are the short form of ``bench/bench_zero_downtime.py`` (whose load generator they
use): >= 2,000 requests across >= 4 switches, every one counted, none may fail.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shiplane.agent import services
from shiplane.agent.errors import AgentError
from shiplane.agent.paths import Layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_zero_downtime as zd

from deployhelp import wait_for

# --- fast: the front replays what a closing server dropped ------------------------------------


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    link = tmp_path / "web.sock"
    port = zd.free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shiplane.agent",
            "proxy",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            str(link),
        ]
    )

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


class _Answering:
    """A unix-socket HTTP server answering every request with ``body``."""

    def __init__(self, path: Path, body: bytes) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(16)
        self.server.settimeout(0.1)  # close() does not wake a blocked accept(): poll a flag
        self.body = body
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
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n"
                    b"\r\n%s" % (len(self.body), self.body)
                )

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.server.close()


def test_a_request_queued_on_a_server_that_closes_its_listener_is_replayed_on_the_new_one(
    proxy: tuple[int, Path], tmp_path: Path
) -> None:
    port, link = proxy
    old = socket.socket(socket.AF_UNIX)  # the old release: listening, never accepting again
    old.bind(str(tmp_path / "old.sock"))
    old.listen(16)
    _point(link, tmp_path / "old.sock")
    new = _Answering(tmp_path / "new.sock", b"new release")
    try:
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        client.request("POST", "/orders", body=b"x" * 1000)  # reset => never read: safe to replay
        # wait until the proxy's upstream connection sits in the old server's listen queue
        wait_for(lambda: _queued(tmp_path / "old.sock") >= 1, 10, "the queued connection")
        _point(link, tmp_path / "new.sock")  # the switch...
        old.close()  # ...and the old server exits: the kernel resets its queued connections
        resp = client.getresponse()
        assert (resp.status, resp.read()) == (200, b"new release")
    finally:
        old.close()
        new.close()


def test_a_post_the_server_read_and_dropped_is_not_replayed(
    proxy: tuple[int, Path], tmp_path: Path
) -> None:
    port, link = proxy
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "a.sock"))
    server.listen(4)
    _point(link, tmp_path / "a.sock")
    seen: list[bytes] = []
    done = threading.Event()

    def read_and_close() -> None:
        server.settimeout(0.1)
        while not done.is_set():  # a replay would arrive as another connection
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:  # the whole request is read (headers and body may come in two writes)
                data = b""
                conn.settimeout(5)
                while b"once" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                seen.append(data)

    thread = threading.Thread(target=read_and_close, daemon=True)
    thread.start()
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    client.request("POST", "/pay", body=b"once")
    # the client sees the close only because the proxy decided not to replay
    with pytest.raises(http.client.RemoteDisconnected):
        client.getresponse()
    done.set()
    thread.join(10)
    server.close()
    # (the fixture's probe connection may show up too, empty)
    assert len([data for data in seen if data]) == 1  # the server may have acted on it: a POST
    # is never sent twice


def _queued(path: Path) -> int:
    """Connections waiting in the accept queue of the listening unix socket ``path`` (``ss``:
    a listener's Recv-Q is its accept queue)."""
    out = subprocess.run(["ss", "-xlnH"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if str(path) in fields:
            return int(fields[2])
    return 0


# --- slow: the real CLI under load -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("front", ["builtin", "nginx"])
def test_deploys_and_rollbacks_under_load_lose_no_request(front: str) -> None:
    if front == "nginx" and shutil.which("nginx") is None:
        pytest.skip("needs nginx")
    base = Path(tempfile.mkdtemp(prefix="shl-zdt-", dir="/tmp"))  # short unix socket paths
    try:
        result = zd.run(
            front,
            switches=4,
            requests=2000,
            threads=4,
            rate=60,
            rest_seconds=2.0,
            max_seconds=300,
            base=base,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert result["failed"] == 0, json.dumps(
        {k: result[k] for k in ("refused", "reset", "timeouts", "non_2xx", "other", "errors")},
        indent=1,
    )
    assert result["requests"] >= 2000 and result["switches"] >= 4
    assert result["releases_seen"] >= 2  # traffic really moved between releases
    # `shiplane status` names the one release serving
    assert re.search(r"live release \d{8}T\d{6}(?:\d{3})?Z-[0-9a-f]{8}", result["status_after"])


# --- slow: kill -9 at each moment of a switch ----------------------------------------------------

ID_A = "20260101T000001Z-aaaaaaa1"
ID_B = "20260101T000002Z-bbbbbbb2"
DIGEST = hashlib.sha256(b"zero-downtime gunicorn").hexdigest()
APP = """
RELEASE = {release!r}

def app(environ, start_response):
    body = b"ok" if environ.get("PATH_INFO") == "/up" else ("release " + RELEASE).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


@pytest.fixture(scope="module")
def crash_root() -> Iterator[tuple[Layout, dict[str, Any]]]:
    base = Path(tempfile.mkdtemp(prefix="shl-crash-", dir="/tmp"))
    layout = Layout(base / "root")
    downloads = base / "dl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "-d",
            str(downloads),
            "supervisor==4.3.0",
        ],
        check=True,
    )
    with zipfile.ZipFile(next(downloads.glob("supervisor-4.3.0-*.whl"))) as zf:
        zf.extractall(layout.tools / "supervisor-4.3.0")
    venv = layout.venv(DIGEST)
    subprocess.run(["uv", "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    subprocess.run(
        ["uv", "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "gunicorn"],
        check=True,
    )
    for rid in (ID_A, ID_B):
        rel = layout.release(rid)
        rel.mkdir(parents=True)
        (rel / "app.py").write_text(APP.format(release=rid))
        (rel / "shiplane.env").touch(mode=0o600)
        (rel / "release.json").write_text(
            json.dumps(
                {
                    "release_id": rid,
                    "dependency_digest": DIGEST,
                    "stage": "test",
                    "state": "prepared",
                }
            )
        )
    spec = {
        "app": "crash",
        "stage": "test",
        "front": "builtin",
        "backend": "daemon",
        "web": {
            "kind": "wsgi",
            "target": "app:app",
            "workers": 2,
            "bind": "127.0.0.1",
            "port": zd.free_port(),
            "timeout": 30,
            "graceful_timeout": 5,
            "drain": 0.5,
            "health": {"path": "/up", "timeout": 30},
            "smoke": [],
        },
        "workers": {},
    }
    try:
        services.switch(layout, ID_A, spec, lambda e: None)
        yield layout, spec
    finally:
        if (layout.run / "supervisord.sock").exists():
            services.shutdown(layout, lambda e: None)
        shutil.rmtree(base, ignore_errors=True)


def _web_pid(layout: Layout, rid: str) -> int | None:
    for entry in services.status(layout)["services"]:
        if (
            entry["name"] == "web"
            and entry["release"] == rid
            and entry["state"] == "RUNNING"
            and entry["pid"]
        ):
            return int(entry["pid"])
    return None


def _serving(layout: Layout, port: int) -> str | None:
    """The one release this host serves, when everything agrees; else None."""
    status = services.status(layout)
    running = [
        s
        for s in status["services"]
        if s["name"] == "web" and s["state"] == "RUNNING" and s["live"]
    ]  # beside it, at most the idle standby
    if len(running) != 1:
        return None
    try:
        code, body = zd_get(port)
    except OSError:
        return None
    live = status["live_release"]
    if code != 200 or body != f"release {live}" or status["current"] != live:
        return None
    return str(live)


def zd_get(port: int) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


MOMENTS = [  # (the event the switch emits, whose server is killed then, standby on)
    ("health", "new", False),  # the candidate is starting, before its health check passed
    ("health", "old", False),
    ("live", "new", False),  # right after the flip, before the old one is stopped
    ("live", "old", False),
    ("drain", "new", False),  # while the old one drains
    ("drain", "old", False),
    ("stop", "new", False),  # while the old one is being stopped (TERM sent)
    ("stop", "old", False),
    ("health", "new", True),  # with a standby: the old server stays up, idle
    ("health", "old", True),
    ("live", "new", True),
    ("live", "old", True),  # the fresh standby dies: its manager restarts it
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("moment", "victim", "standby"),
    MOMENTS,
    ids=[f"{m}-{v}{'-standby' if s else ''}" for m, v, s in MOMENTS],
)
def test_kill_9_at_each_moment_of_a_switch_ends_with_one_healthy_release(
    crash_root: tuple[Layout, dict[str, Any]], moment: str, victim: str, standby: bool
) -> None:
    layout, spec = crash_root
    spec = {**spec, "web": {**spec["web"], "standby": standby}}
    port = spec["web"]["port"]
    old = wait_for(lambda: _serving(layout, port), 60, "one release serving before the switch")
    new = ID_B if old == ID_A else ID_A
    killed: list[int] = []

    def kill(rid: str) -> None:
        pid = wait_for(lambda: _web_pid(layout, rid), 30, f"{rid}'s server to run")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    def emit(event: dict[str, Any]) -> None:
        if event.get("status") == moment and not killed:
            target = new if victim == "new" else old
            if moment == "stop" and victim == "old":
                # killed a moment after supervisord sent it TERM, while it finishes requests
                pid = wait_for(lambda: _web_pid(layout, old), 30, "the old server's pid")
                threading.Timer(0.05, _kill_quiet, [pid]).start()
                killed.append(pid)
            else:
                kill(target)

    error = ""
    try:
        try:
            result: dict[str, Any] | None = services.switch(layout, new, spec, emit)
        except AgentError as exc:  # allowed only if the host still serves one release
            result, error = None, exc.message
        assert killed, f"the switch never emitted {moment!r}"
        serving = wait_for(lambda: _serving(layout, port), 60, "exactly one healthy release")
        if result is not None:
            assert serving == new == result["current"]
        else:
            assert serving in (old, new), error
        assert services.status(layout)["live_release"] == serving
    finally:
        for pid in killed:  # the killed master's workers, orphaned: they exit by themselves
            _kill_group(pid)  # within gunicorn's timeout; do not leave them to chance


def _kill_group(pgid: int) -> None:
    """Kill what is left of the process group the killed gunicorn master led."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return


def _kill_quiet(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- workers: restarted after the web switch, a stubborn one killed after its grace period ------

STUBBORN = "trap '' TERM; echo up; while true; do sleep 0.1; done"  # TERM ignored, inherited
POLITE = "trap 'exit 0' INT; while true; do sleep 0.1; done"


@pytest.mark.slow
def test_workers_restart_on_the_new_release_and_a_stubborn_one_is_killed_and_reported(
    crash_root: tuple[Layout, dict[str, Any]],
) -> None:
    layout, base_spec = crash_root
    spec = {
        **base_spec,
        "workers": {
            "stubborn": {"command": STUBBORN, "stop_signal": "TERM", "stop_timeout": 1},
            "polite": {"command": POLITE, "stop_signal": "INT", "stop_timeout": 10},
        },
    }
    port = spec["web"]["port"]
    try:
        first = wait_for(lambda: _serving(layout, port), 60, "one release serving")
        other = ID_B if first == ID_A else ID_A
        services.switch(layout, other, spec, lambda e: None)

        def workers_running() -> dict[str, Any]:
            entries = {
                s["name"]: s
                for s in services.status(layout)["services"]
                if s["name"] in ("stubborn", "polite") and s["state"] == "RUNNING"
            }
            return entries if len(entries) == 2 else {}

        before = wait_for(workers_running, 30, "both workers running")
        events: list[dict[str, Any]] = []
        started = time.monotonic()
        result = services.switch(layout, first, spec, events.append)
        assert [k["service"] for k in result["killed"]] == ["stubborn"]
        assert result["killed"][0]["pid"] == before["stubborn"]["pid"]
        assert result["killed"][0]["seconds"] >= 1  # its grace period ran out first
        assert any(e.get("status") == "killed" and "stubborn" in e["detail"] for e in events)
        assert time.monotonic() - started < 30
        after = wait_for(workers_running, 30, "both workers running again")
        assert {n: s["release"] for n, s in after.items()} == {"stubborn": first, "polite": first}
        assert all(after[n]["pid"] != before[n]["pid"] for n in after)
        assert _serving(layout, port) == first
    finally:
        # back to no workers (a switch removes the ones the spec no longer has)
        live = services.status(layout)["live_release"]
        services.switch(layout, live, base_spec, lambda e: None)
        assert [s["name"] for s in services.status(layout)["services"]] == ["front", "web"]
