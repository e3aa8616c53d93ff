"""The host's ledger: ``history.jsonl``, one JSON object per line, append-only."""

from __future__ import annotations

import json
import os

from . import utc_now
from .paths import Layout
from .protocol import LedgerEntry


def append(layout: Layout, entry: LedgerEntry) -> LedgerEntry:
    """Append one entry as one line (O_APPEND, fsync); adds ``recorded_at`` when absent.

    A line torn by an earlier crash is closed with a newline first, so it cannot swallow this one.
    """
    record = entry.copy()
    record.setdefault("recorded_at", utc_now())
    line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    layout.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.history, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if _ends_torn(layout):
            line = "\n" + line
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def _ends_torn(layout: Layout) -> bool:
    try:
        with open(layout.history, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def read(layout: Layout, limit: int | None = None) -> list[LedgerEntry]:
    """The entries, oldest first (newest last); ``limit`` keeps the newest ``limit``.

    Lines that do not parse (a torn last line after a crash) are skipped, never fatal.
    """
    try:
        with open(layout.history, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return []
    out: list[LedgerEntry] = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            entry: LedgerEntry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    if limit is not None and limit >= 0:
        out = out[-limit:] if limit else []
    return out


def setup_done(layout: Layout) -> bool:
    """True once an entry with ``"setup": true`` and outcome ok was recorded (first deploy done)."""
    return any(e.get("setup") is True and e.get("outcome") in ("ok", True) for e in read(layout))
