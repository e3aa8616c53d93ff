"""``shiplane setup`` and ``shiplane doctor`` on a real OpenSSH test host (issue 20): doctor on a
bare host says what is missing and the command that fixes it; setup makes the deploy user (a
test-only name: the test hosts share this machine's /etc/passwd and /home), authorises the key,
gives it the deploy root; a second setup changes nothing; doctor then passes; a deploy logs in
as that user, not root, and the app's processes run as it."""

from __future__ import annotations

import json
import os
import pwd
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployhelp import Project, http_get, scaffold, wait_for
from shiplane.commands.setup import (
    _DOCTOR_SCRIPT,
    _FRONT_DIR_DOCTOR,
    _FRONT_DIR_SETUP,
    _SETUP_SCRIPT,
)
from shiplane.transport.ssh import SSHTransport
from sshhosts import TestHost, TestHosts

USER = "shl-deploy"
PORT = 8400
ROOT = "/srv/setup-demo"


def _stage(config: Path) -> str:
    return (
        f'[stages.fresh]\nhosts = ["shl-h1"]\ndeploy_to = "{ROOT}"\nport = {PORT}\n'
        f'bind = "0.0.0.0"\nssh_config = "{config}"\ndeploy_user = "{USER}"\n\n'
        # deployed as root (the ssh_config's user) first, then moved to the deploy user
        f'[stages.legacy]\nhosts = ["shl-h2"]\ndeploy_to = "/srv/legacy"\nport = {PORT + 1}\n'
        f'bind = "0.0.0.0"\nssh_config = "{config}"\n'
    )


def _remove_user() -> None:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return
    subprocess.run(["userdel", "-r", "-f", USER], capture_output=True, check=False)


def result_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    for line in done.stdout.splitlines():
        if line.startswith('{"result"'):
            found: dict[str, Any] = json.loads(line)["result"]
            return found
    raise AssertionError(f"no result ({done.returncode}):\n{done.stdout}\n{done.stderr}")


@pytest.fixture(scope="module")
def app(ssh_hosts: TestHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    _remove_user()  # left by an interrupted run
    project = scaffold(tmp_path_factory.mktemp("setup"))
    toml = project.root / "shiplane.toml"
    text = toml.read_text()
    toml.write_text(text[: text.index("[stages.staging]")] + _stage(ssh_hosts.ssh_config))
    for stage in ("fresh", "legacy"):
        secrets = project.root / ".secrets" / f"{stage}.env"
        secrets.write_text("SECRET_KEY=setup-test-secret-value\n")
        os.chmod(secrets, 0o600)
    project.commit("a stage on a fresh test host")
    try:
        yield project
    finally:
        project.shiplane("stop", "--all", "--stage", "fresh", timeout=120)
        project.shiplane("stop", "--all", "--stage", "legacy", "--set", f"deploy_user={USER}")
        project.shiplane("stop", "--all", "--stage", "legacy", timeout=120)
        _remove_user()


@pytest.mark.ssh
@pytest.mark.slow  # on a real OpenSSH test host
def test_doctor_setup_doctor_deploy_as_the_deploy_user(app: Project, ssh_hosts: TestHosts) -> None:
    host: TestHost = ssh_hosts.hosts[0]
    # before setup: the deploy user cannot log in; doctor says so, with the fix, and exits 1
    before = app.shiplane("doctor", "--stage", "fresh", "--json")
    assert before.returncode == 1, before.stdout + before.stderr
    checks = result_of(before)["hosts"]["shl-h1"]["checks"]
    assert checks[0]["check"] == "login" and checks[0]["status"] == "missing", checks
    assert checks[0]["fix"] == "shiplane setup --stage fresh"
    human = app.shiplane("doctor", "--stage", "fresh")
    assert human.returncode == 1 and "fix: shiplane setup --stage fresh" in human.stdout

    # setup: the user, the key, the deploy root
    first = app.shiplane("setup", "--stage", "fresh", "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    done = result_of(first)
    steps = {s["step"]: s for s in done["hosts"]["shl-h1"]["steps"]}
    assert done["changed"] is True and steps["user"]["status"] == "changed", steps
    assert steps["key"]["status"] == "changed" and steps["root"]["status"] == "changed"
    assert steps["python"]["status"] == "ok" and steps["sudo"]["status"] == "ok"
    assert "client.pub" in done["key"]  # the key ssh offers the host (the ssh_config's)
    account = pwd.getpwnam(USER)
    assert account.pw_uid != 0 and account.pw_shell == "/bin/bash"
    authorized = Path(account.pw_dir) / ".ssh" / "authorized_keys"
    body = " ".join(Path(f"{ssh_hosts.client_key}.pub").read_text().split()[:2])
    assert body in authorized.read_text()
    assert oct(authorized.stat().st_mode & 0o777) == "0o600"
    assert oct(authorized.parent.stat().st_mode & 0o777) == "0o700"
    assert authorized.stat().st_uid == account.pw_uid
    root = host.root / ROOT.removeprefix("/srv/")
    assert root.stat().st_uid == account.pw_uid and oct(root.stat().st_mode & 0o777) == "0o750"

    # a second setup changes nothing
    second = app.shiplane("setup", "--stage", "fresh")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "nothing changed" in second.stdout and " changed " not in second.stdout, second.stdout

    # doctor now passes, as the deploy user
    after = app.shiplane("doctor", "--stage", "fresh", "--json")
    assert after.returncode == 0, after.stdout + after.stderr
    report = result_of(after)["hosts"]["shl-h1"]
    assert report["user"] == USER and report["ok"], report

    # a deploy logs in as the deploy user; the app runs as it
    result = _deploy(app)
    assert result["ok"], result["output"][-3000:]
    assert http_get(host.url(PORT, "/"))[0] == 200
    status = app.shiplane("status", "--stage", "fresh", "--json")
    services = result_of(status)["hosts"]["shl-h1"]["services"]
    web = next(s for s in services if s["name"] == "web" and s.get("live", True) and s["pid"])
    owner = subprocess.run(
        ["ps", "-o", "user=", "-p", str(web["pid"])], capture_output=True, text=True, check=False
    ).stdout.strip()
    assert owner == USER, services
    current = root / "current"
    assert current.lstat().st_uid == account.pw_uid
    wait_for(lambda: http_get(host.url(PORT, "/"))[0] == 200, what="the page")
    # doctor after the deploy: the port is the app's own
    again = app.shiplane("doctor", "--stage", "fresh")
    assert again.returncode == 0 and "held" in again.stdout, again.stdout + again.stderr


def _deploy(app: Project, stage: str = "fresh", *extra: str) -> dict[str, Any]:
    started = time.monotonic()
    done = app.shiplane("deploy", "--stage", stage, "--skip-tests", "--json", *extra)
    result = result_of(done) if '{"result"' in done.stdout else {"ok": False}
    result["output"] = done.stdout + done.stderr + f"\n({time.monotonic() - started:.1f} s)"
    return result


@pytest.mark.ssh
@pytest.mark.slow  # on a real OpenSSH test host
def test_bad_users_are_refused_before_any_connection(app: Project) -> None:
    root = app.shiplane("doctor", "--stage", "fresh", "--set", "deploy_user=root")
    assert root.returncode == 2 and "cannot be root" in root.stderr, root.stderr
    toml = (app.root / "shiplane.toml").read_text()
    bad = app.root / "bad.toml"
    bad.write_text(toml.replace(f'deploy_user = "{USER}"', 'deploy_user = "x;reboot"'))
    try:
        for verb in ("setup", "doctor", "deploy"):
            done = app.shiplane("-f", str(bad), verb, "--stage", "fresh", "--json")
            assert done.returncode == 2, (verb, done.stdout, done.stderr)
            assert "deploy_user" in done.stderr
    finally:
        bad.unlink()
    meta = app.shiplane("setup", "--stage", "fresh", "--as", "root$(id)")
    assert meta.returncode == 2 and "--as" in meta.stderr


def test_a_host_without_a_user_logs_in_as_deploy_user() -> None:
    argv = SSHTransport("web1:2222", user="deploy").command_argv(["true"], tty=False)
    assert argv[-2:] == ["deploy@web1", "true"] and "2222" in argv
    assert (
        SSHTransport("ops@web1", user="deploy").command_argv(["true"], tty=False)[-2] == "ops@web1"
    )
    assert SSHTransport("web1").command_argv(["true"], tty=False)[-2] == "web1"  # unset: ssh's


def test_the_scripts_are_valid_sh_whatever_the_values() -> None:
    hostile = "x'; reboot; echo '$(id)`id`"
    values = {
        "path": "/usr/bin:/bin",
        "deploy_user": "deploy",
        "deploy_root": hostile,
        "pubkey": "ssh-ed25519 AAAA shiplane-demo",
        "python": "python3",
        "front": "",
        "low_ports": "no",
        "systemd": "auto",
        "sudo_rule": "none",
        "stage": "prod",
        "port": "8000",
        "bind": "0.0.0.0",
        "min_free_kb": "1",
    }
    quoted = {k: shlex.quote(v) for k, v in values.items()}
    quoted["front_dir"] = shlex.quote(hostile)
    quoted["front_dir_setup"], quoted["front_dir_doctor"] = _FRONT_DIR_SETUP, _FRONT_DIR_DOCTOR
    for template in (_SETUP_SCRIPT, _DOCTOR_SCRIPT):
        fields = {k: v for k, v in quoted.items() if "{" + k + "}" in template}
        script = template.format(**fields)
        assert subprocess.run(["sh", "-n"], input=script, text=True, check=False).returncode == 0
        assert f"{hostile}" not in script.replace(shlex.quote(hostile), "")


@pytest.mark.ssh
@pytest.mark.slow  # on a real OpenSSH test host
def test_a_stage_deployed_as_root_moves_to_the_deploy_user(
    app: Project, ssh_hosts: TestHosts
) -> None:
    host = ssh_hosts.hosts[1]
    as_deploy = ("--set", f"deploy_user={USER}")
    assert _deploy(app, "legacy")["ok"]  # as root: the ssh_config's user
    # its processes run as root from the deploy root: setup will not take it from under them
    busy = app.shiplane("setup", "--stage", "legacy", *as_deploy)
    assert busy.returncode == 1, busy.stdout + busy.stderr
    assert "shiplane stop --all --stage legacy" in busy.stdout, busy.stdout
    assert (host.root / "legacy").stat().st_uid == 0
    app.shiplane("stop", "--all", "--stage", "legacy", check=True, timeout=120)
    moved = app.shiplane("setup", "--stage", "legacy", *as_deploy, "--json")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    steps = {s["step"]: s for s in result_of(moved)["hosts"]["shl-h2"]["steps"]}
    assert "with everything in it" in steps["root"]["detail"], steps
    uid = pwd.getpwnam(USER).pw_uid
    assert all(p.lstat().st_uid == uid for p in (host.root / "legacy").rglob("*"))
    result = _deploy(app, "legacy", *as_deploy)
    assert result["ok"], result["output"][-3000:]
    assert http_get(host.url(PORT + 1, "/"))[0] == 200
    releases = app.shiplane("releases", "--stage", "legacy", *as_deploy)
    assert releases.returncode == 0 and releases.stdout.count("\n") >= 2, releases.stdout


def test_the_prewarmed_master_logs_in_as_deploy_user(tmp_path: Path) -> None:
    from shiplane.transport import prewarm

    (tmp_path / "shiplane.toml").write_text(
        '[app]\nname = "demo"\n\n[stages.prod]\nhosts = ["web1", "ops@web2"]\n'
        'deploy_to = "/srv/demo"\ndeploy_user = "deploy"\n'
    )
    found = prewarm.targets(["deploy", "--stage", "prod"], {}, tmp_path)
    targets = {h: t.transport.spawn_argv(["true"])[-2] for h, t in found.items()}
    assert targets == {"web1": "deploy@web1", "ops@web2": "ops@web2"}


def _front_dir_steps(snippet: str, front_dir: Path, me: str = "root") -> list[list[str]]:
    """Run setup's or doctor's caddy.data_dir part alone here (the rest makes users, installs
    packages): its ``step``/``check`` lines, split."""
    script = (
        'say() { printf \'%s %s %s\\n\' "$1" "$2" "$3"; }\n'
        f"FRONT_DIR={shlex.quote(str(front_dir))}\nDEPLOY_USER=nobody\nGROUP=nogroup\nME={me}\n"
        + snippet
    )
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    return [line.split(" ", 2) for line in done.stdout.splitlines()]


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a dir to another user (needs root)")
def test_setup_gives_a_shared_caddy_dir_to_the_deploy_user(tmp_path: Path) -> None:
    front = tmp_path / "srv" / "caddy"
    assert _front_dir_steps(_FRONT_DIR_DOCTOR, front) == [
        [
            "frontdir",
            "ok",
            f"{front} (caddy.data_dir) does not exist yet: the first deploy makes it",
        ]
    ]
    [(_, status, detail)] = _front_dir_steps(_FRONT_DIR_SETUP, front)
    assert status == "changed" and "created" in detail, detail
    assert pwd.getpwuid(front.stat().st_uid).pw_name == "nobody"
    assert oct(front.stat().st_mode & 0o777) == "0o700"
    assert _front_dir_steps(_FRONT_DIR_SETUP, front)[0][1] == "ok"  # a second setup
    # doctor, logged in as another user than the dir's owner: the apps share one user
    [(_, status, detail)] = _front_dir_steps(_FRONT_DIR_DOCTOR, front, me="deploy")
    assert status == "missing" and "owned by nobody, not deploy" in detail
    # a dir holding another user's files is not taken
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "Caddyfile").write_text("")
    [(_, status, detail)] = _front_dir_steps(_FRONT_DIR_SETUP, theirs)
    assert status == "failed" and "holds root's files" in detail, detail
    assert theirs.stat().st_uid == 0
