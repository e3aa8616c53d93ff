"""Transports are found by name in one place (shiplane.transport.TRANSPORTS): which one serves a
host spec, whether that host is the controller's own machine, and how it is made from a stage's
connection settings (issue 17: no ``host == "local"`` outside the local transport)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from shiplane import transport
from shiplane.errors import ConfigError
from shiplane.transport import ConnectSettings, connect, kind_of, on_controller
from shiplane.transport.base import Prewarming
from shiplane.transport.local import LocalTransport
from shiplane.transport.ssh import SSHTransport, remove_control_dir

SRC = Path(__file__).resolve().parents[1] / "src" / "shiplane"


@pytest.fixture(autouse=True)
def _control_dir() -> Iterator[None]:
    yield
    remove_control_dir()  # SSH transports made this process's control dir


def test_each_host_spec_has_one_transport_by_name() -> None:
    assert list(transport.TRANSPORTS) == ["local", "ssh"]
    assert kind_of("local") == "local"
    for host in ("web1", "deploy@web1", "web2:2222", "[::1]:22", "localhost"):
        assert kind_of(host) == "ssh"
    assert transport.transport_class("local") is LocalTransport
    assert transport.transport_class("web1") is SSHTransport


def test_only_the_local_transport_is_the_controllers_machine() -> None:
    assert on_controller("local")
    assert not on_controller("web1") and not on_controller("localhost")


def test_a_transport_is_made_from_the_stages_connection_settings() -> None:
    local = connect("local", ConnectSettings())
    assert isinstance(local, LocalTransport) and local.host == "local"
    assert not isinstance(local, Prewarming)
    settings = ConnectSettings(
        ssh_config="/etc/ssh/cfg",
        identity_file="/keys/id",
        ssh_options=("ServerAliveInterval=9",),
        connect_timeout=7,
    )
    ssh = connect("deploy@web1:2222", settings)
    assert isinstance(ssh, SSHTransport) and isinstance(ssh, Prewarming)
    argv = ssh._base
    assert argv[argv.index("-F") + 1] == "/etc/ssh/cfg"
    assert argv[argv.index("-i") + 1] == "/keys/id"
    assert argv[argv.index("-p") + 1] == "2222"
    assert "ServerAliveInterval=9" in argv and "ConnectTimeout=7" in argv
    with pytest.raises(ConfigError):
        connect("-oProxyCommand=x", settings)  # SSH still refuses what is no host
    with pytest.raises(ConfigError):
        connect("web1", ConnectSettings(connect_timeout=0))


def test_every_transport_is_a_transport_kind() -> None:
    for kind in transport.TRANSPORTS.values():
        assert isinstance(kind.on_controller, bool)
        assert callable(kind.claims) and callable(kind.connect) and callable(kind.cleanup)
    # the last one takes every spec: a host always has a transport
    last = list(transport.TRANSPORTS.values())[-1]
    assert last.claims("anything")


def test_no_transport_is_chosen_by_comparing_host_strings() -> None:
    # the registry answers "which transport" and "is it this machine"; a task's scope
    # (task.on == "local", commands/) and the config's own validation are other questions
    pattern = re.compile(r"""\bhost\w*\s*[!=]=\s*["']local["']|["']local["']\s*[!=]=\s*\w*host""")
    offenders = [
        f"{path.relative_to(SRC)}:{number}"
        for path in (SRC / "fleet.py", *sorted((SRC / "transport").glob("*.py")))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
