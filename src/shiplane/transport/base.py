"""How commands reach a host: a transport starts a process there with pipes to it. Local and SSH
implement it; everything above talks to the host's agent through ``AgentSession``."""

from __future__ import annotations

import subprocess
from typing import Protocol


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
