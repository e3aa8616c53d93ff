"""The caddy front (``front = "caddy"``, or a stage with ``domains``): HTTPS with certificates
from an ACME CA, in a Caddy that one stage runs alone or several apps share.

A Caddy runs from its dir (``caddy.data_dir``, default ``<root>/caddy``, 0700): the main
``Caddyfile`` and one site file per deploy root in ``sites/`` (agent/caddyfile.py), its admin
API on a unix socket, its state (``data/``: the ACME accounts and the certificates; Caddy writes
keys 0600 in 0700 dirs) and its log (``caddy.log``, rolled by Caddy). Stages, of one project or
several, naming the same dir share that Caddy (docs/https.md, "Several apps on one host"): each
writes and removes only its own site file, under the dir's lock (agent/frontshare.py), and the
Caddy is reloaded, never restarted, while another app is in it.

It listens on ``https_port`` (443) and ``http_port`` (80): HTTP answers ACME HTTP-01 challenges
and redirects everything else to HTTPS (Caddy's automatic HTTPS); HTTPS proxies each site to its
``run/web.sock``, the symlink a switch renames. Caddy dials that path per connection (``keepalive
off``: no pooled connection to an old release) and retries a refused or reset connection for up
to ``lb_try_duration``, so a switch needs no reload. A changed config is loaded with ``caddy
reload`` (Caddy swaps its config without closing a listener; the other sites' certificates stay
in its cache); an unchanged one does nothing.

Caddy obtains and renews the certificates itself (renewal starts a third of the lifetime before
expiry; the old certificate serves until the new one is in place). After a start or reload the
front waits for each domain's certificate (agent/caddycerts.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from . import atomic_write, caddyunit, frontshare, pid_alive, run_tool
from .caddycerts import wait_certificates
from .caddyfile import SITES, data_dir, main_settings, main_text, settings, site_path, site_text
from .errors import AgentError
from .paths import Layout
from .protocol import CaddySpec, Emit, FrontRoute, FrontState, ServicesSpec

CADDY_TIMEOUT = 60.0  # a caddy CLI command (reload, version)
START_TIMEOUT = 30.0  # caddy run until its admin socket answers
STOP_TIMEOUT = 30.0
POLL = 0.2  # poll interval while waiting for Caddy
LOG_TAIL = 4000


def _env(data: Path) -> dict[str, str]:
    return {**os.environ, **caddyunit.caddy_environment(data)}


def _run(argv: list[str], data: Path) -> subprocess.CompletedProcess[str]:
    return run_tool(argv, timeout=CADDY_TIMEOUT, kind="front", env=_env(data))


def running_pid(data: Path) -> int | None:
    """The stage's Caddy's pid from its pid file, when that process is alive."""
    try:
        pid = int((data / "caddy.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _admin_answers(data: Path) -> bool:
    """True when Caddy's admin API answers on its unix socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect(str(data / "admin.sock"))
        sock.sendall(b"GET /config/ HTTP/1.0\r\nHost: localhost\r\n\r\n")
        return sock.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False
    finally:
        sock.close()


def _tail(path: Path, size: int = LOG_TAIL) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - size))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def units_user(spec: ServicesSpec) -> bool | None:
    """How the stage's Caddy is supervised: None under the daemon backend (the agent starts it,
    detached), else under systemd, whether as a ``--user`` unit (an unprivileged agent)."""
    from .services import choose_backend  # services imports the fronts

    return None if choose_backend(spec) != "systemd" else os.geteuid() != 0


def _start(data: Path, conf: Path, emit: Emit, units: bool | None) -> None:
    """Start Caddy: as a systemd unit (``units`` not None: agent/caddyunit.py), else ``caddy
    run`` detached (its own session); then wait until its admin API answers."""
    emit({"phase": "switch", "status": "front", "detail": f"starting caddy ({conf})"})
    stderr = data / "caddy.stderr"
    argv = caddyunit.caddy_argv(data, conf)
    proc = None
    try:
        with open(stderr, "wb") as err:  # a unit appends to it
            if units is None:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    cwd=str(data),
                    env=_env(data),
                    start_new_session=True,
                )
    except OSError as exc:
        raise AgentError(
            f"caddy could not start: {exc} (install Debian's caddy package)", kind="front"
        ) from None
    if units is not None:
        caddyunit.start(data, conf, units)

    def exited() -> bool:
        return caddyunit.failed(data) if proc is None else proc.poll() is not None

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if exited():
            tail = _tail(stderr).strip()
            hint = ""
            if "address already in use" in tail:
                hint = (
                    "\nanother server holds the port: Debian's own caddy.service listens on 80 "
                    "(systemctl disable --now caddy), or another stage's Caddy does: stages "
                    'naming the same caddy.data_dir share one (docs/https.md, "Several apps on '
                    'one host")'
                )
            elif "permission denied" in tail and "bind" in tail:
                hint = (
                    "\nbinding ports below 1024 needs root or the capability: "
                    "setcap cap_net_bind_service=+ep /usr/bin/caddy"
                )
            code = f"code {proc.returncode}" if proc is not None else caddyunit.unit_name(data)
            raise AgentError(f"caddy exited at start ({code}):\n{tail[-1500:]}{hint}", kind="front")
        if _admin_answers(data):
            return
        time.sleep(POLL)  # poll interval while caddy loads its config
    raise AgentError(
        f"caddy did not answer on {data / 'admin.sock'} within {START_TIMEOUT:.0f}s:\n"
        f"{_tail(stderr)[-1500:]}",
        kind="front",
    )


def _log_size(data: Path) -> int:
    try:
        return os.path.getsize(data / "caddy.log")
    except OSError:
        return 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _restore(path: Path, previous: str | None) -> None:
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write(path, previous, mode=0o600)


def _others(data: Path, mine: Path) -> dict[Path, FrontRoute]:
    """The other deploy roots' sites in the Caddy dir ``data``."""
    found = frontshare.routes(data / SITES, "*.caddy")
    found.pop(mine, None)
    return found


def _own_dir(data: Path) -> None:
    """Make the Caddy dir (0700: the keys live below), or say whose it is when it is not ours."""
    try:
        data.mkdir(parents=True, exist_ok=True)
        os.chmod(data, 0o700)
        (data / SITES).mkdir(exist_ok=True)
    except PermissionError:
        if not os.path.isdir(data):  # (False, not an error, when a parent is closed to us)
            raise AgentError(
                f"cannot make the Caddy dir {data} (caddy.data_dir) as uid {os.geteuid()}: "
                f"shiplane setup makes it for the deploy user",
                kind="front",
            ) from None
        raise AgentError(
            f"the Caddy dir {data} is not this user's (uid {os.geteuid()}; it belongs to uid "
            f"{_owner(data)}): the stages sharing a caddy.data_dir deploy as the same user",
            kind="front",
        ) from None


def _owner(path: Path) -> str:
    try:
        return str(path.stat().st_uid)
    except OSError:
        return "?"


def _refuse_other_settings(main: Path, text: str, others: dict[Path, FrontRoute]) -> None:
    """The main file's options are every app's: another app's Caddy may not change them."""
    current = _read(main)
    if not others or current is None or current == text:
        return
    have, want = main_settings(current), main_settings(text)
    if have == want:
        return
    names = ", ".join(sorted({r["app"] for r in others.values()}))
    raise AgentError(
        f"the Caddy in {main.parent} serves {names} with "
        + ", ".join(f"{k} {v}" for k, v in sorted(have.items()))
        + "; this stage asks for "
        + ", ".join(f"{k} {v}" for k, v in sorted(want.items()))
        + ": stages sharing a caddy.data_dir give the same caddy.http_port, https_port and "
        "renew_interval",
        kind="usage",
    )


def _apply(data: Path, main: Path, emit: Emit, running: bool, units: bool | None) -> None:
    """Start Caddy with the dir's config, or reload it (graceful)."""
    if not running:
        _start(data, main, emit, units)
        return
    emit({"phase": "switch", "status": "front", "detail": f"reloading caddy ({main})"})
    done = _run(["caddy", "reload", "--config", str(main), "--adapter", "caddyfile"], data)
    if done.returncode != 0:
        raise AgentError(
            f"caddy refused the new config {main}; it serves the previous one:\n"
            f"{(done.stderr or done.stdout).strip()[-1500:]}",
            kind="front",
        )


def _running(data: Path) -> bool:
    return running_pid(data) is not None and _admin_answers(data)


def ensure(layout: Layout, spec: ServicesSpec, emit: Emit) -> bool:
    """Write this stage's site (and the dir's main Caddyfile); start Caddy, or reload it when a
    text changed; then wait for the certificates. Unchanged texts and a running Caddy: no
    reload (returns False). A rejected reload puts the previous files back and raises
    ``AgentError(kind="front")``; a first deploy whose certificates fail takes its site out."""
    cfg = settings(spec)
    data = data_dir(layout, spec)
    # shutdown's stop() has only the saved spec: it finds this Caddy by the dir written here
    cfg["data_dir"] = str(data)
    _own_dir(data)
    main, site = data / "Caddyfile", site_path(layout, spec)
    main_new, site_new = main_text(data, cfg), site_text(layout, spec)
    with frontshare.locked(data, emit):
        others = _others(data, site)
        frontshare.refuse_taken(others, list(cfg["domains"]), data)
        _refuse_other_settings(main, main_new, others)
        main_old, site_old = _read(main), _read(site)
        running = _running(data)
        offset = _log_size(data)
        changed = (main_old, site_old) != (main_new, site_new)
        if changed or not running:
            atomic_write(main, main_new, mode=0o600)
            atomic_write(site, site_new, mode=0o600)
            units = units_user(spec)
            try:
                _apply(data, main, emit, running, units)
            except AgentError:
                _restore(main, main_old)
                _restore(site, site_old)
                if not running and _others(data, site):
                    # the others' sites were not served either: Caddy starts for them
                    with contextlib.suppress(AgentError):
                        _start(data, main, emit, units)
                raise
    try:
        wait_certificates(layout, spec, offset, emit)
    except AgentError:
        # an older shiplane's Caddyfile held the site itself (no import): it served these names
        legacy = main_old is not None and "\nimport " not in main_old
        if site_old is None and not legacy:
            # a first deploy: nothing was served for these names; the others keep their Caddy
            withdraw_site(layout, spec, emit)
        raise
    return changed or not running


def withdraw_site(layout: Layout, spec: ServicesSpec, emit: Emit) -> list[str]:
    """Take this stage's site out of its Caddy: reloaded while other apps' sites remain,
    stopped when none does (returns ``["caddy"]`` then)."""
    cfg = spec.get("caddy")
    given = cfg.get("data_dir") if isinstance(cfg, dict) else None
    if not given or not Path(given).is_dir():
        return []
    data = Path(given)
    with frontshare.locked(data, emit):
        site = site_path(layout, spec)
        others = _others(data, site)
        had_site = site.exists()
        site.unlink(missing_ok=True)
        if not others:
            return ["caddy"] if stop_caddy(data, emit) else []
        if had_site and _running(data):
            names = ", ".join(sorted({r["app"] for r in others.values()}))
            emit(
                {
                    "phase": "services",
                    "status": "front",
                    "detail": f"caddy: {site.name} removed; it keeps serving {names}",
                }
            )
            _apply(data, data / "Caddyfile", emit, running=True, units=None)
    return []


def stop_caddy(data: Path, emit: Emit, timeout: float = STOP_TIMEOUT) -> int | None:
    """Stop the Caddy of dir ``data`` (SIGTERM: Caddy's graceful shutdown), waiting for its
    exit. Returns its pid, or None when none ran."""
    pid = running_pid(data)
    if pid is not None:
        emit({"phase": "services", "status": "stop", "detail": f"caddy (pid {pid})"})
    if caddyunit.stop(data) or pid is None:  # under systemd its unit goes too: not at boot
        return pid
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return pid
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # poll interval while Caddy finishes its connections
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    return pid


def describe(layout: Layout, spec: ServicesSpec) -> FrontState | None:
    """The stage's Caddy for ``status``: its dir, pid and every app it routes."""
    cfg: CaddySpec | None = spec.get("caddy")
    if not isinstance(cfg, dict) or not cfg.get("domains"):
        return None
    data = data_dir(layout, spec)
    return {
        "kind": "caddy",
        "config": str(data),
        "pid": running_pid(data),
        "routes": list(frontshare.routes(data / SITES, "*.caddy").values()),
    }


class CaddyFront:
    """``front = "caddy"`` (fronts.py): HTTPS for the stage's domains; the backend runs no
    proxy."""

    name = "caddy"
    supervised = False

    def ensure(self, layout: Layout, spec: ServicesSpec, emit: Emit) -> None:
        ensure(layout, spec, emit)

    def stop(self, layout: Layout, spec: ServicesSpec, emit: Emit) -> list[str]:
        return withdraw_site(layout, spec, emit)

    def describe(self, layout: Layout, spec: ServicesSpec) -> FrontState | None:
        return describe(layout, spec)
