"""Which hosts the CLI pre-warms (an SSH master each, before its imports): only those the command
will certainly connect to, with the options the session will use; nothing when in doubt."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shiplane.transport import prewarm
from shiplane.transport.ssh import remove_control_dir

TOML = """\
[app]
name = "demo"

[stages.local]
hosts = ["local"]
deploy_to = ".shiplane/local"

[stages.fleet]
hosts = ["deploy@web1", "web2:2222"]
deploy_to = "/srv/demo"
ssh_config = "ssh/config"
ssh_options = ["ServerAliveInterval=9"]

[stages.prod]
hosts = ["web3"]
deploy_to = "/srv/demo"
promote_from = "fleet"
"""


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "shiplane.toml").write_text(TOML)
    (tmp_path / "sub").mkdir()
    yield tmp_path
    remove_control_dir()  # the transports made a control dir for this process


def hosts(argv: str, cwd: Path, **env: str) -> list[str]:
    return sorted(prewarm.targets(argv.split(), env, cwd))


def test_a_connecting_verb_prewarms_the_stages_ssh_hosts(project: Path) -> None:
    assert hosts("deploy --stage fleet --skip-tests", project) == ["deploy@web1", "web2:2222"]
    assert hosts("status -s fleet", project / "sub") == [
        "deploy@web1",
        "web2:2222",
    ]  # a parent's file
    assert hosts("logs --stage=fleet --follow", project) == ["deploy@web1", "web2:2222"]
    assert hosts("rollback", project, SHIPLANE_STAGE="fleet") == ["deploy@web1", "web2:2222"]
    assert hosts("deploy --stage fleet --hosts web9", project) == [
        "web9"
    ]  # the override, as the CLI
    assert hosts(f"-f {project / 'shiplane.toml'} status --stage fleet", Path("/")) == [
        "deploy@web1",
        "web2:2222",
    ]
    assert hosts("deploy --stage fleet --parallel 1", project) == ["deploy@web1"]


def test_the_prewarmed_master_uses_the_sessions_ssh_options(project: Path) -> None:
    transport = prewarm.targets(["deploy", "--stage", "fleet"], {}, project)[
        "deploy@web1"
    ].transport
    argv = transport._base  # type: ignore[attr-defined]
    assert argv[argv.index("-F") + 1] == str(project / "ssh" / "config")
    assert "ServerAliveInterval=9" in argv and "StrictHostKeyChecking=yes" in argv


@pytest.mark.parametrize(
    "argv",
    [
        "deploy --stage local",  # no SSH
        "deploy --stage prod",  # a promotion check comes first
        "deploy --stage fleet --set port=9",  # an override the raw file does not know
        "deploy --stage nosuch",  # the real load reports it
        "deploy",  # no stage
        "deploy --stage fleet --help",
        "build --stage fleet",  # connects to nothing
        "init demo",
    ],
)
def test_nothing_is_prewarmed_when_in_doubt(project: Path, argv: str) -> None:
    assert hosts(argv, project) == []


def test_nothing_is_prewarmed_outside_a_project_or_from_a_broken_file(project: Path) -> None:
    assert hosts("deploy --stage fleet", Path("/")) == []
    (project / "shiplane.toml").write_text("[stages.fleet\nhosts = [")
    assert hosts("deploy --stage fleet", project) == []


def early_agent(project: Path, extra: str = "", app_python: str = "") -> set[tuple[object, object]]:
    """(interpreter, deploy root) each fleet host's early agent session is started with."""
    text = TOML.replace(
        'hosts = ["deploy@web1", "web2:2222"]\n', f'hosts = ["deploy@web1", "web2:2222"]\n{extra}'
    )
    (project / "shiplane.toml").write_text(
        text.replace('name = "demo"\n', f'name = "demo"\n{app_python}')
    )
    found = prewarm.targets(["deploy", "--stage", "fleet"], {}, project)
    return {(target.python, target.root) for target in found.values()}


def test_the_early_agent_uses_the_interpreter_and_root_its_session_will(project: Path) -> None:
    assert early_agent(project) == {("python3", "/srv/demo")}
    assert early_agent(project, app_python='python = "python3.12"\n') == {
        ("python3.12", "/srv/demo")
    }
    assert early_agent(project, 'python = "/opt/py/bin/python3"\n', 'python = "python3.12"\n') == {
        ("/opt/py/bin/python3", "/srv/demo")
    }


@pytest.mark.parametrize("python", ["-Werror", "python3; rm -rf /", "py thon", ""])
def test_no_agent_starts_early_with_an_interpreter_the_deploy_file_may_not_name(
    project: Path, python: str
) -> None:
    # the schema refuses them all: nothing may run them
    assert early_agent(project, f'python = "{python}"\n') == {(None, None)}


def test_an_interrupt_stops_a_master_still_connecting(tmp_path: Path) -> None:
    """Ctrl-C (the fleet's cancel) while a host's handshake hangs: the session waiting for the
    master fails at once, not at its connect timeout, and nothing is left connecting."""
    marker = f"hang-{os.getpid()}-{time.monotonic_ns()}"
    (tmp_path / "ssh_config").write_text(
        f'Host hang\n  ProxyCommand sh -c "cat >/dev/null" {marker}\n'
    )
    (tmp_path / "shiplane.toml").write_text(
        '[app]\nname = "demo"\n\n[stages.hang]\nhosts = ["hang"]\ndeploy_to = "/srv/demo"\n'
        'ssh_config = "ssh_config"\nssh_persist = 0\n'
    )

    def proxies() -> int:
        found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, check=False)
        return len(found.stdout.split())

    prewarm.start(["status", "--stage", "hang"], {}, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while proxies() == 0:  # the master is connecting
            assert time.monotonic() < deadline, "no master started"
            time.sleep(0.05)  # polling, bounded by the deadline
        started = time.monotonic()
        prewarm.abort()
        failed = prewarm.wait("hang", 30)
        assert failed is not None  # the session's connect error, not a hang
        assert time.monotonic() - started < 3
    finally:
        prewarm.stop_unused()
        remove_control_dir()
    deadline = time.monotonic() + 10
    while proxies():  # the proxy reads until its ssh is gone
        assert time.monotonic() < deadline, "the proxy command outlived its master"
        time.sleep(0.05)  # polling, bounded by the deadline
