"""Renders the event stream: a live list of steps on a terminal, timestamped plain lines otherwise,
JSON lines with ``--json``. Every text passes the secret masker on its way out."""

from __future__ import annotations

import json
import re
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO, cast, final

from shiplane.events import Event
from shiplane.secret import Masker

if TYPE_CHECKING:  # rich is imported only for a terminal: ~25 ms a --json or CI run does not pay
    from rich.console import Console, ConsoleOptions
    from rich.live import Live
    from rich.text import Text

    from shiplane.commands.check import ProjectCheck
    from shiplane.commands.deployment import DeployResult, PromoteResult
    from shiplane.commands.exec import ExecResult
    from shiplane.commands.operate import (
        HistoryReport,
        HostsReport,
        LockReport,
        ReleasesReport,
        RollbackResult,
        StatusReport,
    )
    from shiplane.commands.plan import HostPlan, PlanResult
    from shiplane.commands.setup import DoctorResult, SetupResult
    from shiplane.commands.verify import Verification

# past this many hosts the host rows fold into one row of counts per step (a screen is ~24 rows)
MAX_HOST_ROWS = 10
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
BAR = 16
# an ANSI escape or any other control character in a detail would move the cursor and break the rows
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x1f\x7f]")


@final
class Reporter:
    """Consumes events. ``mode`` is "live" (a terminal), "plain" or "json"."""

    def __init__(
        self,
        mode: str,
        masker: Masker | None = None,
        stream: TextIO | None = None,
        verbose: bool = False,
    ) -> None:
        self.mode = mode
        self.mask = masker or Masker()
        self.stream = stream or sys.stderr
        self.verbose = verbose
        self._lock = threading.Lock()
        self._board = Board()
        self._live: Live | None = None

    @classmethod
    def for_terminal(cls, json_mode: bool, masker: Masker, verbose: bool = False) -> Reporter:
        if json_mode:
            return cls("json", masker, sys.stdout, verbose)
        return cls("live" if sys.stderr.isatty() else "plain", masker, sys.stderr, verbose)

    def __enter__(self) -> Reporter:
        if self.mode == "live":
            from rich.console import Console
            from rich.live import Live

            # not transient: the finished list of steps (with their times) stays above the summary
            self._live = Live(_View(self), console=Console(file=self.stream), refresh_per_second=8)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            with self._lock:
                self._board.close(time.time(), ok=exc[0] is None)
            self._live.__exit__(None, None, None)  # its last refresh draws the closed board
            self._live = None

    def __call__(self, event: Event) -> None:
        if self.mode == "json":
            with self._lock:
                # an event line of the --json contract (docs/json.md); the version as on every line
                self.stream.write(self.mask(json.dumps({**event.to_json(), "v": 1})) + "\n")
                self.stream.flush()
            return
        if self._live is not None:
            with self._lock:
                loose = self._board.feed(event)
            # printed outside our lock: the live display's refresh holds its own lock, then takes ours
            if event.status == "output" and self.verbose:
                self._live.console.print(
                    self.mask(self._line(event)), highlight=False, markup=False
                )
            elif loose or event.status == "failed":  # one line each: the summary tells it whole
                self._live.console.print(
                    self.mask(self._line(event)),
                    highlight=False,
                    markup=False,
                    no_wrap=True,
                    overflow="ellipsis",
                )
            return
        if event.status in ("progress", "output") and not self.verbose:
            return
        with self._lock:
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

    def rows(self, width: int, now: float | None = None) -> list[Row]:
        """The board's rows as drawn now, each fitted to ``width`` cells, texts masked."""
        with self._lock:
            return self._board.rows(width, time.time() if now is None else now, self.mask)


@final
class _View:
    """The live display's renderable: drawn again on every refresh, at the console's width then."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        for row in self.reporter.rows(options.max_width):
            yield row.text()


STYLES = {
    "running": "cyan",
    "ok": "green",
    "failed": "bold red",
    "waiting": "dim",
    "stopped": "yellow",
}
ICONS = {"ok": "✓", "failed": "✗", "waiting": "·", "stopped": "-"}


@dataclass(frozen=True)
class Row:
    """One drawn row: its state (running, ok, failed, waiting, stopped) and its columns, already
    padded so that ``plain`` is never wider than the width it was made for."""

    state: str
    icon: str
    head: str
    clock: str
    detail: str

    @property
    def plain(self) -> str:
        return f"{self.icon} {self.head}{self.clock}{self.detail}".rstrip()

    def text(self) -> Text:
        from rich.text import Text

        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(self.icon, STYLES[self.state])
        text.append(" " + self.head, "bold" if self.state == "running" else "")
        text.append(self.clock, "dim")
        text.append(self.detail.rstrip(), STYLES["failed"] if self.state == "failed" else "")
        return text


@dataclass
class Track:
    """What one row knows: the step running (a host's steps nest: a hook inside release, the
    venv inside install), the last finished one, its time, the latest detail."""

    label: str
    stack: list[str] = field(default_factory=list)
    step: str = ""
    started: float = 0.0
    seconds: float | None = None
    done: list[str] = field(default_factory=list)
    total_seconds: float = 0.0
    detail: str = ""
    sent: int = 0
    total: int = 0
    failed: bool = False
    open_ended: bool = False  # begun by its progress, without a start: the view's end is its end

    @property
    def running(self) -> bool:
        return bool(self.stack)


@final
class Board:
    """The live view's state, fed one event at a time: a row per step the controller runs (gate,
    build, a local task) in the order they start, then a row per host with its current step.
    Drawing is a pure function of this state, a width and the time."""

    def __init__(self) -> None:
        self.controller: dict[str, Track] = {}
        self.hosts: dict[str, Track] = {}
        self.order: list[str] = []  # host steps in the order first seen: the counts' order
        self.closed_at: float | None = None

    def feed(self, event: Event) -> bool:
        """Take one event; True when it has no row and should be printed as a line instead
        (a hostless note or failure such as "deploy failed")."""
        if event.host:
            self._host(self.hosts.setdefault(event.host, Track(event.host)), event)
            return False
        track = self.controller.get(event.phase)
        if track is None:
            if event.status == "failed":  # the deploy failed: a step still running is where
                for other in self.controller.values():
                    if other.running:
                        other.stack, other.failed = [], True
                        other.seconds = max(0.0, event.at - other.started)
            if event.status in ("failed", "info") or event.phase == "deploy":
                return True
            track = self.controller[event.phase] = Track(event.phase, step=event.phase)
        if event.status == "start" or not track.running and event.status in ("progress", "output"):
            track.stack, track.step, track.started = [event.phase], event.phase, event.at
            track.seconds, track.failed, track.open_ended = None, False, event.status != "start"
            track.detail = event.detail
        elif event.status in ("ok", "skipped", "failed"):
            self._finish(track, event)
        elif event.detail:
            track.detail = event.detail
        return False

    def _host(self, track: Track, event: Event) -> None:
        phase, status = event.phase, event.status
        if status == "start" and phase not in track.stack:
            if not track.stack:  # a new step of this host
                track.step, track.started, track.seconds = phase, event.at, None
                track.detail, track.sent, track.total = "", 0, 0
                if phase not in self.order:
                    self.order.append(phase)
            track.stack.append(phase)
            if phase != track.step:
                track.detail = _sub_detail(track.step, event)
            else:
                track.detail = event.detail
            return
        if status in ("ok", "skipped", "failed"):
            if phase in track.stack[1:]:  # a step inside the running one ended
                del track.stack[track.stack.index(phase) :]
                if status != "failed":
                    track.detail = _sub_detail(track.step, event)
                    return
            if status == "failed" or phase == track.step or not track.stack:
                if not track.stack:
                    track.step = phase
                    if phase not in self.order:
                        self.order.append(phase)
                self._finish(track, event)
            return
        if event.bytes and event.data.get("total"):
            track.sent, track.total = event.bytes, int(event.data["total"])
        elif event.detail:
            track.sent = track.total = 0
        if event.detail:
            track.detail = _sub_detail(track.step, event)

    def _finish(self, track: Track, event: Event) -> None:
        seconds = (
            event.seconds
            if event.seconds is not None
            else max(0.0, event.at - track.started)
            if track.stack
            else 0.0
        )
        track.stack, track.seconds = [], seconds
        track.total_seconds += seconds
        track.sent = track.total = 0
        if event.status == "failed":
            track.failed = True
            track.detail = (event.detail.splitlines() or [""])[0]
            return
        track.done.append(track.step)
        if event.detail:
            track.detail = event.detail if not event.host else _sub_detail(track.step, event)

    def close(self, at: float, ok: bool = True) -> None:
        """The deploy ended (``ok``: without an exception): running rows stop where they are,
        except a step that only reported progress, which ends here; hosts show their outcome."""
        self.closed_at = at
        for track in self.controller.values():
            if track.running and track.open_ended and ok:
                track.stack, track.seconds = [], at - track.started
                track.done.append(track.step)

    def rows(self, width: int, now: float, mask: Callable[[str], str] = str) -> list[Row]:
        """The rows to draw at ``now``, none wider than ``width`` cells."""
        now = self.closed_at if self.closed_at is not None else now
        hosts = sorted(self.hosts.items())
        shown: list[tuple[str, str, str, str, str]] = [
            self._controller_row(t, now) for t in self.controller.values()
        ]
        if len(hosts) > MAX_HOST_ROWS:
            shown.append(self._counts_row([t for _, t in hosts], now))
        else:
            shown.extend(self._host_row(t, now) for _, t in hosts)
        label_width = min(20, max((_cells(mask(r[1])) for r in shown), default=0))
        # a steady column: the time does not shift each time a host's step changes name
        step_width = max(
            [len(r[2]) for r in shown]
            + [len(s) for s in self.order if len(hosts) <= MAX_HOST_ROWS],
            default=0,
        )
        step_width = max(step_width, 8) if step_width else 0
        out = []
        for state, label, step, clock, detail in shown:
            icon = SPINNER[int(now * 10) % len(SPINNER)] if state == "running" else ICONS[state]
            head = _fit(mask(label), label_width).ljust(label_width) + "  "
            if step_width:
                head += step.ljust(step_width) + "  "
            out.append(_fitted(Row(state, icon, head, f"{clock:>6}  ", mask(detail)), width))
        return out

    def _controller_row(self, track: Track, now: float) -> tuple[str, str, str, str, str]:
        state = _state(track, self.closed_at)
        clock = _clock(now - track.started if track.running else track.seconds or 0.0)
        return state, track.label, "", clock, _clean(track.detail)

    def _host_row(self, track: Track, now: float) -> tuple[str, str, str, str, str]:
        state = _state(track, self.closed_at)
        if track.running:  # running, or stopped where it was when the view closed
            detail = _bar(track.sent, track.total) if track.total else track.detail
            return state, track.label, track.step, _clock(now - track.started), _clean(detail)
        if self.closed_at is not None and state == "ok":
            return state, track.label, "done", _clock(track.total_seconds), ", ".join(track.done)
        return state, track.label, track.step, _clock(track.seconds or 0.0), _clean(track.detail)

    def _counts_row(self, tracks: list[Track], now: float) -> tuple[str, str, str, str, str]:
        counts: dict[str, list[int]] = {}
        for track in tracks:
            step = (
                "done"
                if self.closed_at is not None and not track.failed
                else track.step or "waiting"
            )
            count = counts.setdefault(step, [0, 0])
            count[0] += 1
            count[1] += track.failed
        order = [s for s in ["done", *reversed(self.order)] if s in counts] + [
            s for s in counts if s not in self.order and s != "done"
        ]
        detail = ", ".join(
            f"{counts[s][0]} {s}" + (f" ({counts[s][1]} failed)" if counts[s][1] else "")
            for s in order
        )
        # the clock: while running, the oldest step still running (a host that is stuck shows);
        # then the longest host's time
        starts = [t.started for t in tracks if t.running]
        running = self.closed_at is None and bool(starts)
        state = "running" if running else "failed" if any(t.failed for t in tracks) else "ok"
        seconds = now - min(starts) if running else max(t.total_seconds for t in tracks)
        return state, f"{len(tracks)} hosts", "", _clock(seconds), detail


def _state(track: Track, closed_at: float | None) -> str:
    if track.failed:
        return "failed"
    if track.running:
        return "stopped" if closed_at is not None else "running"
    return "ok" if track.done or closed_at is not None else "waiting"


def _sub_detail(step: str, event: Event) -> str:
    """A host event inside its step, as one line: "venv building: 12 wheels with uv"."""
    words = [] if event.phase == step else [event.phase]
    if event.status not in ("progress", "info", "output", "start"):
        words.append(event.status)
    detail = (event.detail.splitlines() or [""])[0]
    label = " ".join(words)
    return f"{label}: {detail}" if label and detail else label or detail


def _clean(text: str) -> str:
    return " ".join(_CONTROL.sub(" ", (text.splitlines() or [""])[0]).split())


def _clock(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def _bar(sent: int, total: int) -> str:
    done = min(1.0, sent / max(1, total))
    return f"{'█' * int(done * BAR)}{'░' * (BAR - int(done * BAR))} {human_bytes(sent)}/{human_bytes(total)}"


def _cells(text: str) -> int:
    from rich.cells import cell_len

    return cell_len(text)


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal cells, its end an ellipsis when it was cut."""
    if _cells(text) <= width:
        return text
    from rich.cells import set_cell_size

    return set_cell_size(text, max(0, width - 1)) + "…" if width > 0 else ""


def _fitted(row: Row, width: int) -> Row:
    """The row with its detail (then its head) cut so that the whole row fits ``width`` cells."""
    room = width - _cells(f"{row.icon} {row.head}{row.clock}")
    if room >= 0:
        return Row(row.state, row.icon, row.head, row.clock, _fit(row.detail, room))
    head = _fit(f"{row.head}{row.clock}", max(0, width - _cells(row.icon) - 1))
    return Row(row.state, row.icon, head, "", "")


def fit_lines(lines: list[str], width: int) -> list[str]:
    """Lines folded to ``width`` columns for a terminal: a long line goes on, indented, on the
    lines below (words kept whole where they fit), so nothing is cut and nothing wraps."""
    out: list[str] = []
    for line in (part for text in lines for part in text.split("\n")):
        if _cells(line) <= width:
            out.append(line)
            continue
        indent = " " * min(len(line) - len(line.lstrip(" ")) + 4, width // 4)
        out.extend(
            textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False)
            or [line[:width]]
        )
    return out


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def print_table(
    rows: list[dict[str, Any]],
    columns: list[str],
    masker: Masker,
    out: Callable[[str], None] | None = None,
) -> None:
    """A plain table on stdout (read verbs' text output)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(masker(str(row.get(c, "") if row.get(c) is not None else "")) for c in columns)
        )
    console.print(table)


# -- command results as text: what a verb prints without --json (its ``lines`` with --json) ------


def plan_lines(plan: PlanResult) -> list[str]:
    """``shiplane plan``: a head line, a block per host, the hooks, the switch's batches."""
    head = (
        f"plan for stage {plan.stage}: artifact {plan.artifact[:12]}"
        f"{' (reused)' if plan.reused else ' (built)'}, "
        f"release {plan.release} (nothing changed on any host)"
    )
    lines = [head]
    for host, info in plan.hosts.items():
        lines += _host_plan_lines(host, info, plan.services)
    lines += [f"then: {h}" for h in _hook_plan_lines(plan)]
    lines.append(f"switch in batches of {plan.batch}, max_fail {plan.max_fail}")
    return lines


def _hook_plan_lines(plan: PlanResult) -> list[str]:
    hooks = plan.hooks
    out = []
    if hooks.setup_pending and hooks.setup:
        out.append(
            f"setup hook `{hooks.setup}` on {', '.join(hooks.setup_pending)} (its first deploy there)"
        )
    if hooks.runs_on:
        out += [
            f"release hook `{c}` once on {', '.join(hooks.runs_on)}" for c in hooks.release_commands
        ]
    if hooks.skips and hooks.release_commands:
        out.append(
            f"no release hook on {', '.join(hooks.skips)}: nothing it depends on "
            f"({', '.join(hooks.watched)}, config) changed since it last ran there"
        )
    return out


def _host_plan_lines(host: str, info: HostPlan, services: list[str]) -> list[str]:
    lines = [
        f"{host}:",
        f"  release   {info['current'] or '(none: first deploy)'} -> {info['release']}"
        + (" (same artifact as live)" if info["same_artifact"] else ""),
        f"  python    {info['python']}",
        f"  venv      {'reused' if info['venv_reused'] else 'built (dependencies installed)'}",
        f"  send      {info['blobs']} blob(s), {human_bytes(info['bytes'])}",
    ]
    if info.get("transfer") and info["blobs"]:  # where they come from: the controller, or a peer
        lines.append(f"  transfer  {info['transfer']}")
    config = info["config"]
    if not info["current"]:
        lines.append("  config    all new (no live release)")
    elif not any(keys for change in config.values() for keys in change.values()):
        lines.append("  config    unchanged")
    else:
        for path, keys in config.items():
            kinds = [
                ("added", keys.get("added")),
                ("changed", keys.get("changed")),
                ("removed", keys.get("removed")),
            ]
            lines += [
                f"  config    {path}: {kind} {', '.join(names)}" for kind, names in kinds if names
            ]
    lines.append(f"  services  {'; '.join(services) if services else 'none'}")
    lock = info["lock"]
    if lock:
        lines.append(
            f"  LOCKED    by {lock.get('user', '?')}@{lock.get('host', '?')} ({lock.get('command', '')}); "
            "a deploy would stop here"
        )
    return lines


def deploy_lines(result: DeployResult) -> list[str]:
    """``deploy``'s summary (``copy``, ``install``): the outcome, then each host's."""
    summary = result.summary
    ok = summary["ok"]
    verb = {"copy": "copied", "install": "installed"}.get(result.until or "", "deployed")
    head = verb if ok else (result.until or "deploy") + " FAILED:"
    lines = [
        (
            f"{head} {result.app} release {summary['release'] or '-'} "
            f"(artifact {(summary['artifact'] or '')[:12] or '-'}) to stage {summary['stage']} "
            f"in {summary['duration']:.1f}s"
        )
    ]
    if summary.get("error"):
        lines.append(f"  reason: {summary['error']}")
    for host, state in result.hosts.items():
        timings = summary["hosts"][host]["phases"]
        phases = ", ".join(f"{p} {s:.2f}s" for p, s in timings.items())
        if ok:
            left = f"release {state.release or state.previous or '-'}"
        elif state.phase in ("pending", "connect", "lock"):  # it never got a byte: as it was
            left = "left as it was"
        else:  # what the host serves now, which a failed deploy may have changed back
            left = f"serves {(state.release if state.switched else state.previous) or 'nothing'}"
        lines.append(
            f"  {host:24} {state.outcome:10} {left}  sent {human_bytes(state.bytes_sent)}"
            + (
                f" (+{human_bytes(state.bytes_from_peers)} from peers)"
                if state.bytes_from_peers
                else ""
            )
            + f"  [{phases}]"
        )
    if ok and result.serving_port:
        lines.append(f"serving at http://127.0.0.1:{result.serving_port}/")
    return lines


def promote_lines(result: PromoteResult) -> list[str]:
    """``promote``'s summary: what was promoted from where, then the deploy's."""
    head = (
        f"promoting artifact {result.artifact[:12]} from stage {result.promoted_from} "
        f"to {result.to_stage}"
    )
    return [head, *deploy_lines(result.deploy)]


def status_lines(report: StatusReport) -> list[str]:
    """``status``: each host's live release and services, then any drift."""
    lines = []
    for host, result in report["hosts"].items():
        lines.append(f"{host}: live release {result.get('live_release') or '-'}")
        lines += front_lines(result.get("front"))
        for service in result.get("services", []):
            name = "web standby" if service.get("standby") else service.get("name", "?")
            if service.get("preboot"):  # libraries loaded: waiting for a release, or its switch
                name = "web preboot" if service.get("release") else "web spare"
            lines.append(
                f"  {name:12} {service.get('state', '?'):9} pid {service.get('pid') or '-':>7}  "
                f"up {service.get('uptime', 0) or 0:>6.0f}s  release {service.get('release') or '-'}"
            )
        lines += [f"  {line}" for line in job_lines(result.get("jobs", []))]
    return lines + [f"DRIFT: {d}" for d in report["drift"]]


def job_lines(jobs: Sequence[Mapping[str, Any]]) -> list[str]:
    """A host's scheduled jobs in ``status``: schedule, last run (when, exit, how long), next."""
    lines = []
    for job in jobs:
        last = job.get("last") or {}
        if job.get("running"):
            ran = f"running since {last.get('started_at', '?')}"
        elif last.get("finished_at"):
            ended = last.get("state") if last.get("state") != "done" else "exit"
            ran = (
                f"last {last.get('started_at')} {ended} {last.get('exit_code')} "
                f"in {float(last.get('seconds') or 0):.1f}s"
            )
        elif last.get("started_at"):  # its runner was killed before it could say how it ended
            ran = f"last {last.get('started_at')} did not finish"
        else:
            ran = "not run yet"
        lines.append(
            f"job {job.get('name', '?'):10} {job.get('schedule', '?'):14} {ran}; "
            f"next {job.get('next_run') or '-'}"
        )
    return lines


def front_lines(front: Mapping[str, Any] | None) -> list[str]:
    """A host's Caddy or nginx in ``status``: every app it routes by name (several apps may
    share it), this stage's among them."""
    if not front:
        return []
    pid = front.get("pid")
    state = f"pid {pid}" if pid else "not running"
    lines = [f"  front {front.get('kind')} ({state}, {front.get('config')}) routes:"]
    for route in front.get("routes", []):
        names = ", ".join(route.get("domains", [])) or "any name"
        lines.append(
            f"    {names} -> {route.get('app')} ({route.get('stage')}) {route.get('root')}"
        )
    return lines


def releases_lines(report: ReleasesReport) -> list[str]:
    """``releases``: one line per release per host."""
    lines = []
    for host, result in report["hosts"].items():
        for release in result.get("releases", []):
            lines.append(
                f"{host:24} {release['release_id']}  {release.get('state', '?'):12} "
                f"artifact {str(release.get('artifact', ''))[:12]}  {release.get('created_at', '')}"
            )
    return lines or ["no releases"]


def history_lines(report: HistoryReport) -> list[str]:
    """``history``: one line per ledger entry per host."""
    lines = []
    for host, found in report["hosts"].items():
        for entry in found.get("entries", []):
            lines.append(
                f"{host:24} {entry.get('started_at', entry.get('at', ''))}  {entry.get('event', ''):9} "
                f"{entry.get('release') or '-':28} {entry.get('outcome', ''):8} "
                f"{entry.get('duration', '')}s  by {entry.get('user', '?')}"
            )
    return lines or ["no history"]


def read_lines(name: str, report: StatusReport | ReleasesReport | HistoryReport) -> list[str]:
    """The lines of a read verb (``status``, ``releases``, ``history``) by its name."""
    if name == "status":
        return status_lines(cast("StatusReport", report))
    if name == "releases":
        return releases_lines(cast("ReleasesReport", report))
    return history_lines(cast("HistoryReport", report))


def service_lines(name: str, report: HostsReport) -> list[str]:
    """``start``, ``stop``, ``restart``, ``reload``: one line per host."""
    return [f"{host}: {name} ok" for host in report["hosts"]]


def prune_lines(report: HostsReport) -> list[str]:
    """``prune``: what each host removed."""
    return [
        f"{h}: removed {', '.join(cast('list[str]', r.get('removed', []))) or 'nothing'}"
        for h, r in report["hosts"].items()
    ]


def lock_lines(report: HostsReport, reason: str | None) -> list[str]:
    """``lock``: each host locked, and why."""
    why = f" ({reason})" if reason else ""
    return [f"locked {h}{why}" for h in report["hosts"]]


def lock_status_lines(report: LockReport) -> list[str]:
    """``lock status``: each host's lock, or none."""
    return [
        f"{host}: {(lock or {}).get('message') or 'not locked'}"
        for host, lock in report["hosts"].items()
    ]


def unlock_lines(report: HostsReport) -> list[str]:
    """``unlock``: each host unlocked."""
    return [f"unlocked {h}" for h in report["hosts"]]


def rollback_lines(result: RollbackResult) -> list[str]:
    """``rollback``: the outcome, the releases skipped, the hosts whose left release is unmarked."""
    report = result.report
    lines = [
        f"rolled back stage {report['stage']} to {report['release']} in {report['duration']:.1f}s"
        if report["ok"]
        else f"rollback FAILED: {'; '.join(result.errors)}"
    ]
    lines += [f"  skipped {rid}: {why}" for rid, why in report["skipped"]]
    lines += [f"  {host}: {why}" for host, why in result.unmarked.items()]
    return lines


def verify_lines(result: Verification) -> list[str]:
    """``verify``: per host the blobs checked and any quarantined, then the hosts that failed."""
    lines = []
    for host, found in result.report["hosts"].items():
        bad = found.get("bad") or []
        verdict = (
            f"{len(bad)} did not match their sha256 and were quarantined: {', '.join(b[:12] for b in bad)}"
            if bad
            else "all match their sha256"
        )
        lines.append(f"{host}: {found.get('blobs', 0)} stored blob(s), {verdict}")
    return lines + [f"{host}: verify failed: {why}" for host, why in result.failed.items()]


def check_lines(result: ProjectCheck) -> list[str]:
    """``check``: the deploy file, the app's source, its lock, then each stage."""
    report = result.report
    lines = [
        f"{report['file']}: ok (app {result.app}, stages: {', '.join(report['stages'])})",
        f"app source: {report['source']} ({report['source_reason']})",
        f"lock: {report['lock']}",
        *(f"warning: {warning}" for warning in report["lock_warnings"]),
        f"packages: {report['packages']}",
    ]
    for name, stage in report["stages"].items():
        facts = result.where[name]
        count = len(stage["hosts"])
        where = "this machine" if facts.local else f"{count} host{'s' if count > 1 else ''}"
        files = ", ".join(stage["config_files"]) or "no files"
        lines.append(f"stage {name}: {where}, deploy_to {facts.deploy_to}, config from {files}")
        pythons = stage["python"]
        if len(set(pythons.values())) > 1:  # hosts on their own interpreters: say which
            lines.append("  python: " + "; ".join(f"{h} {p}" for h, p in pythons.items()))
    return lines


def exec_lines(result: ExecResult) -> list[str]:
    """What ``exec`` itself says (to stderr): the ledgers it could not record in, the failed
    hosts when it ran on several."""
    report = result.report
    lines = [
        f"exec: not recorded in the ledger of {host}: {why}"
        for host, why in result.unrecorded.items()
    ]
    failed = [(h, info["exit_code"]) for h, info in report["hosts"].items() if info["exit_code"]]
    if failed and len(report["hosts"]) > 1:
        lines.append("exec: failed on " + ", ".join(f"{h} (exit code {c})" for h, c in failed))
    return lines


def setup_lines(result: SetupResult) -> list[str]:
    """``setup``: the key authorised, each host's steps, then the verdict."""
    stage = result["stage"]
    if result["local"]:
        return [f"{stage}: the local stage is this machine, reached without SSH: nothing to set up"]
    per_host = result["hosts"]
    lines = [f"authorising {result['key']} for the deploy user"]
    for host, done in per_host.items():
        lines.append(f"{host} (as {done['user']}, deploy user {done['deploy_user']}):")
        for step in done["steps"]:
            lines.append(f"  {step['status']:8} {step['step']:7} {step['detail']}")
    if not result["ok"]:
        bad = [h for h, d in per_host.items() if not d["ok"]]
        lines.append(f"setup failed on {', '.join(bad)}")
    elif result["changed"]:
        lines.append(
            f"{len(per_host)} host(s) ready: deploys log in as the deploy user; "
            f"check with shiplane doctor --stage {stage}"
        )
    else:
        lines.append(f"nothing changed: {len(per_host)} host(s) were ready")
    return lines


def doctor_lines(result: DoctorResult) -> list[str]:
    """``doctor``: each host's checks (with the fix of what is missing), then the verdict."""
    lines: list[str] = []
    for host, done in result["hosts"].items():
        lines.append(f"{host}" + (f" (as {done['user']}):" if done["user"] else ":"))
        for check in done["checks"]:
            lines.append(f"  {check['status']:8} {check['check']:7} {check['detail']}")
            if "fix" in check:
                lines.append(f"  {'':8} {'':7} fix: {check['fix']}")
    if result["ok"]:
        count = len(result["hosts"])
        lines.append(f"all is well on {count} host(s): shiplane deploy --stage {result['stage']}")
    else:
        bad = [h for h, d in result["hosts"].items() if not d["ok"]]
        lines.append(f"{result['missing']} thing(s) missing on {', '.join(bad)}")
    return lines
