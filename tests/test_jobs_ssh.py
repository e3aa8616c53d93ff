"""A scheduled job on a three-host SSH stage (issue 19 item 6, docs/workers.md): ``* * * * *``
runs once a minute on the stage's primary alone (here ``roles.primary``, the second host), in
the live release with its environment, its output in ``shiplane logs --service job.stamp`` and
its last run in ``shiplane status``; the other hosts have no scheduler and no run.

One test, as it waits for a minute boundary (at most 75 s): the daemon backend's scheduler has
minute resolution, and its "once per period" logic is driven with a fake clock in
tests/test_jobs.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apps.common import App, wait_for
from apps.fastapi_app import make_fastapi
from sshhosts import TestHosts

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

PORT = 8410
STAGE = "fleet"
ROOT = "stamps"
JOB = '[jobs.stamp]\nschedule = "* * * * *"\ncommand = "echo ran on $(hostname) in $SHIPLANE_RELEASE"\n\n'


@pytest.fixture
def job_app(ssh_hosts: TestHosts, tmp_path: Path) -> Iterator[App]:
    hosts = ssh_hosts
    app = make_fastapi(tmp_path / "stamps", tmp_path / "unused-local")
    toml = app.root / "shiplane.toml"
    text = toml.read_text()
    text = text.replace(
        'requirements = "requirements.txt"\n',
        'requirements = "requirements.txt"\npython_version = "3.11"\nplatform = "linux_x86_64"\n',
    )
    names = ", ".join(f'"{h.name}"' for h in hosts.hosts)
    stage = (
        f'[stages.{STAGE}]\nhosts = [{names}]\ndeploy_to = "/srv/{ROOT}"\nport = {PORT}\n'
        f'bind = "0.0.0.0"\nssh_config = "{hosts.ssh_config}"\n'
        f'roles = {{ primary = ["{hosts.hosts[1].name}"] }}\n'
    )
    toml.write_text(text[: text.index("[stages.local]")] + JOB + stage)
    app.commit("a job and the fleet stage")
    app.stage = STAGE
    try:
        yield app
    finally:
        app.shiplane("stop", "--all", "--stage", STAGE, timeout=120)


def job_log(root: Path) -> str:
    path = root / ROOT / "log" / "job.stamp.log"
    return path.read_text() if path.exists() else ""


def test_a_job_runs_once_a_minute_on_the_primary_host_only(
    job_app: App, ssh_hosts: TestHosts
) -> None:
    app, hosts = job_app, ssh_hosts.hosts
    primary, others = hosts[1], [hosts[0], hosts[2]]
    deployed = app.deploy()
    release = deployed.result["release"]
    log = wait_for(
        lambda: "exited 0" in job_log(primary.root) and job_log(primary.root),
        deadline=75,
        what="the job's first run on the primary",
    )
    assert f"ran on {primary.name} in {release}" in log
    for host in others:
        assert job_log(host.root) == "", host.name
        assert not (host.root / ROOT / "run" / "jobs").exists(), host.name
        assert not (host.root / ROOT / "run" / "programs" / "shiplane-jobs.conf").exists()

    status: dict[str, Any] = app.json("status", "--stage", STAGE)
    with_jobs = {h: r["jobs"] for h, r in status["hosts"].items() if r.get("jobs")}
    assert list(with_jobs) == [primary.name]
    [entry] = with_jobs[primary.name]
    assert entry["name"] == "stamp" and entry["next_run"]
    assert entry["last"]["exit_code"] == 0 and entry["last"]["release"] == release
    assert entry["last"]["seconds"] < 30
    shown = app.shiplane("status", "--stage", STAGE)
    assert "job stamp" in shown.stdout and "exit 0" in shown.stdout, shown.stdout

    logs = app.shiplane("logs", "--stage", STAGE, "--service", "job.stamp", "-n", "10")
    assert logs.returncode == 0, logs.stderr
    assert f"ran on {primary.name}" in logs.stdout
    for host in others:
        assert f"ran on {host.name}" not in logs.stdout
    # once per minute: each run names another minute
    minutes = [
        line.split("(")[1].split(")")[0] for line in log.splitlines() if "job stamp (" in line
    ]
    assert len(minutes) == len(set(minutes)) >= 1

    # another primary: the job moves with it, and the old primary schedules nothing any more
    toml = app.root / "shiplane.toml"
    text = toml.read_text()
    toml.write_text(text.replace(f'primary = ["{primary.name}"]', f'primary = ["{hosts[2].name}"]'))
    app.commit("another primary")
    app.deploy()
    conf = Path(ROOT) / "run" / "programs" / "shiplane-jobs.conf"
    assert (hosts[2].root / conf).exists()
    assert not (primary.root / conf).exists() and not (hosts[0].root / conf).exists()
    moved = app.json("status", "--stage", STAGE)
    assert [h for h, r in moved["hosts"].items() if r.get("jobs")] == [hosts[2].name]

    # a job removed from the deploy file is scheduled nowhere
    toml.write_text(toml.read_text().replace(JOB, ""))
    app.commit("no job")
    app.deploy()
    assert not any((h.root / conf).exists() for h in hosts)
    gone = app.json("status", "--stage", STAGE)
    assert not [h for h, r in gone["hosts"].items() if r.get("jobs")]
