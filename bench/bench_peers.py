"""Benchmark shiplane against its peers: Fabric, pyinfra, Ansible and the article's Makefile flow.

    python bench/bench_peers.py [--hosts 3] [--rounds 3] [--tools shiplane,fabric,pyinfra,ansible,make]
                                [--out BENCHMARKS.md] [--raw results.json] [--keep]
    python bench/bench_peers.py --from-raw results.json [--out BENCHMARKS.md]   # render only

Needs root (the hosts of ``tests/sshhosts.py``: one ``sshd`` per network namespace). Every tool
deploys the same app, the one ``shiplane init`` scaffolds (Flask + SQLAlchemy + Alembic, 12 locked
wheels, gunicorn with 2 workers), from the same git checkout, to the same hosts ``shl-h1..N``,
each into its own deploy root (``/srv/peer-<tool>``) on its own port, and every host installs the
locked dependencies offline from the same wheel folder (shiplane's own wheelhouse, copied out of
its artifact after one untimed build). The peers' recipes are in ``bench/peers/``, each written
as its tool's documentation recommends; the tools themselves (pinned, ``PINS``) are installed by
the bench into its own venv, ``~/.cache/shiplane-bench-peers``, when missing.

Each round runs, tool after tool (A B C D E), (1) a cold deploy (the tool's services stopped and
its deploy root removed on every host first), then, again tool after tool, (2) a warm redeploy of
a one-line code change (committed), then (3) a rollback. Every deploy deploys a new commit whose
page shows a marker of its own; after every command the bench polls every host's port (bounded,
with a deadline) until it serves that marker (after a rollback: the cold deploy's marker again).
The figure is the time from the command's start until every host serves the new code, so a tool
that returns before its server is up (``gunicorn --daemon``) is not credited for it; the command
alone is reported too. The controller's CPU per command is ``getrusage(RUSAGE_CHILDREN)`` of the
tool and its children, plus the ssh control masters ``ControlPersist`` puts in the background
(shiplane's and Ansible's), polled. The masters that shiplane and Ansible keep open for their
next command are closed before each command, so every command of every tool starts without a
connection, except those of ``shiplane-reused``, which measures the reuse. Everything started is stopped on the way out,
on failure too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

from _benchlib import (
    BenchError,
    clean_up,
    close_masters,
    close_shiplane_connections,
    command_servers_cpu,
    http_get,
    run,
)
from _fleet_cpu import MasterWatch, children_cpu, machine_cpu
from _scenarios import EDITED_FILE, EDITED_TEXT, GIT
from bench_local import load, machine

from shiplane.transport import ConnectSettings, connect
from shiplane.transport.base import Prewarming
from sshhosts import TestHost, TestHosts, ssh_available, start_hosts

STAGE = "peers"
# shiplane again, with the key exchange paramiko (Fabric, pyinfra) makes, not OpenSSH 9.2's
# post-quantum default: what that default costs the controller, measured, not changed
X25519 = "shiplane-x25519"
# shiplane again, each command within ssh_persist (60 s) of the stage's last one, whose SSH
# connections are still open (every other command, of every tool, starts without one)
REUSED = "shiplane-reused"
# shiplane-reused, and the command server its last command started (SHIPLANE_SERVER=1): the
# CLI's imports done once, each command forked from them (src/shiplane/cliserver.py)
SERVER = "shiplane-server"
STAGES = {
    "shiplane": STAGE,
    X25519: "peers-x25519",
    REUSED: "peers-reused",
    SERVER: "peers-server",
}
VARIANTS = (X25519, REUSED, SERVER)
TOOLS = ("shiplane", "fabric", "pyinfra", "ansible", "make", X25519, REUSED, SERVER)
PORTS = {
    "shiplane": 8301,
    "fabric": 8302,
    "pyinfra": 8303,
    "ansible": 8304,
    "make": 8305,
    X25519: 8306,
    REUSED: 8307,
    SERVER: 8308,
}
PINS = {"fabric": "3.2.3", "pyinfra": "3.10.0", "ansible-core": "2.19.14", "hatchling": "1.33.0"}
VENV = Path.home() / ".cache" / "shiplane-bench-peers"
PEERS = BENCH / "peers"
KINDS = ("cold", "warm", "rollback")
SERVE_DEADLINE = 90.0  # seconds after a command until every host must serve its code
COMMAND_TIMEOUT = 600.0
# Each command starts on a quiet machine: under this share of one core busy (every process,
# /proc/stat) over a window, or after the deadline. What a command leaves running once its
# hosts serve (shiplane's hosts start the next spare server, an old one drains, a peer's pip
# cache writes) would otherwise fall into the next tool's figures.
QUIET_CORES, QUIET_WINDOW, QUIET_DEADLINE = 0.15, 0.25, 20.0
HEADING = "## Against the peers"


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so the `finally` blocks stop everything


# --- the peers' venv ---------------------------------------------------------------------------


def _installed(python: Path) -> dict[str, str]:
    done = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        return {}
    return {p["name"].lower(): p["version"] for p in json.loads(done.stdout)}


def ensure_venv() -> dict[str, str]:
    """The peers' venv with the pinned tools (made or completed when missing); their versions."""
    python = VENV / "bin" / "python"
    if not python.exists():
        _say(f"making the peers' venv {VENV}")
        run([sys.executable, "-m", "venv", str(VENV)], Path.cwd(), timeout=300)
    have = _installed(python)
    missing = [f"{n}=={v}" for n, v in PINS.items() if have.get(n) != v]
    if missing:
        _say(f"installing {' '.join(missing)} into {VENV}")
        run([str(python), "-m", "pip", "install", "-q", *missing], Path.cwd(), timeout=900)
        have = _installed(python)
    still = [n for n, v in PINS.items() if have.get(n) != v]
    if still:
        raise BenchError(f"the peers' venv lacks {still}")
    return {n: have[n] for n in (*PINS, "paramiko") if n in have}


# --- the app -----------------------------------------------------------------------------------


@dataclass
class App:
    """The scaffolded app in a git checkout, with a stage for shiplane on the test hosts."""

    root: Path
    edits: int = 0

    @classmethod
    def create(cls, parent: Path, testhosts: TestHosts, n: int) -> App:
        run([sys.executable, "-m", "shiplane", "init", "demo"], parent)
        app = cls(parent / "demo")
        toml = app.root / "shiplane.toml"
        text = toml.read_text(encoding="utf-8")
        hosts = ", ".join(f'"shl-h{i}"' for i in range(1, n + 1))
        stages = "".join(
            f'[stages.{stage}]\nhosts = [{hosts}]\ndeploy_to = "/srv/peer-{tool}"\n'
            f'port = {PORTS[tool]}\nbind = "0.0.0.0"\nssh_config = "{testhosts.ssh_config}"\n'
            + ('ssh_options = ["KexAlgorithms=curve25519-sha256"]\n' if tool == X25519 else "")
            + "\n"
            for tool, stage in STAGES.items()
        )
        toml.write_text(text[: text.index("[stages.staging]")] + stages, encoding="utf-8")
        for stage in STAGES.values():
            secrets = app.root / ".secrets" / f"{stage}.env"
            secrets.write_text("SECRET_KEY=bench-peer-secret\n")
            os.chmod(secrets, 0o600)
        for argv in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "scaffold, peers stage"]):
            run([*GIT, *argv], app.root)
        return app

    def commit_edit(self) -> str:
        """A one-line change of the page's footer, committed; returns the text it then shows."""
        self.edits += 1
        marker = f"(bench-edit-{self.edits:04d})"
        path = self.root / EDITED_FILE
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        hits = [i for i, line in enumerate(lines) if EDITED_TEXT in line]
        if len(hits) != 1:
            raise BenchError(f"{EDITED_FILE}: expected one line with {EDITED_TEXT!r}")
        lines[hits[0]] = f'        "<footer>demo, {EDITED_TEXT} {marker}</footer>\\n"\n'
        path.write_text("".join(lines), encoding="utf-8")
        run([*GIT, "commit", "-qam", marker], self.root)
        return marker

    def wheel_folder(self, dest: Path) -> Path:
        """The locked wheels of the app's artifact (one untimed ``shiplane build``), copied out
        of shiplane's blob store into a plain folder for the peers."""
        digest = run([sys.executable, "-m", "shiplane", "build"], self.root).stdout.split()[-1]
        build = self.root / ".shiplane" / "build"
        manifest = json.loads((build / "artifacts" / f"{digest}.json").read_text())
        dest.mkdir(parents=True)
        for dep in manifest["dependencies"]:
            shutil.copyfile(build / "blobs" / dep["sha256"], dest / dep["path"])
        return dest


# --- the tools ---------------------------------------------------------------------------------


@dataclass
class Measured:
    """One command: seconds until every host served its code, the command alone, its CPU, and
    the whole machine's CPU (controller and hosts) until every host served it."""

    tool: str
    kind: str
    served: float
    command: float
    cpu: float
    machine: float


@dataclass
class Bench:
    """The session: the test hosts, the app, the wheel folder, each tool's commands."""

    testhosts: TestHosts
    n: int
    app: App
    wheels: Path
    work: Path
    deployed: set[str] = field(default_factory=set)

    @property
    def hosts(self) -> list[TestHost]:
        return self.testhosts.hosts[: self.n]

    def env(self, tool: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env.update(
            NO_COLOR="1",
            PATH=f"{VENV / 'bin'}:{env.get('PATH', '')}",
            PEER_HOSTS=",".join(h.name for h in self.hosts),
            PEER_ROOT=f"/srv/peer-{tool}",
            PEER_PORT=str(PORTS[tool]),
            PEER_APP=str(self.app.root),
            PEER_WHEELS=str(self.wheels),
            SSH_CONFIG=str(self.testhosts.ssh_config),
            KNOWN_HOSTS=str(self.testhosts.known_hosts),
            ANSIBLE_CONFIG=str(PEERS / "ansible" / "ansible.cfg"),
            ANSIBLE_SSH_COMMON_ARGS=f"-F {self.testhosts.ssh_config}",
            ANSIBLE_SSH_CONTROL_PATH_DIR=str(self.work / "ansible-cp"),
            ANSIBLE_LOCAL_TEMP=str(self.work / "ansible-tmp"),
        )
        if tool not in STAGES:  # shiplane's ssh control sockets need a short path: the usual /tmp
            env["TMPDIR"] = str(self.work / "tmp")
        if tool == SERVER:
            env["SHIPLANE_SERVER"] = "1"
        return env

    def argv(self, tool: str, kind: str) -> tuple[list[str], Path]:
        """The command (and its directory) that deploys (``cold``/``warm``) or rolls back."""
        back = kind == "rollback"
        if tool in STAGES:
            verb = ["rollback", "--yes"] if back else ["deploy", "--skip-tests"]
            return [sys.executable, "-m", "shiplane", *verb, "--stage", STAGES[tool]], self.app.root
        if tool == "fabric":
            cfg = str(self.testhosts.ssh_config)
            task = "rollback" if back else "deploy"
            return [str(VENV / "bin" / "fab"), "-r", str(PEERS), "-S", cfg, task], PEERS
        if tool == "pyinfra":
            ops = "rollback.py" if back else "deploy.py"
            return [str(VENV / "bin" / "pyinfra"), "-y", "inventory.py", ops], PEERS / "pyinfra"
        if tool == "ansible":
            play = "rollback.yml" if back else "playbook.yml"
            extra = [
                *("-e", "root=/srv/peer-ansible", "-e", f"port={PORTS['ansible']}"),
                *("-e", f"app={self.app.root}", "-e", f"wheels={self.wheels}"),
            ]
            limit = ",".join(h.name for h in self.hosts)
            cmd = [str(VENV / "bin" / "ansible-playbook"), play, "--limit", limit, *extra]
            return cmd, PEERS / "ansible"
        if tool == "make":
            names = " ".join(h.name for h in self.hosts)
            return [
                "make",
                "-s",
                "-f",
                str(PEERS / "make" / "Makefile"),
                f"-j{self.n}",
                "rollback" if back else "deploy",
                f"HOSTS={names}",
                f"SSH_CONFIG={self.testhosts.ssh_config}",
                "ROOT=/srv/peer-make",
                f"PORT={PORTS['make']}",
                f"APP={self.app.root}",
                f"WHEELS={self.wheels}",
                f"PYTHON={VENV / 'bin' / 'python'}",
            ], self.app.root
        raise BenchError(f"unknown tool {tool!r}")

    def measure(self, tool: str, kind: str, marker: str) -> Measured:
        """Once the machine is quiet, run the tool's command, then poll until every host
        serves ``marker``."""
        argv, cwd = self.argv(tool, kind)
        self.deployed.add(tool)
        close_shiplane_connections()
        close_masters(self.work / "ansible-cp")
        if tool in (REUSED, SERVER):
            self.open_connections()
        if tool == SERVER:
            self.start_server()
        wait_quiet()
        watch = MasterWatch(self.testhosts.ssh_config)
        watch.start()
        cpu0, machine0 = children_cpu() + command_servers_cpu(), machine_cpu()
        t0 = time.perf_counter()
        try:
            done = run(argv, cwd, env=self.env(tool), timeout=COMMAND_TIMEOUT, check=False)
            command = time.perf_counter() - t0
            if done.returncode == 0:  # the poll first: the bench's own bookkeeping is not timed
                self.wait_serves(tool, marker, t0 + command + SERVE_DEADLINE)
            served, machine = time.perf_counter() - t0, machine_cpu() - machine0
        finally:
            cpu = children_cpu() + command_servers_cpu() - cpu0 + watch.stop()
        if done.returncode != 0:
            raise BenchError(
                f"{tool} {kind}: exit {done.returncode}: {' '.join(argv)}\n"
                f"--- stdout (tail)\n{done.stdout[-3000:]}\n--- stderr (tail)\n{done.stderr[-3000:]}"
            )
        return Measured(tool, kind, served, command, cpu, machine)

    def wait_serves(self, tool: str, marker: str, deadline: float) -> None:
        """Poll each host's ``/`` on the tool's port until it answers 200 with ``marker``: the
        hosts at once, so the figure is the slowest host's, not the sum of the first answers."""
        errors: list[str] = []

        def poll(host: TestHost) -> None:
            url = host.url(PORTS[tool], "/")
            last = "no answer yet"
            while True:
                try:
                    status, body = http_get(url, timeout=2.0)
                    if status == 200 and marker in body:
                        return
                    last = f"status {status}: {body[-200:]!r}"
                except OSError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.perf_counter() > deadline:
                    errors.append(f"{tool}: {host.name} does not serve {marker}: {last}")
                    return
                time.sleep(0.05)  # poll interval, bounded by the deadline

        threads = [threading.Thread(target=poll, args=(h,), daemon=True) for h in self.hosts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise BenchError("; ".join(errors))

    def open_connections(self) -> None:
        """Each host's SSH connection, as the reused variant's stage's last command left it open
        (``ssh_persist``): a master with the stage's settings, running nothing on the host."""
        settings = ConnectSettings(ssh_config=str(self.testhosts.ssh_config))
        for host in self.hosts:
            transport = connect(host.name, settings)
            assert isinstance(transport, Prewarming)  # an SSH host
            with tempfile.TemporaryFile() as err:
                process = transport.prewarm(err)
                if process is not None and process.wait(timeout=60) != 0:
                    err.seek(0)
                    raise BenchError(f"{host.name}: no SSH connection: {err.read().decode()}")

    def start_server(self) -> None:
        """The command server an earlier command of the stage left (untimed): ``check`` starts
        one when none runs; it is ready once its socket is there."""
        run([sys.executable, "-m", "shiplane", "check"], self.app.root, env=self.env(SERVER))
        deadline = time.monotonic() + 30
        while not list(Path(tempfile.gettempdir()).glob(f"shiplane-cli-{os.getuid()}/*.sock")):
            if time.monotonic() > deadline:
                raise BenchError("shiplane check started no command server within 30 s")
            time.sleep(0.05)  # bounded by the deadline

    def stop(self, tool: str) -> None:
        """Stop the tool's app server on every host (if this bench deployed it)."""
        if tool not in self.deployed:
            return
        if tool in STAGES:
            run(
                [sys.executable, "-m", "shiplane", "stop", "--all", "--stage", STAGES[tool]],
                self.app.root,
                env=self.env(tool),
                timeout=180,
            )
        else:
            for host in self.hosts:
                stop_gunicorn(host.root / f"peer-{tool}", f"/srv/peer-{tool}")
        self.deployed.discard(tool)

    def wipe(self, tool: str) -> None:
        """Stop the tool's server, remove its deploy root on every host: the next deploy is cold."""
        self.stop(tool)
        for host in self.hosts:
            shutil.rmtree(host.root / f"peer-{tool}", ignore_errors=True)

    def stop_all(self) -> None:
        errors = []
        for tool in TOOLS:
            try:
                self.stop(tool)
            except BenchError as exc:
                errors.append(str(exc))
        close_shiplane_connections()
        close_masters(self.work / "ansible-cp")
        if errors:
            raise BenchError("; ".join(errors))


def wait_quiet() -> float:
    """Wait (at most ``QUIET_DEADLINE``) until the whole machine is idle; the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < QUIET_DEADLINE:
        before = machine_cpu()
        time.sleep(QUIET_WINDOW)  # a sampling window, bounded by the deadline
        if (machine_cpu() - before) / QUIET_WINDOW < QUIET_CORES:
            break
    return time.perf_counter() - start


def stop_gunicorn(root: Path, remote_root: str, timeout: float = 30.0) -> None:
    """TERM the gunicorn master whose pid file is in ``root`` (its command line must name
    ``remote_root``), wait for its exit with a deadline, then KILL it."""
    try:
        pid = int((root / "gunicorn.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
        return
    if remote_root not in cmdline or "gunicorn" not in cmdline:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)  # bounded wait for the exit


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# --- rounds and report -------------------------------------------------------------------------


def one_round(bench: Bench, tools: list[str], res: dict[str, Any]) -> None:
    """Cold deploys tool after tool, then warm redeploys, then rollbacks (A B C D E, each)."""
    cold_marker: dict[str, str] = {}
    for tool in tools:
        res["load"].append(load())
        bench.wipe(tool)
        marker = bench.app.commit_edit()
        m = bench.measure(tool, "cold", marker)
        cold_marker[tool] = marker
        res["runs"].append(asdict(m))
        _say(f"  {tool}: cold {m.served:.2f}s (command {m.command:.2f}s, CPU {m.cpu:.2f}s)")
    for tool in tools:
        res["load"].append(load())
        marker = bench.app.commit_edit()
        m = bench.measure(tool, "warm", marker)
        res["runs"].append(asdict(m))
        _say(f"  {tool}: warm {m.served:.2f}s (command {m.command:.2f}s, CPU {m.cpu:.2f}s)")
    for tool in tools:
        res["load"].append(load())
        m = bench.measure(tool, "rollback", cold_marker[tool])
        res["runs"].append(asdict(m))
        _say(f"  {tool}: rollback {m.served:.2f}s (command {m.command:.2f}s, CPU {m.cpu:.2f}s)")


def _series(res: dict[str, Any], tool: str, kind: str, key: str) -> list[float]:
    """One figure of every run of ``tool``'s ``kind`` (runs of an older raw file may lack it)."""
    return [r[key] for r in res["runs"] if r["tool"] == tool and r["kind"] == kind and key in r]


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _cpu(values: list[float]) -> str:
    """A median of CPU seconds, or a dash for runs that did not measure it."""
    return f"{_med(values):.2f} CPU-s" if values else "–"


def render(res: dict[str, Any]) -> str:
    """The ``## Against the peers`` section of BENCHMARKS.md."""
    m, tools, v = res["machine"], res["tools"], res["versions"]
    titles = {
        "cold": "Cold deploy (the tool's deploy root emptied on every host first)",
        "warm": "Warm redeploy of a one-line code change",
        "rollback": "Rollback to the previous release",
    }
    lines = [
        HEADING,
        "",
        (
            f"The same app deployed to the same {res['hosts']} SSH test hosts by shiplane and by "
            "Fabric, pyinfra, Ansible and the article's Makefile flow (scp, ssh, pip, gunicorn), "
            "each recipe written as its tool's documentation recommends (`bench/peers/`), every "
            "host installing offline from the same wheel folder. The app is the one `shiplane "
            "init` scaffolds (Flask + SQLAlchemy + Alembic, 12 locked wheels, gunicorn with 2 "
            "workers). Each figure is the time from the command's start until **every host serves "
            "the new code** (the bench polls every host's port at once for the page's new marker), median "
            f"(min–max) of {res['rounds']} round(s); the rounds interleave the tools (cold deploy "
            "of each, then warm redeploy of each, then rollback of each)."
        ),
        "",
        (
            f"- **Machine:** {m['cores']} cores ({m['cpu']}), {m['os']}; Python {m['python']}, "
            f"shiplane {m['shiplane']}; Fabric {v.get('fabric')} (paramiko {v.get('paramiko')}), "
            f"pyinfra {v.get('pyinfra')}, ansible-core {v.get('ansible-core')}, "
            f"hatchling {v.get('hatchling')} (the Makefile's wheel build), OpenSSH on both ends"
        ),
        (
            f"- **Date:** {m['date']}; 1-minute load average during the rounds "
            f"{min(res['load']):.1f}–{max(res['load']):.1f} (the bench's own hosts and tools "
            "included: the test hosts share the controller's cores, so a figure holds both sides' "
            "work; compare within the table)."
        ),
        (
            f"- **Reproduce** (as root, from the repository root, about "
            f"{res['bench_seconds'] / 60:.0f} min; the pinned tools are installed into "
            f"`~/.cache/shiplane-bench-peers` first if missing): `{res['command']}`"
        ),
        "",
    ]
    base = {k: _med(_series(res, "shiplane", k, "served")) for k in KINDS}
    peers = [t for t in tools if t not in STAGES]
    if "shiplane" in tools and peers:
        spans = []
        for kind, what in zip(KINDS, ("a cold deploy", "a warm redeploy", "a rollback")):
            ratios = [_med(_series(res, t, kind, "served")) / base[kind] for t in peers]
            spans.append(f"{min(ratios):.1f}–{max(ratios):.1f}× for {what}")
        spans[0] = spans[0].replace("× for", "× shiplane's median time for", 1)
        lines += [
            (
                f"In this session the peers took {', '.join(spans[:-1])} and {spans[-1]} "
                "(medians, until every host serves the new code)."
            ),
            "",
        ]
        for variant, how in (
            (REUSED, "its SSH connections still open"),
            (SERVER, "its SSH connections and the opt-in command server still there"),
        ):
            if _series(res, variant, "warm", "served"):
                reused = _med(_series(res, variant, "warm", "served"))
                ratios = [_med(_series(res, t, "warm", "served")) / reused for t in peers]
                cpu = _med(_series(res, variant, "warm", "cpu"))
                lines += [
                    (
                        f"Within a minute of the stage's last command ({variant}: {how}), "
                        f"shiplane's warm redeploy took {reused:.2f} s and {cpu:.2f} CPU-s of "
                        f"the controller: the peers took {min(ratios):.1f}–{max(ratios):.1f}× "
                        "that time."
                    ),
                    "",
                ]
    for kind in KINDS:
        lines += [
            f"**{titles[kind]}**",
            "",
            (
                "| tool | until every host serves it | the command alone | controller CPU "
                "| machine CPU | / shiplane |"
            ),
            "|---|---|---|---|---|---|",
        ]
        for tool in tools:
            served = _series(res, tool, kind, "served")
            if not served:
                continue
            med = _med(served)
            ratio = (
                "1.00×"
                if tool == "shiplane"
                else (f"{med / base[kind]:.2f}×" if base[kind] == base[kind] else "–")
            )
            lines.append(
                f"| {tool} | {med:.2f} s ({min(served):.2f}–{max(served):.2f}) | "
                f"{_med(_series(res, tool, kind, 'command')):.2f} s | "
                f"{_med(_series(res, tool, kind, 'cpu')):.2f} CPU-s | "
                f"{_cpu(_series(res, tool, kind, 'machine'))} | {ratio} |"
            )
        lines.append("")
    lines += [
        (
            "How each tool deploys (the same layout for the four peers: `releases/<id>`, "
            "`shared/var` for each host's SQLite, `current`, gunicorn restarted by its pid file):"
        ),
        "",
        (
            "- **shiplane** (`deploy --stage peers --skip-tests`, `rollback --yes`): its own "
            "pipeline — the artifact (the app's wheel) built and shipped as missing blobs, the venv "
            "made by the uv it ships once per host (kept per lock: a code-only redeploy reuses it), "
            "the migration as the release hook on every host (skipped when the migrations did not "
            "change), the new gunicorn started beside the old one and health- and smoke-checked "
            "before the front's socket moves to it: no request fails. A rollback is a health check "
            "and a rename (the previous server is kept as a standby)."
        ),
        *(
            [
                (
                    f"- **{X25519}**: shiplane again (its own stage, deploy root and port), its "
                    "SSH key exchange set to `curve25519-sha256` (`ssh_options`), the one paramiko "
                    "makes for Fabric and pyinfra, instead of OpenSSH 9.2's default "
                    "`sntrup761x25519-sha512` (post-quantum, and shiplane's default still): what "
                    "that choice costs the controller, on its own line."
                )
            ]
            if X25519 in tools
            else []
        ),
        *(
            [
                (
                    f"- **{SERVER}**: {REUSED} with the opt-in command server "
                    "(`SHIPLANE_SERVER=1`): the stage's last command (`check`, untimed) left one "
                    "running, so the command's own process only hands its argv, environment and "
                    "stdio to it, and a fork of it, with the CLI's modules already imported, runs "
                    "the command. The server's CPU for the command (its fork's, reaped) is in "
                    "the controller's."
                )
            ]
            if SERVER in tools
            else []
        ),
        *(
            [
                (
                    f"- **{REUSED}**: shiplane again (its own stage, deploy root and port), each "
                    "command within a minute of the stage's last one: the SSH connections that "
                    "command left open (`ssh_persist`, 60 s by default, as Ansible's "
                    "`ControlPersist=60s`) are there (the bench opens them, untimed, with the "
                    "stage's settings), so its sessions multiplex over them instead of paying "
                    "each host's handshake. Every other command of every tool starts without a "
                    "connection."
                )
            ]
            if REUSED in tools
            else []
        ),
        (
            "- **Fabric** (`fab deploy`, `bench/peers/fabfile.py`): a `ThreadingGroup` of the hosts; "
            "`git archive` of the commit and every wheel `put` over SFTP, unpacked, `pip install -r` "
            "into one venv the releases share (made on the first deploy), `alembic upgrade head`, "
            "`ln -sfn` current, gunicorn TERMed and started again with `--daemon`; host keys checked "
            "strictly (Fabric's default would add unknown ones)."
        ),
        (
            "- **pyinfra** (`pyinfra -y inventory.py deploy.py`, `bench/peers/pyinfra/`): the same "
            "steps as operations (`files.sync` of the wheel folder, `files.put`, `pip.venv`, "
            "`pip.packages` with the lock, `files.link`, `server.shell`), all hosts at once."
        ),
        (
            "- **Ansible** (`ansible-playbook playbook.yml`, `bench/peers/ansible/`): the same steps "
            "as modules (`copy` of the wheel folder, `unarchive`, `pip` with `virtualenv`, `file` "
            "links, `command`), pipelining on, OpenSSH with `ControlMaster`/`ControlPersist=60s`, "
            "facts not gathered (no task needs them)."
        ),
        (
            "- **make** (the article's flow, `bench/peers/make/Makefile`, `make -j<hosts>`): the app's "
            "wheel built (`pip wheel --no-build-isolation`, no index), then per host one `scp -r` of "
            "the wheel, config, migrations, lock and wheel folder into a new release and one `ssh` "
            "that makes a **fresh venv** there (as the article does), installs the lock and the "
            "wheel, migrates, switches `current` and restarts gunicorn."
        ),
        (
            "- What differs in the work: shiplane and make build the app's wheel on the "
            "controller for every deploy (shiplane's build cache, `.shiplane/build`, stays on the "
            "controller between rounds, as the peers' venv does); Fabric, pyinfra and Ansible "
            "ship a `git archive` of the commit and run the app from its source tree, as their "
            "recipes typically do. The peers run the migration on every deploy (a no-op after "
            "the first); shiplane skips it when the migrations did not change. A cold deploy "
            "starts every tool with nothing on the hosts (make's flow makes a fresh venv on every "
            "deploy anyway; the other peers and shiplane keep theirs for the next one)."
        ),
        (
            "- Every peer restarts its server by stopping the old gunicorn before it starts the new "
            "one, so each host serves nothing for a moment on every deploy and rollback (shiplane: "
            "zero downtime, `## Zero-downtime switches`); none of them checks the new server before "
            "it returns (the bench's own poll waits for it). Their rollback re-points `current` to "
            "the release before it and restarts; it deletes the release it leaves, as Capistrano's "
            "does, and does not revert the shared venv (Fabric, pyinfra, Ansible)."
        ),
        (
            "- Controller CPU: `getrusage(RUSAGE_CHILDREN)` over the command (the tool, its ssh/scp "
            "clients, git, the wheel build), plus the ssh control masters forked into the "
            "background (shiplane's, Ansible's), polled every 0.2 s. Fabric and pyinfra speak SSH "
            "in-process (paramiko). The masters shiplane and Ansible keep open for their next "
            "command are closed before each command, so none starts with a connection open "
            f"(but {REUSED}'s)."
        ),
        (
            "- Machine CPU: the busy time of every process on the machine (`/proc/stat`) from the "
            "command's start until every host serves the new code: the controller's and the "
            "hosts' work together (their SSH servers, pip, the app's servers starting), which share "
            "the same cores. Every command starts on a quiet machine (the bench waits, 20 s at "
            "most, until every process together keeps under 0.15 of a core busy over 0.25 s): work "
            "a tool leaves running once its hosts serve (shiplane's hosts start the next spare "
            "server, an old one drains) does not fall into the next tool's figures."
        ),
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace this bench's section of ``path`` (to the next ``## `` heading), else append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    start = text.find("\n" + HEADING + "\n")
    if start < 0:
        path.write_text(text.rstrip("\n") + ("\n\n" if text else "") + section, encoding="utf-8")
        return
    head, rest = text[: start + 1], text[start + 1 + len(HEADING) + 1 :]
    following = rest.find("\n## ")
    tail = rest[following + 1 :] if following >= 0 else ""
    path.write_text(head + section + ("\n" + tail if tail else ""), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=3, help="test hosts (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    default = ",".join(t for t in TOOLS if t not in VARIANTS)
    parser.add_argument(
        "--tools",
        default=default,
        help=f"default {default}; also {X25519}: shiplane with "
        "the key exchange paramiko makes (curve25519-sha256), to show what OpenSSH's default "
        f"costs; {REUSED}: shiplane with the connections its last command left open; {SERVER}: "
        "those and the opt-in command server",
    )
    parser.add_argument("--out", type=Path, help=f"write the '{HEADING}' section into this file")
    parser.add_argument("--raw", type=Path, help="write every measurement as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (for debugging)")
    parser.add_argument(
        "--from-raw",
        type=Path,
        metavar="RESULTS_JSON",
        help="run nothing: render the section from a --raw file of an earlier run",
    )
    args = parser.parse_args(argv)
    if args.from_raw:
        return report(json.loads(args.from_raw.read_text(encoding="utf-8")), args.out)
    tools = [t for t in args.tools.split(",") if t]
    if not tools or any(t not in TOOLS for t in tools):
        parser.error(f"--tools: a comma-separated list of {', '.join(TOOLS)}")
    if not 1 <= args.hosts <= 8 or args.rounds < 1:
        parser.error("--hosts must be 1..8 and --rounds at least 1")
    why = ssh_available()
    if why is not None:
        print(f"bench_peers: cannot start test hosts: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    res: dict[str, Any] = {"hosts": args.hosts, "rounds": args.rounds, "tools": tools}
    res.update(load=[], runs=[], machine=machine())
    res["command"] = (
        f"python bench/bench_peers.py --rounds {args.rounds} --hosts {args.hosts}"
        + (f" --tools {','.join(tools)}" if ",".join(tools) != default else "")
        + (f" --out {args.out}" if args.out else "")
    )
    work = Path(tempfile.mkdtemp(prefix="shiplane-peers-bench-"))
    for sub in ("ansible-cp", "ansible-tmp", "tmp"):
        (work / sub).mkdir()
    testhosts: TestHosts | None = None
    bench: Bench | None = None
    t0 = time.perf_counter()
    failed: str | None = None
    try:
        res["versions"] = ensure_venv()
        _say(f"starting {args.hosts} test hosts")
        testhosts = start_hosts(args.hosts, work / "hosts")
        app = App.create(work, testhosts, args.hosts)
        _say(f"app in {app.root}; untimed build (fills .shiplane/build, gives the wheel folder)")
        bench = Bench(testhosts, args.hosts, app, app.wheel_folder(work / "wheels"), work)
        for i in range(args.rounds):
            _say(f"round {i + 1}/{args.rounds} (load {load():.2f})")
            one_round(bench, tools, res)
    except (BenchError, KeyboardInterrupt) as exc:
        failed = str(exc) or type(exc).__name__
    finally:
        clean_up(
            [bench.stop_all if bench else None, testhosts.stop if testhosts else None],
            work,
            args.keep,
            _say,
        )
    res["bench_seconds"] = time.perf_counter() - t0
    if args.raw:
        args.raw.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    if failed:
        print(f"bench failed: {failed}", file=sys.stderr)
        return 1
    return report(res, args.out)


def report(res: dict[str, Any], out: Path | None) -> int:
    """Print the section; with ``out``, write it into that file."""
    section = render(res)
    print(section)
    if out:
        write_section(out, section)
        _say(f"wrote the '{HEADING}' section of {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
