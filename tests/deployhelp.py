"""Helpers for tests that deploy for real: a scaffolded project, the `shiplane` CLI as a user runs
it, HTTP polling with deadlines, teardown of everything the project started."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def wait_for(predicate: Any, deadline: float = 20, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy; fail the test with ``what`` after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    last: Any = None
    while time.monotonic() < end:
        try:
            last = predicate()
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)  # poll interval inside the deadline loop
    raise AssertionError(f"timed out after {deadline}s waiting for {what}; last: {last!r}")


@dataclass
class Project:
    root: Path
    port: int
    stage: str = "local"

    def shiplane(
        self,
        *args: str,
        check: bool = False,
        env: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "shiplane", *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env={**os.environ, **(env or {}), "NO_COLOR": "1"},
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"shiplane {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def deploy(
        self, *extra: str, check: bool = True, env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Deploy with --json; return the final result object (exit code under "exit")."""
        done = self.shiplane(
            "deploy", "--stage", self.stage, "--skip-tests", "--json", *extra, env=env
        )
        result: dict[str, Any] = {}
        for line in done.stdout.splitlines():
            if line.startswith('{"result"'):
                result = json.loads(line)["result"]
        result["exit"] = done.returncode
        result["output"] = done.stdout + done.stderr
        if check and done.returncode != 0:
            raise AssertionError(f"deploy failed ({done.returncode}):\n{result['output'][-4000:]}")
        return result

    def get(self, path: str = "/") -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.port}{path}")

    @property
    def deploy_root(self) -> Path:
        return self.root / ".shiplane" / self.stage

    def current(self) -> str:
        return os.readlink(self.deploy_root / "current").split("/")[-1]

    def commit(self, message: str = "change") -> None:
        subprocess.run(["git", "add", "-A"], cwd=self.root, check=True)
        subprocess.run(
            ["git", "commit", "-qm", message],
            cwd=self.root,
            check=True,
            env={
                **os.environ,
                "GIT_AUTHOR_NAME": "t",
                "GIT_AUTHOR_EMAIL": "t@t",
                "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t",
            },
        )

    def stop(self) -> None:
        self.shiplane("stop", "--all", "--stage", self.stage, timeout=120)


def scaffold(tmp: Path, name: str = "demo") -> Project:
    """`shiplane init` a project into tmp/name, on a free port, committed to git."""
    root = tmp / name
    subprocess.run(
        [sys.executable, "-m", "shiplane", "init", str(root)], check=True, capture_output=True
    )
    port = free_port()
    toml = root / "shiplane.toml"
    toml.write_text(toml.read_text().replace("port = 5000", f"port = {port}"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    project = Project(root, port)
    project.commit("init")
    return project


def edit(project: Project, path: str, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in one file of the project and commit it."""
    file = project.root / path
    text = file.read_text()
    assert old in text, f"{old!r} not in {path}"
    file.write_text(text.replace(old, new, 1))
    project.commit(f"edit {path}")
