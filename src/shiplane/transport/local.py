"""The ``local`` host: the very same agent, run as a subprocess of the controller."""

from __future__ import annotations

import subprocess


class LocalTransport:
    host = "local"

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
