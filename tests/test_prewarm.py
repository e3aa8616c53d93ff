"""Which hosts the CLI pre-warms (an SSH master each, before its imports): only those the command
will certainly connect to, with the options the session will use; nothing when in doubt."""

from __future__ import annotations

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
    transport = prewarm.targets(["deploy", "--stage", "fleet"], {}, project)["deploy@web1"]
    argv = transport._base
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
