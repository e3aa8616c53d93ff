"""The example app's own stages, deployed as ``shiplane init`` writes them.

A new user's first fleet deploy: the scaffold's ``staging`` and ``prod`` stages pointed at real
OpenSSH test hosts (their host names, and the test hosts' ``ssh_config``: nothing else changed),
deployed, redeployed, rolled back and promoted; then a first deploy that fails on one host of
three, which must leave no host serving the release the stage rejected.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deployhelp import Project, edit, scaffold, wait_for
from sshhosts import TestHost, TestHosts

pytestmark = [pytest.mark.slow]

ROOT = "demo"  # the scaffold's deploy_to is /srv/<name>
PORT = 8000  # ... and its port


def point_at(
    project: Project, hosts: TestHosts, staging: list[TestHost], prod: list[TestHost]
) -> None:
    """Only the stages' host names change (and where ssh finds the test hosts); secrets given."""
    toml = project.root / "shiplane.toml"
    text = toml.read_text()
    names = lambda hs: json.dumps([h.name for h in hs])
    for old, new in (
        ('["deploy@staging1"]', names(staging)),
        ('["deploy@web1", "deploy@web2"]', names(prod)),
        ('primary = ["deploy@web1"]', f'primary = ["{prod[0].name}"]'),
    ):
        assert old in text, old
        text = text.replace(old, new)
    text = text.replace(
        f'deploy_to = "/srv/{ROOT}"\n',
        f'deploy_to = "/srv/{ROOT}"\nssh_config = "{hosts.ssh_config}"\n',
    )
    toml.write_text(text)
    for stage in ("staging", "prod"):
        secrets = project.root / ".secrets" / f"{stage}.env"
        secrets.write_text(f"SECRET_KEY={stage}-secret-value\n")
        os.chmod(secrets, 0o600)
    project.commit("stages on the test hosts")


def page(host: TestHost) -> str | None:
    """The page the host serves on the scaffold's port (asked on the host itself), or None."""
    done = host.ssh(f"curl -s -f --max-time 5 http://127.0.0.1:{PORT}/")
    return done.stdout if done.returncode == 0 else None


def serves(host: TestHost, release: str, stage: str) -> bool:
    body = page(host) or ""
    return f"release {release}" in body and f"stage {stage}" in body


def run(project: Project, *args: str, check: bool = True) -> dict[str, Any]:
    """A shiplane verb with --json: its result object, exit code and output."""
    done = project.shiplane(*args, "--json", timeout=600)
    result: dict[str, Any] = {}
    for line in done.stdout.splitlines():  # events, then the result (or the error): docs/json.md
        message = json.loads(line)
        result = message.get("result", message.get("error", result))
    result["exit"], result["output"] = done.returncode, done.stdout + done.stderr
    if check and done.returncode != 0:
        raise AssertionError(
            f"shiplane {' '.join(args)} exited {done.returncode}:\n{result['output'][-4000:]}"
        )
    return result


def deploy_until(
    project: Project, stage: str, trigger: tuple[str, str, str], act: Any
) -> dict[str, Any]:
    """A deploy with --json that calls ``act()`` when its event (phase, status, host) comes, the
    controller stopped meanwhile (SIGSTOP, then SIGCONT): what it would do next on the hosts
    waits for ``act()``, whatever either takes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shiplane", "deploy", "--stage", stage, "--skip-tests", "--json"],
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    result: dict[str, Any] = {}
    output = []
    for line in proc.stdout:
        output.append(line)
        message = json.loads(line)
        if (message.get("phase"), message.get("status"), message.get("host")) == trigger:
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                act()
            finally:
                os.kill(proc.pid, signal.SIGCONT)
        result = message.get("result", message.get("error", result))
    proc.wait(timeout=300)
    result["exit"], result["output"] = (
        proc.returncode,
        "".join(output) + (proc.stderr.read() if proc.stderr else ""),
    )
    return result


def no_drift(project: Project, stage: str) -> None:
    status = project.shiplane("status", "--stage", stage)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "DRIFT" not in status.stdout, status.stdout


@pytest.mark.ssh
def test_the_scaffold_deploys_to_its_multi_host_stages(make_ssh_hosts: Any, tmp_path: Path) -> None:
    hosts = make_ssh_hosts(5)
    staging, prod = hosts.hosts[:3], hosts.hosts[3:]
    project = scaffold(tmp_path)
    point_at(project, hosts, staging, prod)
    try:
        # the test gate runs: the scaffold's own tests pass
        first = run(project, "deploy", "--stage", "staging")
        assert all(serves(h, first["release"], "staging") for h in staging)
        assert (
            "alembic upgrade head" in first["output"]
        )  # migrated on each host: each has its tables
        # visits are kept across a redeploy: the counter on each host goes on from where it was
        counts = [int(re.search(r"visit number (\d+)", page(h) or "").group(1)) for h in staging]  # type: ignore[union-attr]

        edit(project, "src/demo/views.py", "<h1>{title}</h1>", "<h1>{title}!</h1>")
        second = run(project, "deploy", "--stage", "staging", "--skip-tests")
        for host, count in zip(staging, counts):
            body = page(host) or ""
            assert f"release {second['release']}" in body and "!</h1>" in body
            assert int(re.search(r"visit number (\d+)", body).group(1)) > count  # type: ignore[union-attr]
        no_drift(project, "staging")

        run(project, "rollback", "--stage", "staging")
        assert all(serves(h, first["release"], "staging") for h in staging)
        no_drift(project, "staging")

        # prod: the two-host stage, which takes only what went live on staging
        promoted = run(project, "promote", "--from", "staging", "--to", "prod")
        assert promoted["artifact"] == first["artifact"]
        assert all(serves(h, promoted["release"], "prod") for h in prod)
        again = run(
            project, "deploy", "--stage", "prod", "--skip-tests"
        )  # went live on staging too
        assert all(serves(h, again["release"], "prod") for h in prod)
        # the promotion could not know what the migration last ran with (an artifact not built from
        # this checkout), so this deploy ran it again: the rollback asks for --yes
        refused = run(project, "rollback", "--stage", "prod", check=False)
        assert refused["exit"] == 2 and "--yes" in refused["output"]
        run(project, "rollback", "--stage", "prod", "--yes")
        assert all(serves(h, promoted["release"], "prod") for h in prod)
        no_drift(project, "prod")
    finally:
        for stage in ("staging", "prod"):
            project.shiplane("stop", "--all", "--stage", stage, timeout=120)


@pytest.mark.ssh
def test_a_first_deploy_failing_on_one_host_leaves_no_host_serving_it(
    make_ssh_hosts: Any, tmp_path: Path
) -> None:
    hosts = make_ssh_hosts(3)
    project = scaffold(tmp_path)
    point_at(project, hosts, hosts.hosts, hosts.hosts[:2])
    toml = project.root / "shiplane.toml"
    # one host at a time, as the scaffold's prod: the first two switch before the third fails
    text = toml.read_text().replace(
        "[stages.staging]\n", "[stages.staging]\nrolling = { batch = 1 }\n"
    )
    # a first-deploy-only init on every host (run_on = "all"), recorded per host
    toml.write_text(
        text.replace("[hooks]\n", '[hooks]\nsetup = "echo init >> {shared}/setup-ran"\n')
    )
    project.commit("rolling staging, a setup hook")
    h1, h2, h3 = hosts.hosts
    squatter: list[str] = []

    def squat() -> None:
        """Once the first host has switched, something that is not ours takes the third host's
        port, so its front cannot listen at its switch (taken earlier, the deploy's preflight
        would refuse it before anything is sent)."""
        squatter.append(
            h3.ssh(
                f"setsid python3 -m http.server {PORT} >/dev/null 2>&1 </dev/null & echo $!"
            ).stdout.strip()
        )
        wait_for(
            lambda: (
                h3.ssh(f"curl -s -o /dev/null --max-time 2 http://127.0.0.1:{PORT}/").returncode
                == 0
            ),
            what="the squatter to listen",
        )

    try:
        failed = deploy_until(project, "staging", ("switch", "ok", h1.name), squat)
        assert failed["exit"] == 1, failed["output"][-3000:]
        outcomes = {h: info["outcome"] for h, info in failed["hosts"].items()}
        assert outcomes[h1.name] == outcomes[h2.name] == "withdrawn", outcomes
        assert outcomes[h3.name] == "failed", outcomes
        assert "serve nothing again" in failed["error"], failed["error"]
        lines = "\n".join(failed["lines"])
        assert re.search(rf"{h1.name}\s+withdrawn\s+serves nothing", lines), lines
        # no host serves the rejected release, none keeps a `current`, nothing of ours runs
        for host in (h1, h2):
            assert page(host) is None
        assert "Directory listing" in (page(h3) or "")  # the squatter, untouched
        for host in hosts.hosts:
            assert not os.path.lexists(host.root / ROOT / "current")
        releases = run(project, "releases", "--stage", "staging")
        states = {
            r.get("state") for per in releases["hosts"].values() for r in per.get("releases", [])
        }
        assert states == {"bad"}, releases["hosts"]
        status = run(project, "status", "--stage", "staging")
        assert not status["drift"], status["drift"]
        assert all(not info.get("services") for info in status["hosts"].values()), json.dumps(
            status["hosts"]
        )

        h3.ssh(f"kill {squatter[0]}")
        wait_for(lambda: page(h3) is None, what="the port to be free")
        fixed = run(project, "deploy", "--stage", "staging", "--skip-tests")
        assert all(serves(h, fixed["release"], "staging") for h in hosts.hosts)
        no_drift(project, "staging")
        # the setup ran once on each host, in the failed deploy; the fix did not run it again
        for host in hosts.hosts:
            assert (host.root / ROOT / "shared" / "setup-ran").read_text() == "init\n", host.name
    finally:
        project.shiplane("stop", "--all", "--stage", "staging", timeout=120)


def test_health_log_once(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The server warns on every health poll; the failure block shows the warning once, counted."""
    project = scaffold(tmp_path_factory.mktemp("hl"))  # short: unix socket paths are limited
    toml = project.root / "shiplane.toml"
    text = toml.read_text().replace(
        'release = "alembic upgrade head"', 'release = "true"'
    )  # no tables: /up is 503
    toml.write_text(
        text.replace(
            'healthcheck = { path = "/up", timeout = 15 }',
            'healthcheck = { path = "/up", timeout = 3 }',
        )
    )
    project.commit("no migration")
    try:
        failed = project.deploy(check=False)
        assert failed["exit"] == 1
        error = failed["error"]
        warning = [
            line
            for line in error.splitlines()
            if "health check failed: (sqlite3.OperationalError)" in line
        ]
        assert len(warning) == 1 and re.search(r"\(x\d+\)$", warning[0]), error
    finally:
        project.stop()
