"""Scheduled jobs on a host (``[jobs.NAME]``, docs/workers.md): one run, its lock, its record.

Only the stage's primary host gets the jobs in its services spec (the controller's
``plan.host_services``; the others get none), so a job runs on one host of the stage. A run
(``agent run-job <root> <name> [minute]``), started by the daemon backend's scheduler
(scheduler.py) or by a systemd timer (timers.py):

- holds ``run/jobs/<name>.lock`` (flock, not waited for): while a run goes on, the next one is
  skipped, so a job never overlaps itself;
- skips a minute it already ran for (the record's ``minute``): a scheduler restarted within a
  minute runs nothing twice;
- runs the command with ``/bin/sh -c`` in the live release's directory, with the release's
  runtime env (the one hooks and services get, secrets included), as the deploy root's owner
  (the app's user; root only when the deploy root is root's, as services run);
- appends its output to ``log/job.<name>.log``, between a header and a footer line;
- records the run in ``run/jobs/<name>.json`` (read by ``status``).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TypedDict

from . import atomic_write, utc_now
from .cron import CronError, parse
from .errors import AgentError
from .paths import Layout
from .protocol import JobSpec
from .runtime import expand, placeholders, runtime_env

# a run ended (timeout, or its runner told to stop) gets TERM, then KILL this much later
KILL_GRACE = 10.0
MINUTE_FORMAT = "%Y-%m-%dT%H:%M"
LOG_MAX = 50 * 1024 * 1024  # a job's log is rotated past this size (the services' 50MB)
LOG_BACKUPS = 5


class JobRecord(TypedDict, total=False):
    """``run/jobs/<name>.json``: the last run (``state`` running while it goes on)."""

    state: str  # "running", "done", "timeout", "killed", "failed" (could not start)
    minute: str  # the scheduled minute, local time "YYYY-mm-ddTHH:MM"
    release: str
    host: str
    pid: int  # the command's, while it runs
    runner_pid: int  # this runner's, while it runs (end_runs signals it)
    started_at: str
    finished_at: str
    exit_code: int | None
    seconds: float


class JobStatus(TypedDict):
    """One job in ``status``."""

    name: str
    schedule: str
    running: bool
    next_run: str | None  # local time "YYYY-mm-ddTHH:MM"
    last: JobRecord | None


def say(line: str) -> None:
    """A line to this runner's stdout: the scheduler's log, or the journal under systemd."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def jobs_dir(layout: Layout) -> Path:
    return layout.run / "jobs"


def record_path(layout: Layout, name: str) -> Path:
    return jobs_dir(layout) / f"{name}.json"


def lock_path(layout: Layout, name: str) -> Path:
    return jobs_dir(layout) / f"{name}.lock"


def log_name(name: str) -> str:
    """The job's log as ``shiplane logs --service`` names it: ``job.<name>`` (a dot, which no
    worker's name has)."""
    return f"job.{name}"


def log_path(layout: Layout, name: str) -> Path:
    return layout.log / f"{log_name(name)}.log"


def configured(layout: Layout) -> dict[str, JobSpec]:
    """The jobs of the spec the last switch saved (none on hosts other than the primary)."""
    from .switch import load_spec  # switch.py imports the backends, which import this module

    spec = load_spec(layout)
    jobs = spec.get("jobs") if spec else None
    return dict(jobs) if isinstance(jobs, dict) else {}


def check_job(name: str, job: JobSpec) -> None:
    """AgentError (usage) for a job whose name or schedule cannot be used."""
    if not name or not all(c.isalnum() or c in "_-" for c in name) or name[0] == "-":
        raise AgentError(f"job name {name!r}: letters, digits, '_' and '-' only", kind="usage")
    try:
        parse(str(job.get("schedule")))
    except CronError as exc:
        raise AgentError(f"job {name!r}: {exc}", kind="usage") from None
    if not job.get("command"):
        raise AgentError(f"job {name!r} has no command", kind="usage")


def read_record(layout: Layout, name: str) -> JobRecord | None:
    try:
        data = json.loads(record_path(layout, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None  # type: ignore[return-value]


def _write_record(layout: Layout, name: str, record: JobRecord) -> None:
    atomic_write(record_path(layout, name), json.dumps(record, sort_keys=True) + "\n")


def is_running(layout: Layout, name: str) -> bool:
    """Whether a run of the job holds its lock now."""
    try:
        fd = os.open(lock_path(layout, name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def status(layout: Layout, now: dt.datetime | None = None) -> list[JobStatus]:
    """Each configured job: schedule, whether it runs now, its next minute and its last run."""
    now = now or dt.datetime.now()
    out: list[JobStatus] = []
    for name, job in sorted(configured(layout).items()):
        try:
            upcoming = parse(str(job.get("schedule"))).next_after(now)
        except CronError:
            upcoming = None
        out.append(
            {
                "name": name,
                "schedule": str(job.get("schedule")),
                "running": is_running(layout, name),
                "next_run": upcoming.strftime(MINUTE_FORMAT) if upcoming else None,
                "last": read_record(layout, name),
            }
        )
    return out


def _run_as(layout: Layout) -> dict[str, Any]:
    """Popen's ``user``/``group`` for the deploy root's owner when we are root (systemd.py's
    rule: the app's user; none when the root is root's own)."""
    from .systemd import app_user

    user = app_user(layout)
    if user is None:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": []}


def run_job(layout: Layout, name: str, minute: str | None = None) -> int:
    """One run of job ``name`` (see the module docstring); returns the runner's exit code: the
    command's, 0 for a skipped run, 2 when the job or the live release cannot be found."""
    from .switch import live_release

    job = configured(layout).get(name)
    if job is None:
        say(f"job {name}: not configured on this host (removed from the deploy file?)")
        return 2
    minute = minute or dt.datetime.now().strftime(MINUTE_FORMAT)
    jobs_dir(layout).mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(layout, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # the record is the running run's to write: the skip goes to the log
            running = (read_record(layout, name) or {}).get("minute")
            line = f"job {name} ({minute}) skipped: the run of {running} still goes on"
            _append_log(layout, name, f"--- {utc_now()} {line}\n")
            say(line)
            return 0
        last = read_record(layout, name) or {}
        if last.get("minute") == minute:
            say(f"job {name}: already ran for {minute}")
            return 0
        release = live_release(layout)
        if release is None:
            say(f"job {name}: no release is live on this host")
            return 2
        return _run(layout, name, job, minute, release)
    finally:
        os.close(fd)


def _run(layout: Layout, name: str, job: JobSpec, minute: str, release: str) -> int:
    command = expand(str(job["command"]), placeholders(layout, release))
    record: JobRecord = {
        "state": "running",
        "minute": minute,
        "release": release,
        "host": socket.gethostname(),
        "started_at": utc_now(),
    }
    layout.log.mkdir(parents=True, exist_ok=True)
    _rotate(log_path(layout, name))
    log = os.open(log_path(layout, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    started = time.monotonic()
    try:
        os.write(log, f"--- {record['started_at']} job {name} ({minute}) on {release}\n".encode())
        try:
            child = subprocess.Popen(
                ["/bin/sh", "-c", command],
                cwd=layout.release(release),
                env=runtime_env(layout, release),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own group: ended with whatever it started
                **_run_as(layout),
            )
        except (OSError, AgentError) as exc:  # the release went (pruned), the user is gone
            why = exc.message if isinstance(exc, AgentError) else str(exc)
            code, state, tail = None, "failed", f"could not start: {why}"
        else:
            record["pid"] = child.pid
            record["runner_pid"] = os.getpid()
            _write_record(layout, name, record)
            code, state = _wait(child, float(job.get("timeout") or 3600))
            tail = f"exited {code}" if state == "done" else f"{state} (exit {code})"
        seconds = round(time.monotonic() - started, 3)
        os.write(log, f"--- {utc_now()} job {name} {tail} after {seconds:g} s\n".encode())
    finally:
        os.close(log)
    record.update({"state": state, "exit_code": code, "seconds": seconds, "finished_at": utc_now()})
    record.pop("pid", None)
    record.pop("runner_pid", None)
    _write_record(layout, name, record)
    say(f"job {name} ({minute}) on {release}: {tail} after {seconds:g} s")
    return code if code is not None and code >= 0 else 1


def end_runs(layout: Layout) -> list[str]:
    """End the runs going on under this root (``shiplane stop``, ``stop --all``): each runner
    gets TERM, ends its command's group (TERM, then KILL) and records the run ``killed``;
    returns the jobs whose run was ended. A run whose job was only unscheduled (removed from
    the deploy file, another primary, the scheduler restarted by a shiplane upgrade) is left
    to finish."""
    ended = []
    try:
        names = sorted(p.stem for p in jobs_dir(layout).glob("*.json"))
    except OSError:
        return []
    for name in names:
        runner = (read_record(layout, name) or {}).get("runner_pid")
        if isinstance(runner, int) and is_running(layout, name) and _is_runner(runner, layout):
            try:
                os.kill(runner, signal.SIGTERM)
            except OSError:
                continue
            ended.append(name)
    deadline = time.monotonic() + KILL_GRACE + 10
    while ended and time.monotonic() < deadline and any(is_running(layout, n) for n in ended):
        time.sleep(0.1)  # poll interval while the runners end their commands
    return ended


def _is_runner(pid: int, layout: Layout) -> bool:
    """Whether ``pid`` is a run-job of this root (not a pid reused by another process)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    return b"run-job" in argv and str(layout.root).encode() in argv


def _append_log(layout: Layout, name: str, text: str) -> None:
    layout.log.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path(layout, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _rotate(path: Path) -> None:
    """Keep a job's log under LOG_MAX bytes, as supervisord keeps the services' (``.1`` the
    newest of LOG_BACKUPS older files): a ``* * * * *`` job appends to it every minute."""
    try:
        if path.stat().st_size < LOG_MAX:
            return
    except OSError:
        return
    for index in range(LOG_BACKUPS - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


def _wait(child: subprocess.Popen[bytes], timeout: float) -> tuple[int | None, str]:
    """The command's exit code and how the run ended: ``done``, ``timeout`` (it ran past the
    job's timeout) or ``killed`` (this runner was told to stop: a scheduler restart, a
    ``systemctl stop``); the last two end its process group, TERM then KILL."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not _STOPPING:
        try:
            return child.wait(timeout=0.5), "done"
        except subprocess.TimeoutExpired:
            continue
    _end_group(child)
    return child.returncode, "killed" if _STOPPING else "timeout"


# the signals this runner got (TERM, INT): from the start, so one that comes before the command
# starts still ends it, and the run is recorded
_STOPPING: list[int] = []


def _catch_stop() -> None:
    def stop(signum: int, _frame: object) -> None:
        _STOPPING.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


def _end_group(child: subprocess.Popen[bytes]) -> None:
    for signum, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(child.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            child.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str]) -> int:
    """``run-job <root> <name> [minute]``."""
    if len(argv) not in (2, 3):
        sys.stderr.write("usage: agent run-job <root> <name> [YYYY-mm-ddTHH:MM]\n")
        return 2
    _catch_stop()
    minute = argv[2] if len(argv) == 3 else None
    try:
        if minute is not None:
            dt.datetime.strptime(minute, MINUTE_FORMAT)  # it goes into the record and the log
    except ValueError:
        sys.stderr.write(f"run-job: not a minute (YYYY-mm-ddTHH:MM): {minute!r}\n")
        return 2
    try:
        return run_job(Layout(argv[0]), argv[1], minute)
    except AgentError as exc:
        say(f"job {argv[1]}: {exc.message}")
        return 2
    finally:
        sys.stdout.flush()
