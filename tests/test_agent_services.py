"""The host agent's services: supervisord, blue/green switch, health/smoke checks, the front proxy.

The slow tests build a deploy root by hand (a real venv with gunicorn, releases with a tiny WSGI
app, supervisor unpacked into tools/) and drive real supervisord, gunicorn and the builtin proxy.
"""

from __future__ import annotations

import configparser
import hashlib
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deployhelp import wait_for
from shiplane.agent import services
from shiplane.agent.errors import AgentError
from shiplane.agent.paths import Layout
from shiplane.agent.supervisor import pid_alive, program_conf

ID1 = "20260101T000001Z-aaaaaaa1"
ID2 = "20260101T000002Z-aaaaaaa2"
ID3 = "20260101T000005Z-aaaaaaa5"
ID_UNHEALTHY = "20260101T000003Z-bbbbbbb3"
ID_NO_SMOKE = "20260101T000004Z-ccccccc4"
DIGEST = hashlib.sha256(b"gunicorn").hexdigest()

APP = """
RELEASE = {release!r}
MODE = {mode!r}

def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/up":
        status = "500 Internal Server Error" if MODE == "unhealthy" else "200 OK"
        body = b"unhealthy: database gone" if MODE == "unhealthy" else b"ok"
    else:
        status = "200 OK"
        body = (b"it works" if MODE == "no-smoke" else ("release " + RELEASE).encode())
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""

# The worker's command holds '%', '#' and quotes: it must reach sh unchanged through the conf.
WORKER = (
    'echo "$SHIPLANE_RELEASE 100% # up" >> "$SHIPLANE_ROOT/log/worker-seen.txt"; exec sleep 600'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str = "/", timeout: float = 10.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def try_get(port: int) -> str | None:
    try:
        status, body = get(port, timeout=3)
    except OSError:
        return None
    return body if status == 200 else None


# --- fast: conf quoting and the proxy alone ----------------------------------------------------


def test_program_conf_round_trips_awkward_commands_through_supervisord_parsing() -> None:
    argv = [
        "/opt/my app/python",
        "-c",
        "print('100%') ; # not a comment",
        "--flag=a;b",
        "#x",
        "%(ENV_HOME)s",
    ]
    text = program_conf("worker", argv, {"stdout_logfile": "/srv/app 100%/log/w.log"}, {"k": 1})
    # supervisord's parser: inline comments after whitespace, '%' expansion, then shlex.split
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"))
    parser.read_string(text)
    command = parser.get("program:worker", "command").replace("%%", "%")
    assert shlex.split(command) == argv
    logfile = parser.get("program:worker", "stdout_logfile").replace("%%", "%")
    assert logfile == "/srv/app 100%/log/w.log"
    with pytest.raises(AgentError):
        program_conf("worker", ["x"], {"stdout_logfile": "/srv/a ;b"})
    with pytest.raises(AgentError):
        program_conf("bad name", ["x"], {})


@pytest.fixture
def proxy_to(tmp_path: Path) -> Iterator[Callable[[Path], int]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(upstream: Path) -> int:
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shiplane.agent",
                "proxy",
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                str(upstream),
            ]
        )
        procs.append(proc)

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(listening, 10, "the proxy to listen")
        return port

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_proxy_waits_for_a_late_upstream_and_passes_half_close(
    proxy_to: Callable[[Path], int], tmp_path: Path
) -> None:
    upstream = tmp_path / "web.sock"
    port = proxy_to(upstream)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    payload = os.urandom(300_000)
    client.sendall(payload)
    client.shutdown(socket.SHUT_WR)  # half-close: the answer must still come back

    # The upstream appears only now; the proxy retries its connect in the meantime.
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "real.sock"))
    os.symlink("real.sock", upstream)
    server.listen()

    def serve() -> None:  # every connection: read to EOF, answer with the digest of the bytes
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            got = b""
            while chunk := conn.recv(65536):
                got += chunk
            try:
                conn.sendall(hashlib.sha256(got).hexdigest().encode())
            except OSError:
                pass  # e.g. the fixture's probe connection, long gone
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    answer = b""
    while chunk := client.recv(65536):
        answer += chunk
    client.close()
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    assert answer.decode() == hashlib.sha256(payload).hexdigest()


def test_proxy_answers_502_when_no_upstream(
    proxy_to: Callable[[Path], int], tmp_path: Path
) -> None:
    port = proxy_to(tmp_path / "missing.sock")
    status, body = get(port)
    assert status == 502 and "no upstream" in body


# --- slow: a real deploy root ----------------------------------------------------------------


def make_release(layout: Layout, release_id: str, mode: str = "ok") -> None:
    rel = layout.release(release_id)
    rel.mkdir(parents=True)
    (rel / "app.py").write_text(APP.format(release=release_id, mode=mode))
    env = rel / "shiplane.env"
    env.touch(mode=0o600)
    meta = {
        "release_id": release_id,
        "dependency_digest": DIGEST,
        "source": "tree",
        "stage": "test",
        "state": "prepared",
    }
    (rel / "release.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Layout]:
    base = tmp_path_factory.mktemp("svc")
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
    wheel = next(downloads.glob("supervisor-4.3.0-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(layout.tools / "supervisor-4.3.0")
    venv = layout.venv(DIGEST)
    subprocess.run(["uv", "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    subprocess.run(
        ["uv", "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "gunicorn"],
        check=True,
    )
    for release_id, mode in [
        (ID1, "ok"),
        (ID2, "ok"),
        (ID3, "ok"),
        (ID_UNHEALTHY, "unhealthy"),
        (ID_NO_SMOKE, "no-smoke"),
    ]:
        make_release(layout, release_id, mode)
    yield layout
    if (layout.run / "supervisord.sock").exists():
        services.shutdown(layout, lambda e: None)


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return {
        "app": "demo",
        "stage": "test",
        "front": "builtin",
        "web": {
            "kind": "wsgi",
            "target": "app:app",
            "workers": 2,
            "worker_class": None,
            "bind": "127.0.0.1",
            "port": free_port(),
            "timeout": 30,
            "graceful_timeout": 10,
            "health": {"path": "/up", "timeout": 15},
            "smoke": [{"path": "/", "expect": "release", "status": 200}],
        },
        "workers": {"worker": {"command": WORKER, "stop_signal": "TERM", "stop_timeout": 5}},
    }


def web_entry(layout: Layout) -> dict[str, Any]:
    """The live release's web server (a standby may run beside it)."""
    [web] = [s for s in services.status(layout)["services"] if s["name"] == "web" and s["live"]]
    return web


@pytest.mark.slow
def test_status_when_nothing_was_ever_started(root: Layout) -> None:
    status = services.status(root)
    assert status["services"] == [] and status["live_release"] is None
    assert status["supervisord"]["running"] is False


@pytest.mark.slow
def test_first_switch_serves_the_release_and_points_current_at_it(
    root: Layout, spec: dict[str, Any]
) -> None:
    events: list[dict[str, Any]] = []
    result = services.switch(root, ID1, spec, events.append)
    assert result["current"] == ID1 and result["previous"] is None
    port = spec["web"]["port"]
    assert wait_for(lambda: try_get(port), 15, "the front to serve") == f"release {ID1}"
    assert os.readlink(root.current) == f"releases/{ID1}"
    status = services.status(root)
    assert status["live_release"] == ID1
    by_name = {s["name"]: s for s in status["services"]}
    assert by_name["web"]["live"] and by_name["web"]["pid"] and by_name["web"]["release"] == ID1
    wait_for(lambda: web_entry(root)["state"] == "RUNNING", 10, "supervisord to call web RUNNING")
    assert by_name["worker"]["release"] == ID1
    assert by_name["front"]["pid"]
    seen = root.log / "worker-seen.txt"
    wait_for(seen.exists, 15, "the worker to start")
    assert seen.read_text().splitlines()[0] == f"{ID1} 100% # up"
    assert any(e.get("status") == "healthy" for e in events)
    assert services.logs(root, "web", 50, False, events.append)["lines"]


@pytest.mark.slow
def test_switch_keeps_the_old_server_as_standby_and_switching_back_starts_nothing(
    root: Layout, spec: dict[str, Any]
) -> None:
    first_pid = web_entry(root)["pid"]
    result = services.switch(root, ID2, spec, lambda e: None)
    assert result == {**result, "previous": ID1, "current": ID2, "standby": ID1, "stopped": []}
    assert try_get(spec["web"]["port"]) == f"release {ID2}"
    assert os.readlink(root.current) == f"releases/{ID2}"
    webs = {s["release"]: s for s in services.status(root)["services"] if s["name"] == "web"}
    assert webs[ID1]["standby"] and webs[ID1]["pid"] == first_pid and not webs[ID1]["live"]
    assert webs[ID2]["live"] and not webs[ID2]["standby"]
    worker = next(s for s in services.status(root)["services"] if s["name"] == "worker")
    assert worker["release"] == ID2

    events: list[dict[str, Any]] = []
    back = services.switch(root, ID1, spec, events.append)  # what a rollback does
    assert not any(e.get("status") == "start" and "web-" in str(e.get("detail")) for e in events)
    assert back["standby"] == ID2 and back["seconds"] < 2
    assert web_entry(root)["pid"] == first_pid  # the very process that served before
    assert try_get(spec["web"]["port"]) == f"release {ID1}"
    services.switch(root, ID2, spec, lambda e: None)


@pytest.mark.slow
def test_without_standby_the_old_server_is_retired_after_the_switch(
    root: Layout, spec: dict[str, Any]
) -> None:
    cold = {**spec, "web": {**spec["web"], "standby": False, "drain": 0.2}}
    result = services.switch(root, ID1, cold, lambda e: None)
    assert result == {**result, "previous": ID2, "current": ID1, "standby": None}
    assert result["stopped"] == [f"web-{ID2}"]
    result = services.switch(root, ID2, cold, lambda e: None)
    assert result["stopped"] == [f"web-{ID1}"]
    assert try_get(spec["web"]["port"]) == f"release {ID2}"
    programs = [s["program"] for s in services.status(root)["services"]]
    assert f"web-{ID1}" not in programs and f"web-{ID2}" in programs
    assert not root.release_socket(ID1).exists()


@pytest.mark.slow
def test_a_third_release_retires_the_oldest_standby(root: Layout, spec: dict[str, Any]) -> None:
    services.switch(root, ID1, spec, lambda e: None)  # ID2 becomes the standby
    services.switch(root, ID2, spec, lambda e: None)  # ID1 the standby
    result = services.switch(root, ID3, spec, lambda e: None)
    assert result == {**result, "previous": ID2, "standby": ID2, "stopped": [f"web-{ID1}"]}
    webs = {s["release"] for s in services.status(root)["services"] if s["name"] == "web"}
    assert webs == {ID2, ID3}
    assert not root.release_socket(ID1).exists()
    services.switch(root, ID2, spec, lambda e: None)


@pytest.mark.slow
def test_unhealthy_release_is_refused_and_the_live_one_keeps_serving(
    root: Layout, spec: dict[str, Any]
) -> None:
    bad = json.loads(json.dumps(spec))
    bad["web"]["health"]["timeout"] = 3
    with pytest.raises(AgentError) as err:
        services.switch(root, ID_UNHEALTHY, bad, lambda e: None)
    assert err.value.kind == "health"
    assert "500" in err.value.message and "database gone" in err.value.message
    assert try_get(spec["web"]["port"]) == f"release {ID2}"
    assert os.readlink(root.current) == f"releases/{ID2}"
    assert f"web-{ID_UNHEALTHY}" not in [s["program"] for s in services.status(root)["services"]]
    assert not root.release_socket(ID_UNHEALTHY).exists()


@pytest.mark.slow
def test_smoke_failure_is_refused_before_it_takes_traffic(
    root: Layout, spec: dict[str, Any]
) -> None:
    with pytest.raises(AgentError) as err:
        services.switch(root, ID_NO_SMOKE, spec, lambda e: None)
    assert err.value.kind == "smoke"
    assert "'release'" in err.value.message and "it works" in err.value.message
    assert try_get(spec["web"]["port"]) == f"release {ID2}"
    assert services.status(root)["live_release"] == ID2


@pytest.mark.slow
def test_a_killed_web_server_is_restarted(root: Layout, spec: dict[str, Any]) -> None:
    old_pid = web_entry(root)["pid"]
    os.kill(old_pid, signal.SIGKILL)

    def restarted() -> bool:
        web = web_entry(root)
        return bool(web["state"] == "RUNNING" and web["pid"] not in (None, old_pid))

    wait_for(restarted, 30, "supervisord to restart gunicorn")
    assert wait_for(lambda: try_get(spec["web"]["port"]), 15, "serving again") == f"release {ID2}"


@pytest.mark.slow
def test_switching_under_load_loses_no_request(root: Layout, spec: dict[str, Any]) -> None:
    port = spec["web"]["port"]
    stop = threading.Event()
    lock = threading.Lock()
    seen: dict[str, int] = {}
    failures: list[str] = []
    deadline = time.monotonic() + 30

    def load() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                if sum(seen.values()) + len(failures) >= 3000:
                    return
            try:
                status, body = get(port)
                ok = status == 200
            except OSError as exc:
                ok, body = False, repr(exc)
            with lock:
                if ok:
                    seen[body] = seen.get(body, 0) + 1
                else:
                    failures.append(body)
            stop.wait(0.02)  # pacing, so the request budget spans all four switches

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for n, release_id in enumerate((ID1, ID2, ID1, ID2)):
            # load runs before and between all four switches (a switch to the standby is quick)
            wait_for(lambda n=n: sum(seen.values()) >= 75 * (n + 1), 20, "requests to go through")
            services.switch(root, release_id, spec, lambda e: None)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert set(seen) == {f"release {ID1}", f"release {ID2}"}
    assert sum(seen.values()) >= 300  # real load ran through all four switches
    assert services.status(root)["live_release"] == ID2


@pytest.mark.slow
def test_stop_then_start_brings_the_live_release_back(root: Layout, spec: dict[str, Any]) -> None:
    port = spec["web"]["port"]
    stopped = services.stop(root, ["web"], lambda e: None)["stopped"]
    assert sorted(stopped) == [f"web-{ID1}", f"web-{ID2}"]  # the live server and the standby
    assert web_entry(root)["state"] == "STOPPED"
    assert get(port)[0] == 502  # the front is still up and says so, after its retry window
    services.start(root, None, None, lambda e: None)  # the spec saved by the last switch
    assert try_get(port) == f"release {ID2}"


@pytest.mark.slow
def test_reload_replaces_web_workers_and_restart_replaces_the_worker(
    root: Layout, spec: dict[str, Any]
) -> None:
    master = web_entry(root)["pid"]
    before = _descendants({master}) - {master}
    services.reload(root, ["web"], lambda e: None)

    def replaced() -> bool:
        now = _descendants({master}) - {master}
        return bool(now) and not now & before

    wait_for(replaced, 30, "gunicorn to replace its workers")
    assert web_entry(root)["pid"] == master
    assert try_get(spec["web"]["port"]) == f"release {ID2}"

    def worker_pid() -> int | None:
        entry = next(s for s in services.status(root)["services"] if s["name"] == "worker")
        return entry["pid"] if entry["state"] in ("STARTING", "RUNNING") else None

    old = worker_pid()
    services.restart(root, ["worker"], None, lambda e: None)
    assert wait_for(worker_pid, 15, "the worker to run again") != old


def _descendants(pids: set[int]) -> set[int]:
    """``pids`` and all their children, from /proc."""
    found = set(pids)
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    changed = True
    while changed:
        new = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= new
        changed = bool(new)
    return found


@pytest.mark.slow
def test_a_keep_alive_client_moves_to_the_new_release_while_the_old_one_stands_by(
    root: Layout, spec: dict[str, Any]
) -> None:
    """gthread (like uvicorn) keeps connections open: a busy client's connection through the
    front is pinned to the server it reached. The standby must not keep serving it old code."""
    threaded = {**spec, "web": {**spec["web"], "worker_class": "gthread"}}
    for release in (ID2, ID1):  # both run gthread now (a changed program is restarted)
        services.switch(root, release, threaded, lambda e: None)
    port = spec["web"]["port"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def ask() -> str:
        for _ in range(2):  # a closed keep-alive connection is reopened once, as clients do
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                return resp.read().decode()
            except (http.client.RemoteDisconnected, ConnectionError):
                conn.close()
        raise AssertionError("the front refused a reconnect")

    try:
        assert ask() == f"release {ID1}"
        services.switch(root, ID2, threaded, lambda e: None)
        deadline = time.monotonic() + 10
        bodies = [ask()]
        while bodies[-1] != f"release {ID2}" and time.monotonic() < deadline:
            bodies.append(ask())  # one connection, kept busy: it never idles out
        assert bodies[-1] == f"release {ID2}", bodies[-5:]
        standby = [s for s in services.status(root)["services"] if s.get("standby")]
        assert [s["release"] for s in standby] == [ID1]
    finally:
        conn.close()
        services.switch(root, ID2, spec, lambda e: None)


@pytest.mark.slow
def test_a_port_held_by_another_program_fails_the_switch_and_changes_nothing(
    root: Layout, spec: dict[str, Any]
) -> None:
    """The front's port taken by someone else: the front cannot listen, so nothing of ours
    would answer there. The switch says so instead of reporting success."""
    live = services.status(root)["live_release"]
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = {**spec, "web": {**spec["web"], "port": squatter.getsockname()[1]}}
    other = ID1 if live == ID2 else ID2
    try:
        with pytest.raises(AgentError) as err:
            services.switch(root, other, taken, lambda e: None)
        assert err.value.kind == "front"
        assert f"127.0.0.1:{taken['web']['port']}" in err.value.message
        assert "in use" in err.value.message
        assert services.status(root)["live_release"] == live
    finally:
        squatter.close()
        services.switch(root, live, spec, lambda e: None)  # the front back on its own port
    assert try_get(spec["web"]["port"]) == f"release {live}"


@pytest.mark.slow
def test_shutdown_leaves_no_process_behind(root: Layout, spec: dict[str, Any]) -> None:
    status = services.status(root)
    sup_pid = status["supervisord"]["pid"]
    pids = _descendants({sup_pid} | {s["pid"] for s in status["services"] if s["pid"]})
    assert len(pids) >= 5  # supervisord, front, gunicorn master + 2 workers, worker
    result = services.shutdown(root, lambda e: None)
    assert result["supervisord_pid"] == sup_pid
    assert [pid for pid in pids if pid_alive(pid)] == []
    after = services.status(root)
    assert after["services"] == [] and after["supervisord"]["running"] is False
    assert after["live_release"] == ID2  # the links stay: start brings the same release back
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", spec["web"]["port"]), timeout=2).close()
