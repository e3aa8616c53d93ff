"""The opt-in command server: the CLI's imports done once, each command forked from them.

With ``SHIPLANE_SERVER=1``, a command that finds no server runs as usual and then starts one in
the background. The server imports what the connecting verbs need (pydantic and the schema,
the artifact builder, the fleet: ~0.25 s of CPU per command otherwise) and waits on a socket in
the user's private dir. The next command's process, still small, hands it its argv,
environment, working directory, umask and its stdin/stdout/stderr; the server forks, and the
fork runs the command exactly as the process would have, writing to the caller's own
descriptors. The caller forwards its signals to the fork and exits with its code.
docs/DESIGN.md "The command server" says why and what it guards.

Stale code is never run: the socket's name hashes the interpreter, ``sys.path`` (the mtime of
each installation's folder too: an install changes it) and every file of this package. A server idle for
``IDLE_SECONDS`` exits, as the connections do.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

ENV = "SHIPLANE_SERVER"
IDLE_SECONDS = 60.0
_HEADER = struct.Struct("!12sQ")  # magic, then the request's length
_MAGIC = b"shiplane-cli"
_FORK_TIMEOUT = 10.0
_SUN_PATH = 108  # Linux's limit on a socket's path, its final NUL included
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCONT)

# Verbs that run non-interactively. `console`, `exec` and `logs --follow` want the terminal as
# their controlling one (window size, job control), which a fork of the server cannot have.
SERVED_VERBS = frozenset(
    {
        "check",
        "build",
        "plan",
        "deploy",
        "promote",
        "rollback",
        "status",
        "releases",
        "history",
        "copy",
        "install",
        "prune",
        "lock",
        "unlock",
        "verify",
        "start",
        "stop",
        "restart",
        "reload",
    }
)

_SERVER_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "PYTHONUTF8", "PYTHONHOME")

# imported once by the server, before its first fork
_PRELOADED = (
    "shiplane.cli",
    "shiplane.commands.check",
    "shiplane.commands.deploy",
    "shiplane.commands.deployment",
    "shiplane.commands.operate",
    "shiplane.commands.plan",
    "shiplane.commands.promote",
    "shiplane.commands.verify",
    "shiplane.transport.prewarm",
    "shiplane.transport.ssh",
    "shiplane.ui",
)


def verb(argv: Sequence[str]) -> str | None:
    """The verb of a command line: the first word that is not the group's own option."""
    words = iter(argv)
    for word in words:
        if word in ("-f", "--file"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def wanted(argv: Sequence[str], env: dict[str, str] | os._Environ[str]) -> bool:
    return env.get(ENV) == "1" and verb(argv) in SERVED_VERBS


def socket_path() -> Path | None:
    """This installation's socket, in the user's private dir; None where that dir is not safe
    or its path too long for a socket (a long ``$TMPDIR``)."""
    from shiplane.userdir import private_dir

    directory = private_dir("cli")
    if directory is None:
        return None
    path = directory / f"{_installation_key()}.sock"
    # with room for the server's staging suffix: a longer one cannot be bound (sun_path)
    return path if len(os.fsencode(path)) + 12 < _SUN_PATH else None


def _installation_key() -> str:
    digest = hashlib.sha256()
    digest.update(f"{sys.executable}\0{sys.version}\0{os.getuid()}\0".encode())
    digest.update(f"{sys.path[0]}\0".encode())  # the script's dir or the working dir: the caller's
    for entry in sys.path[1:]:  # the installations: an install or upgrade changes the mtime
        try:
            digest.update(f"{entry}\0{os.stat(entry or '.').st_mtime_ns}\0".encode())
        except OSError:
            digest.update(f"{entry}\0-\0".encode())
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        info = path.stat()
        digest.update(f"{path}\0{info.st_mtime_ns}\0{info.st_size}\0".encode())
    return digest.hexdigest()[:24]


# --- the caller's side ---------------------------------------------------------------------


class Lost(Exception):
    """The server's fork that ran the command ended without its exit code (killed)."""


def call(argv: Sequence[str], path: Path) -> int | None:
    """Run the command in the server at ``path``; its exit code, or None if no server took it
    (then nothing of the command ran, and the caller runs it itself). ``Lost`` if it ran but
    its process ended without a code."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A server that does not fork within this (stopped, overloaded) is not waited for: the
    # fork's first write then fails and it ends before running anything; this process runs it.
    conn.settimeout(_FORK_TIMEOUT)
    try:
        conn.connect(str(path))
        umask = os.umask(0)
        os.umask(umask)
        streams = (sys.stdin, sys.stdout, sys.stderr)
        request = json.dumps(
            {
                "argv": list(argv),
                "env": dict(os.environ),
                "cwd": os.getcwd(),
                "umask": umask,
                "encodings": [stream.encoding if stream else "utf-8" for stream in streams],
            }
        ).encode()
        socket.send_fds(conn, [_HEADER.pack(_MAGIC, len(request))], [0, 1, 2])
        conn.sendall(request)
        replies = conn.makefile("rb")
        first = replies.readline()
    except OSError:
        conn.close()
        return None
    if not first:
        return None  # the server refused it (another uid) or ended before forking
    conn.settimeout(None)
    pid = int(json.loads(first)["pid"])
    previous = _forward_signals(pid)
    try:
        last = replies.readline()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not last:
        raise Lost
    return int(json.loads(last)["exit"])


_Handler = Callable[[int, FrameType | None], object] | int | None


def _forward_signals(pid: int) -> dict[int, _Handler]:
    def forward(signum: int, frame: FrameType | None) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def suspend(signum: int, frame: FrameType | None) -> None:  # Ctrl-Z stops both
        forward(signal.SIGSTOP, frame)
        os.kill(os.getpid(), signal.SIGSTOP)

    previous: dict[int, _Handler] = {
        signum: signal.signal(signum, forward) for signum in _FORWARDED
    }
    previous[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, suspend)
    return previous


def spawn(path: Path) -> None:
    """Start a server at ``path`` in the background, detached from this command."""
    code = (
        "import json,sys\n"
        "sys.path[:]=json.loads(sys.argv[1])\n"
        "from shiplane.cliserver import serve\n"
        "serve(sys.argv[2])\n"
    )
    # Only what the imports may read: the server outlives this command, and this command's
    # environment may hold secrets (each command's own reaches only its fork).
    env = {name: os.environ[name] for name in _SERVER_ENV if name in os.environ}
    try:
        subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(sys.path), str(path)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        pass  # the next command runs in its own process, as this one did


# --- the server's side ---------------------------------------------------------------------


def serve(path_text: str) -> None:
    import importlib

    from shiplane import agent_bundle

    for module in _PRELOADED:
        importlib.import_module(module)
    agent_bundle.agent_zip()  # the same bytes for every command of this installation
    path = Path(path_text)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = path.with_name(f"{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    listener.bind(str(staging))
    os.chmod(staging, 0o600)
    listener.listen(16)
    os.replace(staging, path)  # atomic: a caller finds a listening socket or none
    ours = os.stat(path).st_ino
    _remove_dead_sockets(path.parent, keep=path)
    children: set[int] = set()
    signal.signal(signal.SIGCHLD, lambda signum, frame: _reap(children))
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    try:
        _accept_until_idle(listener, path, ours, children)
    finally:
        listener.close()
        try:
            if os.stat(path).st_ino == ours:
                path.unlink()
        except OSError:
            pass


def _remove_dead_sockets(directory: Path, keep: Path) -> None:
    """The sockets of servers that are gone (killed, or of an installation since changed)."""
    for other in directory.glob("*.sock"):
        if other == keep:
            continue
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(other))
        except ConnectionRefusedError:
            other.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            probe.close()


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)  # through serve()'s cleanup: the socket goes with the server


def _accept_until_idle(listener: socket.socket, path: Path, ours: int, children: set[int]) -> None:
    """Fork a child per caller, until nobody called for ``IDLE_SECONDS`` and no fork runs."""
    idle_until = time.monotonic() + IDLE_SECONDS
    while True:
        wait = max(0.0, idle_until - time.monotonic())
        ready, _, _ = select.select([listener], [], [], min(wait, 5.0) if children else wait)
        _reap(children)
        if not ready:
            if not children and time.monotonic() >= idle_until:
                return
            continue
        idle_until = time.monotonic() + IDLE_SECONDS
        try:
            if os.stat(path).st_ino != ours:
                return  # replaced or removed: another server serves, or the user stopped ours
        except OSError:
            return
        conn, _ = listener.accept()
        if _peer_uid(conn) != os.getuid():
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            _run_forked(conn)  # never returns
        children.add(pid)
        conn.close()


def _reap(children: set[int]) -> None:
    """Wait for the forks that ended, at once (SIGCHLD): their CPU then counts in this
    process's children's times, where a bench reads it."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _run_forked(conn: socket.socket) -> None:
    code = 1
    try:
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        if len(header) != _HEADER.size or len(fds) != 3:
            os._exit(1)
        magic, length = _HEADER.unpack(header)
        if magic != _MAGIC:
            os._exit(1)
        data = b""
        while len(data) < length:
            chunk = conn.recv(length - len(data))
            if not chunk:
                os._exit(1)
            data += chunk
        request = json.loads(data)
        _become_caller(request, fds)
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        threading.Thread(target=_end_with_caller, args=(conn,), daemon=True).start()
        from shiplane.cli import run_command

        code = run_command(request["argv"])
        conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
    finally:
        os._exit(code)


def _become_caller(request: dict[str, Any], fds: list[int]) -> None:
    import io
    import tempfile

    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    tempfile.tempdir = None  # gettempdir() reads the caller's TMPDIR
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["shiplane", *request["argv"]]
    stdin, stdout, stderr = request["encodings"]

    def text(fd: int, mode: str, encoding: str, errors: str) -> io.TextIOWrapper:
        # as the interpreter makes its own: line-buffered on a terminal, stderr unbuffered
        return io.TextIOWrapper(
            open(fd, mode + "b", closefd=False),
            encoding=encoding,
            errors=errors,
            line_buffering=os.isatty(fd),
            write_through=fd == 2,
        )

    sys.stdin = text(0, "r", stdin, "strict")
    sys.stdout = text(1, "w", stdout, "strict")
    sys.stderr = text(2, "w", stderr, "backslashreplace")


def _end_with_caller(conn: socket.socket) -> None:
    """A caller that is gone (killed, its terminal closed) ends its command, as Ctrl-C does: what
    the command started is stopped, a deploy undone (docs/RELIABILITY.md)."""
    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGINT)
