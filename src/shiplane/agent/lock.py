"""The deploy lock: ``<root>/.lock``, a JSON file created atomically, held by a live agent session.

The record names the controller (user, host, pid of the shiplane process, its command) and the
agent session on this host that took it (``agent_pid``). The session holds an exclusive
``flock`` on the ``.lock`` file itself from before the file appears until it is removed, so the
kernel, not a clock, says whether the holder is alive: when the controller dies its SSH channel
or pipe closes, the session sees EOF and exits, and the kernel drops the flock. A record whose
flock anyone can take (``"holder_lock": "flock"``) is *abandoned*: the next ``acquire`` breaks it
and says whose it was. A record whose flock is held is never broken, whatever its age.

Two other kinds are never broken automatically: a *kept* lock (``shiplane lock``, ``keep``), which
outlives its session until ``unlock``, and a record written by an older agent (no
``holder_lock``), judged by the old rules: its heartbeat age, or on this host its holder's pid.
Only ``unlock --force`` removes those (docs/DESIGN.md, "Agent protocol").
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from . import AgentError, atomic_write, parse_utc, pid_alive, utc_now
from .paths import Layout
from .protocol import Emit, Holder, HolderInfo, LockInfo, LockRecord, UnlockResult

Pause = Callable[[float], bool]

STALE_AFTER = 120.0  # old agents' records only: how old their heartbeat may get
POLL = 0.5
BOUND = "flock"

# Fds of the flocks this process holds. A child forked without exec must not share them (a
# flock belongs to the open file, so a long-lived child would keep the lock alive after our
# exit): they are closed in every forked child. Exec'd children never get them (O_CLOEXEC).
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)  # never LOCK_UN here: that would release the parent's lock too
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


@dataclass
class Held:
    """A taken lock: its record, the fd holding its flock (None: kept, or another session of the
    same controller holds it), and the abandoned record broken on the way, if any."""

    record: LockRecord
    fd: int | None = None
    broke: HolderInfo | None = None


def _parse(raw: bytes, mtime: float | None) -> LockRecord:
    try:
        record: LockRecord = json.loads(raw)
        if isinstance(record, dict):
            return record
    except ValueError:
        pass
    # Should not happen (the file is created whole): reported as held by ``unknown`` so that
    # nobody walks over it silently, and never broken (no holder_lock).
    stamp = time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime if mtime is not None else time.time())
    )
    return {
        "user": "unknown",
        "host": "unknown",
        "pid": 0,
        "command": "?",
        "started_at": stamp,
        "acquired_at": stamp,
        "heartbeat": stamp,
        "unreadable": True,
    }


def read(layout: Layout) -> LockRecord | None:
    """The lock record, or None when nobody holds the lock."""
    opened = _open_current(layout)
    if opened is None:
        return None
    os.close(opened[0])
    return opened[1]


def _open_current(layout: Layout) -> tuple[int, LockRecord] | None:
    """An fd on the current ``.lock`` and the record read through it (the same file, even if
    ``.lock`` is replaced meanwhile), or None when there is no lock."""
    try:
        fd = os.open(layout.lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return fd, _parse(b"".join(chunks), os.fstat(fd).st_mtime)
    except BaseException:
        os.close(fd)
        raise


def _try_flock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _kind(record: LockRecord) -> str:
    """``bound`` (held by a live session's flock), ``kept`` (until unlock) or ``legacy``."""
    if record.get("kept"):
        return "kept"
    return "bound" if record.get("holder_lock") == BOUND else "legacy"


def inspect(layout: Layout) -> LockInfo | None:
    """The described lock (see ``describe``), its holder's liveness checked, plus ``message``
    (``held_message``), or None when free."""
    opened = _open_current(layout)
    if opened is None:
        return None
    fd, record = opened
    try:
        # A shared probe: two inspections never disturb each other; the holder's is exclusive.
        alive = not _try_flock(fd, fcntl.LOCK_SH) if _kind(record) == "bound" else None
    finally:
        os.close(fd)
    info = describe(record, alive=alive)
    info["message"] = held_message(info)
    return info


def describe(record: LockRecord, now: float | None = None, alive: bool | None = None) -> LockInfo:
    """The record plus ``age`` (seconds since acquired), ``state`` and ``stale``.

    ``state``: ``live`` (its session holds the flock), ``abandoned`` (its session is gone: the
    next lock breaks it), ``kept`` (``shiplane lock``, until unlock), ``legacy`` (an older
    agent's record) or ``stale`` (an older agent's record whose heartbeat is old or whose holder
    process on this host is gone). ``alive`` is the flock probe of a bound record (None: not
    probed, taken as live). ``stale`` is true for ``abandoned`` and ``stale``.
    """
    now = time.time() if now is None else now
    acquired = parse_utc(str(record.get("acquired_at") or record.get("started_at") or ""))
    age = max(0.0, now - acquired) if acquired is not None else None
    kind = _kind(record)
    reason = ""
    if kind == "bound":
        state = "abandoned" if alive is False else "live"
    elif kind == "kept":
        state = "kept"
    else:
        state = "legacy"
        beat = parse_utc(str(record.get("heartbeat") or "")) or acquired
        pid = record.get("pid")
        if beat is None or now - beat > STALE_AFTER:
            state = "stale"
            reason = (
                "no heartbeat since it was taken"
                if beat is None or beat == acquired
                else f"its last heartbeat was {int(now - beat)}s ago"
            )
        elif record.get("host") == socket.gethostname() and not (
            isinstance(pid, int) and pid > 0 and pid_alive(pid)
        ):
            state, reason = "stale", f"its holder, pid {pid} on this host, is gone"
    # every key of the record, a newer agent's too (mypy cannot know a LockRecord has no
    # LockInfo key with another type: it has none, LockInfo extends it)
    out = cast(LockInfo, dict(record))
    out["age"] = round(age, 1) if age is not None else None
    out["state"] = state
    out["stale"] = state in ("abandoned", "stale")
    if reason:
        out["stale_reason"] = reason
    return out


def _who(info: LockInfo) -> str:
    return (
        f"{info.get('user', '?')}@{info.get('host', '?')} "
        f"(pid {info.get('pid', '?')}, `{info.get('command', '?')}`)"
    )


def _taken(info: LockInfo) -> str:
    age = info.get("age")
    ago = f"{int(age)}s ago" if isinstance(age, (int, float)) else "age unknown"
    return f"{info.get('acquired_at') or info.get('started_at') or '?'} ({ago})"


def held_message(info: LockInfo) -> str:
    """``deploy lock held by USER@HOST (pid N, `command`), taken T (Ns ago)`` and what it is."""
    msg = f"deploy lock held by {_who(info)}, taken {_taken(info)}"
    if info.get("reason"):
        msg += f", for: {info['reason']}"
    state = info.get("state")
    if state == "live":
        msg += (
            f"; its holder is alive (agent pid {info.get('agent_pid', '?')} on "
            f"{info.get('agent_host', 'the host')}): --lock-wait SECONDS waits for it"
        )
    elif state == "abandoned":
        msg += "; its holder is gone: the next deploy breaks it"
    elif state == "kept":
        msg += "; taken with `shiplane lock`, it is held until `shiplane unlock`"
    elif state == "stale":
        msg += f"; it looks stale ({info.get('stale_reason', 'holder gone')}): `shiplane unlock --force` breaks it"
    return msg


def broke_message(info: LockInfo) -> str:
    """The one line said when an abandoned lock is broken."""
    return f"broke the deploy lock left by {_who(info)}, taken {_taken(info)}: its holder is gone"


def _link_or_create(layout: Layout, tmp: Path, record: LockRecord) -> int | None:
    """Make ``.lock`` the temp file (link(2)): ``-1``; or on filesystems without hard links
    create it with O_EXCL, flocked before its content is written (a reader in between sees an
    unreadable record: held by ``unknown``, never broken): that fd. None: it exists."""
    try:
        os.link(tmp, layout.lock)
        return -1
    except FileExistsError:
        return None
    except OSError:
        pass
    try:
        fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return None
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps(record, sort_keys=True).encode())
    os.fsync(fd)
    return fd


def _try_create(layout: Layout, record: LockRecord, bind: bool) -> tuple[bool, int | None]:
    """Create the lock whole or not at all: a temp file, flocked (``bind``) before it is linked
    to ``.lock``, so no one ever sees a bound record without its flock held.

    Returns (created, the fd holding its flock: ``bind`` only)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    tmp = layout.root / f".lock.tmp-{os.getpid()}"
    atomic_write(tmp, json.dumps(record, sort_keys=True), 0o644)
    fd = None
    try:
        if bind:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX)
        made = _link_or_create(layout, tmp, record)
        if made is None:
            return False, None
        if made >= 0:  # created by O_EXCL, not linked: its own fd holds the flock
            if fd is not None:
                os.close(fd)
            fd = made
        if not bind:
            return True, None
        assert fd is not None
        _HELD.add(fd)
        held, fd = fd, None
        return True, held
    finally:
        if fd is not None:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def _new_record(holder: Holder, keep: bool) -> LockRecord:
    now = utc_now()
    record: LockRecord = {
        "user": holder.get("user"),
        "host": holder.get("host"),
        "pid": holder.get("pid"),
        "command": holder.get("command"),
        "started_at": holder.get("started_at") or now,
        "acquired_at": now,
        "heartbeat": now,
        "agent_pid": os.getpid(),
        "agent_host": socket.gethostname(),
    }
    if keep:
        record["kept"] = True
    else:
        record["holder_lock"] = BOUND
    reason = holder.get("reason")
    if isinstance(reason, str) and reason.strip():
        record["reason"] = reason.strip()[:500]
    return record


def acquire(
    layout: Layout,
    holder: Holder,
    wait: float,
    emit: Emit,
    *,
    keep: bool = False,
    pause: Pause | None = None,
) -> Held:
    """Take the lock for ``holder`` ({user, host, pid, command, started_at}) or fail kind ``lock``
    (``interrupted`` when ``pause`` ends the wait).

    The lock is bound to this process (its flock, see the module doc) unless ``keep``. An
    abandoned lock is broken on the way (said in one event, and in ``Held.broke``). With
    ``wait > 0`` poll until the lock is free or the deadline passes; ``pause(seconds)`` sleeps
    between polls and returns False when the wait should end now (the controller went away).
    Taking a lock the same controller already holds (same host and pid) succeeds.
    """
    deadline = time.monotonic() + max(0.0, float(wait or 0))
    announced = False
    broke: HolderInfo | None = None
    while True:
        record = _new_record(holder, keep)
        created, fd_held = _try_create(layout, record, bind=not keep)
        if created:
            return Held(record, fd_held, broke)
        opened = _open_current(layout)
        if opened is None:
            continue  # released between our attempt and the read: try again at once
        fd, current = opened
        try:
            if is_ours(current, holder):
                return Held(current, None, broke)
            kind = _kind(current)
            # Exclusive: of two sessions probing one abandoned lock, one breaks it.
            free = _try_flock(fd, fcntl.LOCK_EX) if kind == "bound" else None
            info = describe(current, alive=None if free is None else not free)
            if free and _still_current(layout, fd):
                layout.lock.unlink(missing_ok=True)  # missing: an `unlock --force` meanwhile
                broke = _holder_only(info)
                emit({"phase": "lock", "status": "broke", "detail": broke_message(info)})
                continue
        finally:
            os.close(fd)
        if info["state"] == "abandoned":
            continue  # broken by another session meanwhile: try again at once
        if time.monotonic() >= deadline:
            raise AgentError(
                held_message(info),
                kind="lock",
                holder=_holder_only(info),
                stale=bool(info["stale"]),
                state=info["state"],
                age=info["age"],
            )
        if not announced:
            emit({"phase": "lock", "status": "waiting", "detail": held_message(info)})
            announced = True
        step = min(POLL, max(0.0, deadline - time.monotonic()))
        if pause is not None and not pause(step):
            raise AgentError(
                "stopped waiting (cancelled, or the controller went away): " + held_message(info),
                kind="interrupted",
                holder=_holder_only(info),
                stale=bool(info["stale"]),
                state=info["state"],
                age=info["age"],
            )
        if pause is None:
            time.sleep(step)


def _still_current(layout: Layout, fd: int) -> bool:
    """Whether ``.lock`` is still the file ``fd`` has open (not already broken and retaken)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(layout.lock))
    except FileNotFoundError:
        return False


def _holder_only(info: LockInfo) -> HolderInfo:
    """Whose the lock is: the keys of ``HolderInfo`` the record has."""
    return cast(HolderInfo, {key: info[key] for key in _HOLDER_KEYS if key in info})  # type: ignore[literal-required]


# HolderInfo's keys, read from the class (its annotations stay strings on Python 3.9: fine here)
_HOLDER_KEYS = tuple(HolderInfo.__annotations__)


def is_ours(record: LockRecord, holder: Holder | None) -> bool:
    """Whether the lock ``record`` belongs to ``holder`` (same host and pid)."""
    if not holder:
        return False
    return record.get("host") == holder.get("host") and record.get("pid") == holder.get("pid")


def _owns_kept(record: LockRecord, holder: Holder | None) -> bool:
    """A lock taken with ``shiplane lock`` belongs to the user who took it, on the machine they
    took it from: any later command of theirs may release it (no process holds it)."""
    if not holder or not record.get("kept"):
        return False
    return record.get("user") == holder.get("user") and record.get("host") == holder.get("host")


def heartbeat(layout: Layout, holder: Holder | None) -> LockRecord:
    """Whether ``holder`` still holds the lock: its record, or fail kind ``lock``.

    Liveness is the holder session's flock, so nothing is written; an older agent's record of
    ours (none is written any more) would get its heartbeat refreshed."""
    current = read(layout)
    if current is None or not is_ours(current, holder):
        raise AgentError(
            "heartbeat: this session does not hold the deploy lock",
            kind="lock",
            holder=_holder_only(describe(current)) if current else None,
        )
    if _kind(current) == "legacy":
        current["heartbeat"] = utc_now()
        atomic_write(layout.lock, json.dumps(current, sort_keys=True), 0o644)
    return current


def release(layout: Layout, holder: Holder | None, force: bool = False) -> UnlockResult:
    """Remove the lock: only our own unless ``force``. ``{released: bool, holder}``.

    The caller closes its flock fd afterwards (``drop``): the record goes first, so it is never
    seen without its flock held."""
    current = inspect(layout)
    if current is None:
        return {"released": False, "holder": None}
    if not force and not is_ours(current, holder) and not _owns_kept(current, holder):
        raise AgentError(
            held_message(current) + "; not ours to unlock (use force)",
            kind="lock",
            holder=_holder_only(current),
            stale=bool(current["stale"]),
            state=current["state"],
            age=current["age"],
        )
    try:
        layout.lock.unlink()
    except FileNotFoundError:
        pass
    _wake_waiters(layout)
    return {"released": True, "holder": _holder_only(current)}


def drop(fd: int | None) -> None:
    """Close a flock fd from ``acquire`` (the lock's record already gone, or kept on purpose)."""
    if fd is None:
        return
    _HELD.discard(fd)
    try:
        os.close(fd)
    except OSError:
        pass


def _wake_waiters(layout: Layout) -> None:
    """Poke every server sleeping on a ``run/*.wake`` FIFO: a spare waits for the deploy to end
    (its lock released) before it imports anything. Each re-checks what it waits for, so a poke
    for another reason costs it one check."""
    from .backend import poke, wake_fifos

    for fifo in wake_fifos(layout):
        poke(fifo)
