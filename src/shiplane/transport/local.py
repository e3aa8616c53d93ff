"""The ``local`` host: the very same agent, run as a subprocess of the controller."""

from __future__ import annotations

import subprocess
from typing import ClassVar

from .base import ConnectSettings


class LocalTransport:
    """The host spec ``local``: the controller's own machine, no connection settings."""

    on_controller: ClassVar[bool] = True
    host = "local"

    @classmethod
    def claims(cls, host: str) -> bool:
        return host == cls.host

    @classmethod
    def connect(cls, host: str, settings: ConnectSettings) -> LocalTransport:
        return cls()

    @classmethod
    def cleanup(cls) -> None:
        pass

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def explain_failure(self, returncode: int | None, stderr: str) -> str:
        tail = stderr.strip().splitlines()[-3:]
        return f"the agent exited with code {returncode}" + (
            f": {' / '.join(tail)}" if tail else ""
        )

    def close(self) -> None:
        pass

    def drop_stale(self) -> bool:
        return False
