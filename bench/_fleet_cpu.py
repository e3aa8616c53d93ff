"""The fleet bench's CPU probes: the whole machine, the controller, and the test hosts' processes.

The test hosts are network namespaces on this machine, so a host's processes are the ones whose
``/proc/<pid>/ns/net`` is one of the hosts' namespaces.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

from sshhosts import TestHosts


def busy_jiffies() -> int:
    """CPU time (clock ticks) every core of the machine spent busy, since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle


def children_cpu() -> float:
    """CPU seconds of this process's reaped children (``shiplane`` and its ``ssh`` clients)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_cpu() -> float:
    """CPU seconds every process of the machine has spent since boot (``/proc/stat``'s busy
    time): the test hosts share the controller's cores, so this holds both sides' work."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is in user already


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def hosts_cpu(testhosts: TestHosts) -> float:
    """CPU seconds used so far by every process in the hosts' network namespaces, with the
    children each has reaped (sshd reaps its sessions and the agents, supervisord its programs).

    The difference of two readings is what the hosts did in between, short of processes that
    died orphaned in between (reaped outside the hosts): an underestimate, never more.
    """
    ticks = 0
    for pid in _host_pids(_netns_inodes(testhosts)):
        fields = _stat(pid)
        if fields:
            ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _netns_inodes(testhosts: TestHosts) -> set[str]:
    inodes = set()
    for host in testhosts.hosts:
        try:
            inodes.add(f"net:[{os.stat(f'/run/netns/{host.netns}').st_ino}]")
        except OSError:
            continue
    return inodes


def _host_pids(inodes: set[str]) -> list[int]:
    """The processes in the hosts' network namespaces."""
    out = []
    for pid in _pids():
        try:
            if os.readlink(f"/proc/{pid}/ns/net") in inodes:
                out.append(pid)
        except OSError:
            continue
    return out


# What runs on a host, by its command line (the first match wins); unmatched processes count
# as their parent's (compileall's workers, a hook's shell).
PROGRAMS = [
    (b"gunicorn", "gunicorn (the app's server)"),
    # a release's server started early, or the spare for the next deploy (preboot.py)
    (b"preboot.py", "gunicorn (the app's server)"),
    (b"alembic", "alembic (the hooks)"),
    # an agent session: its bootstrap (agent_bundle.BOOTSTRAP) names compileall too
    (b'run_module("shiplane_agent"', "the agent"),
    (b"compileall", "byte-compiling (compileall)"),
    (b"/uv", "uv"),
    (b"pip", "pip"),
    (b"venv", "python -m venv"),
    (b"supervisord", "supervisord"),
    (b"proxy", "the front proxy"),
    (b"shiplane", "the agent"),
    (b"sshd", "sshd"),
]


class ProgramSampler(threading.Thread):
    """CPU seconds the hosts' processes used, summed by program; polls every 0.05 s, so the
    last moments of each process and processes shorter than that are missed (an underestimate)."""

    def __init__(self, testhosts: TestHosts) -> None:
        super().__init__(daemon=True)
        self.inodes = _netns_inodes(testhosts)
        self.base = {pid: self._cpu(pid) for pid in _host_pids(self.inodes)}
        self.last: dict[int, tuple[str, float]] = {}
        self.done = threading.Event()

    @staticmethod
    def _cpu(pid: int) -> float:
        fields = _stat(pid)
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0

    def run(self) -> None:
        while not self.done.wait(0.05):
            scan: dict[int, tuple[str | None, int, float]] = {}
            for pid in _host_pids(self.inodes):
                fields = _stat(pid)
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if fields:
                    name = next((n for mark, n in PROGRAMS if mark in argv), None)
                    scan[pid] = (
                        name,
                        int(fields[1]),
                        (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"),
                    )
            for pid, (name, ppid, cpu) in scan.items():
                parent = ppid
                while name is None and parent in scan:
                    name, parent = scan[parent][0], scan[parent][1]
                self.last[pid] = (name or "other", cpu - self.base.get(pid, 0.0))

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join(timeout=5)
        out: dict[str, float] = {}
        for name, cpu in self.last.values():
            out[name] = out.get(name, 0.0) + cpu
        return out


def _ours(pid: int) -> bool:
    """True when ``pid`` descends from this process (its CPU reaches RUSAGE_CHILDREN): a tool's
    ssh client, not a control master forked into the background."""
    me = os.getpid()
    for _ in range(64):  # bounded walk up the tree
        fields = _stat(pid)
        pid = int(fields[1]) if fields else 0
        if pid == me:
            return True
        if pid <= 1:
            return False
    return False


class MasterWatch(threading.Thread):
    """Polls the CPU time of the ssh control masters naming ``ssh_config`` (``ControlPersist``
    puts them in the background, out of the tool's process tree and so out of
    ``RUSAGE_CHILDREN``; shiplane's and Ansible's): what they used from the watch's start to its
    stop (a master already open at the start counts from its CPU then)."""

    def __init__(self, ssh_config: Path) -> None:
        super().__init__(daemon=True)
        self.mark = str(ssh_config).encode()
        self.before = self._masters()
        self.seen: dict[int, float] = {}
        self.done = threading.Event()

    def _masters(self) -> dict[int, float]:
        """pid -> CPU seconds of each master forked into the background."""
        found = {}
        for pid in _pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not (argv[0].endswith(b"ssh") and self.mark in argv):
                continue
            if b"ControlMaster=auto" in argv or b"-N" in argv:  # a session's, a pre-warmed one
                fields = _stat(pid)
                if fields and not _ours(pid):  # forked into the background
                    found[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return found

    def run(self) -> None:
        while not self.done.wait(0.2):  # poll interval; the stop polls once more
            self.seen.update(self._masters())

    def stop(self) -> float:
        self.done.set()
        self.join(timeout=5)
        self.seen.update(self._masters())
        return sum(cpu - self.before.get(pid, 0.0) for pid, cpu in self.seen.items())
