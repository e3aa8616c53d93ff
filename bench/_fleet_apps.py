"""The fleet bench's two workloads: an app with one stage per fleet size on the test hosts.

- ``scaffold``: the scaffolded Flask + SQLAlchemy + Alembic app (``shiplane init``), stages
  ``fleetN`` (``/srv/bench-N``, port 8100 + N), ``after_install = ["alembic upgrade head"]``.
- ``minimal``: one stdlib WSGI module, a hashed lock of gunicorn alone, one worker, no hooks,
  stages ``minN`` (``/srv/bench-min-N``, port 8200 + N): what shiplane itself does per host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _benchlib import (
    BenchError,
    Timed,
    close_shiplane_connections,
    http_get,
    json_lines,
    result_of,
    run,
)
from _fleet_cpu import MasterWatch, ProgramSampler, busy_jiffies, children_cpu, hosts_cpu
from _scenarios import EDITED_FILE, EDITED_TEXT, GIT, DeployRun
from _uplink import Uplink

from sshhosts import TestHost, TestHosts

WORKLOADS = ("scaffold", "minimal")


@dataclass
class Measured:
    """One timed deploy: the run, its CPU seconds (machine, controller, hosts), the size of the
    app's code (its wheel, or its files for an app without one)."""

    run: DeployRun
    hosts: list[str]
    cpu_machine: float
    cpu_controller: float
    cpu_hosts: float
    code_size: int
    programs: dict[str, float] = field(default_factory=dict)
    sent: int = 0  # bytes the controller sent to the hosts (an Uplink's count; 0: not counted)
    received: dict[str, int] = field(default_factory=dict)  # per host, from anyone

    def phase_max(self) -> dict[str, float]:
        """Each host phase's longest host: phases end at a barrier, so that one sets the pace."""
        out: dict[str, float] = {}
        for host in self.hosts:
            for phase, secs in self.run.host_phases(host).items():
                out[phase] = max(out.get(phase, 0.0), secs)
        return out

    def per_host_bytes(self) -> list[int]:
        """Bytes the controller streamed to each host."""
        return [self.run.bytes_sent(h) for h in self.hosts]

    def as_dict(self) -> dict[str, Any]:
        """Everything measured, for ``--raw``."""
        return {
            "wall": self.run.wall,
            "cpu_machine": self.cpu_machine,
            "cpu_controller": self.cpu_controller,
            "cpu_hosts": self.cpu_hosts,
            "code_size": self.code_size,
            "controller_sent": self.sent,
            "received": self.received,
            "controller": self.run.controller_phases(),
            "hosts": {
                h: {"bytes": self.run.bytes_sent(h), "phases": self.run.host_phases(h)}
                for h in self.hosts
            },
        }


@dataclass
class Fleet:
    """An app in a git repo with one stage per fleet size on the test hosts (subclasses make
    the app and its one-line edit)."""

    root: Path
    testhosts: TestHosts
    sizes: tuple[int, ...]
    edits: int = 0
    deployed: set[str] = field(default_factory=set)
    uplink: Uplink | None = None  # counts (and may limit) what the controller sends
    deploy_args: tuple[str, ...] = ()  # more `deploy` arguments (e.g. --set transfer=direct)

    workload = ""
    stage_prefix = "fleet"
    dir_prefix = "bench-"
    port_base = 8100
    shows_release = False  # the app's page names the live release (SHIPLANE_RELEASE)

    def stage(self, n: int) -> str:
        return f"{self.stage_prefix}{n}"

    def port(self, n: int) -> int:
        return self.port_base + n

    def deploy_dir(self, n: int) -> str:
        """The stage's ``deploy_to`` under ``/srv`` (each host has its own ``/srv``)."""
        return f"{self.dir_prefix}{n}"

    def stages_toml(self) -> str:
        """One ``[stages.<prefix>N]`` table per size: hosts ``shl-h1..N``, own root and port."""
        out = []
        for n in self.sizes:
            hosts = ", ".join(f'"shl-h{i}"' for i in range(1, n + 1))
            out.append(
                f"[stages.{self.stage(n)}]\nhosts = [{hosts}]\n"
                f'deploy_to = "/srv/{self.deploy_dir(n)}"\nport = {self.port(n)}\n'
                f'bind = "0.0.0.0"\nssh_config = "{self.testhosts.ssh_config}"\n\n'
            )
        return "".join(out)

    def hosts(self, n: int) -> list[TestHost]:
        return self.testhosts.hosts[:n]

    def shiplane(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 600.0,
        check: bool = True,
    ) -> Timed:
        """Run the ``shiplane`` CLI in the app's checkout."""
        return run(
            [sys.executable, "-m", "shiplane", *args],
            self.root,
            env={**os.environ, "NO_COLOR": "1", **(env or {})},
            timeout=timeout,
            check=check,
        )

    def commit_edit(self) -> str:
        """A one-line change of the app's code, committed; returns the marker it shows."""
        raise NotImplementedError

    def _git_init(self, message: str) -> None:
        """Make the app's directory a git repo with everything in one commit."""
        for argv in (["init", "-q"], ["add", "-A"], ["commit", "-qm", message]):
            run([*GIT, *argv], self.root)

    def _commit_line(self, rel: Path | str, pattern: str, new: str, marker: str) -> str:
        """Replace the first line of ``rel`` matching ``pattern`` with ``new``, commit as
        ``marker``; returns ``marker``."""
        path = self.root / rel
        text, count = re.subn(
            pattern, lambda _: new, path.read_text(encoding="utf-8"), count=1, flags=re.MULTILINE
        )
        if count != 1:
            raise BenchError(f"{self.workload}: no line of {rel} matches {pattern!r}")
        path.write_text(text, encoding="utf-8")
        run([*GIT, "commit", "-qam", marker], self.root)
        return marker

    def code_size(self, manifest: dict[str, Any]) -> int:
        """The app's code in the artifact: its wheel (the code-only redeploy's yardstick)."""
        return next(int(f["size"]) for f in manifest["app_files"] if f["kind"] == "wheel")

    def deploy(
        self,
        n: int,
        env: dict[str, str] | None = None,
        by_program: bool = False,
        reuse: bool = False,
    ) -> Measured:
        """``deploy --stage <stage> --json``, timed; ``by_program`` also samples the hosts' CPU
        by program (the sampler's own polling costs some CPU: not for the timed rounds). It
        starts without an SSH connection open, unless ``reuse``: then over those the last
        command left open (``ssh_persist``)."""
        if not reuse:
            close_shiplane_connections()
        stage = self.stage(n)
        self.deployed.add(stage)
        watch = MasterWatch(self.testhosts.ssh_config)
        sampler = ProgramSampler(self.testhosts) if by_program else None
        for thread in (watch, sampler):
            if thread is not None:
                thread.start()
        busy0, ctl0, hosts0 = busy_jiffies(), children_cpu(), hosts_cpu(self.testhosts)
        sent0, received0 = (self.uplink.sent(), self.uplink.received()) if self.uplink else (0, {})
        done = self.shiplane(
            "deploy",
            "--stage",
            stage,
            "--skip-tests",
            "--json",
            *self.deploy_args,
            env=env,
            check=False,
        )
        busy = (busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")
        ctl = children_cpu() - ctl0 + watch.stop()
        programs = sampler.stop() if sampler is not None else {}
        sent, received = 0, {}
        if self.uplink is not None:
            sent = self.uplink.sent() - sent0
            after = self.uplink.received()
            received = {h.name: after[h.name] - received0[h.name] for h in self.hosts(n)}
        on_hosts = hosts_cpu(self.testhosts) - hosts0
        events = json_lines(done.stdout)
        try:
            result = result_of(events)
        except BenchError:
            result = {}
        if done.returncode != 0 or not result.get("ok"):
            raise BenchError(
                f"{self.workload}: deploy --stage {stage} exited {done.returncode}: "
                f"{result.get('error')}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        manifest = json.loads(
            (self.root / ".shiplane/build/artifacts" / f"{result['artifact']}.json").read_text()
        )
        names = [h.name for h in self.hosts(n)]
        return Measured(
            DeployRun(done.seconds, result, events, done.started_at),
            names,
            busy,
            ctl,
            on_hosts,
            self.code_size(manifest),
            programs,
            sent,
            received,
        )

    def check_serves(self, n: int, marker: str, done: Measured) -> None:
        """Every host of the stage serves ``/`` with ``marker`` on its public port (and, for an
        app that shows it, the release ``done`` made live on that host)."""
        for host in self.hosts(n):
            status, body = http_get(host.url(self.port(n), "/"), timeout=5.0)
            want = [marker]
            if self.shows_release:
                release = ((done.run.result.get("hosts") or {}).get(host.name) or {}).get("release")
                want.append(f"release {release}")
            missing = [m for m in want if m not in body]
            if status != 200 or missing:
                raise BenchError(
                    f"{self.workload}: {host.name} answers {status} without "
                    f"{missing!r} after the deploy: {body[:200]!r}"
                )

    def stop(self, n: int) -> None:
        """``shiplane stop --all`` on the stage, if this bench deployed it."""
        stage = self.stage(n)
        if stage in self.deployed:
            self.shiplane("stop", "--all", "--stage", stage, timeout=180)
            self.deployed.discard(stage)

    def wipe(self, n: int) -> None:
        """Stop the stage, then remove its deploy root on every host: the next deploy is cold."""
        self.stop(n)
        for host in self.hosts(n):
            if (host.root / self.deploy_dir(n)).exists():
                shutil.rmtree(host.root / self.deploy_dir(n))

    def venvs(self, n: int) -> dict[str, list[str]]:
        """Each host's dependency venvs of the stage (a code-only redeploy leaves them alone)."""
        return {
            h.name: sorted(p.name for p in (h.root / self.deploy_dir(n) / "venvs").glob("*"))
            for h in self.hosts(n)
        }

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


class ScaffoldFleet(Fleet):
    """The scaffolded app (``shiplane init demo``) and its stages ``fleetN``."""

    workload = "scaffold"

    @classmethod
    def create(cls, parent: Path, testhosts: TestHosts, sizes: tuple[int, ...]) -> ScaffoldFleet:
        """Scaffold the app in ``parent/demo``, give it the stages and secrets, commit."""
        run([sys.executable, "-m", "shiplane", "init", "demo"], parent)
        fleet = cls(parent / "demo", testhosts, sizes)
        toml = fleet.root / "shiplane.toml"
        text = toml.read_text()
        # each host has its own sqlite database: migrate on every host, not only on the primary
        text = text.replace(
            'release = "alembic upgrade head"',
            'release = "alembic upgrade head"\nafter_install = ["alembic upgrade head"]',
        )
        toml.write_text(text[: text.index("[stages.staging]")] + fleet.stages_toml())
        for n in sizes:
            secrets = fleet.root / ".secrets" / f"fleet{n}.env"
            secrets.write_text("SECRET_KEY=bench-fleet-secret-value\n")
            os.chmod(secrets, 0o600)
        fleet._git_init("scaffold, stages on the test hosts")
        return fleet

    def commit_edit(self) -> str:
        """A one-line change of a template string, committed; returns the marker it shows."""
        self.edits += 1
        marker = f"bench edit {self.edits}"
        return self._commit_line(
            EDITED_FILE,
            rf"^.*{re.escape(EDITED_TEXT)}.*$",
            f'        "<footer>demo, {EDITED_TEXT} ({marker})</footer>\\n"',
            marker,
        )


MINIMAL_APP = '''"""The fleet bench's minimal app: a stdlib WSGI callable, served by gunicorn."""

import os

TEXT = "minimal app, edit 0"


def app(environ, start_response):
    """``/up`` answers 200; any other path the text and the release the agent started."""
    if environ.get("PATH_INFO") == "/up":
        body = b"ok\\n"
    else:
        release = os.environ.get("SHIPLANE_RELEASE", "none")
        body = f"{TEXT}\\nrelease {release}\\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''

MINIMAL_TOML = """[app]
name = "minimal"
wsgi = "app:app"
source = "tree"

[build]
requirements = "requirements.txt"

[services.web]
workers = 1
healthcheck = { path = "/up", timeout = 15 }

"""


def hashed_lock(requirements: str, workdir: Path) -> str:
    """``uv pip compile --generate-hashes`` of ``requirements`` for this Python; offline from
    uv's cache first (the scaffold app's build has fetched gunicorn already), else online."""
    uv = shutil.which("uv")
    if uv is None:
        import uv as uv_module  # shiplane depends on the uv wheel

        uv = str(uv_module.find_uv_bin())
    src, out = workdir / "requirements.in", workdir / "requirements.txt"
    src.write_text(requirements)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [
        uv,
        "pip",
        "compile",
        "-q",
        "--generate-hashes",
        "--python-version",
        version,
        str(src),
        "-o",
        str(out),
    ]
    done = subprocess.run([*cmd, "--offline"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"uv pip compile --generate-hashes failed: {done.stderr[-2000:]}")
    return out.read_text()


class MinimalFleet(Fleet):
    """The minimal app (``app.py``, gunicorn alone, one worker, no hooks), stages ``minN``."""

    workload = "minimal"
    stage_prefix = "min"
    dir_prefix = "bench-min-"
    port_base = 8200
    shows_release = True

    @classmethod
    def create(cls, parent: Path, testhosts: TestHosts, sizes: tuple[int, ...]) -> MinimalFleet:
        """Write the app in ``parent/minimal`` with a freshly compiled hashed lock, commit."""
        fleet = cls(parent / "minimal", testhosts, sizes)
        fleet.root.mkdir(parents=True)
        (fleet.root / "app.py").write_text(MINIMAL_APP, encoding="utf-8")
        # a dependency change swaps between two locks: gunicorn alone, and gunicorn with six
        with_six = hashed_lock("gunicorn\nsix\n", fleet.root)
        fleet.locks = (hashed_lock("gunicorn\n", fleet.root), with_six)
        (fleet.root / "shiplane.toml").write_text(MINIMAL_TOML + fleet.stages_toml())
        (fleet.root / ".gitignore").write_text("__pycache__/\n.shiplane/\n")
        fleet._git_init("minimal app, stages on the test hosts")
        return fleet

    def commit_edit(self) -> str:
        """Change the one line with the app's text, committed; returns the new text."""
        self.edits += 1
        marker = f"minimal app, edit {self.edits}"
        return self._commit_line("app.py", r'^TEXT = ".*"$', f'TEXT = "{marker}"', marker)

    locks: tuple[str, str] = ("", "")

    def commit_deps(self) -> str:
        """A dependency change, committed: the lock swaps to the other one (six in or out), and
        the app's text changes too, so the bench can tell the new release is served."""
        self.edits += 1
        path = self.root / "requirements.txt"
        path.write_text(self.locks[1] if path.read_text() == self.locks[0] else self.locks[0])
        marker = f"minimal app, edit {self.edits}"
        return self._commit_line("app.py", r'^TEXT = ".*"$', f'TEXT = "{marker}"', marker)

    def code_size(self, manifest: dict[str, Any]) -> int:
        """The app's code: ``app.py`` (a tree app has no wheel; the edit changes only it)."""
        return sum(int(f["size"]) for f in manifest["app_files"] if f["path"] == "app.py")


def make_fleet(workload: str, parent: Path, testhosts: TestHosts, sizes: tuple[int, ...]) -> Fleet:
    """The app of ``workload`` (one of ``WORKLOADS``) in ``parent``, committed, stages set."""
    if workload == "scaffold":
        return ScaffoldFleet.create(parent, testhosts, sizes)
    if workload == "minimal":
        return MinimalFleet.create(parent, testhosts, sizes)
    raise BenchError(f"unknown workload {workload!r}")
