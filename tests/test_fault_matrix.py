"""The fault matrix: each fault injected at each step of a real deploy, on the local stage and on
one SSH test host, while a client keeps asking the live release for its page.

For every cell the test asserts what an operator needs after a bad day:
- zero failed requests to the live release, during the fault and after it;
- no stranded lock: the next plain ``shiplane deploy`` succeeds, with no ``unlock --force``;
- consistent state after it: ``current``, the release states and the host's ledger agree, and
  ``status`` shows no drift;
- every release that went live is in the host's ledger.

Faults are triggered on the deploy's own ``--json`` events, never on sleeps. The table of cells,
with what cannot apply and why, is in docs/RELIABILITY.md (``python -m pytest -q
tests/test_fault_matrix.py`` runs them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deployhelp import Project, edit, scaffold

pytestmark = pytest.mark.slow

# step -> the event that says the deploy is in it (phase, status)
STEPS: dict[str, tuple[str, str]] = {
    "lock": ("lock", "ok"),  # the lock is held, nothing copied yet
    "copy": ("copy", "start"),
    "install": ("install", "start"),
    "release": ("release", "start"),  # the migration runs
    "switch": ("switch", "start"),
    "finalize": ("switch", "ok"),  # switched; ledger, prune and unlock follow
}
# Cells that cannot apply, and why (docs/RELIABILITY.md lists them too):
NOT_APPLICABLE = {
    ("cut", "local"): "the local stage has no connection to cut (its agent is a child process)",
    (
        "disk-full",
        "ssh",
    ): "the same agent code path as on the local stage; a tmpfs cannot be mounted "
    "inside a test host's mount namespace from here",
}


@dataclass
class Target:
    """Where a cell runs: the project, its stage, the live URL and the deploy root as seen here."""

    project: Project
    stage: str
    url: str
    root: Path
    transport: str

    def shiplane(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.project.shiplane(*args, "--stage", self.stage, timeout=300)


class Poller:
    """A client asking the live release for its page every 20 ms (bounded in count and time)."""

    def __init__(self, url: str, limit: int = 20000, seconds: float = 240) -> None:
        self.url, self.limit, self.seconds = url, limit, seconds
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Poller:  # noqa: PYI034 - typing.Self is 3.11+
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        end = time.monotonic() + self.seconds
        while (
            not self._stop.is_set()
            and time.monotonic() < end
            and self.ok + len(self.failed) < self.limit
        ):
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    body = response.read()
                    if response.status == 200 and b"release " in body:
                        self.ok += 1
                    else:
                        self.failed.append(f"status {response.status}")
            except (urllib.error.URLError, OSError) as exc:
                self.failed.append(f"{time.time():.3f} {exc!r}")
            self._stop.wait(0.02)


def deploy_json(
    target: Target,
    inject: Callable[[subprocess.Popen[str]], None] | None,
    trigger: tuple[str, str] | None,
) -> tuple[int, list[dict[str, Any]]]:
    """Run a deploy with --json; when ``trigger`` (phase, status) appears, call ``inject``."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shiplane",
            "deploy",
            "--stage",
            target.stage,
            "--skip-tests",
            "--json",
        ],
        cwd=target.project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    events: list[dict[str, Any]] = []
    fired = False
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            events.append(event)
            if (
                not fired
                and trigger
                and (event.get("phase"), event.get("status")) == trigger
                and inject
            ):
                fired = True
                inject(proc)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if trigger and inject:
        assert fired, f"the deploy never reached {trigger}: {events[-5:]}"
    return proc.returncode, events


def kill_controller(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # SIGKILL, as a CI runner cancelling a job hard


def interrupt_controller(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)


def cut_connection(proc: subprocess.Popen[str]) -> None:
    """Kill the deploy's ssh clients (its session and its control master): the connection is cut."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if argv and argv[0].endswith(b"ssh") and parent == proc.pid:
            os.kill(int(entry.name), signal.SIGKILL)


INJECT = {"sigkill": kill_controller, "sigint": interrupt_controller, "cut": cut_connection}


def change(target: Target, cell: str) -> None:
    """A new release for each cell: a code change the page shows."""
    views = target.project.root / "src/demo/views.py"
    views.write_text(re.sub(r"<footer>.*?</footer>", f"<footer>{cell}</footer>", views.read_text()))
    target.project.commit(cell)


def assert_consistent(target: Target) -> None:
    """`current`, the release states, the host's ledger and status agree; a next deploy worked."""
    status = target.shiplane("status")
    assert status.returncode == 0 and "DRIFT" not in status.stdout, status.stdout + status.stderr
    current = os.readlink(target.root / "current").split("/")[-1]
    releases = json.loads(target.shiplane("releases", "--json").stdout)["result"]["hosts"]
    states = {
        r["release_id"]: r.get("state")
        for per in releases.values()
        for r in per.get("releases", [])
    }
    assert states.get(current) == "live", states
    assert list(states.values()).count("live") == 1, states
    history = json.loads(target.shiplane("history", "--json", "--limit", "200").stdout)["result"][
        "hosts"
    ]
    recorded = {
        e.get("release")
        for per in history.values()
        for e in per.get("entries", [])
        if e.get("outcome") == "ok" and e.get("event") in ("deploy", "switch", "rollback")
    }
    went_live = {rid for rid, state in states.items() if state in ("live", "previous", "good")}
    assert went_live <= recorded, (went_live - recorded, states)
    assert not (target.root / ".lock").exists()
    assert not list((target.root / "store").glob(".tmp-*"))


def run_cell(target: Target, fault: str, step: str) -> None:
    cell = f"{target.transport}-{fault}-{step}"
    change(target, cell)
    with Poller(target.url) as poller:
        code, events = deploy_json(target, INJECT[fault], STEPS[step])
        assert code != 0 or step == "finalize", (cell, code, events[-5:])
        # the next plain deploy: no unlock --force, no manual step
        change(target, cell + "-next")
        again, events = deploy_json(target, None, None)
        assert again == 0, (cell, [e for e in events if e.get("status") == "failed"] or events[-5:])
    assert poller.ok > 0 and not poller.failed, (
        cell,
        poller.ok,
        poller.failed[:3],
        poller.failed[-1:],
        [(e.get("at"), e.get("phase"), e.get("status")) for e in events],
    )
    assert_consistent(target)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    project = scaffold(tmp_path_factory.mktemp("fm"))  # short: unix socket paths are limited
    toml = project.root / "shiplane.toml"
    # the migration runs on every deploy, so the release step is there to fault
    toml.write_text(toml.read_text().replace('release_if_changed = ["alembic.ini", "db/**"]', ""))
    project.commit("release hook every time")
    project.deploy()
    try:
        yield Target(
            project, "local", f"http://127.0.0.1:{project.port}/", project.deploy_root, "local"
        )
    finally:
        project.stop()


@pytest.fixture(scope="module")
def remote(ssh_hosts: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    host = ssh_hosts.hosts[0]
    project = scaffold(tmp_path_factory.mktemp("fmr"))
    toml = project.root / "shiplane.toml"
    text = toml.read_text().replace('release_if_changed = ["alembic.ini", "db/**"]', "")
    text = text[: text.index("[stages.staging]")] + (
        f'[stages.one]\nhosts = ["{host.name}"]\ndeploy_to = "/srv/fm"\nport = 8400\nbind = "0.0.0.0"\n'
        f'ssh_config = "{ssh_hosts.ssh_config}"\n'
    )
    toml.write_text(text)
    secrets = project.root / ".secrets" / "one.env"
    secrets.write_text("SECRET_KEY=fault-matrix-secret\n")
    os.chmod(secrets, 0o600)
    project.commit("one SSH host")
    target = Target(project, "one", host.url(8400, "/"), host.root / "fm", "ssh")
    done = target.shiplane("deploy", "--skip-tests")
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield target
    finally:
        target.shiplane("stop", "--all")


FAULT_STEPS = [(fault, step) for fault in ("sigkill", "sigint") for step in STEPS]


@pytest.mark.parametrize(("fault", "step"), FAULT_STEPS, ids=[f"{f}-{s}" for f, s in FAULT_STEPS])
def test_local(local: Target, fault: str, step: str) -> None:
    run_cell(local, fault, step)


SSH_STEPS = [(fault, step) for fault in ("sigkill", "sigint", "cut") for step in STEPS]


@pytest.mark.ssh
@pytest.mark.parametrize(("fault", "step"), SSH_STEPS, ids=[f"{f}-{s}" for f, s in SSH_STEPS])
def test_ssh(remote: Target, fault: str, step: str) -> None:
    run_cell(remote, fault, step)


# --- faults of the release itself, and of the host's disk: each at the one step it belongs to ---


def failing_release(target: Target, cell: str, path: str, old: str, new: str) -> None:
    """A release that fails its switch (crash at boot, a 500 on health): refused, nothing served
    changes, then the fix deploys."""
    edit(target.project, path, old, new)
    with Poller(target.url) as poller:
        code, events = deploy_json(target, None, None)
        assert code == 1, (cell, events[-5:])
        edit(target.project, path, new, old)
        change(target, cell + "-fixed")
        again, events = deploy_json(target, None, None)
        assert again == 0, (cell, events[-5:])
    assert poller.ok > 0 and not poller.failed, (cell, poller.ok, poller.failed[:5])
    assert_consistent(target)


RELEASE_FAULTS = {
    "crash-at-boot": (
        "src/demo/__init__.py",
        "def create_app(",
        "raise RuntimeError('boom at import')\n\n\ndef create_app(",
    ),
    "health-500": (
        "src/demo/views.py",
        'return Response("ok\\n", 200, mimetype="text/plain")',
        'return Response("no\\n", 500, mimetype="text/plain")',
    ),
}


@pytest.mark.parametrize("fault", list(RELEASE_FAULTS))
def test_local_release_faults(local: Target, fault: str) -> None:
    failing_release(local, f"local-{fault}", *RELEASE_FAULTS[fault])


@pytest.mark.ssh
@pytest.mark.parametrize("fault", list(RELEASE_FAULTS))
def test_ssh_release_faults(remote: Target, fault: str) -> None:
    failing_release(remote, f"ssh-{fault}", *RELEASE_FAULTS[fault])


def hung_hook(target: Target, cell: str) -> None:
    """A migration that hangs, printing nothing: ended by hooks.silence_timeout, lock released."""
    toml = target.project.root / "shiplane.toml"
    original = toml.read_text()
    toml.write_text(
        original.replace(
            'release = "alembic upgrade head"',
            'release = "echo migrating; sleep 291.5"\nsilence_timeout = 2',
        )
    )
    target.project.commit(cell)
    try:
        with Poller(target.url) as poller:
            code, events = deploy_json(target, None, None)
            assert code == 1 and any(
                "printed nothing for 2s" in str(e.get("detail")) for e in events
            ), events[-5:]
            toml.write_text(original)
            change(target, cell + "-fixed")
            again, events = deploy_json(target, None, None)
            assert again == 0, (cell, events[-5:])
    finally:
        if toml.read_text() != original:
            toml.write_text(original)
            target.project.commit("restore")
    assert poller.ok > 0 and not poller.failed, (cell, poller.ok, poller.failed[:5])
    assert_consistent(target)


def test_local_hung_hook(local: Target) -> None:
    hung_hook(local, "local-hung-hook")


@pytest.mark.ssh
def test_ssh_hung_hook(remote: Target) -> None:
    hung_hook(remote, "ssh-hung-hook")


def corrupt_blob(target: Target, cell: str) -> None:
    """Eight bytes flipped in a stored blob the next release reuses: replaced in the same deploy."""
    path = "db/env.py"
    sha = hashlib.sha256((target.project.root / path).read_bytes()).hexdigest()
    blob = target.root / "store" / sha
    data = bytearray(blob.read_bytes())
    for i in range(8):
        data[len(data) // 2 + i] ^= 0xFF
    blob.write_bytes(bytes(data))
    change(target, cell)
    with Poller(target.url) as poller:
        code, events = deploy_json(target, None, None)
        assert code == 0, (cell, events[-5:])
    assert any("sending them again" in str(e.get("detail")) for e in events)
    assert poller.ok > 0 and not poller.failed, (cell, poller.ok, poller.failed[:5])
    assert (target.root / "current" / path).read_bytes() == (
        target.project.root / path
    ).read_bytes()
    assert_consistent(target)


def test_local_corrupt_blob(local: Target) -> None:
    corrupt_blob(local, "local-corrupt-blob")


@pytest.mark.ssh
def test_ssh_corrupt_blob(remote: Target) -> None:
    corrupt_blob(remote, "ssh-corrupt-blob")


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The scaffold on the local stage with its deploy root on a 120 MiB tmpfs (a deploy takes ~60)."""
    base = tmp_path_factory.mktemp("fmd")
    disk = base / "disk"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(disk)],
            capture_output=True,
            check=False,
        ).returncode
        != 0
    ):
        pytest.skip("needs root to mount a small tmpfs")
    project = scaffold(base)
    toml = project.root / "shiplane.toml"
    toml.write_text(
        toml.read_text().replace('deploy_to = ".shiplane/local"', f'deploy_to = "{disk}"')
    )
    project.commit("deploy root on a small disk")
    try:
        project.deploy()
        yield Target(project, "local", f"http://127.0.0.1:{project.port}/", disk, "local")
    finally:
        project.stop()
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_local_disk_full(small_disk: Target) -> None:
    """The disk has no room for the copy: it is refused before a byte is written (the running
    release keeps serving: the deploy never fills its disk), naming the path and the free space,
    leaves no temp file, and the next deploy (after space is freed) goes on."""
    target = small_disk
    filler = target.root / "filler"
    free = os.statvfs(target.root).f_bavail * os.statvfs(target.root).f_frsize
    with open(filler, "wb") as out:
        out.truncate(0)
        out.write(b"\0" * (free - (1 << 20)))  # 1 MiB left
    big = target.project.root / "db" / "seed.bin"
    big.write_bytes(os.urandom(3 << 20))  # shipped (build.include): a 3 MiB blob to copy
    change(target, "local-disk-full")
    with Poller(target.url) as poller:
        started = time.monotonic()
        code, events = deploy_json(target, None, None)
        assert code == 1 and time.monotonic() - started < 30, events[-5:]
        failure = " ".join(str(e.get("detail")) for e in events if e.get("status") == "failed")
        assert "no space left on the disk of" in failure and "MiB free there" in failure, failure
        assert not list((target.root / "store").glob(".tmp-*"))
        filler.unlink()
        change(target, "local-disk-full-next")
        again, events = deploy_json(target, None, None)
        assert again == 0, events[-5:]
    assert poller.ok > 0 and not poller.failed, (poller.ok, poller.failed[:5])
    assert_consistent(target)
