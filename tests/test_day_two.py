"""Day-two problems that peers' users report, reproduced on the local stage, with shiplane's outcome."""

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

from deployhelp import Project, edit, scaffold, wait_for

pytestmark = pytest.mark.slow

VIEWS = "src/demo/views.py"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    project = scaffold(tmp_path_factory.mktemp("daytwo"))
    try:
        yield project
    finally:
        project.stop()


def bump(project: Project, label: str) -> None:
    text = (project.root / VIEWS).read_text()
    start = text.index("<footer>") + len("<footer>")
    end = text.index("demo, deployed")
    (project.root / VIEWS).write_text(text[:start] + f"{label} " + text[end:])
    project.commit(label)


def touch_migrations(project: Project) -> None:
    """A change the release hook depends on (``release_if_changed``), so that the next deploy
    runs it; committed by the next ``bump``."""
    ini = project.root / "alembic.ini"
    ini.write_text(ini.read_text() + f"# touched {time.time()}\n")


@pytest.mark.parametrize("moment", ["install", "release", "switch"])
def test_interrupt_at_any_moment_leaves_one_healthy_release_and_no_lock(
    app: Project, moment: str
) -> None:
    """deployer#899 and friends: Ctrl-C mid-deploy used to leave the lock (and half a deploy)."""
    good = app.deploy()
    if moment == "release":
        touch_migrations(app)
    bump(app, f"interrupted-{moment}")
    process = subprocess.Popen(
        [sys.executable, "-m", "shiplane", "deploy", "--stage", "local", "--skip-tests", "--json"],
        cwd=app.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    for line in process.stdout:
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("phase") == moment and event.get("status") == "start":
            process.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline, f"never reached {moment}"
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 130, rest  # interrupted, as any command on Ctrl-C
    assert not (app.deploy_root / ".lock").exists()
    status, body = app.get("/")
    assert status == 200
    assert f"release {good['release']}" in body or f"interrupted-{moment}" not in body
    assert app.current() == good["release"]
    again = app.deploy()  # immediately, without --force
    assert f"interrupted-{moment}" in app.get("/")[1]
    assert again["exit"] == 0


def test_sigterm_stops_cleanly_too(app: Project) -> None:
    good = app.deploy()
    bump(app, "terminated")
    process = subprocess.Popen(
        [sys.executable, "-m", "shiplane", "deploy", "--stage", "local", "--skip-tests", "--json"],
        cwd=app.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if '"phase": "install"' in line:
            process.send_signal(signal.SIGTERM)
            break
    process.communicate(timeout=120)
    assert process.returncode == 130  # interrupted: a CI job cancelled
    assert not (app.deploy_root / ".lock").exists()
    assert app.current() == good["release"]


def test_stale_lock_is_reported_with_its_holder_and_broken_with_force(app: Project) -> None:
    app.deploy()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = {
        "user": "alice",
        "host": os.uname().nodename,
        "pid": dead.pid,
        "command": "shiplane deploy --stage local",
        "started_at": "2026-01-01T00:00:00Z",
        "heartbeat": "2026-01-01T00:00:00Z",
    }
    (app.deploy_root / ".lock").write_text(json.dumps(lock))
    refused = app.deploy(check=False)
    assert refused["exit"] == 1
    assert "alice@" in refused["output"] and "stale" in refused["output"]
    app.shiplane("unlock", "--stage", "local", "--force", check=True)
    history = json.loads(app.shiplane("history", "--stage", "local", "--json", check=True).stdout)[
        "result"
    ]
    assert any(
        e.get("event") == "unlock" and e.get("forced") for e in history["hosts"]["local"]["entries"]
    )
    assert app.deploy()["exit"] == 0


def test_lock_wait_waits_for_a_held_lock(app: Project) -> None:
    app.shiplane("lock", "--stage", "local", check=True)
    started = time.monotonic()
    releaser = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import time,subprocess,sys; time.sleep(3); "
                "subprocess.run([sys.executable,'-m','shiplane','unlock','--stage','local','--force'])"
            ),
        ],
        cwd=app.root,
    )
    try:
        result = app.deploy("--lock-wait", "60")
    finally:
        releaser.wait(timeout=60)
    assert result["exit"] == 0
    assert time.monotonic() - started >= 3


def test_rollback_skips_a_bad_release_and_says_why(app: Project) -> None:
    """capistrano#552: rollback must never pick a release whose deploy failed."""
    bump(app, "good-one")
    good = app.deploy()
    edit(app, "src/demo/views.py", 'return Response("ok\\n", 200', 'return Response("sick\\n", 500')
    bad = app.deploy(check=False)
    assert bad["exit"] == 1
    edit(app, "src/demo/views.py", 'return Response("sick\\n", 500', 'return Response("ok\\n", 200')
    third = app.deploy()
    done = app.shiplane("rollback", "--stage", "local", "--yes", "--json", check=True)
    result = json.loads(done.stdout.splitlines()[-1])["result"]
    assert result["release"] == good["release"]
    assert app.current() == good["release"]
    skipped = {rid: why for rid, why in result["skipped"]}
    assert bad["release"] in skipped and "bad" in skipped[bad["release"]]
    assert third["release"] not in skipped  # it was live: rolled back from, not skipped


def test_rollback_across_a_migration_asks_for_yes(app: Project) -> None:
    app.deploy()
    touch_migrations(app)
    bump(app, "migrated")
    assert app.deploy()["release_hook"] is True
    refused = app.shiplane("rollback", "--stage", "local")
    assert refused.returncode == 2
    assert (
        "ran the release hook" in refused.stdout + refused.stderr
        and "--yes" in refused.stdout + refused.stderr
    )
    assert app.shiplane("rollback", "--stage", "local", "--yes").returncode == 0


def test_one_off_overrides_are_validated_and_recorded(app: Project) -> None:
    bad = app.shiplane("deploy", "--stage", "local", "--set", "port=notaport")
    assert bad.returncode == 2 and "stages.local.port" in bad.stderr
    result = app.deploy("--set", "connect_timeout=20")
    assert result["overrides"] == {"hosts": None, "set": ["connect_timeout=20"]}
    ledger = (app.root / ".shiplane/history/local.jsonl").read_text().splitlines()
    assert json.loads(ledger[-1])["overrides"]["set"] == ["connect_timeout=20"]


def test_summary_and_history_show_time_per_phase(app: Project) -> None:
    result = app.deploy()
    phases = result["hosts"]["local"]["phases"]
    for phase in ("connect", "lock", "copy", "install", "release", "switch"):
        assert phase in phases and phases[phase] >= 0
    text = app.shiplane("deploy", "--stage", "local", "--skip-tests").stdout
    assert "install" in text and "switch" in text and "s," in text
    history = app.shiplane("history", "--stage", "local", check=True).stdout
    assert " ok " in history and "s  by " in history


def test_a_hung_hook_is_killed_with_its_process_group(app: Project) -> None:
    toml = app.root / "shiplane.toml"
    original = toml.read_text()
    toml.write_text(
        original.replace(
            'release = "alembic upgrade head"',
            'release = "sleep 300 & echo $! > /tmp/shiplane-hung-hook.pid; wait"\ntimeout = 2',
        )
    )
    app.commit("hung hook")
    try:
        result = app.deploy(check=False)
        assert result["exit"] == 1
        assert "timed out" in result["output"] or "timeout" in result["output"]
        pid = int(Path("/tmp/shiplane-hung-hook.pid").read_text())
        wait_for(
            lambda: (
                not os.path.exists(f"/proc/{pid}")
                or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
            ),
            10,
            "the hook's background child to be killed",
        )
    finally:
        toml.write_text(original)
        app.commit("restore hook")


def test_status_flags_drift_from_the_ledger(app: Project) -> None:
    first = app.deploy()
    bump(app, "drift")
    app.deploy()
    # someone switches the host by hand behind shiplane's back
    current = app.deploy_root / "current"
    tmp = app.deploy_root / "current.tmp"
    tmp.symlink_to(f"releases/{first['release']}")
    os.replace(tmp, current)
    status = json.loads(app.shiplane("status", "--stage", "local", "--json", check=True).stdout)[
        "result"
    ]
    assert status["drift"], status
    text = app.shiplane("status", "--stage", "local").stdout
    assert "DRIFT" in text
