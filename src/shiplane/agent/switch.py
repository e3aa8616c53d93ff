"""Blue/green switch of the web service, and the supervisord programs of every service.

Each release's gunicorn is its own program ``web-<release_id>`` on its own unix socket. A switch
starts the candidate from its own release directory, checks it (health, smoke) on its socket,
then renames ``run/web.sock`` (what the front connects to) and ``current``, drains, and retires
the old program with TERM (gunicorn's graceful shutdown). Reloading in place is never used: it
would keep serving the old release (SPEC §13). Every step can be re-run after a crash.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import atomic_write, fsync_dir
from .errors import AgentError
from .health import run_smoke, wait_healthy
from .paths import Layout, agent_command
from .supervisor import (
    Supervisor,
    check_name,
    configured_programs,
    ensure_running,
    program_conf,
    program_meta,
    write_program,
)

Emit = Callable[[dict[str, Any]], None]

DEFAULT_DRAIN = 1.0
SIGNALS = {"TERM", "HUP", "INT", "QUIT", "KILL", "USR1", "USR2"}
RESERVED = {"web", "front", "supervisord"}
# sun_path is 108 bytes on Linux, NUL included
MAX_SOCKET_PATH = 107
DEAD_STATES = {"FATAL", "STOPPED", "UNKNOWN"}


# --- where things are ------------------------------------------------------------------------

def web_program(release_id: str) -> str:
    return f"web-{release_id}"


def spec_path(layout: Layout) -> Path:
    return layout.run / "services.json"


def save_spec(layout: Layout, spec: dict[str, Any]) -> None:
    """Remember the services spec, so ``start``/``restart`` without one reuse it."""
    atomic_write(spec_path(layout), json.dumps(spec, indent=2, sort_keys=True) + "\n")


def load_spec(layout: Layout) -> dict[str, Any] | None:
    try:
        spec = json.loads(spec_path(layout).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


def _link_target(link: Path) -> str | None:
    try:
        return os.readlink(link)
    except OSError:
        return None


def live_release(layout: Layout) -> str | None:
    """The release the front sends traffic to: ``run/web.sock``'s target, else ``current``'s."""
    target = _link_target(layout.web_socket)
    if target:
        match = re.fullmatch(r"web-(.+)\.sock", os.path.basename(target))
        if match:
            return match.group(1)
    return current_release(layout)


def current_release(layout: Layout) -> str | None:
    target = _link_target(layout.current)
    return os.path.basename(target.rstrip("/")) if target else None


def web_programs(layout: Layout, sup: Supervisor | None) -> set[str]:
    """Every ``web-*`` program, configured on disk or known to supervisord."""
    names = {n for n in configured_programs(layout) if n.startswith("web-")}
    if sup is not None:
        names |= {i["name"] for i in sup.all_info() if str(i["name"]).startswith("web-")}
    return names


# --- program confs ---------------------------------------------------------------------------

def _log_options(path: Path) -> dict[str, object]:
    return {"redirect_stderr": True, "stdout_logfile": path,
            "stdout_logfile_maxbytes": "50MB", "stdout_logfile_backups": 5}


def web_conf(layout: Layout, release_id: str, web: dict[str, Any]) -> str:
    """``web-<id>``: the release's gunicorn on ``run/web-<id>.sock``, through ``exec-env``."""
    sock = layout.release_socket(release_id)
    if len(str(sock).encode()) > MAX_SOCKET_PATH:
        raise AgentError(f"the socket path {sock} is longer than {MAX_SOCKET_PATH} bytes "
                         f"(a unix socket limit): use a shorter deploy_to", kind="usage")
    graceful = int(web.get("graceful_timeout") or 20)
    argv = [*agent_command(), "exec-env", str(layout.root), release_id, "--",
            "gunicorn", "--bind", f"unix:{sock}",
            "--workers", str(int(web.get("workers") or 2)),
            "--timeout", str(int(web.get("timeout") or 30)),
            "--graceful-timeout", str(graceful)]
    if _gunicorn_major(layout, release_id) >= 27:
        # gunicorn 27 opens a control socket in ~/.gunicorn by default; blue and green would fight
        # over that one path, so each release gets its own next to its web socket
        argv += ["--control-socket", str(layout.run / f"web-{release_id}.ctl")]
    worker_class = web.get("worker_class")
    if not worker_class and web.get("kind") == "asgi":
        worker_class = "uvicorn.workers.UvicornWorker"
    if worker_class:
        argv += ["-k", str(worker_class)]
    target = web.get("target")
    if not target:
        raise AgentError("services.web has no target (wsgi/asgi app)", kind="usage")
    argv.append(str(target))
    options: dict[str, object] = {
        "autostart": True, "autorestart": True, "startsecs": 1, "startretries": 3,
        "stopsignal": "TERM", "stopwaitsecs": graceful + 5, "stopasgroup": True,
        "killasgroup": True, **_log_options(layout.log / "web.log")}
    meta = {"service": "web", "release_id": release_id}
    return program_conf(web_program(release_id), argv, options, meta)


def _gunicorn_major(layout: Layout, release_id: str) -> int:
    """The major version of gunicorn in the release's venv (0 when unknown)."""
    try:
        meta = json.loads(layout.release_meta(release_id).read_text())
    except (OSError, ValueError):
        return 0
    venv = layout.venv(str(meta.get("dependency_digest") or "none"))
    for info in venv.glob("lib/python*/site-packages/gunicorn-*.dist-info"):
        version = info.name[len("gunicorn-"):-len(".dist-info")]
        head = version.split(".")[0]
        if head.isdigit():
            return int(head)
    return 0


def worker_conf(layout: Layout, name: str, worker: dict[str, Any], release_id: str) -> str:
    """A worker service: ``sh -c <command>`` in the release, with its stop signal and timeout."""
    if name in RESERVED or name.startswith("web-"):
        raise AgentError(f"service name {name!r} is reserved", kind="usage")
    command = worker.get("command")
    if not command:
        raise AgentError(f"service {name!r} has no command", kind="usage")
    stop_signal = str(worker.get("stop_signal") or "TERM").upper().removeprefix("SIG")
    if stop_signal not in SIGNALS:
        raise AgentError(f"service {name!r}: unknown stop_signal {stop_signal!r}", kind="usage")
    argv = [*agent_command(), "exec-env", str(layout.root), release_id, "--",
            "/bin/sh", "-c", str(command)]
    options: dict[str, object] = {
        "autostart": True, "autorestart": True, "startsecs": 1, "startretries": 3,
        "stopsignal": stop_signal, "stopwaitsecs": int(worker.get("stop_timeout") or 10),
        "stopasgroup": True, "killasgroup": True, **_log_options(layout.log / f"{name}.log")}
    meta = {"service": name, "kind": "worker", "release_id": release_id}
    return program_conf(check_name(name), argv, options, meta)


def front_conf(layout: Layout, spec: dict[str, Any]) -> str | None:
    """The builtin front proxy program, or None when the spec asks for another front."""
    if (spec.get("front") or "builtin") != "builtin":
        return None
    web = spec.get("web") or {}
    bind = str(web.get("bind") or "127.0.0.1")
    port = int(web.get("port") or 8000)
    listen = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
    argv = [*agent_command(), "proxy", "--listen", listen, "--upstream", str(layout.web_socket)]
    options: dict[str, object] = {
        "autostart": True, "autorestart": True, "startsecs": 1, "startretries": 3,
        "stopsignal": "TERM", "stopwaitsecs": 15, **_log_options(layout.log / "front.log")}
    return program_conf("front", argv, options, {"service": "front", "kind": "front"})


# --- steps -----------------------------------------------------------------------------------

def ensure_front(layout: Layout, sup: Supervisor, spec: dict[str, Any], emit: Emit) -> None:
    """The front program is configured as the spec says and running (or absent if not builtin)."""
    text = front_conf(layout, spec)
    if text is None:
        sup.remove("front")
        return
    if write_program(layout, "front", text):
        sup.update()
    info = sup.info("front")
    if info is None or info["statename"] not in ("RUNNING", "STARTING"):
        emit({"phase": "switch", "status": "front", "detail": "starting the front proxy"})
        sup.start("front", wait=False)


def ensure_workers(layout: Layout, sup: Supervisor, spec: dict[str, Any], release_id: str,
                   emit: Emit, only: set[str] | None = None) -> list[str]:
    """Worker programs run ``release_id`` (restarted where their conf changed), extra ones gone;
    stopped ones are started (only those in ``only`` when given)."""
    workers: dict[str, Any] = spec.get("workers") or {}
    for name, worker in workers.items():
        write_program(layout, name, worker_conf(layout, name, worker or {}, release_id))
    for name in configured_programs(layout):
        if program_meta(layout, name).get("kind") == "worker" and name not in workers:
            emit({"phase": "switch", "status": "worker", "detail": f"removing {name}"})
            sup.remove(name)
    changes = sup.update()
    for name in workers:
        if name in changes["changed"] or name in changes["added"]:
            emit({"phase": "switch", "status": "worker", "detail": f"{name} on {release_id}"})
        info = sup.info(name)
        if only is not None and name not in only:
            continue
        if info is not None and info["statename"] not in ("RUNNING", "STARTING", "BACKOFF"):
            sup.start(name, wait=False)
    return sorted(workers)


def replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically: a temp symlink renamed over it, dir fsynced."""
    if _link_target(link) == target:
        return
    tmp = link.with_name(link.name + ".tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def flip(layout: Layout, release_id: str) -> None:
    """Move new connections (``web.sock``) and then ``current`` to ``release_id``."""
    replace_symlink(layout.web_socket, layout.release_socket(release_id).name)
    replace_symlink(layout.current, f"releases/{release_id}")


def retire(layout: Layout, sup: Supervisor, name: str, emit: Emit) -> None:
    """Stop a web program (TERM: gunicorn finishes in-flight requests) and forget it."""
    emit({"phase": "switch", "status": "stop", "detail": f"stopping {name}"})
    sup.remove(name)
    try:
        (layout.run / f"{name}.sock").unlink()
    except FileNotFoundError:
        pass


def check_web(layout: Layout, sup: Supervisor, release_id: str, web: dict[str, Any],
              emit: Emit) -> None:
    """Health then smoke checks of ``web-<id>`` on its own socket (AgentError on failure)."""
    name = web_program(release_id)
    health = web.get("health") or {}

    def alive() -> str | None:
        info = sup.info(name)
        if info is None:
            return "not configured"
        if info["statename"] in DEAD_STATES:
            why = info.get("spawnerr") or f"exit status {info.get('exitstatus')}"
            return f"{info['statename']}: {why}"
        return None

    sock = layout.release_socket(release_id)
    log = layout.log / "web.log"
    wait_healthy(sock, health.get("path"), float(health.get("timeout") or 30), log, emit, alive)
    checks = web.get("smoke") or []
    if checks:
        emit({"phase": "switch", "status": "smoke", "detail": f"{len(checks)} check(s)"})
        run_smoke(sock, checks, log_path=log)


def switch(layout: Layout, release_id: str, spec: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """Blue/green switch of the web service to ``release_id`` (see the module docstring).

    A candidate failing its checks is stopped and removed and the error (kind ``health`` or
    ``smoke``) raised; ``current`` and ``web.sock`` are then untouched. Returns
    ``{previous, current, seconds, stopped, workers}``.
    """
    started = time.monotonic()
    if not layout.release_meta(release_id).is_file():
        raise AgentError(f"switch: release {release_id} is not installed", kind="missing")
    web = spec.get("web")
    if not isinstance(web, dict):
        raise AgentError("switch: the services spec has no web service", kind="usage")
    candidate = web_program(release_id)
    text = web_conf(layout, release_id, web)
    sup = ensure_running(layout, emit)
    live = live_release(layout)
    keep = {candidate, web_program(live)} if live else {candidate}
    for name in sorted(web_programs(layout, sup) - keep):  # leftovers of an interrupted switch
        retire(layout, sup, name, emit)
    _remove_stray_sockets(layout, keep)
    ensure_front(layout, sup, spec, emit)

    info = sup.info(candidate)
    if live == release_id and info is not None and info["statename"] == "RUNNING":
        check_web(layout, sup, release_id, web, emit)
        flip(layout, release_id)
        save_spec(layout, spec)
        workers = ensure_workers(layout, sup, spec, release_id, emit)
        return {"previous": live, "current": release_id, "unchanged": True, "stopped": [],
                "workers": workers, "seconds": round(time.monotonic() - started, 3)}

    emit({"phase": "switch", "status": "start", "detail": f"starting {candidate}"})
    write_program(layout, candidate, text)
    sup.update()
    sup.start(candidate, wait=False)
    try:
        check_web(layout, sup, release_id, web, emit)
    except AgentError:
        if live != release_id:
            retire(layout, sup, candidate, emit)
        raise

    flip(layout, release_id)
    save_spec(layout, spec)  # what start/restart use from now on (not a failed candidate's)
    emit({"phase": "switch", "status": "live", "detail": f"{release_id} takes new connections"})
    old = sorted(web_programs(layout, sup) - {candidate})
    if old:
        # Connections the front routed to the old socket just before the flip finish there.
        drain = spec.get("drain", web.get("drain"))
        time.sleep(DEFAULT_DRAIN if drain is None else float(drain))
    for name in old:
        retire(layout, sup, name, emit)
    workers = ensure_workers(layout, sup, spec, release_id, emit)
    return {"previous": live if live != release_id else None, "current": release_id,
            "stopped": old, "workers": workers, "seconds": round(time.monotonic() - started, 3)}


def _remove_stray_sockets(layout: Layout, keep: set[str]) -> None:
    try:
        socks = list(layout.run.glob("web-*.sock"))
    except OSError:
        return
    for sock in socks:
        if sock.name[:-5] not in keep:
            try:
                sock.unlink()
            except FileNotFoundError:
                pass
