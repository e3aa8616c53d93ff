"""The systemd backend's units: generated, checked by ``systemd-analyze verify``, and the front's
socket activation run for real.

These machines do not run systemd as PID 1, so nothing here starts a unit: the units are written
to a temp dir and verified (which also checks that each ExecStart binary exists), and the builtin
proxy is run the way ``<app>-front.socket`` would start it, with the listening socket as fd 3.
"""

from __future__ import annotations

import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shiplane.agent import caddy, caddyunit, services, systemd
from shiplane.agent.errors import AgentError
from shiplane.agent.paths import Layout
from shiplane.agent.systemd import (
    ROOT_APP_WARNING,
    SystemdBackend,
    app_user,
    render_units,
    systemd_running,
)

RID = "20260101T000001Z-aaaaaaa1"
# a uid and gid with no passwd/group entry: what a deploy root given to a deploy user looks like
# to the agent (root), without creating a user on the test machine
APP_UID = 4242
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, app_user)")
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)
WORKER = 'echo "100% done; $HOME" \\ # not a comment'


def spec(front: str = "builtin", backend: str = "systemd") -> dict[str, Any]:
    return {
        "app": "demo",
        "stage": "prod",
        "front": front,
        "backend": backend,
        "web": {
            "kind": "wsgi",
            "target": "demo:create_app()",
            "workers": 3,
            "bind": "0.0.0.0",
            "port": 8123,
            "timeout": 30,
            "graceful_timeout": 12,
            "health": {"path": "/up", "timeout": 5},
            "smoke": [],
        },
        "workers": {"jobs": {"command": WORKER, "stop_signal": "INT", "stop_timeout": 7}},
    }


def exec_argv(unit_text: str) -> list[str]:
    """The ExecStart argv as systemd reads it (our quoting only uses what shlex also reads)."""
    [line] = [ln for ln in unit_text.splitlines() if ln.startswith("ExecStart=")]
    return shlex.split(line[len("ExecStart=") :].replace("%%", "%").replace("$$", "$"))


def option(unit_text: str, key: str) -> str:
    [value] = re.findall(rf"^{key}=(.*)$", unit_text, re.MULTILINE)
    return value


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A deploy root short enough for unix socket paths (pytest's tmp_path is not)."""
    path = Path(tempfile.mkdtemp(prefix="shl-u-", dir="/tmp")) / "srv 100%"
    yield path
    shutil.rmtree(path.parent)


def write_units(unit_dir: Path, written: dict[str, str]) -> dict[str, str]:
    """The units in ``unit_dir``, the web template also as its instance for ``RID``."""
    unit_dir.mkdir(exist_ok=True)
    for name, text in written.items():
        (unit_dir / name).write_text(text)
        if name.endswith("@.service"):
            (unit_dir / name.replace("@.service", f"@{RID}.service")).write_text(text)
    return written


@pytest.fixture
def units(tmp_path: Path, short_root: Path) -> dict[str, str]:
    return write_units(tmp_path / "units", render_units(Layout(short_root), spec(), RID))


@pytest.fixture
def app_root(short_root: Path) -> Path:
    """A deploy root owned by an unprivileged user (``APP_UID``), as ``shiplane setup`` leaves it."""
    short_root.mkdir(parents=True)
    os.chown(short_root, APP_UID, APP_UID)
    return short_root


def verify(unit_dir: Path, *names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", *[str(unit_dir / n) for n in names]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_generated_units_pass_systemd_analyze_verify(units: dict[str, str], tmp_path: Path) -> None:
    assert sorted(units) == [
        "demo-prod-front.service",
        "demo-prod-front.socket",
        "demo-prod-jobs.service",
        "demo-prod-web@.service",
    ]
    done = verify(
        tmp_path / "units",
        f"demo-prod-web@{RID}.service",
        "demo-prod-front.socket",
        "demo-prod-front.service",
        "demo-prod-jobs.service",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # and verify does catch a unit systemd would refuse
    broken = units["demo-prod-jobs.service"].replace(sys.executable, "/nonexistent/python3")
    (tmp_path / "units" / "demo-prod-broken.service").write_text(broken)
    assert verify(tmp_path / "units", "demo-prod-broken.service").returncode != 0


# --- least privilege (issue 20) -------------------------------------------------------------


def exposure(unit_file: Path) -> float:
    """``systemd-analyze security``'s overall exposure for a unit file (0 safe .. 10 unsafe)."""
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", done.stdout)
    assert found, done.stdout + done.stderr
    return float(found.group(1))


SERVICES = [f"demo-prod-web@{RID}.service", "demo-prod-jobs.service", "demo-prod-front.service"]


@needs_analyze
@needs_root
def test_units_run_as_the_deploy_roots_owner_and_are_rated_ok(
    app_root: Path, tmp_path: Path
) -> None:
    layout = Layout(app_root)
    run_as = app_user(layout)
    assert run_as is not None and (run_as.uid, run_as.gid) == (APP_UID, APP_UID)
    written = write_units(tmp_path / "units", render_units(layout, spec(), RID, run_as=run_as))
    done = verify(tmp_path / "units", *SERVICES, "demo-prod-front.socket")
    assert done.returncode == 0, done.stdout + done.stderr
    for name in SERVICES:
        text = (tmp_path / "units" / name).read_text()
        assert (option(text, "User"), option(text, "Group")) == (str(APP_UID), str(APP_UID))
        # 9.6 "UNSAFE" before issue 20; "OK" is <= 4.9
        assert exposure(tmp_path / "units" / name) <= 4.9, name
    assert "User=" not in written["demo-prod-front.socket"]  # systemd binds the port


@needs_analyze
def test_a_root_owned_deploy_root_keeps_root_but_the_sandbox_still_rates_ok(
    units: dict[str, str], tmp_path: Path
) -> None:
    for name in SERVICES:
        assert "User=" not in (tmp_path / "units" / name).read_text()
        assert exposure(tmp_path / "units" / name) <= 4.9, name


def test_system_units_are_sandboxed_to_the_deploy_root(
    units: dict[str, str], short_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("demo-prod-web@.service", "demo-prod-jobs.service", "demo-prod-front.service"):
        text = units[name]
        assert option(text, "NoNewPrivileges") == "yes"
        assert option(text, "ProtectSystem") == "strict"
        # one word of a path list: quoted (the root has a space), % escaped
        assert option(text, "ReadWritePaths") == '"' + str(short_root).replace("%", "%%") + '"'
        assert option(text, "PrivateTmp") == option(text, "PrivateDevices") == "yes"
        assert option(text, "CapabilityBoundingSet") == ""
        assert option(text, "SystemCallFilter") == "@system-service"
        assert option(text, "RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"
        assert "MemoryDenyWriteExecute" not in text  # cffi callbacks, JITs
    # homes are hidden, unless the deploy root or the Python running the units lies in one
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    assert (
        option(
            render_units(Layout("/srv/demo"), spec(), RID)["demo-prod-web@.service"], "ProtectHome"
        )
        == "yes"
    )
    under_home = render_units(Layout("/home/deploy/demo"), spec(), RID)
    assert option(under_home["demo-prod-jobs.service"], "ProtectHome") == "read-only"
    assert option(under_home["demo-prod-jobs.service"], "ReadWritePaths") == "/home/deploy/demo"
    monkeypatch.setattr(sys, "executable", "/root/.pyenv/versions/3.11.7/bin/python3")
    pyenv = render_units(Layout("/srv/demo"), spec(), RID)
    assert option(pyenv["demo-prod-front.service"], "ProtectHome") == "read-only"


def test_user_units_have_no_user_and_only_unprivileged_hardening_without_user_namespaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(systemd, "user_namespaces", lambda: False)
    written = render_units(Layout(tmp_path / "srv"), spec(), RID, user=True)
    for name in ("demo-prod-web@.service", "demo-prod-jobs.service", "demo-prod-front.service"):
        text = written[name]
        assert "User=" not in text and "Group=" not in text
        assert option(text, "NoNewPrivileges") == "yes"
        assert option(text, "SystemCallFilter") == "@system-service"
        # the namespace options would fail the unit where no user namespace may be made
        assert "ProtectSystem=" not in text and "PrivateTmp=" not in text
        assert "PrivateUsers=" not in text
    backend = SystemdBackend(Layout(tmp_path), spec(), unit_dir=tmp_path, user=True)
    assert backend.run_as is None
    # and the deploy says so, once per prepare
    monkeypatch.setattr(systemd, "systemd_running", lambda: True)
    monkeypatch.setattr(backend, "systemctl", lambda *a, **k: None)
    events: list[dict[str, Any]] = []
    backend.prepare(spec(), events.append)
    assert systemd.PARTIAL_SANDBOX_WARNING in [e.get("detail") for e in events]


@needs_analyze
def test_user_units_get_the_whole_sandbox_in_a_user_namespace_and_are_rated_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deploy user's path (``setup``, then deploys that run nothing as root): its ``--user``
    units rated "OK" like root's system units (6.4 "MEDIUM" with seccomp alone)."""
    monkeypatch.setattr(systemd, "user_namespaces", lambda: True)
    root = tmp_path / "srv"
    written = write_units(tmp_path / "units", render_units(Layout(root), spec(), RID, user=True))
    for name in SERVICES:
        text = (tmp_path / "units" / name).read_text()
        assert "User=" not in text and "CapabilityBoundingSet" not in text
        assert option(text, "PrivateUsers") == "yes"
        assert option(text, "ProtectSystem") == "strict"
        assert option(text, "ReadWritePaths") == str(root)
        assert exposure(tmp_path / "units" / name) <= 4.9, name
    assert "PrivateUsers=" not in written["demo-prod-front.socket"]
    backend = SystemdBackend(Layout(root), spec(), unit_dir=tmp_path / "units", user=True)
    monkeypatch.setattr(systemd, "systemd_running", lambda: True)
    monkeypatch.setattr(backend, "systemctl", lambda *a, **k: None)
    events: list[dict[str, Any]] = []
    backend.prepare(spec(), events.append)
    assert systemd.PARTIAL_SANDBOX_WARNING not in [e.get("detail") for e in events]


HOST_PYTHON = "/usr/bin/python3"  # the agent runs on the host's own Python, one nobody may run


@needs_root
@pytest.mark.skipif(not os.access(HOST_PYTHON, os.X_OK), reason=f"needs {HOST_PYTHON}")
def test_user_namespaces_are_asked_of_the_kernel_as_the_unprivileged_user() -> None:
    """The probe, run as ``nobody``: it agrees with util-linux's own verdict on this kernel."""
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(
        [
            *as_nobody,
            HOST_PYTHON,
            "-S",
            "-c",
            "from shiplane.agent.systemd import user_namespaces; print(user_namespaces())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(Path(systemd.__file__).parents[2])},
    )
    assert probe.returncode == 0, probe.stderr
    kernel = subprocess.run(
        [
            *as_nobody,
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "--",
            "sh",
            "-c",
            "mount -t tmpfs none /tmp",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert probe.stdout.strip() == str(kernel.returncode == 0)


@needs_root
def test_the_app_user_gets_its_env_file_and_what_it_writes(
    app_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout(app_root)
    env_file = layout.env_file(RID)
    env_file.parent.mkdir(parents=True)
    env_file.write_text('SECRET="x"\n')
    env_file.chmod(0o600)
    (layout.shared / "db").mkdir(parents=True)
    (layout.shared / "db" / "app.sqlite3").write_text("")  # a root hook's migration made it
    (layout.shared / "theirs").write_text("")
    os.chown(layout.shared / "theirs", 1234, 1234)
    layout.run.mkdir()
    monkeypatch.setattr(systemd, "systemd_running", lambda: True)
    calls: list[tuple[str, ...]] = []
    backend = SystemdBackend(layout, spec(), unit_dir=tmp_path / "units", user=False)
    monkeypatch.setattr(backend, "systemctl", lambda *a, **k: calls.append(a))
    events: list[dict[str, Any]] = []
    backend.prepare(spec(), events.append)
    assert not [e for e in events if e.get("status") == "warning"]
    backend.start_web(RID, spec()["web"], events.append)
    st = env_file.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (APP_UID, APP_UID, 0o600)
    assert env_file.parent.stat().st_uid == 0  # the code stays root's: read-only to the app
    for path in (layout.run, layout.shared, layout.shared / "db", layout.shared / "db/app.sqlite3"):
        assert path.stat().st_uid == APP_UID, path
    assert (layout.shared / "theirs").stat().st_uid == 1234  # another user's file stays theirs
    web = (tmp_path / "units" / "demo-prod-web@.service").read_text()
    assert option(web, "User") == str(APP_UID)
    assert ("start", "--no-block", f"demo-prod-web@{RID}.service") in calls


def test_a_root_owned_deploy_root_runs_the_app_as_root_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout(tmp_path / "srv")
    layout.run.mkdir(parents=True)
    monkeypatch.setattr(systemd, "systemd_running", lambda: True)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    backend = SystemdBackend(layout, spec(), unit_dir=tmp_path / "units", user=False)
    monkeypatch.setattr(backend, "systemctl", lambda *a, **k: None)
    assert app_user(layout) is None  # owned by root here (or by us: not root, no app user)
    events: list[dict[str, Any]] = []
    backend.prepare(spec(), events.append)
    assert [e["detail"] for e in events if e.get("status") == "warning"] == [ROOT_APP_WARNING]


def test_web_template_runs_each_release_from_its_own_dir_through_exec_env(
    units: dict[str, str], short_root: Path
) -> None:
    web = units["demo-prod-web@.service"]
    root = str(short_root)
    argv = exec_argv(web)
    assert argv[:2] == [sys.executable, "-m"] and argv[3:7] == ["exec-env", root, "%i", "--"]
    assert argv[7:10] == ["gunicorn", "--bind", f"unix:{root}/run/web-%i.sock"]
    assert argv[-1] == "demo:create_app()" and "3" == argv[argv.index("--workers") + 1]
    assert option(web, "Restart") == "on-failure"
    assert option(web, "KillMode") == "mixed"  # TERM to the master only: gunicorn drains
    assert option(web, "TimeoutStopSec") == "17"  # graceful_timeout + 5, then SIGKILL
    assert option(web, "StandardOutput") == "journal"
    assert option(web, "WantedBy") == "multi-user.target"


def test_worker_unit_keeps_its_command_and_stop_signal(units: dict[str, str]) -> None:
    jobs = units["demo-prod-jobs.service"]
    argv = exec_argv(jobs)
    # exec-ed (one simple command): its stop signal reaches the worker itself (docs/workers.md)
    assert argv[5] == RID and argv[-3:] == ["/bin/sh", "-c", f"exec {WORKER}"]
    assert option(jobs, "KillMode") == "mixed"
    assert option(jobs, "KillSignal") == "SIGINT"
    assert option(jobs, "TimeoutStopSec") == "7"
    assert option(jobs, "SendSIGKILL") == "yes"


def test_front_socket_owns_the_port_and_user_units_want_default_target(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "srv")
    written = render_units(layout, spec(), None, user=True)
    assert "demo-prod-jobs.service" not in written  # workers need a release
    assert option(written["demo-prod-front.socket"], "ListenStream") == "0.0.0.0:8123"
    front = written["demo-prod-front.service"]
    assert option(front, "Requires") == "demo-prod-front.socket"
    assert exec_argv(front)[3:] == [
        "proxy",
        "--listen",
        "0.0.0.0:8123",
        "--upstream",
        str(layout.web_socket),
        "--ready",
        str(layout.run / "front.ready"),
        "--proxy-protocol",  # to the servers marked as reading it (backend.mark_proxy_protocol)
    ]
    assert option(front, "WantedBy") == "default.target"
    nginx_fronted = render_units(layout, spec(front="nginx"), None)
    assert sorted(nginx_fronted) == ["demo-prod-web@.service"]


def test_systemctl_commands_use_user_mode_for_a_non_root_user(tmp_path: Path) -> None:
    backend = SystemdBackend(Layout(tmp_path), spec(), unit_dir=tmp_path, user=True)
    assert backend.systemctl_argv("start", backend.web_unit_name(RID)) == [
        "systemctl",
        "--user",
        "start",
        f"demo-prod-web@{RID}.service",
    ]
    assert SystemdBackend(Layout(tmp_path), spec(), unit_dir=tmp_path, user=False).systemctl_argv(
        "daemon-reload"
    ) == ["systemctl", "daemon-reload"]


@pytest.mark.skipif(systemd_running(), reason="this host runs systemd")
def test_backend_auto_is_the_daemon_here_and_forcing_systemd_says_why_not(tmp_path: Path) -> None:
    assert services.choose_backend({"backend": "auto"}) == "daemon"
    assert services.choose_backend({"backend": "systemd"}) == "systemd"
    layout = Layout(tmp_path / "root")
    release = layout.release(RID)
    release.mkdir(parents=True)
    (release / "release.json").write_text("{}")
    with pytest.raises(AgentError) as err:
        services.switch(layout, RID, spec(), lambda e: None)
    assert err.value.kind == "usage" and "systemd is not running" in err.value.message
    assert not layout.current.exists()


# --- socket activation: the port outlives the proxy -------------------------------------------


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Path]:
    """A tiny HTTP server on a unix socket answering ``hello``."""
    path = tmp_path / "web.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(64)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
                )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join(5)
    server.close()


def _activated_proxy(listener: socket.socket, upstream: Path) -> subprocess.Popen[bytes]:
    """Start the proxy as systemd would: the socket as fd 3, LISTEN_PID/LISTEN_FDS set."""
    fd = listener.fileno()

    def child() -> None:
        os.dup2(fd, 3)  # dup2 leaves fd 3 inheritable

    script = (
        'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -m shiplane.agent proxy '
        '--listen 127.0.0.1:1 --upstream "$1"'
    )
    return subprocess.Popen(
        ["/bin/sh", "-c", script, sys.executable, str(upstream)],
        preexec_fn=child,  # noqa: PLW1509 - fd 3 only
        close_fds=False,
    )


def _get(port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_socket_activated_front_serves_and_no_connection_is_refused_across_its_restart(
    upstream: Path,
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    procs = [_activated_proxy(listener, upstream)]
    try:
        assert _get(port) == (200, b"hello")  # queued until the proxy accepts: never refused
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=15) == 0
        # No proxy runs now; the port is still held (by us, as by the .socket unit): a client
        # connecting now waits in the listen queue and is served by the next proxy.
        waiting = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        waiting.connect()
        waiting.request("GET", "/")
        procs.append(_activated_proxy(listener, upstream))
        resp = waiting.getresponse()
        assert (resp.status, resp.read()) == (200, b"hello")
        waiting.close()
    finally:
        listener.close()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=15)


@needs_analyze
def test_scheduled_jobs_are_a_timer_and_a_oneshot_service_each(
    tmp_path: Path, short_root: Path
) -> None:
    from shiplane.agent.systemd import SystemdBackend
    from shiplane.agent.timers import job_units

    with_jobs = {
        **spec(),
        "jobs": {
            "cleanup": {
                "schedule": "*/5 * * * *",
                "command": "python -m app.cleanup",
                "timeout": 90,
            },
            "report": {"schedule": "0 12 13 * fri", "command": "true", "timeout": 3600},
        },
    }
    backend = SystemdBackend(Layout(short_root), with_jobs, unit_dir=tmp_path / "units", user=False)
    written = write_units(tmp_path / "units", job_units(backend, with_jobs))  # type: ignore[arg-type]
    assert sorted(written) == [
        "demo-prod-job.cleanup.service",
        "demo-prod-job.cleanup.timer",
        "demo-prod-job.report.service",
        "demo-prod-job.report.timer",
    ]
    timer = written["demo-prod-job.cleanup.timer"]
    assert option(timer, "OnCalendar") == "*-*-* *:00,05,10,15,20,25,30,35,40,45,50,55:00"
    assert option(timer, "AccuracySec") == "1s"
    assert option(timer, "Unit") == "demo-prod-job.cleanup.service"
    # both day fields restricted: either day matches, as cron's, so two lines
    report = written["demo-prod-job.report.timer"]
    assert re.findall(r"^OnCalendar=(.*)$", report, re.MULTILINE) == [
        "*-*-13 12:00:00",
        "Fri *-*-* 12:00:00",
    ]
    service = written["demo-prod-job.cleanup.service"]
    assert exec_argv(service)[-3:] == ["run-job", str(short_root), "cleanup"]
    assert option(service, "Type") == "oneshot"
    assert option(service, "TimeoutStartSec") == "150"  # its timeout, then the runner's grace
    done = verify(tmp_path / "units", *sorted(written))
    assert done.returncode == 0, done.stdout + done.stderr


# --- the caddy front under systemd ------------------------------------------------------------


needs_caddy = pytest.mark.skipif(shutil.which("caddy") is None, reason="needs caddy")


@needs_analyze
@needs_caddy
@pytest.mark.parametrize("user", [False, True])
def test_the_caddy_unit_passes_systemd_analyze_verify_and_starts_at_boot(
    tmp_path: Path, short_root: Path, user: bool
) -> None:
    data = short_root / "caddy"
    data.mkdir(parents=True)
    (data / "Caddyfile").write_text("{\n\tadmin unix//x\n}\n")
    name = caddyunit.unit_name(data)
    text = caddyunit.unit_text(data, data / "Caddyfile", user)
    (tmp_path / name).write_text(text)
    done = verify(tmp_path, name)
    assert done.returncode == 0, done.stdout + done.stderr
    # the very command the daemon backend runs, with the same dir, environment and output
    assert exec_argv(text) == caddyunit.caddy_argv(data, data / "Caddyfile")
    assert option(text, "WorkingDirectory") == str(data).replace("%", "%%")
    assert option(text, "WantedBy") == ("default.target" if user else "multi-user.target")
    assert option(text, "Restart") == "on-failure"
    if not user:  # only its dir writable, and no capability but binding ports 80 and 443
        assert option(text, "ProtectSystem") == "strict"
        assert option(text, "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"


FAKE_SYSTEMCTL = """#!/bin/sh
# systemd cannot run as PID 1 here: record what the agent asks of systemctl
echo "$*" >> "$SYSTEMCTL_LOG"
"""


@needs_caddy
def test_under_systemd_the_caddy_front_is_an_enabled_unit_that_stop_disables_and_removes(
    tmp_path: Path, short_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir, log = tmp_path / "bin", tmp_path / "systemctl.log"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(FAKE_SYSTEMCTL)
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SYSTEMCTL_LOG", str(log))
    monkeypatch.setattr(systemd, "SYSTEM_UNIT_DIR", tmp_path / "system")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = short_root / "caddy"
    data.mkdir(parents=True)
    name = caddyunit.unit_name(data)

    assert caddyunit.start(data, data / "Caddyfile", user=False) == name
    assert (tmp_path / "system" / name).exists() and caddyunit.installed(data) is False
    assert log.read_text().splitlines() == [
        "daemon-reload",
        f"reset-failed {name}",
        f"enable --now {name}",  # enabled: it comes back after a reboot
    ]
    log.write_text("")
    caddyunit.start(data, data / "Caddyfile", user=False)  # the same unit: no daemon-reload
    assert log.read_text().splitlines() == [f"reset-failed {name}", f"enable --now {name}"]

    log.write_text("")
    assert caddy.stop_caddy(data, lambda event: None) is None  # no pid file: nothing ran
    assert log.read_text().splitlines() == [f"disable --now {name}", "daemon-reload"]
    assert caddyunit.installed(data) is None and not (tmp_path / "system" / name).exists()
    assert caddyunit.stop(data) is False  # the daemon backend's Caddy: stop_caddy signals it

    caddyunit.start(data, data / "Caddyfile", user=True)  # an unprivileged agent's
    assert (tmp_path / "home/.config/systemd/user" / name).exists()
    assert caddyunit.installed(data) is True
    assert log.read_text().splitlines()[-1] == f"--user enable --now {name}"


def test_the_caddy_front_is_a_unit_only_under_the_systemd_backend() -> None:
    assert caddy.units_user(spec(front="caddy", backend="daemon")) is None
    assert caddy.units_user(spec(front="caddy", backend="systemd")) is (os.geteuid() != 0)
    assert caddy.units_user(spec(front="caddy", backend="auto")) == (
        None if not systemd_running() else os.geteuid() != 0
    )
