"""Real OpenSSH test hosts for integration tests (stdlib only; needs root and Linux namespaces).

Each host is one Debian ``sshd`` in its own network namespace (a veth pair: the host is
``10.<B>.<i>.2``, the controller ``10.<B>.<i>.1``; own loopback and ports), its own UTS namespace
(hostname = its ssh alias) and its own mount namespace, where ``/srv``, ``/tmp``, ``/root`` and
``/usr/local`` are bind-mounted per-host folders, as separate servers have. Hosts reach each other
only through their addresses (routed by the controller), never through loopback.

The hosts still share one PID namespace with the controller, so everything is stopped by pid
(``ip netns pids``), never by process name. Each host keeps an *anchor* process (``sleep
infinity``) that holds its namespaces, so ``start_sshd`` after ``stop_sshd`` enters the very same
namespaces, and processes that tests start later through ssh (services, supervisord) live in them
too and die at ``stop()``.

Several sessions may run at once: names carry a prefix from the pid (``s<pid%10000><letter>``),
the subnet ``<B>`` is one not used by any address or route here, both picked under a lock file,
and sets left behind by a dead session are removed by the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
HOST_PYTHON = "/usr/bin/python3"
REGISTRY = Path("/run/shiplane-testhosts")
# Inside a host its state folder is mounted here: its /tmp and /root are replaced, which may hide
# the controller-side path of the workdir (pytest's tmp_path lives under /tmp).
HOST_STATE = "/run/shl-host"
_SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SUBNETS = range(200, 255)
_TOOLS = ("ip", "ssh", "ssh-keygen", "unshare", "nsenter", "mount", "hostname")

# Runs in the host's fresh mount+UTS namespace (argv: state dir, hostname); prints "ready" once
# the mounts are in place, then stays as the anchor holding the namespaces.
_ANCHOR_SCRIPT = f"""set -e
mount --bind "$1" {HOST_STATE}
mount --bind {HOST_STATE}/srv /srv
mount --bind {HOST_STATE}/tmp /tmp
mount --bind {HOST_STATE}/home /root
mount --bind {HOST_STATE}/usr-local /usr/local
hostname "$2"
echo ready
exec sleep infinity
"""

_SSHD_CONFIG = f"""ListenAddress 0.0.0.0
Port 22
HostKey {HOST_STATE}/hostkey
AuthorizedKeysFile {HOST_STATE}/authorized_keys
PidFile {HOST_STATE}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PrintMotd no
MaxSessions 64
MaxStartups 64:30:128
Subsystem sftp internal-sftp
"""


class HostStartError(RuntimeError):
    """A test host did not come up; the message carries its sshd log."""


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=_SYS_PATH)
    if found is None:
        raise FileNotFoundError(name)
    return found


def _capture(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = _capture([_tool(argv[0]), *argv[1:]], timeout=30)
    if check:
        result.check_returncode()
    return result


def _keygen(path: Path, comment: str) -> None:
    if not path.exists():
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))


def _spawn(argv: list[str], log: Path, stdout: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """Start a host process in its own session (a Ctrl-C of pytest must not reach it)."""
    env = {"PATH": _SYS_PATH, "LANG": "C.UTF-8"}
    with open(log, "ab") as err:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=err,
            cwd="/",
            env=env,
            start_new_session=True,
        )


@dataclass
class TestHost:
    """One test host: ``ssh -F <ssh_config> <name>`` reaches its sshd as root."""

    __test__ = False  # not a pytest test class

    name: str
    address: str
    root: Path  # this host's /srv, seen from the controller
    home: Path  # this host's /root
    tmp: Path  # this host's /tmp
    ssh_config: Path
    netns: str
    veth: str
    state_dir: Path
    _anchor: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    _sshd: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def ssh(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on the host through ssh; the result is never checked."""
        return _capture([_tool("ssh"), "-F", str(self.ssh_config), self.name, command], timeout)

    def url(self, port: int, path: str = "/") -> str:
        """The http URL of ``path`` on ``port`` of this host, as the controller reaches it."""
        return f"http://{self.address}:{port}/{path.lstrip('/')}"

    @property
    def sshd_pid(self) -> int | None:
        """The pid of the running sshd listener, or None while it is stopped."""
        if self._sshd is None or self._sshd.poll() is not None:
            return None
        return self._sshd.pid

    def sshd_log(self) -> str:
        """The sshd log of this host (empty if none yet)."""
        path = self.state_dir / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_sshd(self) -> None:
        """Kill this host's sshd listener by its pid: new connections are refused at once."""
        proc = self._sshd
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def start_sshd(self, deadline: float = 20.0) -> None:
        """Start sshd again in this host's namespaces and wait until it accepts logins."""
        self._spawn_sshd()
        self._wait_ready(time.monotonic() + deadline)

    def _spawn_sshd(self) -> None:
        if self.sshd_pid is not None:
            return
        if self._anchor is None or self._anchor.poll() is not None:
            raise HostStartError(f"{self.name}: its namespaces are gone (hosts stopped)")
        # nsenter execs sshd in place (no pid namespace), so the Popen pid is sshd's own pid.
        sshd = f"{SSHD} -D -f {HOST_STATE}/sshd_config -E {HOST_STATE}/sshd.log".split()
        nsenter = [_tool("nsenter"), f"--target={self._anchor.pid}", "--mount", "--net", "--uts"]
        self._sshd = _spawn([*nsenter, "--", *sshd], self.state_dir / "sshd.stderr")

    def _wait_ready(self, end: float) -> None:
        """Poll until a real ``ssh ... true`` succeeds; raise with the sshd log at ``end``."""
        last = ""
        while True:
            proc = self._sshd
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise HostStartError(f"{self.name}: sshd exited ({code})\n{self._diagnostics()}")
            if _port_open(self.address, 22):
                try:
                    ssh = [_tool("ssh"), "-F", str(self.ssh_config), "-o", "ConnectTimeout=2"]
                    probe = _capture([*ssh, self.name, "true"], timeout=5)
                    if probe.returncode == 0:
                        return
                    last = probe.stderr.strip()
                except subprocess.TimeoutExpired:
                    last = "ssh timed out"
            if time.monotonic() > end:
                raise HostStartError(
                    f"{self.name} ({self.address}) did not accept ssh in time; last error: "
                    f"{last or 'port 22 closed'}\n{self._diagnostics()}"
                )
            time.sleep(0.02)  # poll interval, not a synchronisation

    def _diagnostics(self) -> str:
        stderr = self.state_dir / "sshd.stderr"
        extra = stderr.read_text(errors="replace") if stderr.exists() else ""
        return f"--- sshd log ---\n{self.sshd_log()}{extra}"


def _port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class TestHosts:
    """A set of test hosts sharing one ``ssh_config``, ``known_hosts`` and client key."""

    __test__ = False  # not a pytest test class

    hosts: list[TestHost]
    ssh_config: Path
    known_hosts: Path
    client_key: Path
    prefix: str = ""
    _stopped: bool = field(default=False, repr=False, compare=False)

    def stop(self) -> None:
        """Kill every process in the hosts' network namespaces (by pid), delete netns and veths.

        Idempotent. Raises if a process survives, so a leak fails the test run loudly.
        """
        if self._stopped:
            return
        leftovers = _teardown([h.netns for h in self.hosts], [h.veth for h in self.hosts])
        for host in self.hosts:
            for proc in (host._sshd, host._anchor):
                if proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)  # reap our own children: no zombies left
        with contextlib.suppress(FileNotFoundError):
            (REGISTRY / f"{self.prefix}.json").unlink()
        self._stopped = True
        if leftovers:
            raise RuntimeError(f"processes survived stopping the test hosts: {leftovers}")


def ssh_available() -> str | None:
    """None if test hosts can be started here, else why not (tests skip with it)."""
    if not sys.platform.startswith("linux"):
        return "test hosts need Linux namespaces"
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces, sshd)"
    if not os.access(SSHD, os.X_OK):
        return f"OpenSSH server not installed ({SSHD})"
    if not os.access(HOST_PYTHON, os.X_OK):
        return f"hosts need Debian's {HOST_PYTHON}"
    for name in _TOOLS:
        if shutil.which(name) is None and shutil.which(name, path=_SYS_PATH) is None:
            return f"{name} not found"
    probe = _run("unshare", "--mount", "--net", "--uts", "true", check=False)
    if probe.returncode != 0:
        return f"cannot create namespaces: {probe.stderr.strip()}"
    return None


def start_hosts(n: int, workdir: Path, *, deadline: float = 20.0) -> TestHosts:
    """Start ``n`` hosts ``shl-h1..n`` with their files under ``workdir``; wait until each
    accepts a real ``ssh ... true`` (or raise with its sshd log after ``deadline`` seconds)."""
    if not 1 <= n <= 254:
        raise ValueError("n must be 1..254")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    client_key = workdir / "client"
    _keygen(client_key, "shl-client")
    known_hosts, ssh_config = workdir / "known_hosts", workdir / "ssh_config"
    for path in ("/run/sshd", HOST_STATE, "/srv"):
        os.makedirs(path, exist_ok=True)

    with _registry_lock():
        _reap_stale()
        prefix, subnet = _allocate(n)
        hosts = [
            _prepare_host(workdir, i, prefix, subnet, client_key, ssh_config)
            for i in range(1, n + 1)
        ]
        known_hosts.write_text(
            "".join(f"{h.address} {_pubkey(h.state_dir / 'hostkey.pub')}\n" for h in hosts)
        )
        ssh_config.write_text("".join(_ssh_entry(h, client_key, known_hosts) for h in hosts))
        testhosts = TestHosts(hosts, ssh_config, known_hosts, client_key, prefix)
        owner = {"owner_pid": os.getpid(), "owner_start": _start_time(os.getpid())}
        names = {"netns": [h.netns for h in hosts], "veths": [h.veth for h in hosts]}
        (REGISTRY / f"{prefix}.json").write_text(json.dumps({**owner, **names}))
        try:
            for index, host in enumerate(hosts, start=1):
                _create_netns(host, subnet, index)
        except BaseException:
            testhosts.stop()
            raise
    try:
        for host in hosts:
            _start_anchor(host)
            host._spawn_sshd()
        end = time.monotonic() + deadline
        for host in hosts:
            host._wait_ready(end)
    except BaseException:
        with contextlib.suppress(Exception):
            testhosts.stop()
        raise
    return testhosts


def _prepare_host(
    workdir: Path, i: int, prefix: str, subnet: int, client_key: Path, ssh_config: Path
) -> TestHost:
    state = workdir / f"h{i}"
    for sub, mode in (("srv", 0o755), ("tmp", 0o1777), ("home", 0o700)):
        (state / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(state / sub, mode)
    for sub in ("bin", "sbin", "lib", "share", "include", "etc", "src"):
        (state / "usr-local" / sub).mkdir(parents=True, exist_ok=True)
    _keygen(state / "hostkey", f"shl-h{i}")
    shutil.copyfile(f"{client_key}.pub", state / "authorized_keys")
    (state / "sshd_config").write_text(_SSHD_CONFIG)
    for stale in ("sshd.log", "sshd.stderr", "sshd.pid"):
        with contextlib.suppress(FileNotFoundError):
            (state / stale).unlink()
    return TestHost(
        name=f"shl-h{i}",
        address=f"10.{subnet}.{i}.2",
        root=state / "srv",
        home=state / "home",
        tmp=state / "tmp",
        ssh_config=ssh_config,
        netns=f"shl-{prefix}h{i}",
        veth=f"{prefix}h{i}",
        state_dir=state,
    )


def _ssh_entry(host: TestHost, client_key: Path, known_hosts: Path) -> str:
    return (
        f"Host {host.name}\n  HostName {host.address}\n  User root\n"
        f"  IdentityFile {client_key}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 10\n\n"
    )


def _pubkey(path: Path) -> str:
    return " ".join(path.read_text().split()[:2])


def _create_netns(host: TestHost, subnet: int, host_index: int) -> None:
    ns, veth, net = host.netns, host.veth, f"10.{subnet}.{host_index}"
    _run("ip", "netns", "add", ns)
    _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    _run("ip", "addr", "add", f"{net}.1/30", "dev", veth)
    _run("ip", "link", "set", veth, "up")
    # Forward between this set's veths only (not the global ip_forward), so hosts reach each
    # other by address; the setting disappears with the veth.
    Path(f"/proc/sys/net/ipv4/conf/{veth}/forwarding").write_text("1\n")
    _run("ip", "-n", ns, "addr", "add", f"{net}.2/30", "dev", "eth0")
    _run("ip", "-n", ns, "link", "set", "eth0", "up")
    _run("ip", "-n", ns, "link", "set", "lo", "up")
    _run("ip", "-n", ns, "route", "add", f"10.{subnet}.0.0/16", "via", f"{net}.1")


def _start_anchor(host: TestHost) -> None:
    # `ip netns exec` and `unshare` exec in place: the Popen pid ends up being `sleep`'s.
    enter = [_tool("ip"), "netns", "exec", host.netns, _tool("unshare"), "--mount", "--uts"]
    script = ["/bin/sh", "-c", _ANCHOR_SCRIPT, "sh", str(host.state_dir), host.name]
    log = host.state_dir / "anchor.log"
    anchor = _spawn([*enter, "--propagation=private", "--", *script], log, subprocess.PIPE)
    host._anchor = anchor
    assert anchor.stdout is not None
    ready = anchor.stdout.readline()  # mounts are quick; EOF if the script failed
    anchor.stdout.close()
    if ready.strip() != b"ready":
        anchor.wait(timeout=10)
        detail = log.read_text(errors="replace")
        raise HostStartError(f"{host.name}: namespace setup failed:\n{detail}")


# --- allocation, registry and teardown -----------------------------------------------------


@contextlib.contextmanager
def _registry_lock() -> Iterator[None]:
    REGISTRY.mkdir(parents=True, exist_ok=True)
    with open(REGISTRY / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _allocate(n: int) -> tuple[str, int]:
    """A name prefix and a 10.<B>.0.0/16 subnet no other session or interface uses."""
    netns = set(_run("ip", "netns", "list").stdout.split())
    base = f"s{os.getpid() % 10000}"
    for letter in "abcdefghijklmnopqrstuvwxyz":
        prefix = base + letter
        taken = (REGISTRY / f"{prefix}.json").exists() or any(
            f"shl-{prefix}h{i}" in netns or Path(f"/sys/class/net/{prefix}h{i}").exists()
            for i in range(1, n + 1)
        )
        if not taken:
            break
    else:
        raise HostStartError(f"no free name prefix for {base}")
    used = _used_networks()
    for subnet in _SUBNETS:
        candidate = ipaddress.ip_network(f"10.{subnet}.0.0/16")
        if not any(candidate.overlaps(net) for net in used):
            return prefix, subnet
    raise HostStartError("no free 10.x.0.0/16 subnet for test hosts")


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for entry in json.loads(_run("ip", "-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = entry.get("dst", "default")
        if dst != "default":
            nets.append(ipaddress.ip_network(dst, strict=False))
    for link in json.loads(_run("ip", "-j", "-4", "addr").stdout or "[]"):
        for addr in link.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    return [net for net in nets if isinstance(net, ipaddress.IPv4Network)]


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` (field 22 of /proc/pid/stat), to tell pid reuse apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _reap_stale() -> None:
    """Remove host sets whose owning test session is dead (crashed or killed)."""
    for entry in REGISTRY.glob("*.json"):
        try:
            info = json.loads(entry.read_text())
        except (OSError, ValueError):
            continue
        start = _start_time(info["owner_pid"])
        if start is not None and start == info["owner_start"]:
            continue
        _teardown(info["netns"], info["veths"])
        entry.unlink(missing_ok=True)


def _netns_pids(ns: str) -> list[int] | None:
    listed = _run("ip", "netns", "pids", ns, check=False)
    if listed.returncode != 0:
        return None  # no such netns
    return [int(p) for p in listed.stdout.split()]


def _teardown(netns: list[str], veths: list[str], deadline: float = 10.0) -> list[int]:
    """SIGKILL every process in ``netns`` until none is left, then delete veths and netns.

    Returns the pids that survived (normally none).
    """
    end = time.monotonic() + deadline
    survivors: list[int] = []
    for ns in netns:
        while True:
            pids = [p for p in (_netns_pids(ns) or []) if p not in (1, os.getpid())]
            if not pids:
                break
            if time.monotonic() > end:
                survivors += pids
                break
            for pid in pids:  # repeat: a supervisor may fork again before it dies
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)  # poll interval
    for veth in veths:
        if Path(f"/sys/class/net/{veth}").exists():
            _run("ip", "link", "del", veth, check=False)
    for ns in netns:
        _run("ip", "netns", "del", ns, check=False)
    return survivors
