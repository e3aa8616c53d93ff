"""Cron schedules (``[jobs.NAME] schedule``): the five fields of crontab(5), parsed once here
for the deploy file's check, the daemon backend's scheduler and the systemd backend's timers.

``minute hour day-of-month month day-of-week``; each field ``*``, a number, a range ``a-b``, a
step ``*/n``, ``a-b/n`` or ``a/n`` (from ``a`` to the field's end), or a comma list of those;
months and weekdays may be named (``jan``, ``mon-fri``); weekday 0 and 7 are Sunday. As in
Vixie cron, when both day fields are restricted a day matches either of them. The macros
``@hourly``, ``@daily`` (``@midnight``), ``@weekly``, ``@monthly``, ``@yearly`` (``@annually``)
stand for their usual lines. Times are the host's local time.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# a schedule that matches no minute in this many days never runs (e.g. "0 0 30 2 *")
HORIZON_DAYS = 366 * 8
SYSTEMD_WEEKDAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")


class CronError(ValueError):
    """A schedule that is not a valid cron line; the message says which field and why."""


@dataclass(frozen=True)
class Cron:
    """A parsed schedule: the values each field allows (weekdays 0-6, Sunday 0)."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool  # the day-of-month field starts with "*"
    any_weekday: bool  # the day-of-week field starts with "*"

    def day_matches(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        by_day = day.day in self.days
        by_weekday = day.isoweekday() % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return by_day and by_weekday
        return by_day or by_weekday  # both restricted: either one (crontab(5))

    def matches(self, when: dt.datetime) -> bool:
        """Whether the minute ``when`` falls in is one of the schedule's."""
        return when.minute in self.minutes and when.hour in self.hours and self.day_matches(when)

    def next_after(self, when: dt.datetime) -> dt.datetime | None:
        """The first minute after ``when`` (naive local time) that matches; None if none does
        within HORIZON_DAYS."""
        start = when.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        day = start.date()
        for _ in range(HORIZON_DAYS):
            if self.day_matches(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        at = dt.datetime(day.year, day.month, day.day, hour, minute)
                        if at >= start:
                            return at
            day += dt.timedelta(days=1)
        return None


def parse(text: str) -> Cron:
    """The schedule ``text`` (CronError naming the field that is wrong)."""
    if not isinstance(text, str):
        raise CronError(f"a schedule is a string such as '*/5 * * * *', found {text!r}")
    line = MACROS.get(text.strip().lower(), text)
    parts = line.split()
    if len(parts) != 5:
        raise CronError(
            f"schedule {text!r}: expected 5 fields (minute hour day-of-month month "
            f"day-of-week), e.g. '*/5 * * * *', or one of {', '.join(sorted(MACROS))}; "
            f"found {len(parts)}"
        )
    values = [_field(part, index, text) for index, part in enumerate(parts)]
    weekdays = frozenset(v % 7 for v in values[4])
    cron = Cron(
        text=text,
        minutes=values[0],
        hours=values[1],
        days=values[2],
        months=values[3],
        weekdays=weekdays,
        any_day=parts[2].startswith("*"),
        any_weekday=parts[4].startswith("*"),
    )
    if cron.next_after(dt.datetime(2000, 1, 1)) is None:
        raise CronError(f"schedule {text!r} matches no day (e.g. February 30th): it never runs")
    return cron


def _field(part: str, index: int, text: str) -> frozenset[int]:
    low, high = BOUNDS[index]
    found: set[int] = set()
    for item in part.split(","):
        try:
            found |= _item(item.lower(), index, low, high)
        except CronError as exc:
            raise CronError(f"schedule {text!r}: {FIELDS[index]} field {part!r}: {exc}") from None
    return frozenset(found)


def _item(item: str, index: int, low: int, high: int) -> set[int]:
    base, slash, step_text = item.partition("/")
    step = 1
    if slash:
        if not step_text.isdigit() or int(step_text) == 0:
            raise CronError(f"the step after '/' must be a number from 1, found {step_text!r}")
        step = int(step_text)
    if base == "*":
        start, end = low, high
    elif "-" in base:
        first, _, last = base.partition("-")
        start, end = _value(first, index, low, high), _value(last, index, low, high)
        if start > end:
            raise CronError(f"the range {base!r} runs backwards")
    else:
        start = _value(base, index, low, high)
        end = high if slash else start  # "a/n": from a to the field's end, every n
    return set(range(start, end + 1, step))


def _value(word: str, index: int, low: int, high: int) -> int:
    names = MONTHS if index == 3 else WEEKDAYS if index == 4 else ()
    if word in names:
        return names.index(word) + (1 if index == 3 else 0)
    if not word.isdigit():
        hint = f" or a name ({names[0]}..{names[-1]})" if names else ""
        raise CronError(f"expected a number from {low} to {high}{hint}, found {word!r}")
    value = int(word)
    if not low <= value <= high:
        raise CronError(f"{value} is out of range ({low}-{high})")
    return value


def on_calendar(cron: Cron) -> list[str]:
    """The schedule as systemd ``OnCalendar=`` values (systemd.time(7)); two when both day
    fields are restricted (a timer fires when any of its lines matches, as cron's "either")."""

    def values(field: frozenset[int], low: int, high: int, width: int) -> str:
        if field == frozenset(range(low, high + 1)):
            return "*"
        return ",".join(f"{v:0{width}d}" for v in sorted(field))

    clock = f"{values(cron.hours, 0, 23, 2)}:{values(cron.minutes, 0, 59, 2)}:00"
    months = values(cron.months, 1, 12, 2)
    days = values(cron.days, 1, 31, 2)
    weekdays = ",".join(SYSTEMD_WEEKDAYS[d] for d in sorted(cron.weekdays))
    all_weekdays = cron.weekdays == frozenset(range(7))
    if cron.any_day or cron.any_weekday:
        head = "" if all_weekdays else weekdays + " "
        return [f"{head}*-{months}-{days} {clock}"]
    return [f"*-{months}-{days} {clock}", f"{weekdays} *-{months}-* {clock}"]
