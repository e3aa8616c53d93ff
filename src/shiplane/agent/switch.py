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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, cast

from . import atomic_write, fsync_dir
from .backend import Backend, Killed, unlink_quiet
from .errors import AgentError
from .fronts import front_for
from .health import run_smoke, wait_healthy
from .paths import Layout
from .protocol import Emit, Event, ServicesSpec, WebSpec

DEFAULT_DRAIN = 1.0


class _Switched(TypedDict):
    previous: str | None  # the release that served before, if it changed
    current: str
    stopped: list[str]  # web programs stopped
    standby: str | None  # the release left running, idle, for a rollback
    workers: list[str]
    killed: list[Killed]  # workers that outlived their grace period
    backend: str
    seconds: float
    stopping: list[str]  # with forget_later: old servers TERMed, for the caller to forget


class SwitchResult(_Switched, total=False):
    """What :func:`switch` did; ``unchanged`` when the release was live already."""

    unchanged: bool


# --- where things are ------------------------------------------------------------------------


def web_program(release_id: str) -> str:
    return f"web-{release_id}"


def spec_path(layout: Layout) -> Path:
    return layout.run / "services.json"


def save_spec(layout: Layout, spec: ServicesSpec) -> None:
    """Remember the services spec, so ``start``/``restart`` without one reuse it."""
    atomic_write(spec_path(layout), json.dumps(spec, indent=2, sort_keys=True) + "\n")


def load_spec(layout: Layout) -> ServicesSpec | None:
    """The spec :func:`save_spec` wrote (the last successful switch's), or None."""
    try:
        spec = json.loads(spec_path(layout).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cast(ServicesSpec, spec) if isinstance(spec, dict) else None


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
    layout: Layout, backend: Backend, spec: ServicesSpec, emit: Emit, wait: bool = True
) -> None:
    """The front is as the spec says (agent/fronts.py): the backend runs the builtin proxy or
    removes it, then the stage's front does its own part (nginx: its site written, checked with
    ``nginx -t`` and reloaded; a failed check changes nothing). ``wait=False``: a builtin front
    just started may not listen yet (``backend.wait_front``)."""
    backend.ensure_front(spec, emit, wait=wait)
    front_for(spec).ensure(layout, spec, emit)


def check_web(
    layout: Layout,
    backend: Backend,
    release_id: str,
    web: WebSpec,
    emit: Emit,
    smoke: bool = True,
    log_since: int = 0,
) -> None:
    """Health (then smoke) checks of the release's server on its own socket (AgentError). A
    failure quotes ``log/web.log`` from byte ``log_since`` on: what this server wrote, not the
    lines an earlier release left in the shared log."""
    health = web.get("health") or {}

    def dead() -> str | None:
        return backend.web_state(release_id)[1]

    sock = layout.release_socket(release_id)
    log = layout.log / "web.log"
    host = str(health.get("host") or "localhost")  # the Host header: apps check it (ALLOWED_HOSTS)
    wait_healthy(
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


@dataclass(frozen=True)
class _Switch:
    """One switch: what its steps share."""

    layout: Layout
    backend: Backend
    spec: ServicesSpec
    web: WebSpec
    release_id: str  # the candidate
    emit: Emit
    live: str | None  # the release serving when the switch began
    servers: set[str]  # releases with a web server then
    going: list[str]  # their servers this switch stops (the old standby, leftovers)
    forget_later: bool
    started: float

    @property
    def standby(self) -> bool:
        """Whether the server that served until the flip stays up, idle (``web.standby``)."""
        return self.web.get("standby", True) is not False


def switch(
    layout: Layout,
    release_id: str,
    spec: ServicesSpec,
    emit: Emit,
    backend: Backend,
    forget_later: bool = False,
) -> SwitchResult:
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
    backend.prepare(spec, emit)
    live = live_release(layout)
    servers = backend.web_releases()
    going = _stop_unneeded(layout, backend, release_id, live, servers, emit)
    job = _Switch(
        layout, backend, spec, web, release_id, emit, live, servers, going, forget_later, started
    )
    if live == release_id and backend.web_state(release_id)[0]:
        return _confirm_live(job)
    log_since = _start_candidate(job)
    _check_candidate(job, log_since)
    flip(layout, release_id)
    save_spec(layout, spec)  # what start/restart use from now on (not a failed candidate's)
    emit({"phase": "switch", "status": "live", "detail": f"{release_id} takes new connections"})
    return _hand_over(job)


def _stop_unneeded(
    layout: Layout,
    backend: Backend,
    release_id: str,
    live: str | None,
    servers: set[str],
    emit: Emit,
) -> list[str]:
    """Stop (without waiting) what is not needed after this switch: the old standby (idle
    since the last switch) and leftovers of an interrupted one, so they exit while the
    candidate boots; returns their release ids."""
    keep = {release_id, live} if live else {release_id}
    going = sorted(servers - keep)
    for rid in going:
        emit({"phase": "switch", "status": "stop", "detail": f"stopping {web_program(rid)}"})
        backend.stop_web(rid, emit, wait=False)
    _remove_stray_sockets(layout, {web_program(r) for r in keep | set(going)})
    return going


def _confirm_live(job: _Switch) -> SwitchResult:
    """The candidate is the live release, running: only checked, and the links made sure of."""
    ensure_front(job.layout, job.backend, job.spec, job.emit)
    check_web(job.layout, job.backend, job.release_id, job.web, job.emit)
    flip(job.layout, job.release_id)
    save_spec(job.layout, job.spec)
    return _finish(job, None, [], unchanged=True)


def _start_candidate(job: _Switch) -> int:
    """Start the candidate's server, or let a prebooted or standby one go on; returns the size
    of ``log/web.log`` before, so a failure quotes only what this candidate wrote."""
    rid, program = job.release_id, web_program(job.release_id)
    running = rid in job.servers and job.backend.web_state(rid)[0]
    if running and job.backend.web_booted(rid):  # the standby (a rollback): only checked
        event: Event = {
            "phase": "switch",
            "status": "standby",
            "detail": f"{program} is running as the standby",
        }
    elif running:  # started during the install with its libraries: it loads the app now
        event = {
            "phase": "switch",
            "status": "start",
            "detail": f"letting {program} load the app (its libraries are loaded)",
        }
    else:
        event = {"phase": "switch", "status": "start", "detail": f"starting {program}"}
    job.emit(event)
    log_since = _size(job.layout.log / "web.log")
    # a standby whose program is unchanged keeps running; one started with other web settings
    # (workers, worker class, timeouts) is restarted with these
    job.backend.start_web(rid, job.web, job.emit)
    return log_since


def _check_candidate(job: _Switch, log_since: int) -> None:
    """Health and smoke checks of the candidate; on failure it is stopped (unless it is the
    live release), the old servers being stopped are waited for, and a first deploy's front is
    stopped too (nothing served before), then the error is raised."""
    try:
        # a front starting up (a first deploy) does so while the candidate boots
        ensure_front(job.layout, job.backend, job.spec, job.emit, wait=False)
        check_web(job.layout, job.backend, job.release_id, job.web, job.emit, log_since=log_since)
        job.backend.wait_front(job.spec)
    except AgentError:
        if job.live != job.release_id:
            retire(job.layout, job.backend, job.release_id, job.emit)
        for rid in job.going:
            _forget(job.layout, job.backend, rid, job.emit)
        if job.live is None:
            job.backend.stop("front", job.emit)
        raise


def _hand_over(job: _Switch) -> SwitchResult:
    """After the flip, the server that served until then stays as the standby, or drains and
    is retired (``web.standby`` false)."""
    live, rid = job.live, job.release_id
    old = live if live and live != rid and live in job.servers else None
    if old is not None and job.standby and _keeps_connections(job.web):
        # Its workers would go on answering clients that hold a keep-alive connection through
        # the front (pinned to the old socket): HUP gives the standby fresh workers, and the
        # old ones finish their request and close those connections, so clients reconnect
        # to the new release.
        job.emit(
            {
                "phase": "switch",
                "status": "standby",
                "detail": f"{web_program(old)} stays up, idle, with fresh workers",
            }
        )
        job.backend.signal_web(old, "HUP")
    if old is None or job.standby:
        return _finish(job, live if live != rid else None, [])
    # Connections the front routed to the old socket just before the flip finish there.
    job.emit({"phase": "switch", "status": "drain", "detail": f"draining {old}"})
    time.sleep(_drain_seconds(job.spec, job.web))
    _recheck(job.layout, job.backend, rid, old, job.web, job.emit)
    retire(job.layout, job.backend, old, job.emit)
    return _finish(job, old, [web_program(old)])


def _drain_seconds(spec: Mapping[str, object], web: Mapping[str, object]) -> float:
    """``drain`` of the spec, else of its web service (neither is in the protocol's types yet:
    tests set it), else DEFAULT_DRAIN."""
    drain = spec.get("drain", web.get("drain"))
    if drain is None:
        return DEFAULT_DRAIN
    if isinstance(drain, (int, float, str)):
        return float(drain)
    raise AgentError(f"drain must be a number of seconds, found {drain!r}", kind="usage")


def _finish(
    job: _Switch, previous: str | None, stopped: list[str], unchanged: bool = False
) -> SwitchResult:
    """Wait for the old servers (unless ``forget_later``), restart the workers on the new
    release, and say what the switch did."""
    for rid in [] if job.forget_later else job.going:
        _forget(job.layout, job.backend, rid, job.emit)
    workers = job.backend.restart_workers(job.spec, job.release_id, job.emit)
    # the jobs' runs read the live release when they start: only their schedule is updated
    job.backend.ensure_jobs(job.spec, job.emit)
    result: SwitchResult = {
        "previous": previous,
        "current": job.release_id,
        "stopped": sorted(stopped + [web_program(r) for r in job.going]),
        "standby": previous if job.standby and previous else None,
        "workers": workers["workers"],
        "killed": workers["killed"],
        "backend": job.backend.name,
        "seconds": round(time.monotonic() - job.started, 3),
        "stopping": job.going if job.forget_later else [],
    }
    if unchanged:
        result["unchanged"] = True
    return result


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _keeps_connections(web: WebSpec) -> bool:
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
    web: WebSpec,
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
