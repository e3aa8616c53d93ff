"""A scheduled job on a three-host SSH stage (issue 19 item 6, docs/workers.md): ``* * * * *``
runs once a minute on the stage's primary alone (``roles.primary``: the third host, then the
second, switched one host at a time: the new primary schedules the job only once the old one,
switched after it, has unscheduled it), in the live release with its environment, its output in ``shiplane logs --service
job.stamp`` and its last run in ``shiplane status``; no minute runs on two hosts, the other
hosts have no scheduler, and a job removed from the deploy file is scheduled nowhere.

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
        f'roles = {{ primary = ["{hosts.hosts[2].name}"] }}\nrolling = {{ batch = 1 }}\n'
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


def minutes(root: Path) -> list[str]:
    """The minutes a host's runs were for (each run's header line names its minute)."""
    return [
        line.split("(")[1].split(")")[0]
        for line in job_log(root).splitlines()
        if " job stamp (" in line
    ]


def test_a_job_runs_once_a_minute_on_the_primary_host_only(
    job_app: App, ssh_hosts: TestHosts
) -> None:
    app, hosts = job_app, ssh_hosts.hosts
    conf = Path(ROOT) / "run" / "programs" / "shiplane-jobs.conf"
    app.deploy()
    # only roles.primary (the third host) schedules it
    assert [h.name for h in hosts if (h.root / conf).exists()] == [hosts[2].name]

    # another primary: the job moves with it, and the old one schedules nothing any more
    toml = app.root / "shiplane.toml"
    text = toml.read_text()
    toml.write_text(
        text.replace(f'primary = ["{hosts[2].name}"]', f'primary = ["{hosts[1].name}"]')
    )
    app.commit("another primary")
    moving = app.deploy()
    release = moving.result["release"]
    primary = hosts[1]
    assert [h.name for h in hosts if (h.root / conf).exists()] == [primary.name]
    # the second host switched before the third, which still scheduled the job: the second
    # took it only after the third had let it go
    said = [
        (e.get("host"), e.get("detail", "")) for e in moving.events if e.get("status") == "jobs"
    ]
    let_go = said.index((hosts[2].name, "no jobs: scheduler removed"))
    took = said.index((primary.name, "scheduling stamp"))
    assert let_go < took, said
    log = wait_for(
        lambda: f"in {release}" in job_log(primary.root) and job_log(primary.root),
        deadline=75,
        what="a run on the new primary",
    )
    wait_for(lambda: "exited 0" in job_log(primary.root).split(f"in {release}")[-1], deadline=30)
    assert f"ran on {primary.name} in {release}" in log
    # each minute ran on one host: the first primary's minutes (before the move) and the new
    # one's never meet, and the third host never ran it
    assert not set(minutes(primary.root)) & set(minutes(hosts[2].root))
    assert len(minutes(primary.root)) == len(set(minutes(primary.root))) >= 1
    assert job_log(hosts[0].root) == "" and not (hosts[0].root / ROOT / "run" / "jobs").exists()

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
    assert f"ran on {primary.name} in {release}" in logs.stdout
    assert f"ran on {hosts[0].name}" not in logs.stdout

    # a job removed from the deploy file is scheduled nowhere
    toml.write_text(toml.read_text().replace(JOB, ""))
    app.commit("no job")
    app.deploy()
    assert not any((h.root / conf).exists() for h in hosts)
    gone = app.json("status", "--stage", STAGE)
    assert not [h for h, r in gone["hosts"].items() if r.get("jobs")]
