"""Benchmark a deploy to a fleet of real OpenSSH hosts: how it scales from 1 to 4 to 8 hosts.

    python bench/bench_fleet.py [--runs N] [--out BENCHMARKS.md] [--raw results.json]
                                [--sizes 1,4,8] [--pip-runs 1] [--wait-idle S] [--no-profile]
                                [--keep]

Needs root (the hosts of ``tests/sshhosts.py``: one ``sshd`` per network namespace, its own
``/srv``). A scaffolded app (``shiplane init``, git commit) gets one stage per fleet size,
``fleetN`` = hosts ``shl-h1..N``, each with its own ``deploy_to`` (``/srv/bench-N``) and port, its
own secrets file, and ``after_install = ["alembic upgrade head"]`` (each host has its own sqlite).

Each round, for each size, back to back: the stage's deploy root is removed on its hosts (after
``shiplane stop --all``), so the hosts have nothing: no agent, store, venv, shipped uv or uv
cache; then (1) cold deploy of a new commit, (2) warm redeploy of a one-line code change (checked:
no venv built, every host serves the edit). In the first ``--pip-runs`` rounds, each size once
more cold with ``SHIPLANE_SHIP_UV=0`` (the hosts install with pip instead of the controller's uv). Every
timed deploy deploys a new commit, so each includes the build of the app's wheel (the
wheelhouse comes from the build cache, which one untimed build fills first). Last, unless
``--no-profile``, one untimed cold and warm deploy at the smallest and largest size sample the
hosts' CPU by program (gunicorn, alembic, compileall, uv, the agent, sshd, ...).

Per deploy it records the wall clock, ``result.hosts.<h>.phases`` and ``.bytes`` from
``deploy --json``, and the CPU time the whole machine and the controller (``shiplane`` and its
``ssh`` clients) used: the test hosts share this machine's cores, which matters when reading how
a figure grows with the host count. Everything started is stopped on the way out, on failure too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

from _benchlib import BenchError, Series, Timed, http_get, json_lines, result_of, run
from _scenarios import EDITED_FILE, EDITED_TEXT, GIT, DeployRun
from bench_local import load, machine, wait_idle

from sshhosts import TestHost, TestHosts, ssh_available, start_hosts

HEADING = "## Fleet over SSH"
SIZES = (1, 4, 8)
PORT_BASE = 8100  # stage fleetN serves on 8100 + N on each of its hosts
RATIO_TARGET = 1.5
BYTES_TARGET = 1.2
HOST_PHASES = ["connect", "lock", "copy", "install", "release", "switch", "after_deploy",
               "finalize", "prune", "unlock"]


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so the `finally` blocks stop everything


def _busy_jiffies() -> int:
    """CPU time (clock ticks) every core of the machine spent busy, since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
PROGRAMS = [(b"gunicorn", "gunicorn (the app's server)"), (b"alembic", "alembic (the hooks)"),
            (b"compileall", "byte-compiling (compileall)"), (b"/uv", "uv"), (b"pip", "pip"),
            (b"venv", "python -m venv"), (b"supervisord", "supervisord"),
            (b"proxy", "the front proxy"), (b"shiplane", "the agent"), (b"sshd", "sshd")]


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
                    scan[pid] = (name, int(fields[1]), (int(fields[11]) + int(fields[12]))
                                 / os.sysconf("SC_CLK_TCK"))
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


def _is_shiplane(pid: int) -> bool:
    try:
        return b"shiplane" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class MasterWatch(threading.Thread):
    """Polls the CPU time of the ssh control masters (``ControlPersist`` puts them in the
    background, out of ``shiplane``'s process tree and so out of ``RUSAGE_CHILDREN``)."""

    def __init__(self, ssh_config: Path) -> None:
        super().__init__(daemon=True)
        self.mark = str(ssh_config).encode()
        self.seen: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):  # poll interval; what a master used in its last 0.2 s is missed
            for pid in _pids():
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if argv[0].endswith(b"ssh") and self.mark in argv and b"ControlMaster=auto" in argv:
                    fields = _stat(pid)
                    # a master forked into the background (the clients are shiplane's children)
                    if fields and not _is_shiplane(int(fields[1])):
                        self.seen[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> float:
        self.done.set()
        self.join(timeout=5)
        return sum(self.seen.values())


@dataclass
class Measured:
    """One timed deploy: the run, its CPU seconds (machine, controller), the wheel's size."""

    run: DeployRun
    hosts: list[str]
    cpu_machine: float
    cpu_controller: float
    cpu_hosts: float
    wheel: int
    programs: dict[str, float] = field(default_factory=dict)

    def phase_max(self) -> dict[str, float]:
        """Each host phase's longest host: phases end at a barrier, so that one sets the pace."""
        out: dict[str, float] = {}
        for host in self.hosts:
            for phase, secs in self.run.host_phases(host).items():
                out[phase] = max(out.get(phase, 0.0), secs)
        return out

    def per_host_bytes(self) -> list[int]:
        return [self.run.bytes_sent(h) for h in self.hosts]

    def as_dict(self) -> dict[str, Any]:
        return {"wall": self.run.wall, "cpu_machine": self.cpu_machine,
                "cpu_controller": self.cpu_controller, "cpu_hosts": self.cpu_hosts, "wheel": self.wheel,
                "controller": self.run.controller_phases(),
                "hosts": {h: {"bytes": self.run.bytes_sent(h), "phases": self.run.host_phases(h)}
                          for h in self.hosts}}


@dataclass
class Fleet:
    """The scaffolded app and its stages ``fleetN`` on the test hosts."""

    root: Path
    testhosts: TestHosts
    sizes: tuple[int, ...]
    edits: int = 0
    deployed: set[str] = field(default_factory=set)

    @classmethod
    def scaffold(cls, parent: Path, testhosts: TestHosts, sizes: tuple[int, ...]) -> Fleet:
        run([sys.executable, "-m", "shiplane", "init", "demo"], parent)
        root = parent / "demo"
        toml = root / "shiplane.toml"
        text = toml.read_text()
        # each host has its own sqlite database: migrate on every host, not only on the primary
        text = text.replace('release = "alembic upgrade head"',
                            'release = "alembic upgrade head"\nafter_install = ["alembic upgrade head"]')
        stages = "".join(
            f'[stages.fleet{n}]\nhosts = [{", ".join(repr(f"shl-h{i}") for i in range(1, n + 1))}]\n'
            f'deploy_to = "/srv/bench-{n}"\nport = {PORT_BASE + n}\nbind = "0.0.0.0"\n'
            f'ssh_config = "{testhosts.ssh_config}"\n\n' for n in sizes).replace("'", '"')
        toml.write_text(text[:text.index("[stages.staging]")] + stages)
        for n in sizes:
            secrets = root / ".secrets" / f"fleet{n}.env"
            secrets.write_text("SECRET_KEY=bench-fleet-secret-value\n")
            os.chmod(secrets, 0o600)
        run([*GIT, "init", "-q"], root)
        run([*GIT, "add", "-A"], root)
        run([*GIT, "commit", "-qm", "scaffold, stages on the test hosts"], root)
        return cls(root, testhosts, sizes)

    def hosts(self, n: int) -> list[TestHost]:
        return self.testhosts.hosts[:n]

    def shiplane(self, *args: str, env: dict[str, str] | None = None, timeout: float = 600.0,
                 check: bool = True) -> Timed:
        return run([sys.executable, "-m", "shiplane", *args], self.root,
                   env={**os.environ, "NO_COLOR": "1", **(env or {})}, timeout=timeout, check=check)

    def commit_edit(self) -> str:
        """A one-line change of a template string, committed; returns the marker it shows."""
        self.edits += 1
        marker = f"bench edit {self.edits}"
        path = self.root / EDITED_FILE
        text = path.read_text(encoding="utf-8")
        line = next(ln for ln in text.splitlines() if EDITED_TEXT in ln)
        new = f'        "<footer>demo, {EDITED_TEXT} ({marker})</footer>\\n"'
        path.write_text(text.replace(line, new), encoding="utf-8")
        run([*GIT, "commit", "-qam", marker], self.root)
        return marker

    def deploy(self, n: int, env: dict[str, str] | None = None, by_program: bool = False) -> Measured:
        """``deploy --stage fleetN --json``, timed; ``by_program`` also samples the hosts' CPU
        by program (the sampler's own polling costs some CPU: not for the timed rounds)."""
        stage = f"fleet{n}"
        self.deployed.add(stage)
        watch = MasterWatch(self.testhosts.ssh_config)
        sampler = ProgramSampler(self.testhosts) if by_program else None
        for thread in (watch, sampler):
            if thread is not None:
                thread.start()
        busy0, ctl0, hosts0 = _busy_jiffies(), _children_cpu(), hosts_cpu(self.testhosts)
        done = self.shiplane("deploy", "--stage", stage, "--skip-tests", "--json", env=env, check=False)
        busy = (_busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")
        ctl = _children_cpu() - ctl0 + watch.stop()
        programs = sampler.stop() if sampler is not None else {}
        on_hosts = hosts_cpu(self.testhosts) - hosts0
        events = json_lines(done.stdout)
        try:
            result = result_of(events)
        except BenchError:
            result = {}
        if done.returncode != 0 or not result.get("ok"):
            raise BenchError(f"deploy --stage {stage} exited {done.returncode}: "
                             f"{result.get('error')}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        manifest = json.loads((self.root / ".shiplane/build/artifacts" /
                               f"{result['artifact']}.json").read_text())
        wheel = next(int(f["size"]) for f in manifest["app_files"] if f["kind"] == "wheel")
        names = [h.name for h in self.hosts(n)]
        return Measured(DeployRun(done.seconds, result, events, done.started_at), names, busy, ctl,
                        on_hosts, wheel, programs)

    def check_serves(self, n: int, marker: str) -> None:
        """Every host of the stage serves the page with ``marker`` on its public port."""
        for host in self.hosts(n):
            status, body = http_get(host.url(PORT_BASE + n, "/"), timeout=5.0)
            if status != 200 or marker not in body:
                raise BenchError(f"{host.name} answers {status} without {marker!r} after the deploy")

    def stop(self, n: int) -> None:
        stage = f"fleet{n}"
        if stage in self.deployed:
            self.shiplane("stop", "--all", "--stage", stage, timeout=180)
            self.deployed.discard(stage)

    def wipe(self, n: int) -> None:
        """Stop the stage, then remove its deploy root on every host: the next deploy is cold."""
        self.stop(n)
        for host in self.hosts(n):
            if (host.root / f"bench-{n}").exists():
                shutil.rmtree(host.root / f"bench-{n}")

    def venvs(self, n: int) -> dict[str, list[str]]:
        return {h.name: sorted(p.name for p in (h.root / f"bench-{n}" / "venvs").glob("*"))
                for h in self.hosts(n)}

    def stop_all(self) -> None:
        """Stop every stage this bench deployed (each tried, the first error raised after)."""
        errors = []
        for n in self.sizes:
            try:
                self.stop(n)
            except BenchError as exc:
                errors.append(str(exc))
        if errors:
            raise BenchError("; ".join(errors))


def new_results(sizes: tuple[int, ...]) -> dict[str, Any]:
    return {"sizes": list(sizes), "load": [],
            "cold": {n: [] for n in sizes}, "warm": {n: [] for n in sizes},
            "cold_pip": {n: [] for n in sizes}, "profile": {}}


def one_round(fleet: Fleet, res: dict[str, Any], pip: bool) -> None:
    """Each size cold then warm, back to back (a drift in the machine's load hits all alike)."""
    for n in fleet.sizes:
        res["load"].append(load())
        fleet.wipe(n)
        marker = fleet.commit_edit()
        cold = fleet.deploy(n)
        fleet.check_serves(n, marker)
        res["cold"][n].append(cold)
        _say(f"  {n} host(s): cold {cold.run.wall:.2f}s")
        before = fleet.venvs(n)
        marker = fleet.commit_edit()
        warm = fleet.deploy(n)
        fleet.check_serves(n, marker)
        if warm.run.venv_builds() or fleet.venvs(n) != before:
            raise BenchError(f"the code-only redeploy to {n} host(s) built a venv")
        res["warm"][n].append(warm)
        _say(f"  {n} host(s): warm {warm.run.wall:.2f}s, sent {warm.per_host_bytes()} bytes "
             f"(wheel {warm.wheel})")
        fleet.stop(n)
    if pip:
        for n in fleet.sizes:
            fleet.wipe(n)
            marker = fleet.commit_edit()
            cold = fleet.deploy(n, env={"SHIPLANE_SHIP_UV": "0"})
            fleet.check_serves(n, marker)
            res["cold_pip"][n].append(cold)
            _say(f"  {n} host(s): cold without shipping uv {cold.run.wall:.2f}s")
            fleet.stop(n)


def profile_pass(fleet: Fleet, res: dict[str, Any]) -> None:
    """Untimed: a cold deploy and a warm redeploy at the smallest and largest size, with the
    hosts' CPU sampled by program."""
    for n in (fleet.sizes[0], fleet.sizes[-1]):
        fleet.wipe(n)
        for kind in ("cold", "warm"):
            marker = fleet.commit_edit()
            res["profile"][(kind, n)] = fleet.deploy(n, by_program=True)
            fleet.check_serves(n, marker)
        fleet.stop(n)


# --- the report ----------------------------------------------------------------------------------

def _series(runs: list[Measured], value: Any) -> Series:
    s = Series("")
    for m in runs:
        s.add(float(value(m)))
    return s


def _med(runs: list[Measured], value: Any) -> float:
    return _series(runs, value).median


def _fmt(s: Series) -> str:
    if not s.values:
        return "–"
    return f"{s.median:.2f} s ({s.low:.2f}–{s.high:.2f})"


def _kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def render(res: dict[str, Any]) -> str:
    """The ``## Fleet over SSH`` section (Markdown)."""
    sizes: list[int] = res["sizes"]
    lo, hi = sizes[0], sizes[-1]
    m = res["machine"]
    lines = [HEADING, "",
             (f"A deploy to 1, 4 and 8 real OpenSSH hosts (`tests/sshhosts.py`: one `sshd` per "
             "network namespace, its own `/srv`, `/root` and `/tmp`, Debian's `/usr/bin/python3`) "
             f"of the scaffolded app. Wall-clock medians (min–max) of {res['runs']} round(s); each "
             "round runs every fleet size once, back to back."), "",
             (f"- **Machine:** {m['cores']} cores ({m['cpu']}), {m['os']}; Python {m['python']}, "
             f"{m['uv']}, shiplane {m['shiplane']}"),
             (f"- **Date:** {m['date']}; 1-minute load average during the rounds "
             f"{min(res['load']):.1f}–{max(res['load']):.1f}"),
             (f"- **Reproduce** (as root, from the repository root, about "
             f"{res['bench_seconds'] / 60:.0f} min): `{res['command']}`"),
             ("- **Caveat:** the test hosts are namespaces on this same machine: every host's "
             "work (venv install, byte-compiling, alembic, gunicorn boot) runs on the controller's "
             f"{m['cores']} cores. Real servers each bring their own CPU, so the CPU rows below "
             "say how much of the growth with the host count is this machine being saturated."), "",
             "| scenario | " + " | ".join(f"{n} host{'s' if n > 1 else ''}" for n in sizes)
             + f" | {hi} / {lo} |", "|---|" + "---|" * (len(sizes) + 1)]

    def row(label: str, key: str, value: Any = lambda r: r.run.wall, unit: str = "s") -> None:
        cells = []
        meds = {}
        for n in sizes:
            s = _series(res[key][n], value)
            meds[n] = s.median
            cells.append(_fmt(s) if unit == "s" else (f"{s.median:.1f}" if s.values else "–"))
        ratio = meds[hi] / meds[lo] if res[key][lo] and res[key][hi] else float("nan")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f}× |")

    cpu = [("hosts (all their processes)", lambda r: r.cpu_hosts),
           ("controller (`shiplane` + `ssh`)", lambda r: r.cpu_controller),
           ("whole machine (anything else running included)", lambda r: r.cpu_machine)]
    for key, label in (("cold", "(1) cold deploy (ships uv to each host)"),
                       ("cold_pip", "(1′) cold deploy, `SHIPLANE_SHIP_UV=0` (hosts install with pip)"),
                       ("warm", "(2) warm redeploy of a one-line change")):
        if not any(res[key][n] for n in sizes):
            continue
        row(label, key)
        for what, value in cpu:
            row(f"… CPU seconds used by the {what}", key, value, "cpu")
    lines += ["", *_targets(res), "", *_reading(res), "", *_programs(res), "", *_bytes(res), "", *_phases(res, "warm", "a warm redeploy"),
              "", *_phases(res, "cold", "a cold deploy"), "", *_method(res)]
    return "\n".join(lines) + "\n"


def _targets(res: dict[str, Any]) -> list[str]:
    sizes = res["sizes"]
    lo, hi = sizes[0], sizes[-1]
    out = ["### Targets", "", "| figure | measured (medians) | target | met |", "|---|---|---|---|"]
    for key, label in (("cold", "cold deploy"), ("cold_pip", "cold deploy without shipping uv"),
                       ("warm", "warm redeploy")):
        if not (res[key][lo] and res[key][hi]):
            continue
        ratio = _med(res[key][hi], lambda r: r.run.wall) / _med(res[key][lo], lambda r: r.run.wall)
        ok = ratio <= RATIO_TARGET
        out.append(f"| {label}, {hi} hosts / {lo} host | {ratio:.2f}× | ≤ {RATIO_TARGET}× | "
                   f"{'yes' if ok else '**no**'} |")
    worst = max((b / r.wheel for n in sizes for r in res["warm"][n] for b in r.per_host_bytes()),
                default=float("nan"))
    out.append(f"| bytes sent per host on a code-only redeploy / the app's wheel (worst host, "
               f"worst run) | {worst:.2f}× | ≤ {BYTES_TARGET}× | "
               f"{'yes' if worst <= BYTES_TARGET else '**no**'} |")
    return out


def _reading(res: dict[str, Any]) -> list[str]:
    """What grows with the host count, from the figures: CPU per host against the cores."""
    sizes, cores = res["sizes"], res["machine"]["cores"]
    lo, hi = sizes[0], sizes[-1]
    out = ["### What grows with the host count", ""]
    for key, what in (("cold", "cold deploy"), ("warm", "warm redeploy")):
        if not (res[key][lo] and res[key][hi]):
            continue
        per_host = {n: _med(res[key][n], lambda r, n=n: r.cpu_hosts / n) for n in (lo, hi)}
        wall = _med(res[key][hi], lambda r: r.run.wall)
        used = _med(res[key][hi], lambda r: r.cpu_hosts + r.cpu_controller)
        machine = _med(res[key][hi], lambda r: r.cpu_machine)
        ctl = {n: _med(res[key][n], lambda r: r.cpu_controller) for n in (lo, hi)}
        grew = sorted(((_med(res[key][hi], lambda r, p=p: r.phase_max().get(p, 0.0))
                        - _med(res[key][lo], lambda r, p=p: r.phase_max().get(p, 0.0)), p)
                       for p in HOST_PHASES), reverse=True)[:3]
        lo_wall = _med(res[key][lo], lambda r: r.run.wall)
        same = per_host[hi] <= 1.25 * per_host[lo]
        out.append(
            f"- **{what}:** each host's own work costs "
            + ("about the same CPU at any fleet size" if same else "more CPU in a bigger fleet")
            + f" ({per_host[lo]:.1f} CPU-s per host with {lo}, {per_host[hi]:.1f} with {hi}), so "
            f"the {hi} hosts' work alone needs at least {per_host[hi] * hi / cores:.1f} s of wall "
            f"clock on {cores} cores ({per_host[hi] * hi / cores / lo_wall:.1f}× the {lo}-host "
            f"deploy). With {hi} hosts the hosts and the controller used {used:.1f} CPU-s in "
            f"{wall:.1f} s, {used / (cores * wall):.0%} of the cores (the whole machine, other "
            f"work included: {machine / (cores * wall):.0%}). The controller's own CPU: "
            f"{ctl[lo]:.1f} → {ctl[hi]:.1f} CPU-s. The phases that grew most: "
            + ", ".join(f"{p} ({d:+.2f} s)" for d, p in grew) + ".")
    out += ["",
            ("- `install`: on each host, the venv (uv from the host's wheelhouse, or pip), the "
            "release unpacked, byte-compiled, its config rendered, and the `after_install` "
            "hook (`alembic upgrade head`: a Python start + SQLAlchemy import); "
            "`switch`: the new gunicorn (a master + 2 workers importing Flask and SQLAlchemy) "
            "started under supervisord, health and smoke checks, the 1 s drain, the old one "
            "stopped; `copy`: the missing blobs streamed through ssh, hashed and written by the "
            "agent; `connect`: ssh login, the agent's bootstrap and start (a Python process)."),
            ("- Each of these is work every host does for itself, and here all hosts share the "
            "controller's cores, so their sum is what the wall clock follows. On servers with "
            "their own CPUs that work runs side by side; what the controller itself adds per host "
            "is its CPU row above.")]
    return out


def _programs(res: dict[str, Any]) -> list[str]:
    """The hosts' CPU by program, per host, from the untimed profiled pass."""
    prof: dict[tuple[str, int], Measured] = res["profile"]
    if not prof:
        return []
    cols = sorted(prof, key=lambda k: (k[0] != "cold", k[1]))
    names = sorted({p for m in prof.values() for p in m.programs},
                   key=lambda p: -sum(m.programs.get(p, 0.0) / len(m.hosts) for m in prof.values()))
    out = ["### The hosts' CPU by program", "",
           ("CPU seconds **per host** (the hosts' total divided by their number), sampled every "
           "0.05 s by command line in one extra, untimed cold deploy and warm redeploy per size "
           "(a process's last 0.05 s is missed, so the rows add up to a little less than the "
           "hosts' total; sshd and the agent include the transfer; alembic runs as `after_install` on "
           "every host and as the release hook once more on the primary)."), "",
           "| program | " + " | ".join(f"{'cold deploy' if k == 'cold' else 'warm redeploy'}, "
                                      f"{n} host{'s' if n > 1 else ''}" for k, n in cols)
           + " |", "|---|" + "---|" * len(cols)]
    for name in names:
        if all(prof[c].programs.get(name, 0.0) < 0.005 * len(prof[c].hosts) for c in cols):
            continue
        out.append(f"| {name} | " + " | ".join(
            f"{prof[c].programs.get(name, 0.0) / len(prof[c].hosts):.2f}" for c in cols) + " |")
    out.append("| **the hosts' total (per host)** | " + " | ".join(
        f"{prof[c].cpu_hosts / len(prof[c].hosts):.2f}" for c in cols) + " |")
    out.append("| wall clock of that deploy | " + " | ".join(
        f"{prof[c].run.wall:.2f} s" for c in cols) + " |")
    return out


def _bytes(res: dict[str, Any]) -> list[str]:
    sizes = res["sizes"]
    out = ["### Bytes sent per host", "",
           ("`result.hosts.<h>.bytes` of `deploy --json` (what the controller streamed to the host: "
           "missing blobs, plus the uv binary where shipped), median over hosts and runs."), "",
           "| deploy | " + " | ".join(f"{n} host{'s' if n > 1 else ''}" for n in sizes) + " |",
           "|---|" + "---|" * len(sizes)]
    for key, label in (("cold", "cold (uv shipped)"), ("cold_pip", "cold, `SHIPLANE_SHIP_UV=0`"),
                       ("warm", "warm, code-only")):
        cells = []
        for n in sizes:
            per = [b for r in res[key][n] for b in r.per_host_bytes()]
            cells.append(_kib(statistics.median(per)) if per else "–")
        if any(c != "–" for c in cells):
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    wheels = sorted({r.wheel for n in sizes for r in res["warm"][n]})
    out += ["", "The app's wheel (`app_files`, kind `wheel`, of the artifact's manifest): "
            + ", ".join(f"{w} bytes" for w in wheels) + "."]
    return out


def _phases(res: dict[str, Any], key: str, what: str) -> list[str]:
    sizes = res["sizes"]
    runs = res[key]
    names = [p for p in HOST_PHASES if any(p in r.phase_max() for n in sizes for r in runs[n])]
    out = [f"### Where {what} spends its time, by host count", "",
           ("Each host phase's slowest host (`result.hosts.<h>.phases`; the hosts run a phase in "
           "parallel and the next phase starts when all are done), median over runs; `build` is "
           "the controller's event; `rest` is the wall time outside these (interpreter start, "
           "config, ledger, output)."), "",
           "| phase | " + " | ".join(f"{n} host{'s' if n > 1 else ''}" for n in sizes)
           + f" | {sizes[-1]} − {sizes[0]} |", "|---|" + "---|" * (len(sizes) + 1)]

    def line(label: str, value: Any) -> None:
        meds = [_med(runs[n], value) for n in sizes]
        out.append(f"| {label} | " + " | ".join(f"{v:.2f} s" for v in meds)
                   + f" | {meds[-1] - meds[0]:+.2f} s |")

    line("build (controller)", lambda r: r.run.controller_phases().get("build", 0.0))
    for p in names:
        line(p, lambda r, p=p: r.phase_max().get(p, 0.0))
    line("rest", lambda r: r.run.wall - r.run.controller_phases().get("build", 0.0)
         - sum(r.phase_max().values()))
    line("**wall**", lambda r: r.run.wall)
    return out


def _method(res: dict[str, Any]) -> list[str]:
    return [
        "### How it is measured", "",
        ("- One stage per size: `fleetN` = hosts `shl-h1..N`, `deploy_to = \"/srv/bench-N\"`, port "
        "8100+N, `bind = \"0.0.0.0\"`, the hosts' `ssh_config`, a secrets file per stage, "
        "`after_install = [\"alembic upgrade head\"]` (each host migrates its own sqlite; the "
        "release hook runs once, on the primary)."),
        ("- (1) before each cold deploy the stage is stopped (`shiplane stop --all`) and "
        "`/srv/bench-N` is removed on its hosts: no agent, blob store, venv, shipped uv or uv "
        "cache is left (all live under the deploy root). Each timed deploy deploys a new commit "
        "(a one-line edit of `src/demo/views.py`), so it builds the app's wheel; the wheelhouse "
        "comes from `.shiplane/build`, filled by one untimed build first. (1′) is the same "
        f"with `SHIPLANE_SHIP_UV=0` in the controller's environment, in the first "
        f"{min(res['pip_runs'], res['runs'])} round(s) only (it is the slow one)."),
        ("- (2) right after each cold deploy: edit, commit, `deploy --stage fleetN --skip-tests "
        "--json`; checked: no venv event, every host's `venvs/` unchanged, every host serves the "
        "edit on its public port. The stage is stopped after it."),
        ("- CPU seconds over each command: the hosts' = the change of user+system time, with "
        "reaped children, of every process in the hosts' network namespaces (sshd and its "
        "sessions, agents, uv/pip, hooks, supervisord, gunicorn); the controller's = "
        "`getrusage(RUSAGE_CHILDREN)` of `shiplane` and its `ssh` clients, plus the ssh control "
        "masters (`ControlPersist` puts them in the background; polled every 0.2 s); the whole "
        "machine's = busy time in `/proc/stat`, which counts any other work on the machine too."),
    ]


def write_section(path: Path, section: str) -> None:
    """Replace this bench's section of ``path`` (to the next ``## `` heading), else append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    start = text.find("\n" + HEADING + "\n")
    if start < 0 and text.startswith(HEADING + "\n"):
        start = -1
        head, rest = "", text[len(HEADING) + 1:]
    elif start < 0:
        path.write_text(text.rstrip("\n") + ("\n\n" if text else "") + section, encoding="utf-8")
        return
    else:
        head, rest = text[:start + 1], text[start + 1 + len(HEADING) + 1:]
    following = rest.find("\n## ")
    tail = rest[following + 1:] if following >= 0 else ""
    path.write_text(head + section + ("\n" + tail if tail else ""), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="fleet sizes, ascending (default 1,4,8)")
    parser.add_argument("--pip-runs", type=int, default=1, metavar="N",
                        help="rounds (the first N) that also deploy cold with SHIPLANE_SHIP_UV=0, "
                             "the hosts installing with pip (default 1; 0: none)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for the 1-minute load average to drop "
                             "below 1.0 (other work on the machine skews every figure)")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the untimed pass that samples the hosts' CPU by program")
    parser.add_argument("--out", type=Path, help=f"write the '{HEADING}' section into this file")
    parser.add_argument("--raw", type=Path, help="write every measurement as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (for debugging)")
    args = parser.parse_args(argv)
    sizes = tuple(sorted({int(x) for x in args.sizes.split(",")}))
    if args.runs < 1 or not sizes or sizes[0] < 1:
        parser.error("--runs and every size must be at least 1")
    why = ssh_available()
    if why is not None:
        print(f"bench_fleet: cannot start test hosts: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    wait_idle(args.wait_idle)
    res = new_results(sizes)
    res["machine"], res["runs"], res["pip_runs"] = machine(), args.runs, args.pip_runs
    res["command"] = (f"python bench/bench_fleet.py --runs {args.runs}"
                      + (f" --sizes {args.sizes}" if sizes != SIZES else "")
                      + (f" --pip-runs {args.pip_runs}" if args.pip_runs != 1 else "")
                      + (f" --wait-idle {args.wait_idle:g}" if args.wait_idle else "")
                      + (f" --out {args.out}" if args.out else ""))
    work = Path(tempfile.mkdtemp(prefix="shiplane-fleet-bench-"))
    testhosts: TestHosts | None = None
    fleet: Fleet | None = None
    t0 = time.perf_counter()
    failed: str | None = None
    try:
        _say(f"starting {sizes[-1]} test hosts")
        testhosts = start_hosts(sizes[-1], work / "hosts")
        fleet = Fleet.scaffold(work, testhosts, sizes)
        _say(f"app scaffolded in {fleet.root}; untimed build (fills .shiplane/build)")
        fleet.shiplane("build")
        for i in range(args.runs):
            _say(f"round {i + 1}/{args.runs} (load {load():.2f})")
            one_round(fleet, res, i < args.pip_runs)
        if not args.no_profile:
            _say("untimed: the hosts' CPU by program (cold and warm, smallest and largest size)")
            profile_pass(fleet, res)
    except (BenchError, KeyboardInterrupt) as exc:
        failed = str(exc) or type(exc).__name__
    finally:
        for cleanup in (fleet.stop_all if fleet else None, testhosts.stop if testhosts else None):
            if cleanup is None:
                continue
            try:
                cleanup()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up whatever else runs
                print(f"cleanup: {exc}", file=sys.stderr)
        if args.keep:
            _say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if failed:
        print(f"bench failed: {failed}", file=sys.stderr)
        return 1
    res["bench_seconds"] = time.perf_counter() - t0
    section = render(res)
    print(section)
    if args.out:
        write_section(args.out, section)
        _say(f"wrote the '{HEADING}' section of {args.out}")
    if args.raw:
        raw = {k: ({str(n): [r.as_dict() for r in v[n]] for n in v} if k in ("cold", "warm", "cold_pip")
                   else v) for k, v in res.items() if k != "profile"}
        raw["profile"] = {f"{kind} {n}": {**m.as_dict(), "programs": m.programs}
                          for (kind, n), m in res["profile"].items()}
        args.raw.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
