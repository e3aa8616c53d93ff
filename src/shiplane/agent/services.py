"""The services ops the agent server calls: switch, start/stop/restart/reload, status, logs.

Service names as users see them: ``web`` (the live release's server), ``front`` (the builtin
proxy) and each worker service by its name. Processes are run by a backend (backend.py): the
daemon backend (one supervisord per root, daemon.py) or systemd units (systemd.py). The stage's
``backend`` picks one; ``auto`` means systemd when this host runs it, else the daemon. The web
switch itself is in switch.py, the same for both.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

from . import atomic_write
from . import supervisor as sv
from .backend import Backend, ManagerState, ServiceStatus, builtin_front
from .daemon import DaemonBackend
from .errors import AgentError
from .fronts import front_for
from .health import tail_lines, wait_healthy
from .jobs import JobStatus, end_runs
from .jobs import status as jobs_status
from .paths import Layout
from .protocol import Emit, FrontState, ServicesSpec, WebSpec
from .switch import (
    SwitchResult,
    current_release,
    ensure_front,
    forget,
    live_release,
    load_spec,
    save_spec,
    spec_path,
)
from .switch import switch as _switch
from .systemd import SystemdBackend, systemd_running

__all__ = [
    "backend_for",
    "choose_backend",
    "logs",
    "reload",
    "resolve_backend",
    "restart",
    "shutdown",
    "start",
    "status",
    "stop",
    "switch",
    "withdraw",
]


# --- what the ops answer ----------------------------------------------------------------------


class _Status(TypedDict):
    live_release: str | None
    current: str | None
    backend: str  # a name in BACKENDS
    services: list[ServiceStatus]  # front, web (live, standby, preboot), workers


class ServicesStatus(_Status, total=False):
    """The ``status`` op's answer (and ``start``'s, ``restart``'s, ``reload``'s); the process
    manager as ``supervisord`` under the daemon backend, as ``manager`` under the others."""

    supervisord: ManagerState
    manager: ManagerState
    front: FrontState  # a front routing names (Caddy, nginx): every app it routes
    jobs: list[JobStatus]  # the scheduled jobs this host runs (the primary's), when it has any


class Stopped(TypedDict):
    stopped: list[str]  # programs (units) stopped


class _ShutDown(TypedDict):
    stopped: list[str]  # programs that ran, and a private nginx


class ShutDown(_ShutDown, total=False):
    supervisord_pid: int | None  # the daemon backend's


class Withdrawn(TypedDict):
    withdrawn: str
    stopped: list[str]


class _Logs(TypedDict):
    service: str
    path: str  # the log file, or the command that printed it (journalctl)
    lines: list[str]


class Logs(_Logs, total=False):
    followed: int  # with ``follow``: lines emitted as events after ``lines``


# --- which backend ---------------------------------------------------------------------------


def _backend_file(layout: Layout) -> Path:
    return layout.run / "backend"


# The process managers, by the name a stage's `backend` gives (config/schema.py lists the same
# names): adding one is its module (a Backend, agent/backend.py), a line here, and its tests.
BACKENDS: dict[str, Callable[[Layout, ServicesSpec | None], Backend]] = {
    "daemon": lambda layout, spec: DaemonBackend(layout),
    "systemd": lambda layout, spec: SystemdBackend(layout, spec),
}


def choose_backend(spec: ServicesSpec | None) -> str:
    """A backend's name for a spec (``auto``: systemd when PID 1 is systemd, else the daemon)."""
    return resolve_backend(spec.get("backend") if spec else None)


def resolve_backend(wanted: str | None) -> str:
    """The backend a stage's ``backend`` names (None: ``auto``)."""
    wanted = str(wanted or "auto")
    if wanted == "auto":
        return "systemd" if systemd_running() else "daemon"
    if wanted not in BACKENDS:
        raise AgentError(f"unknown backend {wanted!r} (auto, {', '.join(BACKENDS)})", kind="usage")
    return wanted


def recorded_backend(layout: Layout) -> str | None:
    """The backend the last switch on this root used."""
    try:
        name = _backend_file(layout).read_text().strip()
    except OSError:
        return None
    return name if name in BACKENDS else None


def backend_for(layout: Layout, spec: ServicesSpec | None, switching: bool = False) -> Backend:
    """The backend for ``spec``, or the one this root's services run under when ``spec`` is
    None. A switch to another backend than the running one is refused: the old one holds the
    port, so that change needs ``shiplane stop --all`` first."""
    recorded = recorded_backend(layout)
    name = choose_backend(spec) if spec else (recorded or "daemon")
    if switching and recorded and recorded != name:
        old = backend_for(layout, None)
        if any(e.get("pid") for e in old.status()):
            raise AgentError(
                f"this host's services run under the {recorded} backend, the stage "
                f"now asks for {name}: run `shiplane stop --all` for this stage "
                f"first (the port moves, which cannot be done without a gap)",
                kind="usage",
            )
    return BACKENDS[name](layout, spec or load_spec(layout))


def switch(
    layout: Layout, release_id: str, spec: ServicesSpec, emit: Emit, forget_later: bool = False
) -> SwitchResult:
    """Blue/green switch of the web service to ``release_id`` (see :func:`switch.switch`)."""
    backend = backend_for(layout, spec, switching=True)
    layout.run.mkdir(parents=True, exist_ok=True)
    if recorded_backend(layout) != backend.name:
        atomic_write(_backend_file(layout), backend.name + "\n")
    return _switch(layout, release_id, spec, emit, backend, forget_later)


def preboot(layout: Layout, release_id: str, web: WebSpec, backend: str | None, emit: Emit) -> None:
    """Start the release's web server before its switch, with only its libraries loaded."""
    BACKENDS[resolve_backend(backend)](layout, None).preboot_web(release_id, web, emit)


def hold_switch_lock(layout: Layout) -> int:
    """An fd holding ``run/.switch.lock`` (flock), once no switch or after-switch holds it."""
    layout.run.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.run / ".switch.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def after_switch(layout: Layout, release_id: str, stopping: list[str], emit: Emit) -> None:
    """What a switch leaves for later (agent ``after-switch``, detached, so no deploy waits):
    forget the old standbys it TERMed once they have exited, then keep a spare web server for
    the next release, where the backend has one. Runs holding the switch lock it inherited."""
    spec = load_spec(layout)
    backend = backend_for(layout, spec)
    for rid in stopping:
        if rid != live_release(layout) and not backend.web_state(rid)[0]:
            forget(layout, backend, rid, emit)
    web = spec.get("web") if spec else None
    if isinstance(web, dict) and live_release(layout) == release_id:
        backend.keep_spare(release_id, web, emit)


def discard(layout: Layout, release_id: str, emit: Emit) -> bool:
    """Stop the web server of a release that is not live (a failed deploy's preboot)."""
    if live_release(layout) == release_id:
        return False
    backend = backend_for(layout, None)
    if release_id not in backend.web_releases():
        return False
    backend.stop_web(release_id, emit)
    return True


def withdraw(layout: Layout, release_id: str, emit: Emit) -> Withdrawn:
    """Take a host back to serving nothing: the undo of a failed *first* deploy, where there is
    no earlier release to return to. Every service stops (the manager too, as before the deploy),
    and ``web.sock``, ``current`` and the saved spec go, so the host holds the release installed
    (marked bad by the deploy) but runs and serves nothing. A host serving another release is
    refused: that one is undone by a switch back, never by this."""
    live = live_release(layout)
    if live not in (None, release_id):
        raise AgentError(f"withdraw: this host serves {live}, not {release_id}", kind="usage")
    held = hold_switch_lock(layout)  # the switch's after-switch (its spare) has finished first
    try:
        stopped = shutdown(layout, emit)["stopped"]
        if isinstance(backend_for(layout, None), DaemonBackend):
            # a supervisord started later (to ask it anything) would start these programs again
            for program in sv.configured_programs(layout):
                sv.remove_program_conf(layout, program)
        for link in (layout.web_socket, layout.current):
            if os.path.islink(link):
                link.unlink()
        spec_path(layout).unlink(missing_ok=True)
    finally:
        os.close(held)
    emit(
        {
            "phase": "undo",
            "status": "withdrawn",
            "detail": f"{release_id} no longer serves; nothing runs here",
        }
    )
    return {"withdrawn": release_id, "stopped": stopped}


def _spec(layout: Layout, spec: ServicesSpec | None) -> ServicesSpec:
    if spec:
        save_spec(layout, spec)
        return spec
    saved = load_spec(layout)
    if saved is None:
        raise AgentError("no services spec on this host yet: deploy first", kind="missing")
    return saved


def _targets(layout: Layout, names: list[str] | None, spec: ServicesSpec | None) -> list[str]:
    """User service names in start order (front, web, workers); validates given names."""
    known = ["front"] if builtin_front(spec) else []
    known.append("web")
    known += sorted((spec.get("workers") if spec else None) or {})
    if spec is None:  # no spec: whatever is configured on disk
        for name in sv.configured_programs(layout):
            kind = sv.program_meta(layout, name).get("kind")
            if kind == "worker" and name not in known:
                known.append(name)
    if not names:
        return known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AgentError(
            f"unknown service(s) {', '.join(unknown)}; known: {', '.join(known)}", kind="usage"
        )
    return [n for n in known if n in names]


def _require_live(layout: Layout) -> str:
    live = live_release(layout)
    if live is None:
        raise AgentError("no release is live on this host: deploy first", kind="missing")
    return live


def _start_web(layout: Layout, backend: Backend, spec: ServicesSpec, emit: Emit) -> None:
    live = _require_live(layout)
    web = spec.get("web")
    if not web:  # a spec without web: the server has no app to run
        raise AgentError("services.web has no target (wsgi/asgi app)", kind="usage")
    backend.start_web(live, web, emit)
    health = web.get("health")
    wait_healthy(
        layout.release_socket(live),
        health.get("path") if health else None,
        float((health and health.get("timeout")) or 30),
        layout.log / "web.log",
        emit,
        lambda: backend.web_state(live)[1],
        host=str((health and health.get("host")) or "localhost"),
    )


def start(
    layout: Layout, names: list[str] | None, spec: ServicesSpec | None, emit: Emit
) -> ServicesStatus:
    """Start services (all when ``names`` is empty) on the live release; returns the status."""
    spec = _spec(layout, spec)
    targets = _targets(layout, names, spec)
    backend = backend_for(layout, None)
    backend.prepare(spec, emit)
    for name in targets:
        emit({"phase": "services", "status": "start", "detail": name})
        if name == "front":
            ensure_front(layout, backend, spec, emit)
        elif name == "web":
            _start_web(layout, backend, spec, emit)
            if not builtin_front(spec):
                # a Caddy or nginx is no service of ours: the web's start puts its site back
                # (a stop --all took it out) and starts the server if none runs
                front_for(spec).ensure(layout, spec, emit)
    workers = [n for n in targets if n not in ("front", "web")]
    if workers:
        backend.restart_workers(spec, _require_live(layout), emit, only=set(workers))
    if not names:  # everything: the jobs are scheduled again too
        backend.ensure_jobs(spec, emit)
    return status(layout)


def stop(layout: Layout, names: list[str] | None, emit: Emit) -> Stopped:
    """Stop services (all when ``names`` is empty); the manager itself keeps running."""
    backend = backend_for(layout, None)
    stopped: list[str] = []
    spec = load_spec(layout)
    for name in _targets(layout, names, spec):
        stopped += backend.stop(name, emit)
    if not names and spec and spec.get("jobs"):  # everything: no job is scheduled until start
        backend.ensure_jobs({**spec, "jobs": {}}, emit)
        stopped.append("jobs")
    if not names:  # and a run going on ends (an unscheduled job's run would finish)
        stopped += [f"job.{name}" for name in end_runs(layout)]
    return {"stopped": stopped}


def restart(
    layout: Layout, names: list[str] | None, spec: ServicesSpec | None, emit: Emit
) -> ServicesStatus:
    """Stop then start services (the web service briefly stops: the front retries connects for
    a moment; use a deploy or rollback for a switch without any gap)."""
    spec = _spec(layout, spec)
    targets = _targets(layout, names, spec)
    stop(layout, targets, emit)
    return start(layout, targets, spec, emit)


def reload(layout: Layout, names: list[str] | None, emit: Emit) -> ServicesStatus:
    """Reload services: ``web`` gets HUP (gunicorn replaces its workers gracefully, same
    release -- the server runs from its own release directory); others are restarted."""
    spec = load_spec(layout)
    targets = _targets(layout, names, spec)
    backend = backend_for(layout, None)
    backend.prepare(spec, emit)
    others = []
    for name in targets:
        if name == "web":
            live = _require_live(layout)
            emit({"phase": "services", "status": "reload", "detail": f"web-{live}"})
            backend.signal_web(live, "HUP")
        else:
            others.append(name)
    if others:
        restart(layout, others, spec, emit)
    return status(layout)


def status(layout: Layout) -> ServicesStatus:
    """Per service: name, program, pid, state, uptime, release, live; plus the live release.

    Works on a host where nothing was ever started (no services, no manager running).
    """
    live = live_release(layout)
    backend = backend_for(layout, None)
    services = backend.status()
    for entry in services:
        if entry["name"] == "web":
            entry["live"] = entry["release"] is not None and entry["release"] == live
            # the previous release's server, idle, kept for an instant rollback (switch.py)
            entry["standby"] = (
                not entry["live"]
                and entry["state"] in ("RUNNING", "STARTING")
                and not entry.get("preboot")
            )
    order = {"front": 0, "web": 1}
    services.sort(key=lambda s: (order.get(s["name"], 2), s["name"], s["program"]))
    manager = backend.running()
    current = current_release(layout)
    result: ServicesStatus = {
        "live_release": live,
        "current": current,
        "backend": backend.name,
        "services": services,
    }
    if backend.name == "daemon":
        result["supervisord"] = manager
    else:
        result["manager"] = manager
    spec = load_spec(layout)
    front = front_for(spec).describe(layout, spec) if spec else None
    if front is not None:  # a Caddy or nginx: the apps it routes, this one among them
        result["front"] = front
    jobs = jobs_status(layout)
    if jobs:
        result["jobs"] = jobs
    return result


def shutdown(layout: Layout, emit: Emit) -> ShutDown:
    """Stop every service (and supervisord); returns once its pid is gone (or a zombie)."""
    before = status(layout)
    emit({"phase": "services", "status": "shutdown", "detail": "stopping every service"})
    down = backend_for(layout, None).shutdown()
    result: ShutDown = {"stopped": [s["program"] for s in before["services"] if s["pid"]]}
    if "supervisord_pid" in down:
        result = {"supervisord_pid": down["supervisord_pid"], **result}
    spec = load_spec(layout)
    if spec:  # its site leaves the front; what the stage alone used stops (a private nginx)
        result["stopped"] += front_for(spec).stop(layout, spec, emit)
    result["stopped"] += [f"job.{name}" for name in end_runs(layout)]  # runs outlive the scheduler
    return result


def log_path(layout: Layout, service: str) -> Path:
    """The log file of a service (``web`` is shared by all its releases' programs)."""
    if service in ("supervisord", "supervisor"):
        return layout.log / "supervisord.log"
    return layout.log / f"{sv.check_name(service)}.log"


def logs(
    layout: Layout,
    service: str | None,
    lines: int,
    follow: bool | float,
    emit: Emit,
    gone: Callable[[], bool] = lambda: False,
) -> Logs:
    """The last ``lines`` lines of a service's log; with ``follow`` new lines are then emitted as
    events (``status: "line"``) until ``follow`` seconds passed (``True``: until the reader goes
    away: ``emit`` raises, or ``gone()`` says so while the log is quiet)."""
    service = service or "web"
    # a job's runs write their output to a file under every backend (jobs.py)
    command = None if service.startswith("job.") else backend_for(layout, None).log_command(service)
    if command is not None:  # the journal: its own reader
        done = subprocess.run(
            [*command, "-n", str(max(0, int(lines)))],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        return {"service": service, "path": " ".join(command), "lines": done.stdout.splitlines()}
    path = log_path(layout, service)
    head = tail_lines(path, max(0, int(lines)))
    result: Logs = {"service": service, "path": str(path), "lines": head}
    if not follow:
        return result
    for line in head:
        emit({"phase": "logs", "status": "line", "service": service, "detail": line})
    deadline = None if follow is True else time.monotonic() + float(follow)
    try:
        result["followed"] = _follow(path, service, deadline, emit, gone)
    except (OSError, ValueError):  # the reader is gone (broken pipe): following ends
        pass
    return result


def _follow(
    path: Path, service: str, deadline: float | None, emit: Emit, gone: Callable[[], bool]
) -> int:
    count = 0
    pos = path.stat().st_size if path.exists() else 0
    inode = path.stat().st_ino if path.exists() else None
    partial = b""
    while (deadline is None or time.monotonic() < deadline) and not gone():
        try:
            st = path.stat()
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_ino != inode or st.st_size < pos):  # rotated or truncated
            inode, pos = st.st_ino, 0
        if st is not None and st.st_size > pos:
            with open(path, "rb") as fh:
                fh.seek(pos)
                data = fh.read(1 << 20)
            pos += len(data)
            *done, partial = (partial + data).split(b"\n")
            for raw in done:
                emit(
                    {
                        "phase": "logs",
                        "status": "line",
                        "service": service,
                        "detail": raw.decode("utf-8", "replace"),
                    }
                )
                count += 1
            continue
        time.sleep(0.2)  # poll interval for new log output
    return count
