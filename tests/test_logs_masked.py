"""Secrets stay masked in logs: ``shiplane logs`` masks the stage's secret values the app printed
(also with ``--follow``), and the host's log files are readable by their owner and group only."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployhelp import Project, edit, scaffold, wait_for

pytestmark = pytest.mark.slow

LEAK = "    visits = record_visit(_engine())\n"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """The scaffold app whose home page prints its SECRET_KEY to its log (stderr: log/web.log)."""
    project = scaffold(tmp_path_factory.mktemp("logsmasked"))
    edit(
        project,
        "src/demo/views.py",
        LEAK,
        LEAK
        + '    print("leaking", current_app.config["SECRET_KEY"], file=__import__("sys").stderr, flush=True)\n',
    )
    try:
        project.deploy()
        yield project
    finally:
        project.stop()


def secret(project: Project) -> str:
    line = (project.root / ".secrets" / "local.env").read_text().strip()
    assert line.startswith("SECRET_KEY=")
    return line.split("=", 1)[1]


def leaked(project: Project) -> str:
    """Visit the home page; wait until web.log holds the secret in clear (the app printed it)."""
    assert project.get("/")[0] == 200
    log = project.deploy_root / "log" / "web.log"
    wait_for(lambda: secret(project) in log.read_text(), 20, "the app's line in log/web.log")
    return log.read_text()


def test_logs_masks_the_secret_the_app_logged(app: Project) -> None:
    leaked(app)
    done = app.shiplane("logs", "--stage", "local", "--lines", "200", check=True)
    assert "leaking ***" in done.stdout, done.stdout[-2000:]
    assert secret(app) not in done.stdout + done.stderr


def test_logs_follow_masks_new_lines_too(app: Project) -> None:
    follow = subprocess.Popen(
        [sys.executable, "-m", "shiplane", "logs", "--stage", "local", "--lines", "0", "--follow"],
        cwd=app.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert follow.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(follow.stdout.readline, "")), daemon=True
    )
    reader.start()
    try:
        # the follower may start after the first visit: visit until a new line reaches it
        wait_for(
            lambda: leaked(app) and any("leaking" in line for line in list(lines)),
            30,
            "a followed line",
        )
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(timeout=30)
    text = "".join(lines)
    assert "leaking ***" in text and secret(app) not in text, text[-2000:]


def test_a_missing_secret_is_no_error_for_logs(app: Project) -> None:
    file = app.root / ".secrets" / "local.env"
    value = secret(app)
    moved = file.with_name("elsewhere.env")
    file.rename(moved)
    try:
        leaked_text = app.shiplane("logs", "--stage", "local", "--lines", "50")
        assert leaked_text.returncode == 0, (
            leaked_text.stderr
        )  # nothing to mask with: still the logs
        # found elsewhere (the environment), it is masked again
        done = app.shiplane(
            "logs", "--stage", "local", "--lines", "50", env={"SECRET_KEY": value}, check=True
        )
        assert "leaking ***" in done.stdout and value not in done.stdout
    finally:
        moved.rename(file)


def mode(path: os.PathLike[str] | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_log_files_are_private_to_owner_and_group(app: Project) -> None:
    leaked(app)
    log = app.deploy_root / "log"
    assert mode(log) & ~0o750 == 0, oct(mode(log))
    files = sorted(p for p in log.iterdir() if p.is_file())
    assert {"web.log", "front.log", "supervisord.log"} <= {p.name for p in files}
    for path in files:
        assert mode(path) & ~0o640 == 0, (path.name, oct(mode(path)))
    # supervisord creates them under umask 027; the app's own files keep the umask it always had
    services = json.loads(app.shiplane("status", "--stage", "local", "--json", check=True).stdout)[
        "result"
    ]["hosts"]["local"]
    web = next(s for s in services["services"] if s["name"] == "web" and s["state"] == "RUNNING")
    assert "Umask:\t0022" in Path(f"/proc/{web['pid']}/status").read_text()
    # left readable by everyone (an older version): the next deploy takes that back
    os.chmod(log, 0o755)
    os.chmod(log / "web.log", 0o644)
    app.deploy()
    assert (mode(log), mode(log / "web.log")) == (0o750, 0o640)
