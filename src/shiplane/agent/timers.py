"""The systemd backend's scheduled jobs: a ``.timer`` and a ``.service`` per job.

For an app ``demo``, stage ``prod``, job ``cleanup``: ``demo-prod-job.cleanup.timer`` fires at
the job's schedule (cron.py's ``on_calendar``: the host's local time, as cron) and starts
``demo-prod-job.cleanup.service``, a oneshot running ``agent run-job <root> cleanup`` as the
app's user, sandboxed as the other units (systemd.py's ``hardening``). systemd never starts a
unit that is still running, and jobs.py's lock and record hold as under the daemon backend. A
worker's name has no dot, so ``job.<name>`` is never a worker's unit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .backend import job_specs, run_job_argv, unlink_quiet
from .cron import on_calendar, parse
from .protocol import Emit, JobSpec, ServicesSpec

if TYPE_CHECKING:
    from .systemd import SystemdBackend

# beyond the job's own timeout (jobs.py ends it then): the runner's grace to end it and record
RUNNER_GRACE = 60


def unit_base(prefix: str, name: str) -> str:
    return f"{prefix}-job.{name}"


def job_units(backend: SystemdBackend, spec: ServicesSpec) -> dict[str, str]:
    """``{file name: text}`` of every job's timer and service."""
    from .systemd import exec_line, hardening, path_value, unit_file, unit_prefix

    prefix = unit_prefix(spec)
    layout = backend.layout
    units: dict[str, str] = {}
    for name, job in sorted(job_specs(spec).items()):
        base = unit_base(prefix, name)
        units[f"{base}.service"] = unit_file(
            [
                ("Unit", [("Description", f"{prefix} scheduled job {name}")]),
                (
                    "Service",
                    [
                        ("Type", "oneshot"),
                        ("ExecStart", exec_line(run_job_argv(layout, name))),
                        ("WorkingDirectory", path_value(layout.root)),
                        ("TimeoutStartSec", f"{_timeout(job) + RUNNER_GRACE:g}"),
                        ("KillMode", "control-group"),
                        ("StandardOutput", "journal"),
                        ("StandardError", "journal"),
                        ("SyslogIdentifier", base),
                        *hardening(layout, backend.user, backend.run_as),
                    ],
                ),
            ]
        )
        calendar = on_calendar(parse(job["schedule"]))
        units[f"{base}.timer"] = unit_file(
            [
                ("Unit", [("Description", f"{prefix} schedule of job {name}: {job['schedule']}")]),
                (
                    "Timer",
                    [
                        *[("OnCalendar", line) for line in calendar],
                        # systemd's default would start it up to a minute late
                        ("AccuracySec", "1s"),
                        ("Unit", f"{base}.service"),
                    ],
                ),
                ("Install", [("WantedBy", "timers.target")]),
            ]
        )
    return units


def _timeout(job: JobSpec) -> float:
    return float(job.get("timeout") or 3600)


def ensure(backend: SystemdBackend, spec: ServicesSpec, emit: Emit) -> list[str]:
    """Write the jobs' units, start their timers, and remove the units of jobs gone."""
    from .jobs import jobs_dir
    from .systemd import give_to_app_user, unit_prefix

    units = job_units(backend, spec)
    base = f"{unit_prefix(spec)}-job."
    gone = [
        p
        for p in backend.unit_dir.glob(f"{base}*")
        if p.name not in units and p.suffix in (".timer", ".service")
    ]
    for path in sorted(gone, key=lambda p: p.suffix != ".timer"):  # the timer first
        emit({"phase": "switch", "status": "jobs", "detail": f"removing {path.name}"})
        # a run going on finishes (its service is not stopped): as under the daemon backend
        backend.systemctl(
            "disable", *(["--now"] if path.suffix == ".timer" else []), path.name, check=False
        )
        unlink_quiet(path)
    changed = [name for name, text in units.items() if backend._write(name, text)]
    if changed or gone:
        backend.systemctl("daemon-reload")
    if units:
        jobs_dir(backend.layout).mkdir(parents=True, exist_ok=True)
        give_to_app_user(jobs_dir(backend.layout), backend.run_as)  # the runs write their records
        timers = sorted(n for n in units if n.endswith(".timer"))
        backend.systemctl("enable", "--now", *timers)
    return sorted(job_specs(spec))
