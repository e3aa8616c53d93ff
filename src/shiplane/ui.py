"""Renders the event stream: live per-host lines on a terminal, timestamped plain lines otherwise,
JSON lines with ``--json``. Every text passes the secret masker on its way out."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO, final

from shiplane.events import Event
from shiplane.secret import Masker

if TYPE_CHECKING:  # rich is imported only for a terminal: ~25 ms a --json or CI run does not pay
    from rich.live import Live
    from rich.table import Table


@final
class Reporter:
    """Consumes events. ``mode`` is "live" (a terminal), "plain" or "json"."""

    def __init__(self, mode: str, masker: Masker | None = None, stream: TextIO | None = None, verbose: bool = False) -> None:
        self.mode = mode
        self.mask = masker or Masker()
        self.stream = stream or sys.stderr
        self.verbose = verbose
        self._lock = threading.Lock()
        self._hosts: dict[str, Event] = {}
        self._live: Live | None = None
        self._started = time.monotonic()

    @classmethod
    def for_terminal(cls, json_mode: bool, masker: Masker, verbose: bool = False) -> Reporter:
        if json_mode:
            return cls("json", masker, sys.stdout, verbose)
        return cls("live" if sys.stderr.isatty() else "plain", masker, sys.stderr, verbose)

    def __enter__(self) -> Reporter:
        if self.mode == "live":
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._table(), console=Console(file=self.stream), refresh_per_second=8, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def __call__(self, event: Event) -> None:
        with self._lock:
            if self.mode == "json":
                # an event line of the --json contract (docs/json.md); the version as on every line
                self.stream.write(self.mask(json.dumps({**event.to_json(), "v": 1})) + "\n")
                self.stream.flush()
                return
            if event.host:
                self._hosts[event.host] = event
            if self._live is not None:
                self._live.update(self._table())
                if event.status in ("failed",) or (event.status == "output" and self.verbose):
                    self._live.console.print(self.mask(self._line(event)), highlight=False, markup=False)
                return
            if event.status == "progress" and not self.verbose:
                return
            if event.status == "output" and not self.verbose:
                return
            self.stream.write(self.mask(self._line(event)) + "\n")
            self.stream.flush()

    def _line(self, event: Event) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(event.at))
        parts = [stamp, f"[{event.host}]" if event.host else "", event.phase, event.status]
        if event.seconds is not None:
            parts.append(f"{event.seconds:.2f}s")
        if event.bytes:
            parts.append(human_bytes(event.bytes))
        if event.detail:
            # a failure's whole story (cause, log tail) is told once, by the summary at the end
            first, *more = event.detail.splitlines() or [""]
            parts.append(first + (" (more below)" if more and event.status == "failed" else ""))
            if more and event.status != "failed":
                parts.append("\n" + "\n".join(more))
        return " ".join(p for p in parts if p)

    def _table(self) -> Table:
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        for host, event in sorted(self._hosts.items()):
            detail = event.detail
            if event.bytes and event.data.get("total"):
                done = min(1.0, event.bytes / max(1, event.data["total"]))
                bar = "█" * int(done * 20) + "░" * (20 - int(done * 20))
                detail = f"{bar} {human_bytes(event.bytes)}"
            table.add_row(host, event.phase, event.status, self.mask(detail))
        return table


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def print_table(rows: list[dict[str, Any]], columns: list[str], masker: Masker, out: Callable[[str], None] | None = None) -> None:
    """A plain table on stdout (read verbs' text output)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(masker(str(row.get(c, "") if row.get(c) is not None else "")) for c in columns))
    console.print(table)
