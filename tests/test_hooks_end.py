"""Hooks that end: a hook silent for longer than ``hooks.silence_timeout`` is ended (the agent's
own "alive" pings are not its output), and Ctrl-C during a running hook ends its process group
at once: the deploy ends "interrupted" within seconds, its lock released, and the next deploy
goes on with no manual step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployhelp import Project, scaffold, wait_for

pytestmark = pytest.mark.slow


def running(marker: str) -> list[int]:
    """Pids of processes whose command line holds ``marker`` (the hook's own sleep)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def with_hook(project: Project, release: str, silence: int) -> None:
    toml = project.root / "shiplane.toml"
    text = "".join(
        line
        for line in toml.read_text().splitlines(keepends=True)
        if not line.startswith("silence_timeout")
    )
    start = text.index("release = ")
    end = text.index("\n", start)
    toml.write_text(
        text[:start] + f'release = "{release}"\nsilence_timeout = {silence}' + text[end:]
    )
    project.commit("hook")


@pytest.fixture
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    project = scaffold(tmp_path_factory.mktemp("he"))  # short: unix socket paths are limited
    try:
        yield project
    finally:
        project.stop()


def test_a_silent_hook_is_ended(app: Project) -> None:
    with_hook(app, "echo migrating; sleep 283.25", silence=2)
    started = time.monotonic()
    failed = app.deploy(check=False)
    assert failed["exit"] == 1 and time.monotonic() - started < 30
    assert "printed nothing for 2s" in failed["error"], failed["error"]
    assert not running("283.25")
    assert not (app.deploy_root / ".lock").exists()


def test_ctrl_c_ends_a_running_hook_at_once(app: Project) -> None:
    with_hook(app, "echo hook-started; sleep 287.25", silence=0)
    deploy = subprocess.Popen(
        [sys.executable, "-m", "shiplane", "deploy", "--stage", "local", "--skip-tests", "--json"],
        cwd=app.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        assert deploy.stdout is not None
        for line in deploy.stdout:  # the deploy's own events say when the hook runs
            if "hook-started" in line:
                break
        else:
            raise AssertionError(
                f"the hook never started: {deploy.stderr.read() if deploy.stderr else ''}"
            )
        wait_for(lambda: running("287.25"), deadline=10, what="the hook's sleep")
        interrupted_at = time.monotonic()
        deploy.send_signal(signal.SIGINT)
        rest, _ = deploy.communicate(timeout=30)
        assert time.monotonic() - interrupted_at < 15
    finally:
        if deploy.poll() is None:
            deploy.kill()
    assert deploy.returncode == 130, rest
    result = next(
        json.loads(line)["result"] for line in rest.splitlines() if line.startswith('{"result"')
    )
    assert result["outcome"] == "interrupted"
    assert not running("287.25")
    assert not (app.deploy_root / ".lock").exists()

    with_hook(app, "alembic upgrade head", silence=300)
    done = app.deploy()
    status, body = app.get("/")
    assert status == 200 and f"release {done['release']}" in body
