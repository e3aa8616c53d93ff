"""What every real-app test needs: locks compiled once per set of requirements (cached across
runs), throwaway tool venvs (e.g. Django's ``django-admin``), the ``shiplane`` CLI run as a user
runs it, HTTP polling with deadlines, and the teardown of what a deployed app started."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployhelp import wait_for  # noqa: F401 - re-exported for the app helpers

CACHE = Path(os.environ.get("SHIPLANE_TESTS_CACHE", Path.home() / ".cache" / "shiplane-tests"))
PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


def _uv() -> str:
    found = shutil.which("uv")
    if found is None:
        import uv  # the uv wheel is a dependency of shiplane itself

        return str(uv.find_uv_bin())
    return found


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def compiled_lock(requirements: Sequence[str]) -> str:
    """``uv pip compile`` of ``requirements`` for this Python (pinned, with comments), cached in
    CACHE/locks by the requirements' text, so later runs neither resolve nor touch the index."""
    text = "".join(r + "\n" for r in requirements)
    out = CACHE / "locks" / f"{_key(PY_VERSION, text)}.txt"
    if out.is_file():
        return out.read_text()
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_suffix(f".in.{os.getpid()}")
    tmp = out.with_suffix(f".tmp.{os.getpid()}")
    src.write_text(text)
    try:
        subprocess.run(
            [
                _uv(),
                "pip",
                "compile",
                "-q",
                "--no-header",
                "--python-version",
                PY_VERSION,
                str(src),
                "-o",
                str(tmp),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, out)
    finally:
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return out.read_text()


def tool_venv(lock: str) -> Path:
    """A venv with ``lock`` installed (a framework's own tooling, e.g. ``django-admin``), cached."""
    venv = CACHE / "venvs" / _key(PY_VERSION, lock)
    if (venv / ".complete").is_file():
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    # another test session may be making the same venv: one at a time
    with open(venv.with_name(venv.name + ".lock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if not (venv / ".complete").is_file():
            _make_venv(venv, lock)
    return venv


def _make_venv(venv: Path, lock: str) -> None:
    # venvs are not relocatable: built in place, complete once the marker is written
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    req = venv.with_name(venv.name + f".{os.getpid()}.txt")
    req.write_text(lock)
    try:
        subprocess.run(
            [_uv(), "venv", "-q", "--python", sys.executable, str(venv)],
            check=True,
            capture_output=True,
            text=True,
        )
        subprocess.run(
            [
                _uv(),
                "pip",
                "install",
                "-q",
                "--python",
                str(venv / "bin" / "python"),
                "-r",
                str(req),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        (venv / ".complete").write_text("")
    finally:
        req.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def run(cmd: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a framework tool; fail the test with its output when it fails."""
    done = subprocess.run(
        list(cmd),
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout


@dataclass
class Deployed:
    """The outcome of one ``shiplane deploy --json``."""

    exit: int
    result: dict[str, Any]
    events: list[dict[str, Any]]
    output: str

    @property
    def bytes_sent(self) -> int:
        return int(self.result["hosts"]["local"]["bytes"])

    def installs(self) -> list[dict[str, Any]]:
        """The install results/events the host reported (venv reused or built)."""
        return [e for e in self.events if e.get("phase") == "install"]


@dataclass
class App:
    """An app's checkout (a git work tree) with a local stage on its own port and deploy_to."""

    root: Path
    port: int
    deploy_to: Path
    env: dict[str, str] = field(default_factory=dict)  # the deploying environment (secrets)
    stage: str = "local"

    def shiplane(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shiplane", *args],
            cwd=self.root,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self.env, "NO_COLOR": "1"},
        )

    def deploy(self, *extra: str, check: bool = True) -> Deployed:
        done = self.shiplane("deploy", "--stage", self.stage, "--json", *extra)
        result: dict[str, Any] = {}
        events: list[dict[str, Any]] = []
        for line in done.stdout.splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "result" in obj:
                result = obj["result"]
            elif isinstance(obj, dict):
                events.append(obj)
        out = Deployed(done.returncode, result, events, done.stdout + done.stderr)
        if check and done.returncode != 0:
            raise AssertionError(f"deploy exited {done.returncode}:\n{out.output[-6000:]}")
        return out

    def json(self, *args: str) -> Any:
        done = self.shiplane(*args, "--json")
        if done.returncode != 0:
            raise AssertionError(
                f"shiplane {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return json.loads(done.stdout)["result"]

    def get(self, path: str = "/") -> tuple[int, bytes]:
        return http_get(f"http://127.0.0.1:{self.port}{path}")

    def text(self, path: str = "/") -> str:
        status, body = self.get(path)
        assert status == 200, f"GET {path} -> {status}: {body[:300]!r}"
        return body.decode()

    def current(self) -> str:
        return os.readlink(self.deploy_to / "current").rsplit("/", 1)[-1]

    def commit(self, message: str = "change") -> None:
        run(["git", "add", "-A"], self.root)
        run(["git", "commit", "-qm", message], self.root, GIT_ENV)

    def edit(self, rel: str, old: str, new: str) -> None:
        """Change one line of one file and commit it (a code-only change)."""
        path = self.root / rel
        text = path.read_text()
        assert old in text, f"{old!r} not in {rel}"
        path.write_text(text.replace(old, new, 1))
        run(["git", "add", rel], self.root)
        run(["git", "commit", "-qm", f"edit {rel}", "--", rel], self.root, GIT_ENV)

    def stop(self) -> None:
        """Stop everything the app's deploys started (supervisord and its programs, by pid)."""
        if (self.deploy_to / "run").exists():
            self.shiplane("stop", "--all", "--stage", self.stage, timeout=120)


def new_app(root: Path, deploy_base: Path) -> App:
    """An empty git work tree at ``root`` and a short ``deploy_to`` (unix socket paths are
    limited to 107 bytes, and pytest's tmp paths are long)."""
    root.mkdir(parents=True)
    run(["git", "init", "-q"], root)
    deploy_base.mkdir(parents=True, exist_ok=True)
    return App(root=root, port=free_port(), deploy_to=deploy_base)


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def share_build_caches(root: Path) -> None:
    """Point the project's wheelhouse and tool-wheel caches (``.shiplane/build/{wheelhouse,tools}``)
    at CACHE/build, shared by every test project: a wheelhouse resolved for another target (a
    ``pip download`` per lock and target) is made once across runs, not once per tmp project."""
    build = root / ".shiplane" / "build"
    build.mkdir(parents=True, exist_ok=True)
    for name in ("wheelhouse", "tools"):
        shared = CACHE / "build" / name
        shared.mkdir(parents=True, exist_ok=True)
        (build / name).symlink_to(shared, target_is_directory=True)
