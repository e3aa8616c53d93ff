"""How commands reach a host: a transport starts a process there with pipes to it. Local and SSH
implement it; everything above talks to the host's agent through ``AgentSession``.

A transport is two things: its instances (``Transport``, one per host and command) and its class
(``TransportKind``): which host specs it serves, whether it runs on the controller's own machine,
and how to make one from a stage's connection settings. ``shiplane.transport.TRANSPORTS`` lists
the classes by name."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable


class Transport(Protocol):
    """A way to run one argv on a host with stdin/stdout/stderr pipes."""

    host: str

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` on the host; stdin/stdout/stderr are pipes."""
        ...

    def explain_failure(self, returncode: int | None, stderr: str) -> str:
        """A human sentence for a connection that died, from the process's stderr."""
        ...

    def close(self) -> None:
        """Release connections (the SSH control master)."""
        ...

    def drop_stale(self) -> bool:
        """After its session could not connect: close the connection an earlier command left
        open, if the session went through one, so that a new attempt connects afresh (the host
        rebooted, the network changed). False when there was none: the failure is the host's."""
        ...


@runtime_checkable
class Prewarming(Protocol):
    """A transport that can open its connection ahead of its session (transport/prewarm.py)."""

    host: str

    def prewarm(self, stderr: BinaryIO) -> subprocess.Popen[bytes] | None:
        """Start connecting now, running nothing on the host; the process exits once connected
        (0) or failed (its reason in ``stderr``). None: already connected (an earlier command's
        connection persists)."""
        ...

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]: ...

    def spawn_argv(self, argv: list[str]) -> list[str]:
        """The local argv ``spawn(argv)`` runs: two transports that give the same one start the
        same session (an early agent session is taken only then)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ConnectSettings:
    """A stage's connection settings (the deploy file's keys of the same names); each transport
    reads those it needs."""

    ssh_config: str | None = None  # an absolute path
    identity_file: str | None = None
    ssh_options: tuple[str, ...] = ()
    connect_timeout: float = 10
    ssh_persist: int = 60  # seconds an idle SSH connection outlives its command; 0: it does not
    user: str | None = None  # the login for a host that names none (``deploy_user``); None: ssh's


class TransportKind(Protocol):
    """A transport's class, as the registry (``shiplane.transport.TRANSPORTS``) sees it."""

    @property
    def on_controller(self) -> bool:
        """True when its hosts are the controller's own machine: a relative ``deploy_to`` is the
        project's, ``python3`` is the controller's interpreter, and it has the controller's uv."""
        ...

    def claims(self, host: str) -> bool:
        """Whether a host spec of the deploy file (``local``, ``deploy@web1:2222``) is its."""
        ...

    def connect(self, host: str, settings: ConnectSettings) -> Transport:
        """A transport to ``host``; ConfigError when ``host`` or ``settings`` cannot be used."""
        ...

    def cleanup(self) -> None:
        """Called once every transport of a command is closed (by any transport): remove what
        its transports shared (SSH: this process's control-socket directory, if empty)."""
        ...
