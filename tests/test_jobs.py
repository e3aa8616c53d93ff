"""Scheduled jobs, without a deploy (docs/workers.md): the cron parser (tables and hypothesis
against a brute-force reading of crontab(5)), its systemd ``OnCalendar=`` form, the scheduler's
"what is due" with a fake clock, one run of a job on a deploy root made by hand (lock, record,
log, once per minute), the deploy file's check of ``[jobs.*]``, and the primary-only spec."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployhelp import wait_for
from shiplane.agent import jobs
from shiplane.agent.cron import CronError, on_calendar, parse
from shiplane.agent.paths import Layout
from shiplane.agent.scheduler import CATCH_UP, due
from shiplane.plan import host_services, services_spec

T0 = dt.datetime(2026, 12, 7, 10, 0)  # a Monday


@pytest.mark.parametrize(
    ("text", "minutes", "hours"),
    [
        ("* * * * *", set(range(60)), set(range(24))),
        ("*/5 * * * *", set(range(0, 60, 5)), set(range(24))),
        ("0 9-17 * * *", {0}, set(range(9, 18))),
        ("1,2,30-32 */6 * * *", {1, 2, 30, 31, 32}, {0, 6, 12, 18}),
        ("10-50/20 3/8 * * *", {10, 30, 50}, {3, 11, 19}),
        ("@hourly", {0}, set(range(24))),
        ("@daily", {0}, {0}),
    ],
)
def test_fields(text: str, minutes: set[int], hours: set[int]) -> None:
    cron = parse(text)
    assert cron.minutes == minutes and cron.hours == hours


def test_names_and_sunday() -> None:
    cron = parse("0 0 * jan,jul mon-fri")
    assert cron.months == {1, 7} and cron.weekdays == {1, 2, 3, 4, 5}
    assert parse("0 0 * * 7").weekdays == parse("0 0 * * sun").weekdays == {0}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("* * * *", "expected 5 fields"),
        ("60 * * * *", "minute field '60': 60 is out of range (0-59)"),
        ("* 24 * * *", "hour field"),
        ("*/0 * * * *", "step"),
        ("5-1 * * * *", "runs backwards"),
        ("* * * foo *", "month field 'foo'"),
        ("0 0 30 2 *", "never runs"),
        ("@reboot", "expected 5 fields"),
    ],
)
def test_bad_schedules(text: str, words: str) -> None:
    with pytest.raises(CronError, match=None) as info:
        parse(text)
    assert words in str(info.value)


def _brute(text: str, when: dt.datetime) -> bool:
    """crontab(5) read literally, field by field."""
    fields = text.split()
    weekday = when.isoweekday() % 7

    def hit(field: str, value: int, low: int, high: int, alias7: bool = False) -> bool:
        for item in field.split(","):
            base, _, step = item.partition("/")
            lo, hi = (
                (low, high) if base == "*" else (int(base.split("-")[0]), int(base.split("-")[-1]))
            )
            if step and "-" not in base and base != "*":
                hi = high
            values = set(range(lo, hi + 1, int(step or 1)))
            if alias7 and 7 in values:
                values.add(0)
            if value in values:
                return True
        return False

    minute = hit(fields[0], when.minute, 0, 59)
    hour = hit(fields[1], when.hour, 0, 23)
    month = hit(fields[3], when.month, 1, 12)
    dom = hit(fields[2], when.day, 1, 31)
    dow = hit(fields[4], weekday, 0, 7, alias7=True)
    if fields[2].startswith("*") or fields[4].startswith("*"):
        day = dom and dow
    else:
        day = dom or dow
    return minute and hour and month and day


def _field(low: int, high: int) -> st.SearchStrategy[str]:
    value = st.integers(low, high)
    item = st.one_of(
        st.just("*"),
        value.map(str),
        st.tuples(value, value).map(lambda p: f"{min(p)}-{max(p)}"),
        st.tuples(st.integers(1, high), st.sampled_from(["*", ""])).map(
            lambda p: f"*/{p[0]}" if p[1] else f"{low}-{high}/{p[0]}"
        ),
    )
    return st.lists(item, min_size=1, max_size=3).map(",".join)


@settings(max_examples=150, deadline=None)
@given(
    minute=_field(0, 59),
    hour=_field(0, 23),
    dom=_field(1, 31),
    month=_field(1, 12),
    dow=_field(0, 7),
    offset=st.integers(0, 60 * 24 * 400),
)
def test_matches_crontab(
    minute: str, hour: str, dom: str, month: str, dow: str, offset: int
) -> None:
    text = f"{minute} {hour} {dom} {month} {dow}"
    try:
        cron = parse(text)
    except CronError:
        return  # a day that never comes (Feb 30th): refused, tested above
    when = T0 + dt.timedelta(minutes=offset)
    assert cron.matches(when) == _brute(text, when)
    upcoming = cron.next_after(when)
    assert upcoming is not None and upcoming > when and cron.matches(upcoming)
    # nothing in between matches (checked over at most a day of minutes)
    probe = when.replace(second=0) + dt.timedelta(minutes=1)
    for _ in range(min(1440, int((upcoming - probe).total_seconds() // 60))):
        assert not cron.matches(probe)
        probe += dt.timedelta(minutes=1)


@pytest.mark.parametrize(
    ("text", "calendar"),
    [
        ("*/15 * * * *", ["*-*-* *:00,15,30,45:00"]),
        ("30 2 * * mon-fri", ["Mon,Tue,Wed,Thu,Fri *-*-* 02:30:00"]),
        ("0 0 1 */3 *", ["*-01,04,07,10-01 00:00:00"]),
        ("0 12 13 * 5", ["*-*-13 12:00:00", "Fri *-*-* 12:00:00"]),
    ],
)
def test_on_calendar(text: str, calendar: list[str]) -> None:
    assert on_calendar(parse(text)) == calendar


def test_due_once_per_minute_with_a_fake_clock() -> None:
    schedules = {"every": parse("* * * * *"), "five": parse("*/5 * * * *")}
    # a tick at each minute: "every" each time, "five" at :00 and :05 only
    seen: dict[str, list[dt.datetime]] = {"every": [], "five": []}
    last = T0
    for step in range(1, 11):
        now = T0 + dt.timedelta(minutes=step, seconds=0.2)
        for name, minute in due(schedules, last, now).items():
            seen[name].append(minute)
        last = now.replace(second=0, microsecond=0)
    assert len(seen["every"]) == 10 and len(set(seen["every"])) == 10
    assert seen["five"] == [T0 + dt.timedelta(minutes=5), T0 + dt.timedelta(minutes=10)]
    # a second tick within the same minute, or a clock gone back, starts nothing
    assert due(schedules, last, last + dt.timedelta(seconds=30)) == {}
    assert due(schedules, last, last - dt.timedelta(minutes=3)) == {}


def test_due_after_a_late_wake_runs_each_job_once() -> None:
    schedules = {"every": parse("* * * * *"), "five": parse("*/5 * * * *")}
    late = due(schedules, T0, T0 + dt.timedelta(minutes=3, seconds=5))
    assert late == {"every": T0 + dt.timedelta(minutes=3)}  # once, for the latest minute
    # a wake hours late: only the last CATCH_UP minutes count (cron runs no missed minute)
    hours = due(schedules, T0, T0 + dt.timedelta(hours=2, minutes=7))
    assert hours["five"] == T0 + dt.timedelta(hours=2, minutes=5)
    assert CATCH_UP >= 2


def test_the_schedulers_ticks_with_a_fake_clock(tmp_path: Path) -> None:
    from shiplane.agent.scheduler import Scheduler

    layout = Layout(tmp_path / "root")
    layout.run.mkdir(parents=True)
    jobs_of = {
        "every": {"schedule": "* * * * *", "command": "true", "timeout": 60},
        "hourly": {"schedule": "@hourly", "command": "true", "timeout": 60},
    }
    (layout.run / "services.json").write_text(json.dumps({"jobs": jobs_of}))
    started: list[tuple[str, dt.datetime]] = []

    class Recording(Scheduler):
        def start(self, name: str, minute: dt.datetime) -> None:
            started.append((name, minute))

    clock = Recording(layout, now=T0 + dt.timedelta(seconds=30))
    assert clock.tick(T0 + dt.timedelta(seconds=59)) == {}  # the same minute: nothing
    clock.tick(T0 + dt.timedelta(minutes=1, seconds=0.1))
    clock.tick(T0 + dt.timedelta(minutes=1, seconds=40))  # woke again within the minute
    assert started == [("every", T0 + dt.timedelta(minutes=1))]
    # the hour: both, once each
    clock.tick(T0 + dt.timedelta(minutes=59, seconds=1))
    clock.tick(T0 + dt.timedelta(hours=1, seconds=1))
    at_the_hour = T0 + dt.timedelta(hours=1)
    assert started[-2:] == [("every", at_the_hour), ("hourly", at_the_hour)]
    # a clock stepped back an hour runs nothing again; three hours, it starts over from there
    count = len(started)
    clock.tick(T0 + dt.timedelta(minutes=5, seconds=1))
    assert len(started) == count
    clock.tick(T0 - dt.timedelta(hours=3))
    clock.tick(T0 - dt.timedelta(hours=3) + dt.timedelta(minutes=1, seconds=1))
    assert started[-1] == ("every", T0 - dt.timedelta(hours=3) + dt.timedelta(minutes=1))
    # a job gone from the saved spec is not started; a spec without jobs starts nothing
    (layout.run / "services.json").write_text(json.dumps({"jobs": {}}))
    count = len(started)
    clock.tick(T0 + dt.timedelta(hours=5))
    assert len(started) == count


# --- one run on a deploy root made by hand -----------------------------------------------------

RID = "20261207T100000000Z-abcdef12"


def _root(tmp_path: Path, command: str, timeout: float = 60) -> Layout:
    layout = Layout(tmp_path / "root")
    release = layout.release(RID)
    release.mkdir(parents=True)
    (release / "release.json").write_text(json.dumps({"release_id": RID, "stage": "t"}))
    (release / "shiplane.env").write_text('GREETING="hello from the env"\n')
    os.symlink(f"releases/{RID}", layout.current)
    layout.run.mkdir()
    spec = {"jobs": {"tidy": {"schedule": "* * * * *", "command": command, "timeout": timeout}}}
    (layout.run / "services.json").write_text(json.dumps(spec))
    return layout


def _run_job(layout: Layout, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shiplane.agent", "run-job", str(layout.root), "tidy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_run_in_the_release_with_its_env_logged_and_recorded(tmp_path: Path) -> None:
    layout = _root(tmp_path, 'echo "$GREETING in $(pwd)"; echo oops >&2; exit 3')
    done = _run_job(layout, "2026-12-07T10:01")
    assert done.returncode == 3, done
    log = jobs.log_path(layout, "tidy").read_text()
    assert f"hello from the env in {layout.release(RID)}" in log and "oops" in log
    assert "job tidy exited 3" in log
    record = jobs.read_record(layout, "tidy")
    assert record is not None
    assert record["exit_code"] == 3 and record["state"] == "done"
    assert record["release"] == RID and record["minute"] == "2026-12-07T10:01"
    # the same minute again: nothing runs (a scheduler restarted within the minute)
    again = _run_job(layout, "2026-12-07T10:01")
    assert again.returncode == 0 and "already ran" in again.stdout
    assert log == jobs.log_path(layout, "tidy").read_text()
    [entry] = jobs.status(layout, now=dt.datetime(2026, 12, 7, 10, 1, 30))
    assert entry["next_run"] == "2026-12-07T10:02" and not entry["running"]
    assert entry["last"] is not None and entry["last"]["exit_code"] == 3


def test_a_run_never_overlaps_itself_and_ends_at_its_timeout(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    layout = _root(tmp_path, f"while [ ! -e {gate} ]; do sleep 0.05; done; echo through")
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shiplane.agent",
            "run-job",
            str(layout.root),
            "tidy",
            "2026-12-07T10:01",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: jobs.is_running(layout, "tidy"), deadline=20, what="the first run")
        second = _run_job(layout, "2026-12-07T10:02")
        assert second.returncode == 0 and "skipped" in second.stdout
        assert "job tidy (2026-12-07T10:02) skipped: the run of 2026-12-07T10:01 still goes on" in (
            jobs.log_path(layout, "tidy").read_text()
        )
        gate.touch()
        assert first.wait(timeout=30) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert jobs.log_path(layout, "tidy").read_text().count("through") == 1
    # a run past its timeout is ended (its whole process group) and recorded so
    slow = _root(tmp_path / "slow", "sleep 30", timeout=0.5)
    done = _run_job(slow)
    record = jobs.read_record(slow, "tidy")
    assert record is not None and record["state"] == "timeout", (done, record)
    assert record["seconds"] < 15


def test_a_runner_told_to_stop_ends_its_job_and_records_it(tmp_path: Path) -> None:
    from shiplane.agent import pid_alive

    layout = _root(tmp_path, "sleep 60")
    runner = subprocess.Popen(
        [sys.executable, "-m", "shiplane.agent", "run-job", str(layout.root), "tidy"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid = wait_for(
            lambda: (jobs.read_record(layout, "tidy") or {}).get("pid"),
            deadline=20,
            what="the run's command started",
        )
        runner.terminate()  # a scheduler stopping, or systemctl stop
        assert runner.wait(timeout=30) == 1
    finally:
        if runner.poll() is None:
            runner.kill()
    record = jobs.read_record(layout, "tidy")
    assert record is not None and record["state"] == "killed", record
    assert not pid_alive(int(pid))
    assert "job tidy killed" in jobs.log_path(layout, "tidy").read_text()


def test_stop_ends_the_runs_going_on(tmp_path: Path) -> None:
    from shiplane.agent import pid_alive

    layout = _root(tmp_path, "sleep 60")
    runner = subprocess.Popen(
        [sys.executable, "-m", "shiplane.agent", "run-job", str(layout.root), "tidy"],
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # as the scheduler starts it: its own session
    )
    try:
        pid = wait_for(
            lambda: (jobs.read_record(layout, "tidy") or {}).get("pid"),
            deadline=20,
            what="the run's command started",
        )
        assert jobs.end_runs(layout) == ["tidy"]
        assert runner.wait(timeout=30) == 1
    finally:
        if runner.poll() is None:
            runner.kill()
    record = jobs.read_record(layout, "tidy")
    assert record is not None and record["state"] == "killed" and "runner_pid" not in record
    assert not pid_alive(int(pid))
    assert jobs.end_runs(layout) == []  # nothing going on: nothing to end


def test_the_deploy_file_checks_schedules_and_the_primary_alone_gets_jobs(
    tmp_path: Path,
) -> None:
    from shiplane.config import load_project
    from shiplane.config.loader import with_overrides
    from shiplane.errors import ConfigError

    toml = tmp_path / "shiplane.toml"
    base = (
        '[app]\nname = "demo"\nwsgi = "app:app"\n'
        '[stages.prod]\nhosts = ["h1", "h2", "h3"]\ndeploy_to = "/srv/demo"\n'
        '[stages.prod.roles]\nprimary = ["h2"]\n'
    )
    toml.write_text(base + '[jobs.cleanup]\nschedule = "*/5 * * *"\ncommand = "true"\n')
    with pytest.raises(ConfigError) as info:
        load_project(toml)
    assert "jobs.cleanup.schedule" in str(info.value) and "expected 5 fields" in str(info.value)
    toml.write_text(base + '[jobs.cleanup]\nschedule = "*/5 * * * *"\ncommand = "true"\n')
    deploy = load_project(toml).deploy
    spec = services_spec(deploy, "prod")
    assert spec["jobs"]["cleanup"]["schedule"] == "*/5 * * * *"
    given_to = {h: host_services(spec, deploy, "prod", h)["jobs"] for h in ("h1", "h2", "h3")}
    assert [h for h, j in given_to.items() if j] == ["h2"]
    # the primary moved: it waits for the end of the rollout when the old one switches later
    from shiplane.plan import jobs_after_rollout

    rollout = [["h1"], ["h2"], ["h3"]]
    assert jobs_after_rollout(spec, deploy, "prod", rollout, {"h3"}) == "h2"
    assert jobs_after_rollout(spec, deploy, "prod", rollout, {"h1"}) is None  # switched before
    assert jobs_after_rollout(spec, deploy, "prod", rollout, {"h2"}) is None  # the same primary
    assert jobs_after_rollout(spec, deploy, "prod", [["h1", "h2", "h3"]], {"h3"}) is None

    from shiplane.commands.plan import _services

    assert "job cleanup (*/5 * * * *: scheduled on the primary host only)" in _services(spec)
    # a run with --hosts cannot leave roles.primary out, so the jobs never move by it
    with pytest.raises(ConfigError, match="role 'primary' names 'h2'"):
        with_overrides(load_project(toml), "prod", "h1,h3", [])
    # without roles.primary, the first host has them
    toml.write_text(toml.read_text().replace('primary = ["h2"]', ""))
    plain = load_project(toml).deploy
    assert [h for h in ("h1", "h2", "h3") if host_services(spec, plain, "prod", h)["jobs"]] == [
        "h1"
    ]


@pytest.mark.parametrize(
    ("command", "execed"),
    [
        ("rq worker --url $REDIS_URL default", True),
        ("celery -A proj worker -l info > log.txt", True),
        ("python -m myapp.worker 'a b'", True),
        ("cd sub && python -m worker", False),
        ("python a.py; python b.py", False),
        ("python a.py | tee log", False),
        ("FOO=1 python -m worker", False),
        ("exec python -m worker", False),  # exec-ed already
        ("python -m worker &", False),
        ("python 'unbalanced", False),
    ],
)
def test_worker_commands_are_execed_when_simple(command: str, execed: bool) -> None:
    from shiplane.agent.backend import exec_form

    assert (exec_form(command) == f"exec {command}") is execed


def test_a_jobs_log_is_rotated_past_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = _root(tmp_path, "echo fresh")
    log = jobs.log_path(layout, "tidy")
    log.parent.mkdir(parents=True)
    for index in range(1, jobs.LOG_BACKUPS + 1):
        log.with_name(f"{log.name}.{index}").write_text(f"backup {index}\n")
    log.write_text("x" * 64)
    monkeypatch.setattr(jobs, "LOG_MAX", 32)
    monkeypatch.setattr(jobs, "_run_as", lambda layout: {})
    assert jobs.run_job(layout, "tidy", "2026-12-07T10:01") == 0
    assert "fresh" in log.read_text() and "x" * 64 not in log.read_text()
    assert log.with_name(f"{log.name}.1").read_text() == "x" * 64
    assert log.with_name(f"{log.name}.2").read_text() == "backup 1\n"
    assert (
        log.with_name(f"{log.name}.{jobs.LOG_BACKUPS}").read_text()
        == f"backup {jobs.LOG_BACKUPS - 1}\n"
    )


def test_a_service_cannot_take_a_name_shiplane_uses(tmp_path: Path) -> None:
    from shiplane.config import load_project
    from shiplane.errors import ConfigError

    toml = tmp_path / "shiplane.toml"
    toml.write_text(
        '[app]\nname = "demo"\nwsgi = "app:app"\n[services.shiplane-jobs]\ncommand = "true"\n'
        '[stages.prod]\nhosts = ["h1"]\ndeploy_to = "/srv/demo"\n'
    )
    with pytest.raises(ConfigError, match="the name is shiplane's own"):
        load_project(toml)
