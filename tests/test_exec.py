"""``shiplane exec`` and ``shiplane console``: a command in the live release's environment (its
venv, the stage's env and secrets, the release as working directory), on the primary, one or
every host; interactive through a terminal; its exit code passed through; recorded in the ledger
without the secret typed on its command line."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployhelp import Project, scaffold
from shiplane.transport.ssh import SSHTransport, remove_control_dir
from sshhosts import TestHosts


def test_the_remote_command_line_is_quoted_word_by_word() -> None:
    ssh = SSHTransport("deploy@web1:2222", options=["ServerAliveInterval=7"])
    argv = ssh.command_argv(["python", "-c", "print('a b'); import os", "$HOME;rm -rf /"], tty=True)
    assert (
        argv[0] == "ssh" and "StrictHostKeyChecking=yes" in argv and "ServerAliveInterval=7" in argv
    )
    assert argv[-4:] == [
        "-t",
        "--",
        "deploy@web1",
        "python -c 'print('\"'\"'a b'\"'\"'); import os' '$HOME;rm -rf /'",
    ]
    assert ssh.command_argv(["true"], tty=False)[-4:] == ["-T", "--", "deploy@web1", "true"]
    remove_control_dir()  # made for its control sockets; nothing connected


def test_exec_refuses_without_a_command_or_a_stage(tmp_path: Path) -> None:
    project = scaffold(tmp_path)
    expected = {
        ("exec", "--stage", "local"): "no command given",
        ("exec", "--stage", "local", "--", ""): "no command given",
        ("exec", "--stage", "nope", "--", "true"): "unknown stage 'nope'",
    }
    for args, message in expected.items():
        done = project.shiplane(*args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (
            args,
            done.stderr,
        )


@pytest.mark.slow
def test_exec_refuses_where_nothing_is_deployed(tmp_path: Path) -> None:
    project = scaffold(tmp_path)
    done = project.shiplane("exec", "--stage", "local", "--", "true")
    assert done.returncode == 2, done.stderr
    assert (
        "nothing is deployed on local" in done.stderr
        and "shiplane deploy --stage local" in done.stderr
    )


# -- the local stage --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    project = scaffold(tmp_path_factory.mktemp("ex"))  # short: unix socket paths are limited
    try:
        project.deploy()
        yield project
    finally:
        project.stop()


def secret_key(project: Project) -> str:
    for line in (project.root / ".secrets" / "local.env").read_text().splitlines():
        if line.startswith("SECRET_KEY="):
            return line.partition("=")[2]
    raise AssertionError("no SECRET_KEY in .secrets/local.env")


@pytest.mark.slow
def test_exec_runs_in_the_release_with_its_secrets(app: Project) -> None:
    secret = secret_key(app)
    check = (
        f'import os, sys; print(os.environ["SECRET_KEY"] == "{secret}", os.getcwd(), sys.prefix)'
    )
    done = app.shiplane("exec", "--stage", "local", "--", "python", "-c", check, check=True)
    same, cwd, prefix = done.stdout.split()
    assert same == "True"
    assert cwd == os.path.realpath(app.deploy_root / "current")
    assert prefix.startswith(str(app.deploy_root / "venvs")), prefix  # the release's venv python
    assert secret not in done.stdout + done.stderr

    entries = json.loads(
        app.shiplane("history", "--stage", "local", "--json", check=True).stdout.splitlines()[-1]
    )
    execs = [e for e in entries["result"]["hosts"]["local"]["entries"] if e.get("event") == "exec"]
    assert execs and execs[-1]["command"][:2] == ["python", "-c"] and execs[-1]["exit_code"] == 0
    assert execs[-1]["release"] == app.current() and execs[-1]["stage"] == "local"
    assert {"user", "controller", "started_at", "duration"} <= set(execs[-1])
    history = (app.deploy_root / "history.jsonl").read_text()
    assert secret not in history and "***" in execs[-1]["command"][2]


@pytest.mark.slow
def test_captured_output_masks_the_stages_secrets(app: Project) -> None:
    done = app.shiplane(
        "exec", "--stage", "local", "--json", "--", "sh", "-c", "echo key=$SECRET_KEY"
    )
    assert done.returncode == 0, done.stderr
    assert secret_key(app) not in done.stdout and "key=***" in done.stdout


@pytest.mark.slow
def test_exec_passes_the_exit_code_and_stdin_through(app: Project) -> None:
    assert app.shiplane("exec", "--stage", "local", "--", "sh", "-c", "exit 3").returncode == 3
    done = subprocess.run(
        [sys.executable, "-m", "shiplane", "exec", "--stage", "local", "--", "tr", "a-z", "A-Z"],
        cwd=app.root,
        input="piped in\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and done.stdout == "PIPED IN\n", done.stderr


class Terminal:
    """A shiplane command on a pseudo-terminal (its controlling terminal, as a login shell has
    it: Ctrl-C there is SIGINT to shiplane and what it runs), read with deadlines."""

    def __init__(self, cwd: Path, *args: str) -> None:
        env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}
        self.pid, self.master = pty.fork()
        if self.pid == 0:  # the child: becomes shiplane, or exits
            try:
                os.chdir(cwd)
                os.execve(sys.executable, [sys.executable, "-m", "shiplane", *args], env)
            finally:
                os._exit(127)
        self.output = b""

    def expect(self, text: str, deadline: float = 60) -> None:
        end = time.monotonic() + deadline
        while text.encode() not in self.output:
            left = end - time.monotonic()
            assert left > 0, (
                f"no {text!r} within {deadline}s; got: {self.output.decode(errors='replace')[-2000:]}"
            )
            readable, _, _ = select.select([self.master], [], [], left)
            if readable:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: every writer of the terminal is gone
                    chunk = b""
                assert chunk, (
                    f"ended before {text!r}; got: {self.output.decode(errors='replace')[-2000:]}"
                )
                self.output += chunk

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def interrupt(self, tries: int = 3) -> None:
        """Ctrl-C until the REPL says KeyboardInterrupt, as a person presses again: the full suite
        on a loaded machine once saw a first Ctrl-C get no answer at all (twice in ~10 runs;
        never alone). Fails, with the terminal's state, if none of ``tries`` gets one."""
        for _ in range(tries):
            self.send("\x03")
            try:
                self.expect("KeyboardInterrupt", deadline=10)
                return
            except AssertionError:
                continue
        attrs = termios.tcgetattr(self.master)
        raise AssertionError(
            f"no KeyboardInterrupt after {tries} Ctrl-C; ISIG {bool(attrs[3] & termios.ISIG)}, "
            f"foreground pgrp {os.tcgetpgrp(self.master)}, shiplane pid {self.pid}; got: "
            + self.output.decode(errors="replace")[-2000:]
        )

    def close(self, deadline: float = 30) -> int:
        """The exit code, once shiplane has ended (killed after ``deadline``)."""
        end = time.monotonic() + deadline
        try:
            while time.monotonic() < end:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    return os.waitstatus_to_exitcode(status)
                readable, _, _ = select.select(
                    [self.master], [], [], 0.05
                )  # drain what it still prints
                if readable:
                    try:
                        self.output += os.read(self.master, 4096)
                    except OSError:  # EIO: it has closed the terminal, its exit is near
                        pass
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
            raise AssertionError(
                f"still running after {deadline}s: {self.output.decode(errors='replace')[-2000:]}"
            )
        finally:
            os.close(self.master)


@pytest.mark.slow
def test_exec_on_a_terminal_is_interactive(app: Project) -> None:
    term = Terminal(app.root, "exec", "--stage", "local", "--", "python")
    term.expect(">>> ")
    term.send("print(6*7)\n")
    term.expect("42\r\n>>> ")  # the REPL waits for a line again: Ctrl-C now is a person's
    term.interrupt()  # Ctrl-C is the REPL's: it goes on, and so does shiplane
    term.send("print('still' + 'here')\n")
    term.expect("stillhere")
    term.send("exit()\n")
    assert term.close() == 0


@pytest.mark.slow
def test_console_reaches_the_flask_shell(app: Project) -> None:
    term = Terminal(app.root, "console", "--stage", "local")
    term.expect(">>> ")
    term.send("print('name=' + app.name)\n")
    term.expect("name=demo")
    term.send("exit()\n")
    assert term.close() == 0


@pytest.mark.slow
def test_console_says_what_to_run_when_it_cannot_tell(app: Project) -> None:
    toml = app.root / "shiplane.toml"
    text = toml.read_text()
    assert 'wsgi = "demo:create_app()"' in text
    try:  # served as ASGI: no app.wsgi naming a Flask app, and no manage.py in the release
        toml.write_text(text.replace('wsgi = "demo:create_app()"', 'asgi = "demo:create_app()"'))
        done = app.shiplane("console", "--stage", "local")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert (
            "cannot tell which shell" in done.stderr
            and "shiplane exec --stage local -- python" in done.stderr
        )
    finally:
        toml.write_text(text)
    done = app.shiplane("console", "--stage", "local", "--host", "nowhere")
    assert done.returncode == 2 and "not a host of stage 'local'" in done.stderr, done.stderr


# -- SSH hosts ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(ssh_hosts: TestHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """The scaffold app on three SSH test hosts (stage ``fleet``), deployed once."""
    project = scaffold(tmp_path_factory.mktemp("exs"))
    toml = project.root / "shiplane.toml"
    text = toml.read_text()
    text = text.replace(
        'release = "alembic upgrade head"',
        'release = "alembic upgrade head"\nafter_install = ["alembic upgrade head"]',
    )
    text = text[: text.index("[stages.staging]")] + (
        f'[stages.fleet]\nhosts = ["shl-h1", "shl-h2", "shl-h3"]\ndeploy_to = "/srv/exec-demo"\nport = 8400\n'
        f'bind = "0.0.0.0"\nssh_config = "{ssh_hosts.ssh_config}"\n'
    )
    toml.write_text(text)
    secrets = project.root / ".secrets" / "fleet.env"
    secrets.write_text("SECRET_KEY=exec-fleet-secret\n")
    secrets.chmod(0o600)
    project.commit("a stage on the test hosts")
    project.stage = "fleet"
    try:
        project.deploy()
        yield project
    finally:
        project.stop()


@pytest.mark.slow
@pytest.mark.ssh
def test_exec_on_every_host_prefixes_each_line(fleet: Project) -> None:
    done = fleet.shiplane(
        "exec",
        "--stage",
        "fleet",
        "--all",
        "--",
        "sh",
        "-c",
        'echo "$(hostname) $SECRET_KEY $(basename "$PWD")"',
        check=True,
    )
    lines = sorted(done.stdout.splitlines())
    assert [line.split(":")[0] for line in lines] == ["shl-h1", "shl-h2", "shl-h3"], done.stdout
    for line in lines:
        host, _, rest = line.partition(": ")
        name, secret, release = rest.split()
        # the stage's secret reached each host's command, and is masked in what shiplane prints
        assert name == host and secret == "***" and release.startswith("20")
    assert "exec-fleet-secret" not in done.stdout


@pytest.mark.slow
@pytest.mark.ssh
def test_exec_passes_each_hosts_exit_code(fleet: Project) -> None:
    one = fleet.shiplane(
        "exec", "--stage", "fleet", "--host", "shl-h2", "--", "sh", "-c", "hostname; exit 5"
    )
    assert one.returncode == 5 and one.stdout == "shl-h2\n", one.stderr
    several = fleet.shiplane(
        "exec", "--stage", "fleet", "--all", "--", "sh", "-c", 'test "$(hostname)" != shl-h3'
    )
    assert several.returncode == 1
    assert (
        "failed on shl-h3 (exit code 1)" in several.stderr
        and "shl-h1" not in several.stderr.split("failed on")[1]
    )


@pytest.mark.slow
@pytest.mark.ssh
def test_exec_over_ssh_on_a_terminal_is_interactive(fleet: Project) -> None:
    term = Terminal(fleet.root, "exec", "--stage", "fleet", "--", "python")  # the primary: shl-h1
    term.expect(">>> ")
    term.send("import socket; print(socket.gethostname(), 6*7)\n")
    term.expect("shl-h1 42")
    term.send("exit()\n")
    assert term.close() == 0
