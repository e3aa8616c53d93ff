"""Who is deploying: recorded in host locks and in the ledger."""

from __future__ import annotations

import getpass
import socket
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Holder:
    user: str
    host: str
    pid: int
    command: str

    def to_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "host": self.host,
            "pid": self.pid,
            "command": self.command,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def holder(command: str, pid: int) -> Holder:
    """Who is deploying: recorded in locks and the ledger."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = "unknown"
    return Holder(user=user, host=socket.gethostname(), pid=pid, command=command)
