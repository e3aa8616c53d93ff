"""The host agent: stdlib only, shipped to hosts as a zipapp (package ``shiplane_agent``).

Modules here use relative imports only and import nothing from the rest of shiplane.
This file holds what every agent module shares: the error type that becomes a protocol error
line, crash-safe file writes, and running a host tool (systemctl, nginx, caddy).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # the protocol imports this module
    from .protocol import ErrorObject

__version__ = "0.1.0"


class AgentError(Exception):
    """An expected failure of an op: becomes ``{"ok": false, "error": {"message", "kind", ...}}``.

    ``kind`` tells the controller what went wrong (``lock``, ``hook``, ``timeout``, ``install``,
    ``integrity``, ``usage``, ``missing``, ...); ``extra`` fields are merged into the error object.
    """

    def __init__(self, message: str, kind: str = "error", **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.extra = extra

    def to_dict(self) -> ErrorObject:
        """The JSON error object of the protocol (``extra``: keys of ``ErrorObject``)."""
        out = cast("ErrorObject", dict(self.extra))
        out["message"] = self.message
        out["kind"] = self.kind
        return out


def run_tool(
    argv: list[str], *, timeout: float, kind: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a host tool to its end, no stdin, its output captured as text; one that cannot start
    or outlives ``timeout`` is an AgentError of ``kind`` naming its command (its exit code is
    the caller's to judge)."""
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentError(f"{' '.join(argv)}: {exc}", kind=kind) from None


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or create inside ``path`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half of one.

    Temp file in the same directory, created with ``mode`` (so a 0600 file is never readable by
    others, not even for an instant), fsync, rename, fsync the directory.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        # os.open applies the umask; chmod makes the mode exact (0644 stays 0644 under umask 077).
        os.fchmod(fd, mode)
        view = memoryview(raw)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp)
        raise
    os.close(fd)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def _unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def utc_now() -> str:
    """The current time as ``2026-11-25T10:00:00Z`` (the format of every timestamp we record)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def parse_utc(stamp: str) -> float | None:
    """Seconds since the epoch for a ``utc_now()`` stamp; None when it cannot be read."""
    import calendar

    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%S+00:00"):
        try:
            return float(calendar.timegm(time.strptime(stamp, fmt)))
        except (TypeError, ValueError):
            continue
    return None


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie (an exited process awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # state is the field after the parenthesised command name, which may itself hold spaces
    state = stat[stat.rfind(b")") + 2 :][:1]
    return state not in (b"Z", b"X", b"")
