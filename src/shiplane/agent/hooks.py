"""Hooks: shell commands run in a release directory with the release's runtime environment."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import AgentError
from .paths import Layout
from .runtime import runtime_env

Emit = Callable[[dict[str, Any]], None]

TAIL_LINES = 20
KILL_GRACE = 5.0
# After the shell exits, a background child may still hold the pipe open: read no longer than this.
DRAIN_AFTER_EXIT = 1.0


def run_hook(layout: Layout, release_id: str, command: str, timeout: float | None,
             emit: Emit) -> dict[str, Any]:
    """Run ``/bin/sh -c command`` in ``releases/<id>`` and stream its output as events.

    The hook gets its own process group (killed whole on timeout: kind ``timeout``); stdout and
    stderr are merged. A non-zero exit fails with kind ``hook`` and the last lines of output.
    Returns ``{exit_code, output, output_tail, seconds}``.
    """

    cwd = layout.release(release_id)
    if not cwd.is_dir():
        raise AgentError(f"hook: release {release_id} is not installed", kind="missing")
    env = runtime_env(layout, release_id)
    emit({"phase": "hook", "status": "start", "detail": command, "release_id": release_id})
    started = time.monotonic()
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command], cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    deadline = started + timeout if timeout and timeout > 0 else None
    timed_out = False
    try:
        timed_out = _pump(proc, deadline, tail, command, emit)
    except BaseException:
        _kill_group(proc)
        raise
    seconds = round(time.monotonic() - started, 3)
    output = "\n".join(tail)
    if timed_out:
        raise AgentError(f"hook `{command}` timed out after {timeout:g}s (process group killed)",
                         kind="timeout", output_tail=output, seconds=seconds)
    code = proc.returncode
    if code != 0:
        raise AgentError(f"hook `{command}` failed with exit code {code}:\n{output}", kind="hook",
                         exit_code=code, output_tail=output, seconds=seconds)
    emit({"phase": "hook", "status": "ok", "detail": command, "seconds": seconds})
    return {"exit_code": code, "output": output, "output_tail": output, "seconds": seconds}


def _pump(proc: subprocess.Popen[bytes], deadline: float | None, tail: deque[str],
          command: str, emit: Emit) -> bool:
    """Forward output lines until EOF; True if the deadline passed (the group is then killed)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    pending = b""
    exited_at: float | None = None

    def flush_line(raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        tail.append(text)
        emit({"phase": "hook", "status": "output", "detail": text, "command": command})

    try:
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                _kill_group(proc)
                return True
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > DRAIN_AFTER_EXIT:
                break
            wait = 0.2
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - now))
            if not sel.select(wait):
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                flush_line(raw)
    finally:
        sel.close()
        if pending:
            flush_line(pending)
        proc.stdout.close()
    # EOF: the shell closed its output; wait for its exit within what is left of the deadline.
    try:
        proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return True
    return False


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """TERM the hook's whole process group, then KILL what is left after a grace period."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=KILL_GRACE)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
