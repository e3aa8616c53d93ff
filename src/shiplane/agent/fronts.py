"""The fronts, by the name a stage's ``front`` gives: the server on the stage's public port that
sends every request to ``run/web.sock``, the symlink a switch moves to the live release's socket.

- ``builtin``: the agent's own proxy (proxy.py), run by the stage's backend as its ``front``
  service (backend.py's ``front_argv``: a supervisord program, or a systemd socket and service);
- ``nginx``: the stage's site in the host's nginx, or in a private one (nginx.py);
- ``caddy``: HTTPS for the stage's domains, certificates from an ACME CA (caddy.py).

Several apps (deploy roots) may share one nginx or Caddy on a host, routed by host name: each
stage writes and removes only its own site, under the front's lock (frontshare.py).

A switch sets the front up in two steps: the backend runs the builtin proxy, or removes it when
the stage has another front (``Backend.ensure_front``), then the front's own :meth:`Front.ensure`
(nginx: the site written, checked and reloaded). A shutdown stops what :meth:`Front.stop` names
besides the backend's services; ``status`` adds :meth:`Front.describe`.

Adding a front is its module (a :class:`Front`), a line in ``FRONTS``, its name in the
``front`` choices of the deploy file (config/schema.py), and its tests.
"""

from __future__ import annotations

from typing import Protocol

from . import caddy, nginx
from .errors import AgentError
from .paths import Layout
from .protocol import Emit, FrontState, ServicesSpec

DEFAULT = "builtin"


class Front(Protocol):
    """What services.py and switch.py need from a front."""

    name: str
    # True: the backend runs it as the stage's ``front`` service (started, stopped and shown
    # in ``status`` with the others); False: a server of its own, driven through this class
    supervised: bool

    def ensure(self, layout: Layout, spec: ServicesSpec, emit: Emit) -> None:
        """Serve the stage as ``spec`` says, once the backend's ``ensure_front`` ran; an
        AgentError of kind ``front`` when it cannot (the previous setup then stays)."""

    def stop(self, layout: Layout, spec: ServicesSpec, emit: Emit) -> list[str]:
        """At a shutdown: take the stage out of the front, and stop what the stage itself
        started for it unless another app's site is still in it (the backend has stopped its
        own services); returns what stopped."""

    def describe(self, layout: Layout, spec: ServicesSpec) -> FrontState | None:
        """For ``status``: the server, and every app it routes by host name (several apps may
        share one front: agent/frontshare.py); None for a front that routes no names."""


class BuiltinFront:
    """The builtin proxy: the backend runs it (``Backend.ensure_front``), nothing more to do."""

    name = "builtin"
    supervised = True

    def ensure(self, layout: Layout, spec: ServicesSpec, emit: Emit) -> None:
        return None

    def stop(self, layout: Layout, spec: ServicesSpec, emit: Emit) -> list[str]:
        return []  # the backend's shutdown stopped it, with every service

    def describe(self, layout: Layout, spec: ServicesSpec) -> FrontState | None:
        return None  # one stage's port, no names: ``status`` shows it among the services


# The fronts by name (config/schema.py's ``front`` choices are the same names): adding one is its
# module (a Front), a line here, and its tests.
FRONTS: dict[str, Front] = {
    "builtin": BuiltinFront(),
    "nginx": nginx.NginxFront(),
    "caddy": caddy.CaddyFront(),
}


def front_for(spec: ServicesSpec | None) -> Front:
    """The stage's front (the builtin proxy when the spec names none, or there is no spec)."""
    name = (spec.get("front") if spec else None) or DEFAULT
    front = FRONTS.get(name)
    if front is None:
        raise AgentError(f"unknown front {name!r} ({', '.join(FRONTS)})", kind="usage")
    return front
