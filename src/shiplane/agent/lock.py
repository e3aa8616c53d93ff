"""The deploy lock: ``<root>/.lock``, a JSON file created atomically, with a heartbeat.

The holder is the controller (user, host, pid of the shiplane process), not this agent: a lock
is "ours" when its holder host and pid are those the session acquired it with.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from . import AgentError, atomic_write, parse_utc, pid_alive, utc_now
from .paths import Layout

Emit = Callable[[dict[str, Any]], None]

STALE_AFTER = 120.0
POLL = 0.5


def read(layout: Layout) -> dict[str, Any] | None:
    """The lock record, or None when nobody holds the lock.

    A lock file that cannot be parsed (should not happen: it is created whole) is reported
    as held by ``unknown`` so that nobody walks over it silently.
    """
    try:
        raw = layout.lock.read_bytes()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw)
        if isinstance(record, dict):
            return record
    except ValueError:
        pass
    try:
        mtime = layout.lock.stat().st_mtime
    except FileNotFoundError:
        return None
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))
    return {"user": "unknown", "host": "unknown", "pid": 0, "command": "?",
            "started_at": stamp, "heartbeat": stamp, "unreadable": True}


def describe(record: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """The record plus ``age`` (seconds since acquired) and ``stale`` (heartbeat too old)."""
    now = time.time() if now is None else now
    acquired = parse_utc(str(record.get("acquired_at") or record.get("started_at") or ""))
    beat = parse_utc(str(record.get("heartbeat") or "")) or acquired
    age = max(0.0, now - acquired) if acquired is not None else None
    stale = beat is None or (now - beat) > STALE_AFTER
    if not stale and record.get("host") == socket.gethostname():
        # Same machine (the `local` stage): a dead holder pid settles it without waiting.
        pid = record.get("pid")
        stale = not (isinstance(pid, int) and pid > 0 and pid_alive(pid))
    out = dict(record)
    out["age"] = round(age, 1) if age is not None else None
    out["stale"] = stale
    return out


def held_message(info: dict[str, Any]) -> str:
    """``deploy lock held by USER@HOST (pid N, `command`) since T (Ns ago)``."""
    age = info.get("age")
    ago = f"{int(age)}s ago" if isinstance(age, (int, float)) else "age unknown"
    msg = (f"deploy lock held by {info.get('user', '?')}@{info.get('host', '?')} "
           f"(pid {info.get('pid', '?')}, `{info.get('command', '?')}`) "
           f"since {info.get('started_at') or info.get('acquired_at', '?')} ({ago})")
    if info.get("stale"):
        msg += (f"; it looks stale (no heartbeat for over {int(STALE_AFTER)}s): "
                "`shiplane unlock --force` breaks it")
    return msg


def _try_create(layout: Layout, record: dict[str, Any]) -> bool:
    """Create the lock whole or not at all: write a temp file, then link(2) it to ``.lock``."""
    layout.root.mkdir(parents=True, exist_ok=True)
    tmp = layout.root / f".lock.tmp-{os.getpid()}"
    atomic_write(tmp, json.dumps(record, sort_keys=True), 0o644)
    try:
        os.link(tmp, layout.lock)
        return True
    except FileExistsError:
        return False
    except OSError:
        # Filesystems without hard links: fall back to O_EXCL (content written right after).
        try:
            fd = os.open(layout.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def acquire(layout: Layout, holder: dict[str, Any], wait: float, emit: Emit) -> dict[str, Any]:
    """Take the lock for ``holder`` ({user, host, pid, command, started_at}) or fail kind ``lock``.

    With ``wait > 0`` poll until the lock is free or the deadline passes. Taking a lock we
    already hold (same host and pid) succeeds and refreshes it.
    """
    deadline = time.monotonic() + max(0.0, float(wait or 0))
    announced = False
    while True:
        now = utc_now()
        record = {
            "user": holder.get("user"), "host": holder.get("host"), "pid": holder.get("pid"),
            "command": holder.get("command"), "started_at": holder.get("started_at") or now,
            "acquired_at": now, "heartbeat": now, "agent_pid": os.getpid(),
        }
        if _try_create(layout, record):
            return record
        current = read(layout)
        if current is None:
            continue  # released between our attempt and the read: try again at once
        if is_ours(current, holder):
            heartbeat(layout, holder)
            return read(layout) or record
        info = describe(current)
        if time.monotonic() >= deadline:
            raise AgentError(held_message(info), kind="lock", holder=_holder_only(info),
                             stale=bool(info["stale"]), age=info["age"])
        if not announced:
            emit({"phase": "lock", "status": "waiting", "detail": held_message(info)})
            announced = True
        time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))


def _holder_only(info: dict[str, Any]) -> dict[str, Any]:
    keys = ("user", "host", "pid", "command", "started_at", "acquired_at", "heartbeat")
    return {k: info.get(k) for k in keys}


def is_ours(record: dict[str, Any], holder: dict[str, Any] | None) -> bool:
    """Whether the lock ``record`` belongs to ``holder`` (same host and pid)."""
    if not holder:
        return False
    return record.get("host") == holder.get("host") and record.get("pid") == holder.get("pid")


def heartbeat(layout: Layout, holder: dict[str, Any] | None) -> dict[str, Any]:
    """Refresh the heartbeat of the lock if ``holder`` holds it; fail kind ``lock`` otherwise."""
    current = read(layout)
    if current is None or not is_ours(current, holder):
        raise AgentError("heartbeat: this session does not hold the deploy lock", kind="lock",
                         holder=_holder_only(describe(current)) if current else None)
    current["heartbeat"] = utc_now()
    atomic_write(layout.lock, json.dumps(current, sort_keys=True), 0o644)
    return current


def release(layout: Layout, holder: dict[str, Any] | None, force: bool = False) -> dict[str, Any]:
    """Remove the lock: only our own unless ``force``. ``{released: bool, holder}``."""
    current = read(layout)
    if current is None:
        return {"released": False, "holder": None}
    if not force and not is_ours(current, holder):
        info = describe(current)
        raise AgentError(held_message(info) + "; not ours to unlock (use force)", kind="lock",
                         holder=_holder_only(info), stale=bool(info["stale"]), age=info["age"])
    try:
        layout.lock.unlink()
    except FileNotFoundError:
        pass
    _wake_waiters(layout)
    return {"released": True, "holder": _holder_only(current)}


def _wake_waiters(layout: Layout) -> None:
    """Poke every server sleeping on a ``run/*.wake`` FIFO: a spare waits for the deploy to end
    (its lock released) before it imports anything. Each re-checks what it waits for, so a poke
    for another reason costs it one check."""
    from .backend import poke, wake_fifos

    for fifo in wake_fifos(layout):
        poke(fifo)
