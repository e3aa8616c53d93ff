"""The transports, by name: which one reaches a host is asked here, never by comparing host
strings elsewhere. Adding one is its module (a class that is a ``TransportKind``, its instances
``Transport`` objects: transport/base.py), a line in ``TRANSPORTS``, and its tests.

Kept light: ``prewarm`` imports this package before the config package (pydantic) loads."""

from __future__ import annotations

from .base import ConnectSettings, Transport, TransportKind
from .local import LocalTransport
from .ssh import SSHTransport

# In the order a host spec is tried: the first transport that claims it serves it; SSH claims
# every spec (its constructor refuses one that is not [user@]host[:port]), so it comes last.
TRANSPORTS: dict[str, TransportKind] = {
    "local": LocalTransport,
    "ssh": SSHTransport,
}


def kind_of(host: str) -> str:
    """The name in ``TRANSPORTS`` of the transport that serves ``host``."""
    for name, kind in TRANSPORTS.items():
        if kind.claims(host):
            return name
    raise LookupError(f"no transport serves host {host!r}")  # pragma: no cover - SSH takes all


def transport_class(host: str) -> TransportKind:
    """The transport class that serves ``host``."""
    return TRANSPORTS[kind_of(host)]


def on_controller(host: str) -> bool:
    """Whether ``host`` is the controller's own machine (see ``TransportKind.on_controller``)."""
    return transport_class(host).on_controller


def connect(host: str, settings: ConnectSettings) -> Transport:
    """A transport to ``host``, made by the transport that serves it."""
    return transport_class(host).connect(host, settings)


def cleanup() -> None:
    """Once a command's transports are all closed: what they shared goes (``TransportKind.cleanup``)."""
    for kind in TRANSPORTS.values():
        kind.cleanup()


__all__ = [
    "TRANSPORTS",
    "ConnectSettings",
    "Transport",
    "TransportKind",
    "cleanup",
    "connect",
    "kind_of",
    "on_controller",
    "transport_class",
]
