"""The services ops the agent server calls: switch, start/stop/restart/reload, status, logs.

Service names as users see them: ``web`` (the live release's ``web-<id>`` program), ``front``
(the builtin proxy) and each worker service by its name. Everything runs under this root's
supervisord (see supervisor.py); the web switch itself is in switch.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import supervisor as sv
from .errors import AgentError
from .health import tail_lines, wait_healthy
from .paths import Layout
from .switch import (
    current_release,
    ensure_front,
    ensure_workers,
    live_release,
    load_spec,
    save_spec,
    web_conf,
    web_program,
    web_programs,
)
from .switch import switch as _switch

Emit = Callable[[dict[str, Any]], None]

__all__ = ["logs", "reload", "restart", "shutdown", "start", "status", "stop", "switch"]


def switch(layout: Layout, release_id: str, spec: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """Blue/green switch of the web service to ``release_id`` (see :func:`switch.switch`)."""
    return _switch(layout, release_id, spec, emit)


def _spec(layout: Layout, spec: dict[str, Any] | None) -> dict[str, Any]:
    if spec:
        save_spec(layout, spec)
        return spec
    saved = load_spec(layout)
    if saved is None:
        raise AgentError("no services spec on this host yet: deploy first", kind="missing")
    return saved


def _targets(layout: Layout, names: list[str] | None, spec: dict[str, Any] | None) -> list[str]:
    """User service names in start order (front, web, workers); validates given names."""
    known = ["front"] if ((spec or {}).get("front") or "builtin") == "builtin" else []
    known.append("web")
    known += sorted((spec or {}).get("workers") or {})
    if spec is None:  # no spec: whatever is configured on disk
        for name in sv.configured_programs(layout):
            kind = sv.program_meta(layout, name).get("kind")
            if kind == "worker" and name not in known:
                known.append(name)
    if not names:
        return known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AgentError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(known)}",
                         kind="usage")
    return [n for n in known if n in names]


def _require_live(layout: Layout) -> str:
    live = live_release(layout)
    if live is None:
        raise AgentError("no release is live on this host: deploy first", kind="missing")
    return live


def _start_web(layout: Layout, sup: sv.Supervisor, spec: dict[str, Any], emit: Emit) -> None:
    live = _require_live(layout)
    name = web_program(live)
    if sv.write_program(layout, name, web_conf(layout, live, spec.get("web") or {})):
        sup.update()
    sup.start(name, wait=False)
    health = (spec.get("web") or {}).get("health") or {}
    wait_healthy(layout.release_socket(live), health.get("path"),
                 float(health.get("timeout") or 30), layout.log / "web.log", emit)


def start(layout: Layout, names: list[str] | None, spec: dict[str, Any] | None,
          emit: Emit) -> dict[str, Any]:
    """Start services (all when ``names`` is empty) on the live release; returns the status."""
    spec = _spec(layout, spec)
    targets = _targets(layout, names, spec)
    sup = sv.ensure_running(layout, emit)
    for name in targets:
        emit({"phase": "services", "status": "start", "detail": name})
        if name == "front":
            ensure_front(layout, sup, spec, emit)
        elif name == "web":
            _start_web(layout, sup, spec, emit)
    workers = [n for n in targets if n not in ("front", "web")]
    if workers:
        ensure_workers(layout, sup, spec, _require_live(layout), emit, only=set(workers))
    return status(layout)


def _programs_for(layout: Layout, sup: sv.Supervisor, name: str) -> list[str]:
    if name == "web":
        return sorted(web_programs(layout, sup))
    return [name]


def stop(layout: Layout, names: list[str] | None, emit: Emit) -> dict[str, Any]:
    """Stop services (all when ``names`` is empty); supervisord itself keeps running."""
    sup = sv.connect(layout)
    if sup is None:
        return {"stopped": []}
    stopped = []
    for name in _targets(layout, names, load_spec(layout)):
        for program in _programs_for(layout, sup, name):
            if sup.info(program) is not None:
                emit({"phase": "services", "status": "stop", "detail": program})
                sup.stop(program)
                stopped.append(program)
    return {"stopped": stopped}


def restart(layout: Layout, names: list[str] | None, spec: dict[str, Any] | None,
            emit: Emit) -> dict[str, Any]:
    """Stop then start services (the web service briefly stops: the front retries connects for
    a moment; use a deploy or rollback for a switch without any gap)."""
    spec = _spec(layout, spec)
    targets = _targets(layout, names, spec)
    stop(layout, targets, emit)
    return start(layout, targets, spec, emit)


def reload(layout: Layout, names: list[str] | None, emit: Emit) -> dict[str, Any]:
    """Reload services: ``web`` gets HUP (gunicorn replaces its workers gracefully, same
    release — the program runs from its own release directory); others are restarted."""
    spec = load_spec(layout)
    targets = _targets(layout, names, spec)
    sup = sv.ensure_running(layout, emit)
    others = []
    for name in targets:
        if name == "web":
            program = web_program(_require_live(layout))
            emit({"phase": "services", "status": "reload", "detail": program})
            sup.signal(program, "HUP")
        else:
            others.append(name)
    if others:
        restart(layout, others, spec, emit)
    return status(layout)


def status(layout: Layout) -> dict[str, Any]:
    """Per service: name, program, pid, state, uptime, release, live; plus the live release.

    Works on a host where nothing was ever started (no services, supervisord not running).
    """
    live = live_release(layout)
    sup = sv.connect(layout)
    services: list[dict[str, Any]] = []
    if sup is not None:
        for info in sup.all_info():
            program = str(info["name"])
            meta = sv.program_meta(layout, program)
            running = info["statename"] == "RUNNING"
            entry: dict[str, Any] = {
                "name": meta.get("service") or ("web" if program.startswith("web-") else program),
                "program": program, "pid": info["pid"] or None, "state": info["statename"],
                "uptime": max(0, int(info["now"]) - int(info["start"])) if running else 0,
                "release": meta.get("release_id"),
            }
            if entry["name"] == "web":
                entry["live"] = entry["release"] is not None and entry["release"] == live
            services.append(entry)
    order = {"front": 0, "web": 1}
    services.sort(key=lambda s: (order.get(s["name"], 2), s["name"], s["program"]))
    return {"live_release": live, "current": current_release(layout),
            "supervisord": {"running": sup is not None,
                            "pid": sv.read_pid(layout) if sup is not None else None},
            "services": services}


def shutdown(layout: Layout, emit: Emit) -> dict[str, Any]:
    """Stop every program and supervisord itself; returns once its pid is gone (or a zombie)."""
    before = status(layout)
    emit({"phase": "services", "status": "shutdown", "detail": "stopping supervisord"})
    result = sv.shutdown(layout)
    result["stopped"] = [s["program"] for s in before["services"] if s["pid"]]
    return result


def log_path(layout: Layout, service: str) -> Path:
    """The log file of a service (``web`` is shared by all its releases' programs)."""
    if service in ("supervisord", "supervisor"):
        return layout.log / "supervisord.log"
    return layout.log / f"{sv.check_name(service)}.log"


def logs(layout: Layout, service: str | None, lines: int, follow: bool | float, emit: Emit
         ) -> dict[str, Any]:
    """The last ``lines`` lines of a service's log; with ``follow`` new lines are then emitted as
    events (``status: "line"``) until ``follow`` seconds passed (``True``: until the reader goes
    away, i.e. ``emit`` raises)."""
    service = service or "web"
    path = log_path(layout, service)
    head = tail_lines(path, max(0, int(lines)))
    result: dict[str, Any] = {"service": service, "path": str(path), "lines": head}
    if not follow:
        return result
    for line in head:
        emit({"phase": "logs", "status": "line", "service": service, "detail": line})
    deadline = None if follow is True else time.monotonic() + float(follow)
    try:
        result["followed"] = _follow(path, service, deadline, emit)
    except (OSError, ValueError):  # the reader is gone (broken pipe): following ends
        pass
    return result


def _follow(path: Path, service: str, deadline: float | None, emit: Emit) -> int:
    count = 0
    pos = path.stat().st_size if path.exists() else 0
    inode = path.stat().st_ino if path.exists() else None
    partial = b""
    while deadline is None or time.monotonic() < deadline:
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
                emit({"phase": "logs", "status": "line", "service": service,
                      "detail": raw.decode("utf-8", "replace")})
                count += 1
            continue
        time.sleep(0.2)  # poll interval for new log output
    return count

