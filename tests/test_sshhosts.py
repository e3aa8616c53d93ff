"""The real-OpenSSH test hosts behave like separate servers reached through ssh_config."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from sshhosts import HostStartError, TestHost, TestHosts

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

HTTP_PORT = 8765


def _alive(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie waiting to be reaped counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> bytes:
    """The argv of ``pid`` NUL-separated; empty if it has exited meanwhile (ssh sessions do)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _netns_names() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def _ok(host: TestHost, command: str) -> str:
    result = host.ssh(command)
    assert result.returncode == 0, f"{host.name}: {command!r} failed: {result.stderr}"
    return result.stdout


def _get(url: str, deadline: float = 10.0) -> str:
    """GET ``url``, polling until the server is up or ``deadline`` seconds have passed."""
    end = time.monotonic() + deadline
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return str(response.read().decode())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > end:
                raise
            time.sleep(0.05)  # poll interval


def test_command_runs_on_each_host_with_its_own_name_and_address(ssh_hosts: TestHosts) -> None:
    assert [h.name for h in ssh_hosts.hosts] == ["shl-h1", "shl-h2", "shl-h3"]
    for host in ssh_hosts.hosts:
        out = _ok(host, 'hostname; echo "$SSH_CONNECTION"; command -v python3; echo "$HOME"')
        hostname, connection, python3, home = out.splitlines()
        assert hostname == host.name
        assert connection.split()[2] == host.address
        assert python3 == "/usr/bin/python3"
        assert home == "/root"
    # the same alias works for a plain `ssh -F <ssh_config>`, as shiplane's stages will call it
    plain = subprocess.run(
        ["ssh", "-F", str(ssh_hosts.ssh_config), "shl-h2", "hostname"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (plain.returncode, plain.stdout.strip()) == (0, "shl-h2")


def test_each_host_has_its_own_srv_tmp_and_home(ssh_hosts: TestHosts) -> None:
    h1, h2 = ssh_hosts.hosts[:2]
    name = f"marker-{uuid.uuid4().hex}"
    _ok(
        h1,
        f"echo h1 > /tmp/{name}; mkdir -p /srv/app && echo h1 > /srv/app/{name}; "
        f"echo h1 > /root/{name}",
    )
    assert (h1.tmp / name).read_text() == "h1\n"
    assert (h1.root / "app" / name).read_text() == "h1\n"
    assert (h1.home / name).read_text() == "h1\n"
    for path in (f"/tmp/{name}", f"/srv/app/{name}", f"/root/{name}"):
        assert h2.ssh(f"test -e {path}").returncode == 1, f"{path} leaked to h2"
    assert not (h2.tmp / name).exists()
    assert not Path(f"/tmp/{name}").exists()  # nor onto the controller


def test_unknown_or_changed_host_key_is_refused(ssh_hosts: TestHosts, tmp_path: Path) -> None:
    h1, h2 = ssh_hosts.hosts[:2]
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    wrong = tmp_path / "wrong_known_hosts"  # h2's key under h1's address
    h2_key = next(
        line
        for line in ssh_hosts.known_hosts.read_text().splitlines()
        if line.startswith(f"{h2.address} ")
    )
    wrong.write_text(f"{h1.address} {h2_key.split(' ', 1)[1]}\n")
    for known_hosts, message in (
        (empty, "Host key verification failed"),
        (wrong, "REMOTE HOST IDENTIFICATION HAS CHANGED"),
    ):
        result = subprocess.run(
            [
                "ssh",
                "-F",
                str(ssh_hosts.ssh_config),
                "-o",
                f"UserKnownHostsFile={known_hosts}",
                h1.name,
                "touch /tmp/should-not-run",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 255
        assert message in result.stderr
    assert not (h1.tmp / "should-not-run").exists()
    assert empty.read_text() == ""  # strict checking: nothing learned


def test_hosts_reach_each_other_by_address_but_not_by_loopback(ssh_hosts: TestHosts) -> None:
    h1, h2 = ssh_hosts.hosts[:2]
    pids = {}
    for host in (h1, h2):
        (host.root / "who").write_text(host.name)
        # the same port on every host: each has its own network namespace
        pids[host.name] = _ok(
            host,
            (
                f"nohup python3 -m http.server {HTTP_PORT} --bind 0.0.0.0 --directory /srv "
                f">/tmp/http.log 2>&1 </dev/null & echo $!"
            ),
        ).strip()
    try:
        for host in (h1, h2):
            assert _get(host.url(HTTP_PORT, "/who")) == host.name
        fetch = (
            "python3 -c 'import sys, urllib.request as u; "
            "print(u.urlopen(sys.argv[1], timeout=5).read().decode())' "
        )
        assert _ok(h1, fetch + f"http://127.0.0.1:{HTTP_PORT}/who").strip() == "shl-h1"
        assert _ok(h1, fetch + h2.url(HTTP_PORT, "/who")).strip() == "shl-h2"
    finally:
        for host in (h1, h2):
            host.ssh(f"kill {pids[host.name]}")


def test_stopped_sshd_fails_fast_and_start_brings_the_same_host_back(
    make_ssh_hosts: Callable[[int], TestHosts],
) -> None:
    hosts = make_ssh_hosts(1)
    host = hosts.hosts[0]
    service = _ok(host, "nohup sleep 600 >/dev/null 2>&1 </dev/null & echo $!").strip()
    mount_ns = _ok(host, f"readlink /proc/{service}/ns/mnt").strip()

    host.stop_sshd()
    assert host.sshd_pid is None
    started = time.monotonic()
    down = subprocess.run(
        ["ssh", "-F", str(hosts.ssh_config), "-o", "ConnectTimeout=3", host.name, "true"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 255
    assert "Connection refused" in down.stderr
    assert time.monotonic() - started < 3

    host.start_sshd()
    # back in the very same namespaces: the service started before is still there and seen
    # with the same mount namespace as the new login
    out = _ok(host, f"kill -0 {service} && readlink /proc/self/ns/mnt && hostname")
    assert out.splitlines() == [mount_ns, host.name]


def test_stop_leaves_no_process_netns_or_veth(make_ssh_hosts: Callable[[int], TestHosts]) -> None:
    hosts = make_ssh_hosts(2)
    pids: list[int] = []
    for host in hosts.hosts:
        # a plain background job and a double-forked daemon in its own session, as services are
        _ok(host, "nohup sleep 600 >/dev/null 2>&1 </dev/null &")
        _ok(host, "(setsid sleep 601 >/dev/null 2>&1 </dev/null &) ; true")
        listed = subprocess.run(
            ["ip", "netns", "pids", host.netns], capture_output=True, text=True, check=True
        )
        in_host = [int(p) for p in listed.stdout.split()]
        assert host.sshd_pid in in_host
        pids += in_host
    sleepers = [p for p in pids if _cmdline(p).startswith(b"sleep\0")]
    assert len(sleepers) >= 2 * 3  # the anchor and the two jobs on each host

    hosts.stop()

    assert [p for p in pids if _alive(p)] == []
    assert _netns_names().isdisjoint(h.netns for h in hosts.hosts)
    assert not any(Path(f"/sys/class/net/{h.veth}").exists() for h in hosts.hosts)
    hosts.stop()  # idempotent (the fixture calls it again)


def test_concurrent_host_sets_do_not_collide(
    ssh_hosts: TestHosts,
    make_ssh_hosts: Callable[[int], TestHosts],
) -> None:
    other = make_ssh_hosts(2)
    mine, theirs = ssh_hosts.hosts[0], other.hosts[0]
    assert mine.name == theirs.name == "shl-h1"  # same alias, in different ssh_configs
    assert mine.netns != theirs.netns and mine.veth != theirs.veth
    assert mine.address.split(".")[1] != theirs.address.split(".")[1]
    assert _ok(theirs, 'echo "$SSH_CONNECTION"').split()[2] == theirs.address
    assert _ok(mine, 'echo "$SSH_CONNECTION"').split()[2] == mine.address
    name = f"marker-{uuid.uuid4().hex}"
    _ok(theirs, f"touch /srv/{name}")
    assert (theirs.root / name).exists() and not (mine.root / name).exists()


def test_sshd_that_cannot_start_raises_with_its_log(
    make_ssh_hosts: Callable[[int], TestHosts],
) -> None:
    host = make_ssh_hosts(1).hosts[0]
    host.stop_sshd()
    config = host.state_dir / "sshd_config"
    config.write_text(config.read_text() + "NoSuchOption yes\n")
    with pytest.raises(HostStartError) as failure:
        host.start_sshd(deadline=5)
    assert "shl-h1: sshd exited" in str(failure.value)
    assert "NoSuchOption" in str(failure.value)  # the sshd log says what is wrong
