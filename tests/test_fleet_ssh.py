"""The fleet over SSH: the scaffold app deployed to three real OpenSSH hosts, as a user runs it.

Stages of the one project: ``fleet`` (all three hosts), ``staging`` (shl-h1) and ``prod``
(shl-h2, shl-h3; ``promote_from = "staging"``). Each host serves at http://<its address>:<port>/.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployhelp import Project, http_get, scaffold, wait_for
from shiplane.agent import lock as deploy_lock
from shiplane.agent.paths import Layout
from sshhosts import TestHost, TestHosts

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

PORTS = {"fleet": 8100, "staging": 8200, "prod": 8300}
ROOTS = {"fleet": "demo", "staging": "demo-staging", "prod": "demo-prod"}
VIEWS = "src/demo/views.py"
MIGRATE = 'after_install = ["alembic upgrade head"]'


def _stages(config: Path) -> str:
    common = f'bind = "0.0.0.0"\nssh_config = "{config}"\n'
    return (
        f'[stages.fleet]\nhosts = ["shl-h1", "shl-h2", "shl-h3"]\ndeploy_to = "/srv/demo"\nport = {PORTS["fleet"]}\n'
        f"{common}\n"
        f'[stages.staging]\nhosts = ["shl-h1"]\ndeploy_to = "/srv/demo-staging"\nport = {PORTS["staging"]}\n{common}\n'
        f'[stages.prod]\nhosts = ["shl-h2", "shl-h3"]\ndeploy_to = "/srv/demo-prod"\nport = {PORTS["prod"]}\n{common}'
        'roles = { primary = ["shl-h2"] }\npromote_from = "staging"\n'
    )


@pytest.fixture(scope="module")
def app(ssh_hosts: TestHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """The scaffold app, its stages on the test hosts; every stage deployed is stopped at the end."""
    project = scaffold(tmp_path_factory.mktemp("fleet"))
    toml = project.root / "shiplane.toml"
    text = toml.read_text()
    # each host has its own sqlite database: migrate it on every host, not only on the primary
    text = text.replace(
        'release = "alembic upgrade head"', f'release = "alembic upgrade head"\n{MIGRATE}'
    )
    text = text.replace(
        'healthcheck = { path = "/up", timeout = 15 }',
        'healthcheck = { path = "/up", timeout = 12 }',
    )
    text = text[: text.index("[stages.staging]")] + _stages(ssh_hosts.ssh_config)
    toml.write_text(text)
    secrets = project.root / ".secrets"
    for stage in ("fleet", "staging", "prod"):
        (secrets / f"{stage}.env").write_text("SECRET_KEY=fleet-test-secret-value\n")
        os.chmod(secrets / f"{stage}.env", 0o600)
    project.commit("stages on the test hosts")
    try:
        yield project
    finally:
        for stage in ("fleet", "staging", "prod"):
            project.shiplane("stop", "--all", "--stage", stage, timeout=120)


def deploy(project: Project, stage: str, *extra: str, check: bool = True) -> dict[str, Any]:
    done = project.shiplane("deploy", "--stage", stage, "--skip-tests", "--json", *extra)
    result: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        if line.startswith('{"result"'):
            result = json.loads(line)["result"]
    result["exit"], result["output"] = done.returncode, done.stdout + done.stderr
    if check and done.returncode != 0:
        raise AssertionError(f"deploy failed ({done.returncode}):\n{result['output'][-4000:]}")
    return result


def edit(project: Project, old: str, new: str) -> None:
    file = project.root / VIEWS
    text = file.read_text()
    assert old in text
    file.write_text(text.replace(old, new, 1))
    project.commit("edit views")


def current(host: TestHost, stage: str = "fleet") -> str:
    return os.readlink(host.root / ROOTS[stage] / "current").split("/")[-1]


def page(host: TestHost, stage: str = "fleet") -> str:
    status, body = http_get(host.url(PORTS[stage], "/"))
    assert status == 200, body
    return body


def ssh_processes(config: Path) -> list[int]:
    """Our ssh clients and control masters still alive (they name the fixture's ssh_config)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            masters = (b"ControlMaster=auto", b"ControlMaster=yes")  # a session's, a pre-warmed one
            if (
                argv
                and argv[0].endswith(b"ssh")
                and str(config).encode() in argv
                and any(m in argv for m in masters)
            ):
                pids.append(int(entry.name))
    return pids


def listening_masters(config: Path) -> list[int]:
    """Our ssh processes that listen on a control socket: the masters, each a host's connection
    that persists for the next command (``ssh_persist``)."""
    listening = set()  # the inodes of listening unix sockets (state 01: SS_UNCONNECTED, ACC)
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[3] == "00010000":  # the __SO_ACCEPTCON flag
            listening.add(f"socket:[{fields[6]}]")
    masters = []
    for pid in ssh_processes(config):
        try:
            fds = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
        except OSError:
            continue
        if fds & listening:
            masters.append(pid)
    return masters


def leftover_ssh(config: Path) -> list[int]:
    """Our ssh processes other than the masters that persist: sessions or clients left behind."""
    return sorted(set(ssh_processes(config)) - set(listening_masters(config)))


def logins(host: TestHost) -> int:
    """How many times the host's sshd has let someone log in (a new SSH connection)."""
    return host.sshd_log().count("Accepted publickey")


def sessions_of(pid: int, config: Path) -> list[int]:
    """The ssh clients of process ``pid`` (its sessions on the hosts)."""
    found = []
    for child in ssh_processes(config):
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(child)
    return found


def after_switch_done(root: Path) -> None:
    """Wait for every stage's after-switch (the detached housekeeping that follows a switch: the
    old standby's exit, the spare's start) to finish: it holds the switch lock until then."""
    for lock in root.glob("*/run/.switch.lock"):
        with lock.open("rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under a host's /srv: symlink target, file size, or directory."""
    tree: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                tree[rel] = ("link", os.readlink(path))
            elif path.name == "supervisord.log":
                # supervisord's own record of its programs' states: a spare started by the
                # deploy enters RUNNING a second later, whatever plan does
                tree[rel] = ("log",)
            elif path.is_file():
                tree[rel] = ("file", path.stat().st_size, path.stat().st_mtime_ns)
            else:
                tree[rel] = ("dir",)
    return tree


def test_deploy_to_three_hosts_serves_the_release_on_each(
    app: Project, ssh_hosts: TestHosts
) -> None:
    result = deploy(app, "fleet")
    release = result["release"]
    for host in ssh_hosts.hosts:
        body = page(host)
        assert f"release {release}" in body and "stage fleet" in body
        assert current(host) == release
        assert result["hosts"][host.name]["outcome"] == "ok"
    assert leftover_ssh(ssh_hosts.ssh_config) == [], "ssh sessions left after the deploy"
    assert len(listening_masters(ssh_hosts.ssh_config)) == len(ssh_hosts.hosts)


def test_the_next_command_reuses_each_hosts_connection_without_logging_in_again(
    app: Project, ssh_hosts: TestHosts
) -> None:
    assert app.shiplane("status", "--stage", "fleet").returncode == 0
    before = {host.name: logins(host) for host in ssh_hosts.hosts}
    for _ in range(2):
        done = app.shiplane("status", "--stage", "fleet")
        assert done.returncode == 0, done.stderr
    assert {host.name: logins(host) for host in ssh_hosts.hosts} == before
    assert leftover_ssh(ssh_hosts.ssh_config) == []


def close_connections() -> None:
    """Close every connection shiplane keeps open in this user's dir (docs/DESIGN.md)."""
    shared = Path(tempfile.gettempdir()) / f"shiplane-ssh-{os.getuid()}"
    for sock in shared.iterdir() if shared.is_dir() else []:
        subprocess.run(
            ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
            capture_output=True,
            check=False,
        )


def test_two_commands_connecting_to_the_same_hosts_at_once_neither_waits_for_the_other(
    app: Project, ssh_hosts: TestHosts
) -> None:
    close_connections()
    argv = [sys.executable, "-m", "shiplane", "status", "--stage", "fleet"]
    started = time.monotonic()
    both = [
        subprocess.Popen(argv, cwd=app.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=60) for proc in both]
    # each pre-warms the same masters: the one whose master is second gives it up for the
    # first's (before, it stayed connected until its connect timeout, 10 s + 5)
    assert time.monotonic() - started < 8
    assert [proc.returncode for proc in both] == [0, 0], outputs
    assert leftover_ssh(ssh_hosts.ssh_config) == []


def test_other_ssh_settings_or_ssh_persist_0_never_borrow_a_connection(
    app: Project, ssh_hosts: TestHosts
) -> None:
    assert app.shiplane("status", "--stage", "fleet").returncode == 0
    toml = app.root / "shiplane.toml"
    original = toml.read_text()
    first = ssh_hosts.hosts[0]
    try:
        # another ssh option: a connection of its own, logged in anew
        toml.write_text(
            original.replace(
                "[stages.fleet]\n", "[stages.fleet]\nssh_options = ['ServerAliveInterval=7']\n", 1
            )
        )
        before = logins(first)
        assert app.shiplane("status", "--stage", "fleet").returncode == 0
        assert logins(first) == before + 1
        # ssh_persist = 0: every command logs in, and leaves no ssh process behind
        toml.write_text(
            original.replace("[stages.fleet]\n", "[stages.fleet]\nssh_persist = 0\n", 1)
        )
        for _ in range(2):
            before = logins(first)
            assert app.shiplane("status", "--stage", "fleet").returncode == 0
            assert logins(first) == before + 1
    finally:
        toml.write_text(original)
    # no session left, and the persisting connections: the stage's and the other option's
    assert leftover_ssh(ssh_hosts.ssh_config) == []
    assert len(listening_masters(ssh_hosts.ssh_config)) <= 2 * len(ssh_hosts.hosts)


def test_logs_follow_prints_every_hosts_new_lines_prefixed_by_host(
    app: Project, ssh_hosts: TestHosts
) -> None:
    deploy(app, "fleet")
    follow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shiplane",
            "logs",
            "--stage",
            "fleet",
            "--service",
            "web",
            "--lines",
            "0",
            "--follow",
        ],
        cwd=app.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(follow.stdout.readline, "")), daemon=True
    )
    reader.start()
    try:
        # each host's session: an ssh client of the CLI's, over that host's connection
        assert wait_for(
            lambda: len(sessions_of(follow.pid, ssh_hosts.ssh_config)) == len(ssh_hosts.hosts),
            20,
            "a session per host",
        )
        edit(app, "<footer>", "<footer>followed ")
        release = deploy(app, "fleet")["release"]
        # each new server logs its control socket, named after its release, on its own host
        wanted = {f"[{h.name}]" for h in ssh_hosts.hosts}

        def hosts_seen() -> set[str] | None:
            got = {line.split(" ", 1)[0] for line in list(lines) if release in line}
            return got if got == wanted else None

        assert wait_for(hosts_seen, 30, "every host's new log lines") == wanted
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(timeout=30)
    assert follow.returncode == 130 and "interrupted" in follow.stderr.read()  # Ctrl-C, as tail -f
    assert leftover_ssh(ssh_hosts.ssh_config) == [], "logs --follow left ssh connections behind"


def test_a_command_refused_after_its_hosts_were_prewarmed_exits_2_and_leaves_no_session(
    app: Project, ssh_hosts: TestHosts
) -> None:
    # valid TOML (so the CLI pre-warms the stage's hosts) that the schema refuses
    bad = app.root / "bad.toml"
    bad.write_text(
        (app.root / "shiplane.toml").read_text().replace("[app]\n", "[app]\nnot_a_key = 1\n", 1)
    )
    done = app.shiplane("-f", str(bad), "status", "--stage", "fleet")
    assert done.returncode == 2 and "not_a_key" in done.stderr
    # the masters started for it that had not connected are gone with it; the connected ones
    # persist for the next command, one per host
    assert wait_for(lambda: leftover_ssh(ssh_hosts.ssh_config) == [], 10, "no ssh left")


# The hosts' Python as the stage names it: logs the last word of each command line it runs (the
# agent's sha, or "early" for a session the CLI started before reading its deploy file)
SPY_PYTHON = """#!/bin/sh
for last; do :; done
echo "$last" >> /srv/spy-python.log
exec python3 "$@"
"""


def test_each_host_runs_one_agent_per_command_started_early_and_a_refused_one_makes_nothing(
    app: Project, ssh_hosts: TestHosts
) -> None:
    for host in ssh_hosts.hosts:
        spy = host.root / "spy-python"
        spy.write_text(SPY_PYTHON)
        spy.chmod(0o755)
        (host.root / "spy-python.log").unlink(missing_ok=True)
    names = ", ".join(f'"{h.name}"' for h in ssh_hosts.hosts)
    stage = (
        f'\n[stages.spy]\nhosts = [{names}]\ndeploy_to = "/srv/demo-spy"\n'
        f'python = "/srv/spy-python"\nssh_config = "{ssh_hosts.ssh_config}"\n'
    )
    spied = app.root / "spy.toml"
    spied.write_text((app.root / "shiplane.toml").read_text() + stage)
    done = app.shiplane("-f", str(spied), "status", "--stage", "spy")
    assert done.returncode == 0, done.stdout + done.stderr
    for host in ssh_hosts.hosts:  # the agent started while the CLI loaded was the session's
        assert (host.root / "spy-python.log").read_text().split() == ["early"], host.name
    # refused by the schema after its hosts' agents were started early: they end having made
    # nothing (the stage's deploy root never appears) and no agent is left running
    bad = app.root / "bad-spy.toml"
    bad.write_text(
        spied.read_text()
        .replace("[app]\n", "[app]\nnot_a_key = 1\n", 1)
        .replace("/srv/demo-spy", "/srv/never-made")
    )
    refused = app.shiplane("-f", str(bad), "status", "--stage", "spy")
    assert refused.returncode == 2 and "not_a_key" in refused.stderr
    for host in ssh_hosts.hosts:
        assert wait_for(lambda host=host: _agent_pids(host) == [], 10, "no agent left")
        assert not (host.root / "never-made").exists()


def test_code_only_redeploy_sends_one_wheel_and_installs_nothing(
    app: Project, ssh_hosts: TestHosts
) -> None:
    deploy(app, "fleet")
    venvs = {h.name: sorted(os.listdir(h.root / "demo" / "venvs")) for h in ssh_hosts.hosts}
    edit(app, "deployed with shiplane", "shipped over ssh")
    result = deploy(app, "fleet")
    manifest = json.loads(
        (app.root / ".shiplane/build/artifacts" / f"{result['artifact']}.json").read_text()
    )
    wheel = next(f for f in manifest["app_files"] if f["kind"] == "wheel")
    for host in ssh_hosts.hosts:
        assert 0 < result["hosts"][host.name]["bytes"] <= 1.2 * wheel["size"], (
            host.name,
            result["hosts"],
        )
        assert sorted(os.listdir(host.root / "demo" / "venvs")) == venvs[host.name]
        assert "shipped over ssh" in page(host)
    assert not [
        e
        for e in events(result)
        if e.get("phase") == "venv" and e.get("status") in ("building", "built")
    ]


def events(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON event lines a ``deploy --json`` printed before its result."""
    return [
        json.loads(line)
        for line in result["output"].splitlines()
        if line.startswith("{") and not line.startswith('{"result"')
    ]


def test_rolling_failure_on_second_host_returns_every_host_to_the_old_release(
    app: Project, ssh_hosts: TestHosts
) -> None:
    old = deploy(app, "fleet")["release"]
    edit(
        app,
        'def up() -> Response:\n    """',
        'def up() -> Response:\n    if __import__("os").path.exists("/srv/fail-health"):\n'
        '        return Response("failing on purpose\\n", 500)\n    """',
    )
    marker = ssh_hosts.hosts[1].root / "fail-health"
    marker.write_text("")
    try:
        result = deploy(app, "fleet", "--set", "rolling.batch=1", check=False)
    finally:
        marker.unlink()
    assert result["exit"] == 1
    for host in ssh_hosts.hosts:
        assert current(host) == old
        assert f"release {old}" in page(host)
    states = {h: s["outcome"] for h, s in result["hosts"].items()}
    assert states == {"shl-h1": "undone", "shl-h2": "failed", "shl-h3": "not switched"}, states
    summary = "\n".join(result["lines"])
    for host, state in states.items():
        assert host in summary and state in summary


def test_host_lost_during_prepare_aborts_with_nothing_switched(
    app: Project, ssh_hosts: TestHosts
) -> None:
    before = deploy(app, "fleet")["release"]
    toml = app.root / "shiplane.toml"
    original = toml.read_text()
    # every host's after_install waits for /srv/go; shl-h2 never gets it: we cut it off meanwhile
    hold = "touch /srv/waiting; while [ ! -e /srv/go ]; do sleep 0.1; done"
    toml.write_text(
        original.replace(MIGRATE, f'after_install = ["alembic upgrade head", "{hold}"]')
    )
    lost = ssh_hosts.hosts[1]
    for host in ssh_hosts.hosts:
        if host is not lost:
            (host.root / "go").write_text("")
    run = subprocess.Popen(
        [sys.executable, "-m", "shiplane", "deploy", "--stage", "fleet", "--skip-tests"],
        cwd=app.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: (lost.root / "waiting").exists(), 60, "shl-h2 to reach after_install")
        lost.stop_sshd()
        _kill_sshd_sessions(lost)
        output, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
        toml.write_text(original)
        (lost.root / "go").write_text("")  # the orphaned hook ends; its agent gives the lock back
    assert run.returncode == 1, output
    assert "nothing was switched" in output and "shl-h2" in output
    for host in ssh_hosts.hosts:
        if host is not lost:
            assert current(host) == before
            assert f"release {before}" in page(host)
    lost.start_sshd()
    # its agent exits, leaving its lock abandoned (the next deploy breaks it): no longer held
    wait_for(
        lambda: (
            (deploy_lock.inspect(Layout(str(lost.root / "demo"))) or {}).get("state")
            in (None, "abandoned")
        ),
        30,
        "shl-h2's lock holder to be gone",
    )
    assert current(lost) == before
    for host in ssh_hosts.hosts:
        for name in ("go", "waiting"):
            (host.root / name).unlink(missing_ok=True)


def _sshd_pids(host: TestHost) -> list[int]:
    """Every sshd of that host: its listener and its connections' processes."""
    listed = subprocess.run(
        ["ip", "netns", "pids", host.netns], capture_output=True, text=True, check=True
    )
    found = []
    for pid in map(int, listed.stdout.split()):
        try:
            if os.path.realpath(f"/proc/{pid}/exe") == "/usr/sbin/sshd":
                found.append(pid)
        except OSError:
            pass
    return found


def _kill_sshd_sessions(host: TestHost, sig: int = signal.SIGKILL) -> None:
    """What a crashed server does to open connections: every sshd of that host dies (by pid)."""
    for pid in _sshd_pids(host):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def test_a_connection_left_open_that_no_longer_answers_is_replaced_by_a_new_one(
    app: Project, ssh_hosts: TestHosts
) -> None:
    host = ssh_hosts.hosts[0]
    assert app.shiplane("status", "--stage", "staging").returncode == 0  # leaves it open
    before = logins(host)
    # the host's end of every open connection freezes (a host gone without closing them): the
    # connection left open takes the next session's request and never answers it
    frozen = [pid for pid in _sshd_pids(host) if pid != host.sshd_pid]
    assert frozen
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        done = app.shiplane("status", "--stage", "staging", timeout=90)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # ssh gave the frozen connection up (ServerAlive*), and the session connected anew
    assert done.returncode == 0, done.stdout + done.stderr
    assert logins(host) == before + 1


def test_unknown_host_key_is_refused_with_how_to_trust_it(
    app: Project, ssh_hosts: TestHosts, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    config = tmp_path / "ssh_config"
    config.write_text(
        ssh_hosts.ssh_config.read_text().replace(str(ssh_hosts.known_hosts), str(known))
    )
    done = app.shiplane(
        "deploy", "--stage", "fleet", "--skip-tests", "--set", f'ssh_config="{config}"'
    )
    assert done.returncode == 1
    host = ssh_hosts.hosts[0]
    assert "host key of shl-h1 is not known" in done.stdout + done.stderr
    assert f"ssh-keyscan {host.address} >> {known}" in done.stdout + done.stderr
    assert known.read_text() == ""  # nothing was accepted silently


def test_plan_changes_nothing_on_any_host(app: Project, ssh_hosts: TestHosts) -> None:
    deploy(app, "fleet")
    edit(app, "<h1>", "<h1 class=plan>")
    for host in ssh_hosts.hosts:
        after_switch_done(host.root)
    before = {h.name: snapshot(h.root) for h in ssh_hosts.hosts}
    done = app.shiplane("plan", "--stage", "fleet", "--set", 'config.app.title="Planned"')
    after = {h.name: snapshot(h.root) for h in ssh_hosts.hosts}
    assert done.returncode == 0, done.stderr
    changed = {
        h: sorted(
            (k, before[h].get(k), after[h].get(k))
            for k in before[h].keys() | after[h].keys()
            if before[h].get(k) != after[h].get(k)
        )
        for h in before
    }
    assert before == after, changed
    out = done.stdout
    for host in ssh_hosts.hosts:
        assert f"{host.name}:" in out
    assert "venv      reused" in out
    assert "config/app.ini: changed app.title" in out
    assert "fleet-test-secret-value" not in out + done.stderr


def test_promote_moves_the_exact_artifact_and_unpromoted_is_refused(
    app: Project, ssh_hosts: TestHosts
) -> None:
    staged = deploy(app, "staging")
    h1, h2, h3 = ssh_hosts.hosts
    assert f"release {staged['release']}" in page(h1, "staging")
    edit(app, "<footer>", "<footer class=unpromoted>")
    refused = app.shiplane("deploy", "--stage", "prod", "--skip-tests")
    assert refused.returncode == 2
    assert (
        "never was" in refused.stderr
        and "shiplane promote --from staging --to prod" in refused.stderr
    )
    assert not (h2.root / "demo-prod" / "current").exists()
    promoted = app.shiplane("promote", "--from", "staging", "--to", "prod", "--json")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    result = json.loads(
        next(line for line in promoted.stdout.splitlines() if line.startswith('{"result"'))
    )["result"]
    assert result["artifact"] == staged["artifact"]
    for host in (h2, h3):
        release = json.loads(
            (
                host.root / "demo-prod" / "releases" / current(host, "prod") / "release.json"
            ).read_text()
        )
        assert release["artifact"] == staged["artifact"]
        assert "class=unpromoted" not in page(host, "prod")


def test_retry_failed_finishes_the_same_deploy_on_the_host_that_was_down(
    app: Project, ssh_hosts: TestHosts
) -> None:
    """capistrano#1498, deployer#3172: one host down must not mean redoing (or half-doing) all."""
    before = deploy(app, "fleet")["release"]
    edit(app, "</footer>", " retried</footer>")
    lost = ssh_hosts.hosts[2]
    lost.stop_sshd()
    _kill_sshd_sessions(lost)  # down: its connection too (it persisted from the last deploy)
    try:
        failed = deploy(app, "fleet", check=False)
    finally:
        lost.start_sshd()
    assert failed["exit"] == 1, failed["output"]
    assert "nothing was switched" in failed["output"] and "shl-h3" in failed["output"]
    assert all(current(host) == before for host in ssh_hosts.hosts)
    retried = deploy(app, "fleet", "--retry-failed")
    assert retried["release"] == failed["release"] and retried["artifact"] == failed["artifact"]
    for host in ssh_hosts.hosts:
        assert current(host) == failed["release"]
        assert "retried" in page(host)
    # the hosts that were prepared were not prepared again: nothing sent, nothing installed
    for host in ssh_hosts.hosts[:2]:
        assert retried["hosts"][host.name]["bytes"] == 0
    assert retried["hosts"][lost.name]["bytes"] > 0


def _agent_pids(host: TestHost) -> list[int]:
    """The shiplane agents serving sessions on a host (python running the agent's serve loop)."""
    listed = subprocess.run(
        ["ip", "netns", "pids", host.netns], capture_output=True, text=True, check=True
    )
    pids = []
    for pid in map(int, listed.stdout.split()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a for a in argv if a]
        # `python3 -S -c <bootstrap> <root> <agent sha> [early]`: the agent's session process
        if words[-1:] == [b"early"]:
            words.pop()
        if (
            len(words) >= 5
            and words[1:3] == [b"-S", b"-c"]
            and len(words[-1]) == 64
            and b"shiplane_agent" in words[3]
        ):
            pids.append(pid)
    return pids


def test_a_host_that_stops_answering_is_an_error_within_the_timeout(
    app: Project, ssh_hosts: TestHosts
) -> None:
    """kamal#326, deployer#1430: one frozen host must not hang the whole deploy."""
    before = deploy(app, "fleet")["release"]
    toml = app.root / "shiplane.toml"
    original = toml.read_text()
    hold = "touch /srv/waiting; while [ ! -e /srv/go ]; do sleep 0.1; done"
    toml.write_text(
        original.replace(MIGRATE, f'after_install = ["alembic upgrade head", "{hold}"]')
    )
    edit(app, "</footer>", " frozen</footer>")
    frozen = ssh_hosts.hosts[0]
    for host in ssh_hosts.hosts[1:]:
        (host.root / "go").write_text("")
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shiplane",
            "deploy",
            "--stage",
            "fleet",
            "--skip-tests",
            "--set",
            "command_timeout=5",
        ],
        cwd=app.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stopped: list[int] = []
    try:
        wait_for(lambda: (frozen.root / "waiting").exists(), 60, "shl-h1 to reach after_install")
        stopped = _agent_pids(frozen)
        assert stopped, "found no agent process on shl-h1"
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        output, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
        for pid in stopped:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        toml.write_text(original)
        app.commit("restore")
        for host in ssh_hosts.hosts:
            for name in ("go", "waiting"):
                (host.root / name).unlink(missing_ok=True)
    assert run.returncode == 1, output
    assert (
        "shl-h1" in output and "no answer within 5 s" in output and "nothing was switched" in output
    )
    for host in ssh_hosts.hosts:
        assert current(host) == before
    app.shiplane(
        "unlock", "--stage", "fleet", "--force", check=True
    )  # the killed agent could not give it back
