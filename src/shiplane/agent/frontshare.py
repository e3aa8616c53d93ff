"""A front several apps share on one host: one site file per deploy root, a route line in each,
and a lock around every change (docs/https.md, "Several apps on one host").

Each stage's site (Caddy's ``sites/<name>.caddy``, nginx's ``shiplane-<app>-<stage>.conf``)
starts with a route line, ``# shiplane-route {"app", "stage", "root", "domains"}``: ``status``
lists the front's routes from them, and a deploy refuses a name another deploy root already
routes. A deploy, a rollback or a ``stop --all`` rewrites or removes its own site only, then
reloads the shared server (graceful: no listener closes), holding an exclusive ``flock`` on the
front's lock file, so two apps' deploys never interleave their write-check-reload steps. The lock
is held for those steps only, never while a certificate is awaited.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import AgentError
from .paths import Layout
from .protocol import Emit, FrontRoute, ServicesSpec

ROUTE_MARK = "# shiplane-route "
LOCK_TIMEOUT = 120.0  # another app's deploy holds it while it writes and reloads (a Caddy start)
POLL = 0.1


def site_stem(layout: Layout, spec: ServicesSpec) -> str:
    """``<app>-<stage>-<8 hex of the deploy root>``: one site per deploy root, so two stages or
    two projects of the same name on one host never share a file."""
    digest = hashlib.sha256(str(layout.root).encode()).hexdigest()[:8]
    name = f"{spec.get('app') or 'app'}-{spec.get('stage') or 'stage'}-{digest}"
    return re.sub(r"[^\w.-]", "-", name)


def route_line(layout: Layout, spec: ServicesSpec, domains: list[str]) -> str:
    """The first line of a site file: what it routes where."""
    route: FrontRoute = {
        "domains": list(domains),
        "app": str(spec.get("app") or ""),
        "stage": str(spec.get("stage") or ""),
        "root": str(layout.root),
    }
    return ROUTE_MARK + json.dumps(route, sort_keys=True)


def read_route(path: Path) -> FrontRoute | None:
    """The route line of a site file (None: not shiplane's, or an older shiplane's)."""
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError):
        return None
    if not first.startswith(ROUTE_MARK):
        return None
    try:
        found = json.loads(first[len(ROUTE_MARK) :])
    except ValueError:
        return None
    if not isinstance(found, dict) or not isinstance(found.get("domains"), list):
        return None
    return {
        "domains": [str(d) for d in found["domains"]],
        "app": str(found.get("app", "")),
        "stage": str(found.get("stage", "")),
        "root": str(found.get("root", "")),
    }


def routes(directory: Path, pattern: str) -> dict[Path, FrontRoute]:
    """The site files in ``directory`` matching ``pattern`` that carry a route line."""
    found: dict[Path, FrontRoute] = {}
    try:
        paths = sorted(directory.glob(pattern))
    except OSError:
        return found
    for path in paths:
        route = read_route(path)
        if route is not None:
            found[path] = route
    return found


def refuse_taken(others: dict[Path, FrontRoute], domains: list[str], where: Path) -> None:
    """A usage error when another deploy root's site already routes one of ``domains``."""
    wanted = {d.lower() for d in domains}
    for path, route in others.items():
        taken = sorted(wanted & {d.lower() for d in route["domains"]})
        if taken:
            raise AgentError(
                f"{', '.join(taken)} is already routed by the front in {where} to app "
                f"{route['app']!r} (stage {route['stage']}, {route['root']}; {path.name}): a name "
                f"goes to one app on a host — drop it from one of the two stages' domains",
                kind="usage",
            )


@contextlib.contextmanager
def locked(directory: Path, emit: Emit, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold ``<directory>/.shiplane-front.lock`` (flock) while a site changes and the server
    reloads; waits for another app's deploy at most ``timeout`` seconds. (A dot file: nginx's
    ``include sites-enabled/*`` does not match it.)"""
    path = directory / ".shiplane-front.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise AgentError(f"cannot open the front's lock {path}: {exc}", kind="front") from None
    try:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise AgentError(
                        f"the front in {directory} stayed locked for {timeout:.0f}s by another "
                        f"deploy ({path}); try again when it is done",
                        kind="front",
                    ) from None
                if not told:
                    emit(
                        {
                            "phase": "switch",
                            "status": "front",
                            "detail": f"waiting for another app's change of the front ({path})",
                        }
                    )
                    told = True
                time.sleep(POLL)  # poll interval while another deploy reloads the front
        yield
    finally:
        os.close(fd)  # drops the flock
