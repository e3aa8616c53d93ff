"""Blue/green switch of the web service, the same under every backend (backend.py).

Each release's gunicorn runs on its own unix socket ``run/web-<id>.sock``. A switch starts the
candidate from its own release directory, checks it (health, smoke) on that socket, then renames
``run/web.sock`` (what the front connects to) and ``current``. Reloading in place is never used:
it would keep serving the old release (SPEC §13). Every step can be re-run after a crash, and a
server killed at any moment is restarted by its manager, so a host ends up serving exactly one
healthy release.

What happens to the server that served until the flip depends on ``web.standby``:

- standby (the default): it keeps running, idle, as the *standby*. Its in-flight requests finish
  on their own; a rollback to it is a health check and a rename, no process start (SPEC §2:
  "rollback goes back in about a second"). The standby before it, which has had no traffic
  since the last switch, gets TERM as soon as the candidate starts booting, so its exit overlaps
  the candidate's boot. Costs one idle server's memory.
- no standby: after the flip the old server drains (``drain`` seconds), the new one is checked
  once more, and the old one is retired with TERM (gunicorn's graceful shutdown: in-flight
  requests finish; connections still queued on its socket are reset, and the builtin front and
  nginx replay those on the new socket).
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
from .backend import Backend, builtin_front, unlink_quiet
from .errors import AgentError
from .health import run_smoke, wait_healthy
from .paths import Layout

Emit = Callable[[dict[str, Any]], None]

DEFAULT_DRAIN = 1.0


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


def retire(layout: Layout, backend: Backend, release_id: str, emit: Emit) -> None:
    """Stop a release's web server (TERM: gunicorn finishes in-flight requests) and forget it."""
    emit({"phase": "switch", "status": "stop", "detail": f"stopping {web_program(release_id)}"})
    _forget(layout, backend, release_id, emit)


def forget(layout: Layout, backend: Backend, release_id: str, emit: Emit) -> None:
    """Wait for a stopped release server's exit, then remove its program and socket."""
    _forget(layout, backend, release_id, emit)


def _forget(layout: Layout, backend: Backend, release_id: str, emit: Emit) -> None:
    backend.stop_web(release_id, emit)  # waits for the exit when the stop was only sent
    unlink_quiet(layout.release_socket(release_id))


def ensure_front(
    layout: Layout, backend: Backend, spec: dict[str, Any], emit: Emit, wait: bool = True
) -> None:
    """The front is as the spec says: the builtin proxy under the backend, or nginx's site
    (written, checked with ``nginx -t`` and reloaded; a failed check changes nothing).
    ``wait=False``: a builtin front just started may not listen yet (``backend.wait_front``)."""
    backend.ensure_front(spec, emit, wait=wait)
    if not builtin_front(spec):
        from . import nginx  # only stages fronted by nginx need it

        nginx.ensure_site(layout, spec, emit)


def check_web(
    layout: Layout,
    backend: Backend,
    release_id: str,
    web: dict[str, Any],
    emit: Emit,
    smoke: bool = True,
    log_since: int = 0,
) -> dict[str, Any]:
    """Health (then smoke) checks of the release's server on its own socket (AgentError). A
    failure quotes ``log/web.log`` from byte ``log_since`` on: what this server wrote, not the
    lines an earlier release left in the shared log."""
    health = web.get("health") or {}

    def dead() -> str | None:
        return backend.web_state(release_id)[1]

    sock = layout.release_socket(release_id)
    log = layout.log / "web.log"
    host = str(health.get("host") or "localhost")  # the Host header: apps check it (ALLOWED_HOSTS)
    result = wait_healthy(
        sock,
        health.get("path"),
        float(health.get("timeout") or 30),
        log,
        emit,
        dead,
        host=host,
        log_since=log_since,
    )
    checks = web.get("smoke") or []
    if checks and smoke:
        emit({"phase": "switch", "status": "smoke", "detail": f"{len(checks)} check(s)"})
        run_smoke(sock, checks, log_path=log, host=host, log_since=log_since)
    return result


def switch(
    layout: Layout,
    release_id: str,
    spec: dict[str, Any],
    emit: Emit,
    backend: Backend,
    forget_later: bool = False,
) -> dict[str, Any]:
    """Blue/green switch of the web service to ``release_id`` (see the module docstring).

    A candidate failing its checks is stopped and removed and the error (kind ``health`` or
    ``smoke``) raised; ``current`` and ``web.sock`` are then untouched. Returns
    ``{previous, current, seconds, stopped, standby, workers, killed, backend, stopping}``;
    ``killed`` lists the workers that outlived their grace period and were killed.
    ``forget_later``: the old standby (TERMed when the switch began) is not waited for; its ids
    are returned as ``stopping``, for the caller to :func:`forget` once it has exited.
    """
    started = time.monotonic()
    if not layout.release_meta(release_id).is_file():
        raise AgentError(f"switch: release {release_id} is not installed", kind="missing")
    web = spec.get("web")
    if not isinstance(web, dict):
        raise AgentError("switch: the services spec has no web service", kind="usage")
    standby = web.get("standby", True) is not False
    backend.prepare(spec, emit)
    live = live_release(layout)
    servers = backend.web_releases()
    keep = {release_id, live} if live else {release_id}
    # Not needed after this switch: the old standby (idle since the last switch) and leftovers
    # of an interrupted one. They stop while the candidate boots.
    going = sorted(servers - keep)
    for rid in going:
        emit({"phase": "switch", "status": "stop", "detail": f"stopping {web_program(rid)}"})
        backend.stop_web(rid, emit, wait=False)
    _remove_stray_sockets(layout, {web_program(r) for r in keep | set(going)})

    def done(previous: str | None, stopped: list[str], **extra: Any) -> dict[str, Any]:
        for rid in [] if forget_later else going:
            _forget(layout, backend, rid, emit)
        workers = backend.restart_workers(spec, release_id, emit)
        return {
            "previous": previous,
            "current": release_id,
            "stopped": sorted(stopped + [web_program(r) for r in going]),
            **extra,
            "standby": previous if standby and previous else None,
            "workers": workers["workers"],
            "killed": workers["killed"],
            "backend": backend.name,
            "seconds": round(time.monotonic() - started, 3),
            "stopping": going if forget_later else [],
        }

    if live == release_id and backend.web_state(release_id)[0]:
        ensure_front(layout, backend, spec, emit)
        check_web(layout, backend, release_id, web, emit)
        flip(layout, release_id)
        save_spec(layout, spec)
        return done(None, [], unchanged=True)

    running = release_id in servers and backend.web_state(release_id)[0]
    if running and backend.web_booted(release_id):  # the standby (a rollback): only checked
        emit(
            {
                "phase": "switch",
                "status": "standby",
                "detail": f"{web_program(release_id)} is running as the standby",
            }
        )
    elif running:  # started during the install with its libraries: it loads the app now
        emit(
            {
                "phase": "switch",
                "status": "start",
                "detail": f"letting {web_program(release_id)} "
                "load the app (its libraries are loaded)",
            }
        )
    else:
        emit(
            {"phase": "switch", "status": "start", "detail": f"starting {web_program(release_id)}"}
        )
    # a standby whose program is unchanged keeps running; one started with other web settings
    # (workers, worker class, timeouts) is restarted with these
    log_since = _size(layout.log / "web.log")  # a failure quotes only what this candidate wrote
    backend.start_web(release_id, web, emit)
    try:
        # a front starting up (a first deploy) does so while the candidate boots
        ensure_front(layout, backend, spec, emit, wait=False)
        check_web(layout, backend, release_id, web, emit, log_since=log_since)
        backend.wait_front(spec)
    except AgentError:
        if live != release_id:
            retire(layout, backend, release_id, emit)
        for rid in going:
            _forget(layout, backend, rid, emit)
        if live is None:  # a first deploy: nothing served before, so no front may stay up either
            backend.stop("front", emit)
        raise

    flip(layout, release_id)
    save_spec(layout, spec)  # what start/restart use from now on (not a failed candidate's)
    emit({"phase": "switch", "status": "live", "detail": f"{release_id} takes new connections"})
    old = live if live and live != release_id and live in servers else None
    if old is not None and standby and _keeps_connections(web):
        # Its workers would go on answering clients that hold a keep-alive connection through
        # the front (pinned to the old socket): HUP gives the standby fresh workers, and the
        # old ones finish their request and close those connections, so clients reconnect
        # to the new release.
        emit(
            {
                "phase": "switch",
                "status": "standby",
                "detail": f"{web_program(old)} stays up, idle, with fresh workers",
            }
        )
        backend.signal_web(old, "HUP")
    if old is None or standby:
        return done(live if live != release_id else None, [])
    # Connections the front routed to the old socket just before the flip finish there.
    drain = spec.get("drain", web.get("drain"))
    emit({"phase": "switch", "status": "drain", "detail": f"draining {old}"})
    time.sleep(DEFAULT_DRAIN if drain is None else float(drain))
    _recheck(layout, backend, release_id, old, web, emit)
    retire(layout, backend, old, emit)
    return done(old, [web_program(old)])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _keeps_connections(web: dict[str, Any]) -> bool:
    """Whether the web server's workers keep client connections open between requests
    (gunicorn's sync worker closes after every response; gthread, gevent, uvicorn... do not)."""
    worker_class = str(
        web.get("worker_class") or ("uvicorn" if web.get("kind") == "asgi" else "sync")
    )
    return worker_class.rsplit(".", 1)[-1].lower() not in ("sync", "syncworker")


def _recheck(
    layout: Layout,
    backend: Backend,
    release_id: str,
    live: str | None,
    web: dict[str, Any],
    emit: Emit,
) -> None:
    """The new server still answers before the old one goes (it may have crashed since the flip:
    its manager restarts it); if it does not come back, traffic returns to ``live``."""
    try:
        check_web(layout, backend, release_id, web, emit, smoke=False)
    except AgentError as exc:
        if live is None or not backend.web_state(live)[0]:
            raise
        flip(layout, live)
        emit({"phase": "switch", "status": "back", "detail": f"{live} takes connections again"})
        retire(layout, backend, release_id, emit)
        raise AgentError(
            f"{release_id} stopped answering after it took traffic; {live} serves "
            f"again: {exc.message}",
            kind="health",
        ) from None


def _remove_stray_sockets(layout: Layout, keep: set[str]) -> None:
    try:
        socks = list(layout.run.glob("web-*.sock"))
    except OSError:
        return
    for sock in socks:
        if sock.name[:-5] not in keep:
            unlink_quiet(sock)
