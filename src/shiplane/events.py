"""Events, not prints: every phase reports through an ``Event``; the terminal UI, the ledger and
``--json`` are three readers of the same stream."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TypedDict


class EventData(TypedDict, total=False):
    """An event's extras, beyond its fields."""

    total: int  # receive: the bytes to send in all (``bytes``: those sent so far)
    from_controller: int  # copy: the bytes this host received from the controller
    from_peers: int  # copy: the bytes it fetched from other hosts (commands/relay.py)
    peers: dict[str, int]  # copy: those bytes by the host they came from
    served_to_peers: int  # copy: the bytes a host served to the others


@dataclass(frozen=True)
class Event:
    phase: str
    status: str  # start | progress | ok | failed | skipped | info | output
    host: str = ""
    detail: str = ""
    seconds: float | None = None
    bytes: int | None = None
    data: EventData = field(default_factory=lambda: EventData())
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, object]:
        """The event as one JSON object (``--json``), without its empty fields."""
        out = {k: v for k, v in asdict(self).items() if v not in (None, "", {})}
        out["at"] = round(self.at, 3)
        return out


Emit = Callable[[Event], None]


def discard(event: Event) -> None:
    """An event sink that drops everything (library calls without a UI)."""
