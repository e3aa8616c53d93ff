"""The measured scenarios: shiplane on the ``local`` stage, and the article's manual flow.

(a) cold deploy, (b) warm redeploy of a one-line change, (c) rollback — through ``shiplane``;
(d) the article's flow by hand (wheel, cp, fresh venv + pip, stop gunicorn by pid, start it
again, poll ``/up``); (e) the floor: gunicorn from an existing venv until ``/up`` answers 200.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _benchlib import (
    BenchError,
    Started,
    Timed,
    http_get,
    json_lines,
    result_of,
    run,
    wait_http_200,
)

GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
EDITED_FILE = Path("src/demo/views.py")
EDITED_TEXT = "deployed with shiplane"
BOOT_DEADLINE = 60.0


def stop_supervisord(deploy_root: Path, timeout: float = 40.0) -> bool:
    """TERM the supervisord whose pid file is in ``deploy_root/run`` and wait for it to exit.

    Only a pid whose command line names this deploy root is signalled. True when none runs now.
    """
    try:
        pid = int((deploy_root / "run" / "supervisord.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
        return True
    if str(deploy_root) not in cmdline:
        return True
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.1)  # bounded wait for supervisord to stop its programs and exit
    return False


@dataclass
class DeployRun:
    """One ``deploy``/``rollback --json``: wall time, the result, and the events' timings."""

    wall: float
    result: dict[str, Any]
    events: list[dict[str, Any]]
    started_at: float

    def host_phases(self, host: str = "local") -> dict[str, float]:
        phases = ((self.result.get("hosts") or {}).get(host) or {}).get("phases") or {}
        return {str(k): float(v) for k, v in phases.items()}

    def controller_phases(self) -> dict[str, float]:
        """Phases the controller runs itself (gate, build): events without a host."""
        out: dict[str, float] = {}
        for ev in self.events:
            if ev.get("host") is None and ev.get("status") == "ok" and "seconds" in ev:
                out[str(ev["phase"])] = out.get(str(ev["phase"]), 0.0) + float(ev["seconds"])
        return out

    def to_live(self) -> float | None:
        """Seconds from the command's start to the new release taking new connections."""
        for ev in self.events:
            if ev.get("phase") == "switch" and ev.get("status") == "live" and "at" in ev:
                return float(ev["at"]) - self.started_at
        return None

    def switch_split(self) -> dict[str, float]:
        """The switch phase cut at the ``live`` event: before (start candidate, health, smoke,
        flip) and after (the old standby's exit, other services)."""
        marks: dict[str, float] = {}
        for ev in self.events:
            if ev.get("phase") != "switch" or "at" not in ev:
                continue
            status = ev.get("status")
            if status == "start" and "start" not in marks:
                marks["start"] = float(ev["at"])
            elif status in ("live", "ok"):
                marks[str(status)] = float(ev["at"])
        if not {"start", "live", "ok"} <= set(marks):
            return {}
        return {
            "switch ▸ until live": marks["live"] - marks["start"],
            "switch ▸ after live": marks["ok"] - marks["live"],
        }

    def venv_builds(self) -> list[dict[str, Any]]:
        """Events showing a dependency venv being built (a warm redeploy must have none)."""
        return [
            ev
            for ev in self.events
            if ev.get("phase") == "venv" and ev.get("status") in ("building", "built")
        ]

    def bytes_sent(self, host: str = "local") -> int:
        return int(((self.result.get("hosts") or {}).get(host) or {}).get("bytes") or 0)


@dataclass
class Project:
    """A scaffolded app (``shiplane init``) in a git repo, deployed on its ``local`` stage."""

    root: Path
    port: int
    edits: int = 0
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    @classmethod
    def scaffold(cls, parent: Path, port: int) -> Project:
        run([sys.executable, "-m", "shiplane", "init", "demo"], parent)
        root = parent / "demo"
        run([*GIT, "init", "-q"], root)
        run([*GIT, "add", "-A"], root)
        run([*GIT, "commit", "-qm", "scaffold"], root)
        return cls(root, port)

    def shiplane(self, *args: str, timeout: float = 300.0) -> Timed:
        return run(
            [sys.executable, "-m", "shiplane", *args], self.root, env=self.env, timeout=timeout
        )

    def _json_run(self, *args: str) -> DeployRun:
        done = self.shiplane(*args, "--stage", "local", "--set", f"port={self.port}", "--json")
        events = json_lines(done.stdout)
        result = result_of(events)
        if result.get("ok") is False or result.get("outcome") not in (None, "ok"):
            raise BenchError(f"shiplane {' '.join(args)} failed: {result.get('error')}")
        return DeployRun(done.seconds, result, events, done.started_at)

    def deploy(self, gate: bool = False) -> DeployRun:
        return self._json_run("deploy", *([] if gate else ["--skip-tests"]))

    def rollback(self) -> DeployRun:
        # --yes: the scaffold's release hook is `alembic upgrade head`, which may count as a
        # migration; a bench must never stop at a question.
        return self._json_run("rollback", "--yes")

    def stop_all(self) -> None:
        """Stop everything this project's local stage runs (supervisord and its programs).

        If ``shiplane stop --all`` fails, the supervisord of this deploy root is stopped by
        the pid in its pid file (TERM makes it stop its programs first).
        """
        deploy_root = self.root / ".shiplane" / "local"
        if not deploy_root.exists():
            return
        try:
            self.shiplane("stop", "--all", "--stage", "local", timeout=120)
        except BenchError:
            if not stop_supervisord(deploy_root):
                raise

    def wipe(self) -> None:
        """A fresh deploy root and a fresh ``.shiplane/build`` (global uv/pip caches stay)."""
        self.stop_all()
        shutil.rmtree(self.root / ".shiplane", ignore_errors=True)
        os.sync()  # the deletion's writeback must not land inside the next timed deploy

    def settle(self, deadline: float = 15.0) -> float:
        """Wait (bounded) for what the last deploy left running in the background to finish:
        the old standby's exit and the spare's start (`web spare` RUNNING in `status`), as any
        pause of a second or two between two deploys does. Returns the seconds waited."""
        started = time.perf_counter()
        while time.perf_counter() - started < deadline:
            done = self.shiplane("status", "--stage", "local", "--json")
            services = json.loads(done.stdout)["result"]["hosts"]["local"]["services"]
            if any(
                s.get("preboot") and not s.get("release") and s.get("state") == "RUNNING"
                for s in services
            ):
                return time.perf_counter() - started
        raise BenchError(f"no spare web server was running {deadline:g}s after the deploy")

    def commit_edit(self) -> str:
        """A one-line change of a template string in the app, committed; returns the marker."""
        self.edits += 1
        marker = f"bench edit {self.edits}"
        path = self.root / EDITED_FILE
        text = path.read_text(encoding="utf-8")
        line = next(ln for ln in text.splitlines() if EDITED_TEXT in ln)
        new = f'        "<footer>demo, {EDITED_TEXT} ({marker})</footer>\\n"'
        path.write_text(text.replace(line, new), encoding="utf-8")
        run([*GIT, "commit", "-qam", marker], self.root)
        return marker

    def venvs(self) -> list[str]:
        return sorted(p.name for p in (self.root / ".shiplane/local/venvs").glob("*"))

    def page(self) -> str:
        status, body = http_get(f"http://127.0.0.1:{self.port}/")
        if status != 200:
            raise BenchError(f"GET / on the local stage answered {status}")
        return body


@dataclass
class Manual:
    """The article's flow, literally, on this machine: ``remote`` stands for the server's dir."""

    project: Path
    base: Path
    port: int
    floor_port: int
    started: Started
    runs: int = 0
    server: Any = None  # the running gunicorn (subprocess.Popen)
    venv: Path | None = None

    @property
    def remote(self) -> Path:
        return self.base / "remote"

    @property
    def dist(self) -> Path:
        return self.base / "dist"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The machine's pip config already disables the version check; make it explicit.
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        for var in ("VIRTUAL_ENV", "PYTHONPATH", "SHIPLANE_STAGE"):
            env.pop(var, None)
        return env

    def gunicorn(self, venv: Path, port: int) -> Any:
        cmd = [
            str(venv / "bin" / "gunicorn"),
            "--workers",
            "2",
            "--bind",
            f"127.0.0.1:{port}",
            "demo:create_app()",
        ]
        return self.started.spawn(cmd, self.remote, self.base / "gunicorn.log", env=self.env())

    def wait_up(self, proc: Any, port: int) -> float:
        return wait_http_200(
            f"http://127.0.0.1:{port}/up",
            time.perf_counter() + BOOT_DEADLINE,
            alive=lambda: proc.poll() is None,
        )

    def _install(self) -> tuple[Path, dict[str, float]]:
        """Build the wheel, copy it with the config, make a fresh venv and pip install into it."""
        self.runs += 1
        env = self.env()
        t0 = time.perf_counter()
        # build: the article's `clean` + `compile` (setup.py bdist_wheel -> pip wheel today)
        shutil.rmtree(self.dist, ignore_errors=True)
        run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(self.dist), "."],
            self.project,
            env=env,
        )
        t1 = time.perf_counter()
        # copy: the article's `pack` + `scp` of the wheel and the config files (cp here)
        wheel = next(self.dist.glob("*.whl"))
        (self.remote / "config").mkdir(parents=True, exist_ok=True)
        run(["cp", str(wheel), str(self.remote)], self.base)
        ini = sorted(str(p) for p in (self.project / "config").glob("*.ini"))
        run(["cp", *ini, str(self.remote / "config")], self.base)
        t2 = time.perf_counter()
        venv = self.remote / f"venv-{self.runs}"
        run([sys.executable, "-m", "venv", str(venv)], self.remote, env=env)
        pip = str(venv / "bin" / "pip")
        run(
            [pip, "install", "-q", "-r", str(self.project / "requirements.txt")],
            self.remote,
            env=env,
        )
        run([pip, "install", "-q", str(self.remote / wheel.name)], self.remote, env=env)
        t3 = time.perf_counter()
        return venv, {"wheel": t1 - t0, "copy": t2 - t1, "venv+pip": t3 - t2}

    def steps(self) -> dict[str, float]:
        """One deploy by hand; returns the seconds of each step (and ``total``, ``downtime``)."""
        t0 = time.perf_counter()
        venv, times = self._install()
        t3 = time.perf_counter()
        if self.server is not None:
            self.started.stop(self.server)  # by its pid (the article: `killall gunicorn`)
        t4 = time.perf_counter()
        self.server = self.gunicorn(venv, self.port)
        up = self.wait_up(self.server, self.port)
        previous, self.venv = self.venv, venv
        if previous is not None:  # not part of the article's flow: keeps the disk bounded
            shutil.rmtree(previous, ignore_errors=True)
            os.sync()  # its writeback must not land inside the next timed scenario
        return {
            **times,
            "stop": t4 - t3,
            "start+up": up - t4,
            "total": up - t0,
            "downtime": up - t3,
        }

    def setup(self) -> None:
        """The server's first state (not timed): the app installed, migrated and serving."""
        self.remote.mkdir(parents=True, exist_ok=True)
        for name in ("alembic.ini", "db"):
            src, dst = self.project / name, self.remote / name
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                shutil.copy2(src, dst)
        self.venv, _ = self._install()
        # /up answers 200 only once the schema exists: migrate once, as a first deploy would.
        run([str(self.venv / "bin" / "alembic"), "upgrade", "head"], self.remote, env=self.env())
        self.server = self.gunicorn(self.venv, self.port)
        self.wait_up(self.server, self.port)

    def floor(self) -> float:
        """(e) gunicorn from the existing venv until ``/up`` answers 200, on a second port
        (the manual flow's server stays up, idle)."""
        assert self.venv is not None
        t0 = time.perf_counter()
        proc = self.gunicorn(self.venv, self.floor_port)
        try:
            up = self.wait_up(proc, self.floor_port)
        finally:
            self.started.stop(proc)
        return up - t0

    def close(self) -> None:
        if self.server is not None:
            self.started.stop(self.server)
            self.server = None
