"""The opt-in command server (``SHIPLANE_SERVER=1``, src/shiplane/cliserver.py): a command it
runs behaves as one run in its own process — output, exit code, the caller's environment, working
directory and signals — and a server never runs code other than the installation's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# runs the console entry point and reports, as it exits, whether this process loaded the schema
_PROBE = """
import os, sys
from shiplane import launch
exit_ = os._exit
def report(code):
    sys.stdout.flush()
    print("SCHEMA", "shiplane.config.schema" in sys.modules, file=sys.stderr, flush=True)
    exit_(code)
os._exit = report
sys.argv = ["shiplane", *sys.argv[1:]]
launch.entry()
"""


def _poll(what: str, condition: object, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not callable(condition) or not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds} s: {what}")
        time.sleep(0.05)  # polling, bounded by the deadline


class Workspace:
    def __init__(self, root: Path, tmp: Path) -> None:
        self.root = root
        self.tmp = tmp  # short: a socket's path has at most 107 bytes
        self.env = dict(os.environ, TMPDIR=str(self.tmp), SHIPLANE_SERVER="1", NO_COLOR="1")
        self.env.pop("SHIPLANE_STAGE", None)

    @property
    def sockets(self) -> list[Path]:
        return sorted((self.tmp / f"shiplane-cli-{os.getuid()}").glob("*.sock"))

    def servers(self) -> list[int]:
        """The pids of this workspace's servers and of their forks (the same command line)."""
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"shiplane.cliserver" in cmdline and str(self.tmp).encode() in cmdline:
                pids.append(int(entry.name))
        return pids

    def shiplane(
        self, *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", _PROBE, *argv],
            cwd=cwd or self.root / "demo",
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def init(self, parent: Path, *argv: str) -> None:
        """``shiplane init`` (run in its own process) of an app in ``parent``."""
        done = subprocess.run(
            [sys.executable, "-m", "shiplane", "init", *argv],
            cwd=parent,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr

    def started(self) -> None:
        """A first command, run in its own process, leaves a server; wait until it listens."""
        done = self.shiplane("check")
        assert done.returncode == 0, done.stderr
        assert "SCHEMA True" in done.stderr
        _poll("a server listening", lambda: len(self.sockets) == 1)


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    ws = Workspace(tmp_path, Path(tempfile.mkdtemp(prefix="cs-", dir="/tmp")))
    ws.init(tmp_path, "demo")
    try:
        yield ws
    finally:
        for pid in ws.servers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ws.tmp, ignore_errors=True)


def _served(done: subprocess.CompletedProcess[str]) -> bool:
    """The caller's own process never loaded the schema: the server's fork ran the command."""
    return "SCHEMA False" in done.stderr


def test_the_next_command_runs_in_the_server_with_the_same_output_and_exit(
    workspace: Workspace,
) -> None:
    alone = workspace.shiplane("check", "--json", env={**workspace.env, "SHIPLANE_SERVER": "0"})
    workspace.started()
    served = workspace.shiplane("check", "--json")
    assert _served(served)
    assert served.returncode == alone.returncode == 0
    assert served.stdout == alone.stdout

    bad = workspace.shiplane("status", "--stage", "nope")
    assert _served(bad)
    assert bad.returncode == 2
    assert "unknown stage 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_its_dir_and_socket_are_the_users_alone(workspace: Workspace) -> None:
    workspace.started()
    (sock,) = workspace.sockets
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_the_command_sees_the_callers_directory_and_environment(workspace: Workspace) -> None:
    workspace.started()
    other = workspace.root / "elsewhere"
    other.mkdir()
    workspace.init(other, "site", "--name", "othersite")
    here = workspace.shiplane("check", cwd=other / "site")
    assert _served(here)
    assert "app othersite" in here.stdout

    # the stage from the caller's environment, not the server's (which had none)
    staged = workspace.shiplane(
        "status", env={**workspace.env, "SHIPLANE_STAGE": "nope"}, cwd=workspace.root / "demo"
    )
    assert _served(staged)
    assert staged.returncode == 2 and "unknown stage 'nope'" in staged.stderr


def test_a_changed_installation_gets_a_server_of_its_own(workspace: Workspace) -> None:
    extra = workspace.root / "site-extra"
    extra.mkdir()
    env = {**workspace.env, "PYTHONPATH": str(extra)}
    first = workspace.shiplane("check", env=env)
    assert not _served(first)
    _poll("the first server", lambda: len(workspace.sockets) == 1)
    assert _served(workspace.shiplane("check", env=env))

    (extra / "newly_installed.py").write_text("")  # what an install does to a sys.path folder
    changed = workspace.shiplane("check", env=env)
    assert not _served(changed)  # never the server that imported the installation before
    _poll("a second server", lambda: len(workspace.sockets) == 2)
    assert _served(workspace.shiplane("check", env=env))


def _hanging_stage(workspace: Workspace) -> str:
    """A stage whose host's connection never completes: its proxy command only reads (until
    its ssh is gone, as a real proxy's would), as the command line returned (unique, to find it)."""
    marker = f"hang-{os.getpid()}-{time.monotonic_ns()}"
    config = workspace.root / "ssh_config"
    config.write_text(f'Host hang\n  ProxyCommand sh -c "cat >/dev/null" {marker}\n')
    toml = workspace.root / "demo" / "shiplane.toml"
    toml.write_text(
        toml.read_text()
        + f'\n[stages.hang]\nhosts = ["hang"]\nssh_config = "{config}"\ndeploy_to = "/srv/x"\n'
    )
    return f"sh -c cat >/dev/null {marker}"


def _running(cmdline: str) -> bool:
    for entry in Path("/proc").iterdir():
        try:
            if (entry / "cmdline").read_bytes().replace(b"\0", b" ").strip() == cmdline.encode():
                return True
        except OSError:
            continue
    return False


def _connecting(workspace: Workspace, sleep: str, served: bool) -> subprocess.Popen[str]:
    """``status`` of the hanging stage, once it waits for the host's connection (made by the
    command itself, not pre-warmed while it still loads)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROBE, "status", "--stage", "hang", "--json"],
        cwd=workspace.root / "demo",
        env={**workspace.env, "SHIPLANE_SERVER": "1" if served else "0", "SHIPLANE_PREWARM": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _poll("the command waits for the connection", lambda: _running(sleep))
    return proc


def test_ctrl_c_reaches_the_command(workspace: Workspace) -> None:
    sleep = _hanging_stage(workspace)
    endings = []
    for served in (False, True):
        if served:
            workspace.started()
        proc = _connecting(workspace, sleep, served)
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        # at once: not at the connect timeout (10 s), nor the proxy's 60 s
        assert time.monotonic() - interrupted < 5, err
        assert ("SCHEMA False" in err) is served
        error = json.loads(out.splitlines()[-1])["error"]
        endings.append((proc.returncode, error["kind"]))
        assert (proc.returncode, error["kind"]) == (130, "interrupted"), err
        _poll("the proxy command ended", lambda: not _running(sleep))
    assert endings[0] == endings[1]


def test_a_killed_caller_ends_its_command(workspace: Workspace) -> None:
    sleep = _hanging_stage(workspace)
    workspace.started()
    forks = len(workspace.servers())
    proc = _connecting(workspace, sleep, served=True)
    proc.kill()
    proc.communicate(timeout=30)
    _poll("the fork ended", lambda: len(workspace.servers()) == forks, seconds=5)
    _poll("its connection ended", lambda: not _running(sleep))
    assert len(workspace.sockets) == 1  # the server itself runs on


def test_a_killed_fork_is_a_failure_that_says_so(workspace: Workspace) -> None:
    sleep = _hanging_stage(workspace)
    workspace.started()
    (server,) = workspace.servers()
    proc = _connecting(workspace, sleep, served=True)
    (fork,) = set(workspace.servers()) - {server}
    os.kill(fork, signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "the command ended without an exit code" in err
    assert "Traceback" not in err


def test_the_server_keeps_no_callers_secrets(workspace: Workspace) -> None:
    secret = "s3cr3t-from-the-first-command"
    env = {**workspace.env, "SECRET_KEY": secret}
    first = workspace.shiplane("check", env=env)
    assert first.returncode == 0, first.stderr
    _poll("a server listening", lambda: len(workspace.sockets) == 1)
    (server,) = workspace.servers()
    assert secret.encode() not in Path(f"/proc/{server}/environ").read_bytes()
