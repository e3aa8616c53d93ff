"""The nginx front (``front = "nginx"``): the stage's site file, checked and reloaded.

The site proxies to ``run/web.sock``, the symlink a switch renames: nginx connects to that path
per request, so a switch needs no reload at all. A reload happens only when the site text changes
(first deploy, a changed server name, TLS paths, static dirs, port). The upstream lists the same
socket three times so that ``proxy_next_upstream error`` has somewhere to go: a connection the old
server's listener reset when it shut down is retried, on the new server's socket, once the
symlink moved. ``nginx -t`` checks the new file first; when it fails the previous file is put
back and nothing is reloaded.

``nginx = { conf = ..., pid_file = ... }`` drives a private nginx (its own ``-c`` conf, started
here when it is not running); without ``conf`` the host's nginx is used (``nginx -s reload``).

Several apps may share one nginx (the host's, or a private one whose site dir they name): each
site carries its route line and changes under the site dir's lock (frontshare.py); a shutdown
removes the stage's site and reloads, and stops a private nginx only when no other shiplane site
is left in its dir.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import TypedDict

from . import atomic_write, frontshare, pid_alive, run_tool
from .backend import front_listen
from .errors import AgentError
from .paths import Layout
from .protocol import Emit, FrontRoute, FrontState, NginxSpec, ServicesSpec

NGINX_TIMEOUT = 60.0
DEFAULT_SITE_DIR = "/etc/nginx/sites-enabled"
DEFAULT_PID_FILE = "/run/nginx.pid"
UPSTREAM_COPIES = 3
NAME_RE = re.compile(r"[^A-Za-z0-9_]")


class SiteResult(TypedDict):
    site: str
    changed: bool


def settings(spec: ServicesSpec) -> NginxSpec:
    """The stage's ``nginx`` settings (all unset when the spec has none)."""
    nginx = spec.get("nginx")
    if isinstance(nginx, dict):
        return nginx
    return {
        "server_name": "_",
        "tls_cert": None,
        "tls_key": None,
        "static": {},
        "site_dir": DEFAULT_SITE_DIR,
        "conf": None,
        "pid_file": None,
    }


def site_path(spec: ServicesSpec) -> Path:
    """``<site_dir>/shiplane-<app>-<stage>.conf``."""
    name = f"shiplane-{spec.get('app') or 'app'}-{spec.get('stage') or 'stage'}.conf"
    return Path(settings(spec).get("site_dir") or DEFAULT_SITE_DIR) / re.sub(r"[^\w.-]", "-", name)


def _q(value: object) -> str:
    """A double-quoted nginx string (no variables expanded: ``$`` cannot start one here)."""
    text = str(value)
    if any(ch in text for ch in "\n\r\0"):
        raise AgentError(f"value not allowed in an nginx conf: {text!r}", kind="usage")
    if "$" in text:
        raise AgentError(f"'$' is not allowed in an nginx path or name: {text!r}", kind="usage")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def server_names(spec: ServicesSpec) -> list[str]:
    """The names the site routes (none for the catch-all ``_``)."""
    return [n for n in str(settings(spec).get("server_name") or "_").split() if n != "_"]


def site_conf(layout: Layout, spec: ServicesSpec) -> str:
    """The text of the stage's nginx site."""
    cfg = settings(spec)
    upstream = NAME_RE.sub("_", f"shiplane_{spec.get('app')}_{spec.get('stage')}")
    listen = front_listen(spec)
    tls = bool(cfg.get("tls_cert"))
    lines = [
        frontshare.route_line(layout, spec, server_names(spec)),
        f"# written by shiplane for {spec.get('app')} ({spec.get('stage')}); replaced at deploys",
        f"upstream {upstream} {{",
        "    # one socket, listed again so that a reset or refused connect is retried on it",
    ]
    lines += [f"    server {_q('unix:' + str(layout.web_socket))} max_fails=0;"] * UPSTREAM_COPIES
    lines += [
        "}",
        "",
        "server {",
        f"    listen {listen}{' ssl' if tls else ''};",
        f"    server_name {cfg.get('server_name') or '_'};",
    ]
    if tls:
        lines += [
            f"    ssl_certificate {_q(cfg['tls_cert'])};",
            f"    ssl_certificate_key {_q(cfg.get('tls_key') or cfg['tls_cert'])};",
        ]
    for prefix, rel in sorted((cfg.get("static") or {}).items()):
        location = "/" + str(prefix).strip("/") + "/"
        target = str(layout.current / str(rel).strip("/")) + "/"
        lines += [
            f"    location {_q(location)} {{",
            f"        alias {_q(target)};",
            "        expires 1h;",
            "    }",
        ]
    lines += [
        "    location / {",
        f"        proxy_pass http://{upstream};",
        "        proxy_http_version 1.1;",
        '        proxy_set_header Connection "";',
        "        proxy_set_header Host $host;",
        "        # the client's address, replacing whatever X-Forwarded-For the client sent",
        "        proxy_set_header X-Forwarded-For $remote_addr;",
        "        proxy_set_header X-Forwarded-Proto $scheme;",
        "        proxy_next_upstream error timeout;",
        f"        proxy_next_upstream_tries {UPSTREAM_COPIES};",
        "        proxy_connect_timeout 5s;",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def nginx_argv(spec: ServicesSpec, *args: str) -> list[str]:
    """``nginx`` with the private conf (and its dir as prefix) when one is configured."""
    cfg = settings(spec)
    argv = ["nginx"]
    if cfg.get("conf"):
        conf = os.path.abspath(str(cfg["conf"]))
        argv += ["-p", os.path.dirname(conf) + "/", "-c", conf, "-e", "stderr"]
    return argv + list(args)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return run_tool(argv, timeout=NGINX_TIMEOUT, kind="front")


def master_pid(spec: ServicesSpec) -> int | None:
    """The running nginx master's pid from its pid file, or None."""
    path = settings(spec).get("pid_file") or DEFAULT_PID_FILE
    try:
        pid = int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _site_dir(spec: ServicesSpec) -> Path:
    return Path(settings(spec).get("site_dir") or DEFAULT_SITE_DIR)


def _others(spec: ServicesSpec, path: Path) -> dict[Path, FrontRoute]:
    found = frontshare.routes(_site_dir(spec), "shiplane-*.conf")
    found.pop(path, None)
    return found


def _refuse_anothers_file(layout: Layout, path: Path) -> None:
    """Two deploy roots of the same app and stage name on one host would write one file."""
    route = frontshare.read_route(path)
    if route is not None and route["root"] != str(layout.root):
        raise AgentError(
            f"the nginx site {path} routes {route['app']} ({route['stage']}) of "
            f"{route['root']}, another deploy root with this app's and stage's names: give one "
            f"of them another nginx.site_dir or stage name",
            kind="usage",
        )


def ensure_site(layout: Layout, spec: ServicesSpec, emit: Emit) -> SiteResult:
    """Write the site, ``nginx -t``, reload (or start a private nginx), holding the site dir's
    lock. Unchanged text: nothing to do. A failed check puts the previous file back and raises
    ``AgentError(kind="front")``."""
    path = site_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    with frontshare.locked(path.parent, emit):
        _refuse_anothers_file(layout, path)
        frontshare.refuse_taken(_others(spec, path), server_names(spec), path.parent)
        return _write_site(layout, spec, path, emit)


def _write_site(layout: Layout, spec: ServicesSpec, path: Path, emit: Emit) -> SiteResult:
    text = site_conf(layout, spec)
    try:
        previous: str | None = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        previous = None
    running = master_pid(spec)
    if previous == text and running is not None:
        return {"site": str(path), "changed": False}
    atomic_write(path, text)
    test = _run(nginx_argv(spec, "-t"))
    if test.returncode != 0:
        if previous is None:
            path.unlink()
        else:
            atomic_write(path, previous)
        raise AgentError(
            f"nginx -t rejected the site {path}; the previous site is back:\n"
            f"{(test.stderr or test.stdout).strip()}",
            kind="front",
        )
    if running is None and settings(spec).get("conf"):
        emit({"phase": "switch", "status": "front", "detail": "starting nginx"})
        done = _run(nginx_argv(spec))
    elif running is None:
        raise AgentError(
            f"nginx is not running (no live pid in "
            f"{settings(spec).get('pid_file') or DEFAULT_PID_FILE}): start it, or "
            f"set nginx.conf for a private nginx",
            kind="front",
        )
    else:
        emit({"phase": "switch", "status": "front", "detail": f"reloading nginx for {path}"})
        done = _run(nginx_argv(spec, "-s", "reload"))
    if done.returncode != 0:
        raise AgentError(
            f"nginx did not take the site {path}: {(done.stderr or done.stdout).strip()}",
            kind="front",
        )
    return {"site": str(path), "changed": True}


def withdraw_site(layout: Layout, spec: ServicesSpec, emit: Emit) -> list[str]:
    """At a shutdown: remove the stage's site and reload nginx, or stop a private nginx when
    no other shiplane site is left in its dir (returns ``["nginx"]`` then). The host's own
    nginx is never stopped; a reload it refuses is reported, the shutdown goes on."""
    path = site_path(spec)
    if not path.parent.is_dir():
        return []
    with frontshare.locked(path.parent, emit):
        route = frontshare.read_route(path)
        if route is not None and route["root"] != str(layout.root):
            return []  # another deploy root's site: not this stage's to remove
        had_site = path.exists()
        path.unlink(missing_ok=True)
        if settings(spec).get("conf") and not _others(spec, path):
            return ["nginx"] if stop_private(spec, emit) else []
        if not had_site or master_pid(spec) is None:
            return []
        done = _run(nginx_argv(spec, "-s", "reload"))
        detail = f"nginx reloaded without {path.name}"
        if done.returncode != 0:
            detail = f"nginx did not reload without {path.name}: {(done.stderr or '').strip()}"
        emit({"phase": "services", "status": "front", "detail": detail})
    return []


def describe(layout: Layout, spec: ServicesSpec) -> FrontState:
    """The nginx the stage's site is in, for ``status``: every shiplane site in its dir."""
    return {
        "kind": "nginx",
        "config": str(_site_dir(spec)),
        "pid": master_pid(spec),
        "routes": list(frontshare.routes(_site_dir(spec), "shiplane-*.conf").values()),
    }


def stop_private(spec: ServicesSpec, emit: Emit, timeout: float = 30.0) -> int | None:
    """Stop the private nginx (``nginx.conf`` set) gracefully: ``-s quit``, then wait for its
    master to exit. The host's own nginx is never stopped. Returns the stopped master's pid."""
    pid = master_pid(spec)
    if pid is None or not settings(spec).get("conf"):
        return None
    emit({"phase": "services", "status": "stop", "detail": f"nginx (pid {pid})"})
    _run(nginx_argv(spec, "-s", "quit"))
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # poll interval while nginx finishes its connections
    return pid


class NginxFront:
    """``front = "nginx"`` (fronts.py): the stage's site; the backend runs no proxy."""

    name = "nginx"
    supervised = False

    def ensure(self, layout: Layout, spec: ServicesSpec, emit: Emit) -> None:
        ensure_site(layout, spec, emit)

    def stop(self, layout: Layout, spec: ServicesSpec, emit: Emit) -> list[str]:
        """The site goes; a private nginx no other app's site is in stops (never the host's)."""
        return withdraw_site(layout, spec, emit)

    def describe(self, layout: Layout, spec: ServicesSpec) -> FrontState | None:
        return describe(layout, spec)
