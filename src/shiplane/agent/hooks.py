"""Hooks: shell commands run in a release directory with the release's runtime environment."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time
from collections import deque
from typing import BinaryIO

from . import AgentError
from .paths import Layout
from .protocol import Emit, HookResult
from .runtime import expand, placeholders, runtime_env

TAIL_LINES = 20
KILL_GRACE = 5.0
# After the shell exits, a background child may still hold the pipe open: read no longer than this.
DRAIN_AFTER_EXIT = 1.0


class Limits:
    """When a running hook is ended: ``timeout`` seconds in all, ``silence`` seconds without a
    line of its own output (the agent's "alive" pings are not its output), or the controller
    cancelling (a ``{"cancel": ...}`` line, or EOF, on ``watch``: the session's stdin, on which
    nothing else arrives while an op runs)."""

    def __init__(
        self, timeout: float | None, silence: float | None = None, watch: BinaryIO | None = None
    ) -> None:
        self.timeout = timeout if timeout and timeout > 0 else None
        self.silence = silence if silence and silence > 0 else None
        self.watch = watch


def run_hook(
    layout: Layout, release_id: str, command: str, limits: Limits, emit: Emit
) -> HookResult:
    """Run ``/bin/sh -c command`` in ``releases/<id>`` and stream its output as events.

    The hook gets its own process group, killed whole when a limit is reached (kind ``timeout``)
    or the controller cancels (kind ``interrupted``); stdout and stderr are merged. A non-zero
    exit fails with kind ``hook`` and the last lines of output.
    Returns ``{exit_code, output, output_tail, seconds}``.
    """

    cwd = layout.release(release_id)
    if not cwd.is_dir():
        raise AgentError(f"hook: release {release_id} is not installed", kind="missing")
    env = runtime_env(layout, release_id)
    command = expand(command, placeholders(layout, release_id))
    emit({"phase": "hook", "status": "start", "detail": command, "release_id": release_id})
    started = time.monotonic()
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command],
        cwd=str(cwd),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        ended = _pump(proc, started, limits, tail, command, emit)
    except BaseException:
        _kill_group(proc)
        raise
    seconds = round(time.monotonic() - started, 3)
    output = "\n".join(tail)
    if ended == "cancel":
        raise AgentError(
            f"hook `{command}` interrupted: the deploy was cancelled (process group killed)",
            kind="interrupted",
            output_tail=output,
            seconds=seconds,
        )
    if ended == "silence":
        raise AgentError(
            f"hook `{command}` printed nothing for {limits.silence:g}s (hooks.silence_timeout; "
            "process group killed)",
            kind="timeout",
            output_tail=output,
            seconds=seconds,
        )
    if ended == "timeout":
        raise AgentError(
            f"hook `{command}` timed out after {limits.timeout:g}s (hooks.timeout; process "
            "group killed)",
            kind="timeout",
            output_tail=output,
            seconds=seconds,
        )
    code = proc.returncode
    if code != 0:
        raise AgentError(
            f"hook `{command}` failed with exit code {code}:\n{output}",
            kind="hook",
            exit_code=code,
            output_tail=output,
            seconds=seconds,
        )
    emit({"phase": "hook", "status": "ok", "detail": command, "seconds": seconds})
    return {"exit_code": code, "output": output, "output_tail": output, "seconds": seconds}


def _pump(
    proc: subprocess.Popen[bytes],
    started: float,
    limits: Limits,
    tail: deque[str],
    command: str,
    emit: Emit,
) -> str | None:
    """Forward output lines until EOF; on a limit or a cancel, kill the group and say which
    (``timeout``, ``silence``, ``cancel``); None when the hook ended by itself."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ, "output")
    if limits.watch is not None:
        try:
            sel.register(limits.watch.fileno(), selectors.EVENT_READ, "watch")
        except (AttributeError, OSError, ValueError):  # not a real stream (tests): not watched
            pass
    deadline = started + limits.timeout if limits.timeout else None
    pending = b""
    exited_at: float | None = None
    heard = started

    def flush_line(raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        tail.append(text)
        emit({"phase": "hook", "status": "output", "detail": text, "command": command})

    def ending() -> str | None:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return "timeout"
        if limits.silence is not None and exited_at is None and now - heard >= limits.silence:
            return "silence"
        return None

    try:
        while True:
            why = ending()
            if why:
                _kill_group(proc)
                return why
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > DRAIN_AFTER_EXIT:
                break
            ready = sel.select(0.2)
            if any(key.data == "watch" for key, _ in ready) and _cancelled(limits.watch):
                _kill_group(proc)
                return "cancel"
            if not any(key.data == "output" for key, _ in ready):
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            heard = time.monotonic()
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
        return "timeout"
    return None


def _cancelled(watch: BinaryIO | None) -> bool:
    """Whether what arrived on the session's stdin ends the hook: EOF (the controller is gone)
    or a cancel line (the controller was interrupted)."""
    if watch is None:
        return False
    line = watch.readline()
    if not line:
        return True
    try:
        message = json.loads(line)
    except ValueError:
        return False
    return isinstance(message, dict) and "cancel" in message


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
