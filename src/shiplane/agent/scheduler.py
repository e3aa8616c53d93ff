"""The daemon backend's scheduler (``agent jobs <root>``): the cron of a deploy root's jobs.

One supervisord program (``shiplane-jobs``) on the stage's primary host, while the stage has
jobs (daemon.py). It wakes at each minute boundary, reads the jobs of the spec the last switch
saved (so a deploy's new or changed jobs, and its new release, count from the next minute
without a restart), and starts ``agent run-job <root> <name> <minute>`` for each job due:
jobs.py's lock and record make each run once per minute and never overlapping itself.

:func:`due` is the whole of the "when": pure, so tests drive it with a fake clock.
"""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import threading

from .cron import Cron, CronError, parse
from .jobs import MINUTE_FORMAT, configured, say
from .paths import Layout, agent_command

# minutes a late wake-up (a suspended VM, a stalled host) still runs a missed schedule for;
# beyond that a missed minute is skipped, as cron does
CATCH_UP = 5
# the clock stepped back more than this: start again from the new time
CLOCK_BACK = dt.timedelta(hours=2)


def minute_of(when: dt.datetime) -> dt.datetime:
    return when.replace(second=0, microsecond=0)


def due(
    schedules: dict[str, Cron], after: dt.datetime, upto: dt.datetime
) -> dict[str, dt.datetime]:
    """The jobs to start when the clock reached ``upto``, the last tick having been ``after``:
    each job whose schedule matches a minute in (after, upto] (the last CATCH_UP of them), once,
    for the latest such minute. Nothing when the clock did not move forward."""
    out: dict[str, dt.datetime] = {}
    first = max(minute_of(after), minute_of(upto) - dt.timedelta(minutes=CATCH_UP))
    minute = minute_of(upto)
    while minute > first:
        for name, cron in schedules.items():
            if name not in out and cron.matches(minute):
                out[name] = minute
        minute -= dt.timedelta(minutes=1)
    return out


def schedules(layout: Layout) -> dict[str, Cron]:
    """The saved spec's jobs, parsed; one whose schedule cannot be read is left out (the
    controller checked it: an edited spec on the host, or a newer controller's syntax)."""
    out: dict[str, Cron] = {}
    for name, job in configured(layout).items():
        try:
            out[name] = parse(str(job.get("schedule")))
        except CronError as exc:
            say(f"job {name}: {exc}; not scheduled")
    return out


class Scheduler:
    """The loop: sleep to the next minute, start what is due, reap what ended."""

    def __init__(self, layout: Layout, now: dt.datetime | None = None) -> None:
        self.layout = layout
        self.stopping = threading.Event()
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.last = minute_of(now or dt.datetime.now())  # the minute the last tick reached

    def start(self, name: str, minute: dt.datetime) -> None:
        stamp = minute.strftime(MINUTE_FORMAT)
        say(f"starting job {name} for {stamp}")
        self.running[f"{name} {stamp}"] = subprocess.Popen(
            [*agent_command(), "run-job", str(self.layout.root), name, stamp],
            stdin=subprocess.DEVNULL,
            # its own session: a run outlives a restart of the scheduler (a shiplane upgrade)
            # and finishes; `shiplane stop` ends runs itself (jobs.end_runs)
            start_new_session=True,
        )

    def reap(self) -> None:
        for key, child in list(self.running.items()):
            if child.poll() is not None:
                del self.running[key]

    def tick(self, now: dt.datetime) -> dict[str, dt.datetime]:
        """Start the jobs due when the clock reads ``now`` (none until a new minute); returns
        them. A clock stepped back by more than CLOCK_BACK starts over from its new time."""
        if now < self.last - CLOCK_BACK:
            self.last = minute_of(now)
        if minute_of(now) <= self.last:
            return {}
        started = due(schedules(self.layout), self.last, now)
        for name, minute in sorted(started.items()):
            self.start(name, minute)
        self.last = minute_of(now)
        return started

    def loop(self) -> None:
        while not self.stopping.is_set():
            now = dt.datetime.now()
            wait = (minute_of(now) + dt.timedelta(minutes=1) - now).total_seconds()
            # wakes at the boundary (or within 5 s, to notice a clock step and reap)
            if self.stopping.wait(min(max(wait, 0.05), 5.0)):
                break
            self.reap()
            self.tick(dt.datetime.now())


def main(argv: list[str]) -> int:
    """``jobs <root>``: run the scheduler until TERM or INT."""
    if len(argv) != 1:
        sys.stderr.write("usage: agent jobs <root>\n")
        return 2
    scheduler = Scheduler(Layout(argv[0]))

    def stop(_signum: int, _frame: object) -> None:
        scheduler.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    say(f"scheduler for {argv[0]} started")
    scheduler.loop()
    say(f"scheduler stopped; {len(scheduler.running)} run(s) going on finish by themselves")
    return 0
