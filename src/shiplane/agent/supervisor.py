"""The daemon backend: one supervisord per deploy root, driven over XML-RPC on its unix socket.

supervisord (Supervisor 4.x, pure Python) comes from ``root/tools/supervisor-<version>/`` (the
wheel the controller ships, unpacked) or, failing that, from this interpreter. Programs are one
file each in ``run/programs/<name>.conf``; :meth:`Supervisor.update` applies them the way
``supervisorctl update`` does. Nothing here kills by process name: supervisord is stopped through
its socket, or by the pid it recorded in ``run/supervisord.pid``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict, cast

from . import atomic_write, pid_alive
from .errors import AgentError
from .health import UnixHTTPConnection, tail_lines
from .paths import Layout
from .protocol import Emit

START_TIMEOUT = 20.0
# stopProcess waits for the program's own stopwaitsecs; the RPC must outwait it.
RPC_TIMEOUT = 600.0
PING_TIMEOUT = 5.0
SHUTDOWN_TIMEOUT = 300.0
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
META_PREFIX = "; shiplane: "
# The services' logs may hold what an app printed (a secret, a user's data): log/ is 0750 and
# each file in it 0640 at most. supervisord creates them (its own log, each program's, their
# rotations) under its umask, 027 (main_conf); its programs get 022 back (_BOOT), as before.
LOG_DIR_MODE = 0o750
LOG_FILE_MODE = 0o640

# supervisor's xmlrpc fault codes (supervisor/xmlrpc.py, class Faults)
BAD_NAME = 10
ALREADY_STARTED = 60
NOT_RUNNING = 70
ALREADY_ADDED = 90


class ProgramMeta(TypedDict, total=False):
    """What a program conf's ``; shiplane: {...}`` first line says about it (for ``status``)."""

    service: str  # "web", "front" or the worker's name
    kind: str  # "worker", "front"; none for a web server
    release_id: str  # the release it runs (a spare: once adopted)
    preboot: bool  # a web server that waits for its go-ahead (preboot.py)
    spare: str  # a spare web server (spare.py): its program name
    venv: str  # a spare's venv digest


class ProcessInfo(TypedDict):
    """supervisord's ``getProcessInfo`` struct (supervisor/rpcinterface.py)."""

    name: str
    group: str
    description: str
    start: int
    stop: int
    now: int
    state: int
    statename: str
    spawnerr: str
    exitstatus: int
    logfile: str
    stdout_logfile: str
    stderr_logfile: str
    pid: int


class Shutdown(TypedDict):
    supervisord_pid: int | None
    stopped: bool


def conf_path(layout: Layout) -> Path:
    return layout.run / "supervisord.conf"


def sock_path(layout: Layout) -> Path:
    return layout.run / "supervisord.sock"


def pid_path(layout: Layout) -> Path:
    return layout.run / "supervisord.pid"


def programs_dir(layout: Layout) -> Path:
    return layout.run / "programs"


def program_conf_path(layout: Layout, name: str) -> Path:
    return programs_dir(layout) / f"{check_name(name)}.conf"


def check_name(name: str) -> str:
    """A program name safe as a supervisord section and a file name, or AgentError."""
    if not NAME_RE.match(name or ""):
        raise AgentError(
            f"invalid service name {name!r} (letters, digits, '_', '.', '-')", kind="usage"
        )
    return name


# --- conf text -------------------------------------------------------------------------------


def conf_value(value: object) -> str:
    """One value for supervisord's ini files: ``%`` doubled (it expands ``%(x)s``), no newlines,
    and no whitespace before ``;``/``#`` (configparser would cut an inline comment there)."""
    text = str(value)
    if any(ch in text for ch in "\r\n\0"):
        raise AgentError(f"value not allowed in a supervisord conf: {text!r}", kind="usage")
    if re.search(r"\s[;#]", text) or text != text.strip():
        raise AgentError(
            f"value not allowed in a supervisord conf (whitespace before ';'/'#' "
            f"or at an end): {text!r}",
            kind="usage",
        )
    return text.replace("%", "%%")


def conf_command(argv: list[str]) -> str:
    """A ``command =`` value that supervisord's ``shlex.split`` turns back into exactly ``argv``."""
    joined = " ".join(shlex.quote(str(arg)) for arg in argv)
    if any(ch in joined for ch in "\r\n\0"):
        raise AgentError(f"command not allowed in a supervisord conf: {argv!r}", kind="usage")
    # Whitespace then ';'/'#' can only occur inside a single-quoted word here: close the quote
    # around that character so configparser sees no inline comment and shlex sees the same word.
    joined = re.sub(r"(\s)([;#])", r"\1'\2'", joined)
    return joined.replace("%", "%%")


def program_conf(
    name: str, argv: list[str], options: dict[str, object], meta: ProgramMeta | None = None
) -> str:
    """The text of ``run/programs/<name>.conf``; ``meta`` is kept in a comment for ``status``."""
    lines = []
    if meta is not None:
        lines.append(META_PREFIX + json.dumps(meta, sort_keys=True))
    lines += [f"[program:{check_name(name)}]", f"command = {conf_command(argv)}"]
    for key, value in options.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        lines.append(f"{key} = {conf_value(value)}")
    return "\n".join(lines) + "\n"


def main_conf(layout: Layout) -> str:
    """``run/supervisord.conf``: private socket, pid file, log, programs from ``run/programs``."""
    v = conf_value
    return "\n".join(
        [
            "; written by shiplane; programs are in programs/*.conf",
            "[unix_http_server]",
            f"file = {v(sock_path(layout))}",
            "chmod = 0700",
            "",
            "[supervisord]",
            f"logfile = {v(layout.log / 'supervisord.log')}",
            "logfile_maxbytes = 10MB",
            "logfile_backups = 3",
            "loglevel = info",
            "umask = 027",
            f"pidfile = {v(pid_path(layout))}",
            f"childlogdir = {v(layout.log)}",
            f"directory = {v(layout.root)}",
            "nodaemon = false",
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "",
            "[supervisorctl]",
            f"serverurl = unix://{v(sock_path(layout))}",
            "",
            "[include]",
            # Relative to this file: the include list is split on whitespace, the root may hold some.
            "files = programs/*.conf",
            "",
        ]
    )


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write ``text`` atomically unless the file already holds it; True when it was written."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except OSError:
        pass
    atomic_write(path, text, mode)
    return True


def write_program(layout: Layout, name: str, text: str) -> bool:
    """Install a program conf (not applied until :meth:`Supervisor.update`)."""
    return write_if_changed(program_conf_path(layout, name), text)


def remove_program_conf(layout: Layout, name: str) -> bool:
    try:
        program_conf_path(layout, name).unlink()
        return True
    except FileNotFoundError:
        return False


def configured_programs(layout: Layout) -> list[str]:
    """Program names with a conf file in ``run/programs``."""
    try:
        return sorted(p.name[:-5] for p in programs_dir(layout).glob("*.conf"))
    except OSError:
        return []


def program_meta(layout: Layout, name: str) -> ProgramMeta:
    """The ``; shiplane: {...}`` metadata of a program conf ({} when absent)."""
    try:
        first = program_conf_path(layout, name).read_text(encoding="utf-8").split("\n", 1)[0]
        if first.startswith(META_PREFIX):
            meta = json.loads(first[len(META_PREFIX) :])
            # the line program_conf wrote, from a ProgramMeta
            return cast(ProgramMeta, meta) if isinstance(meta, dict) else {}
    except (OSError, ValueError, AgentError):
        pass
    return {}


# --- the RPC client --------------------------------------------------------------------------


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self._path = path
        self._timeout = timeout

    def make_connection(self, host: Any) -> UnixHTTPConnection:
        # One connection per call: supervisord's medusa server is fine with that, and a broken
        # connection can never be reused.
        return UnixHTTPConnection(self._path, timeout=self._timeout)


def _proxy(layout: Layout, timeout: float) -> Any:
    transport = _UnixTransport(str(sock_path(layout)), timeout)
    return xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=transport)


STOP_DEADLINE = 120.0  # beyond any stopwaitsecs we write; supervisord KILLs before this


class Supervisor:
    """A client of one root's supervisord."""

    def __init__(self, layout: Layout, timeout: float = RPC_TIMEOUT) -> None:
        self.layout = layout
        self.rpc: Any = _proxy(layout, timeout)

    def ping(self) -> bool:
        """True when supervisord answers (within seconds) and is RUNNING (not shutting down)."""
        try:
            state = _proxy(self.layout, PING_TIMEOUT).supervisor.getState()
        except (OSError, xmlrpc.client.Error):
            return False
        return bool(state.get("statename") == "RUNNING")

    def update(self) -> dict[str, list[str]]:
        """Re-read ``programs/*.conf`` and apply it (as ``supervisorctl update``): removed groups
        are stopped and removed, changed ones restarted with the new conf, added ones added
        (``autostart`` then starts them)."""
        try:
            [[added, changed, removed]] = self.rpc.supervisor.reloadConfig()
        except xmlrpc.client.Fault as fault:  # a conf supervisord cannot read
            raise AgentError(
                f"supervisord rejected run/programs: {fault.faultString}", kind="service"
            ) from None
        for name in removed:
            self._stop_group(name)
            self.rpc.supervisor.removeProcessGroup(name)
        for name in changed:
            self._stop_group(name)
            self.rpc.supervisor.removeProcessGroup(name)
            self._add(name)
        for name in added:
            self._add(name)
        return {"added": list(added), "changed": list(changed), "removed": list(removed)}

    def _add(self, name: str) -> None:
        try:
            self.rpc.supervisor.addProcessGroup(name)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != ALREADY_ADDED:
                raise

    def _stop_group(self, name: str, wait: bool = True) -> None:
        """Stop a program and return once supervisord has seen it stop (or at once, with
        ``wait=False``). supervisord's own ``wait=True`` answers only on its next one-second
        tick; polling its state answers as soon as the process is gone (gunicorn's graceful
        exit takes a few hundred ms)."""
        try:
            self.rpc.supervisor.stopProcessGroup(name, False)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode not in (BAD_NAME, NOT_RUNNING):
                raise
            return
        if not wait:
            return
        deadline = time.monotonic() + STOP_DEADLINE
        while time.monotonic() < deadline:
            info = self.info(name)
            if info is None or info["statename"] not in ("STOPPING", "RUNNING", "STARTING"):
                return
            time.sleep(0.05)
        self.rpc.supervisor.stopProcessGroup(name, True)  # past its grace: supervisord KILLs it

    def info(self, name: str) -> ProcessInfo | None:
        """supervisord's process info for ``name``, None when it has no such program."""
        try:
            info: ProcessInfo = self.rpc.supervisor.getProcessInfo(name)
            return info.copy()
        except xmlrpc.client.Fault as fault:
            if fault.faultCode == BAD_NAME:
                return None
            raise

    def all_info(self) -> list[ProcessInfo]:
        infos: list[ProcessInfo] = self.rpc.supervisor.getAllProcessInfo()
        return [i.copy() for i in infos]

    def start(self, name: str, wait: bool = True) -> None:
        """Start ``name`` (no error when it is already running)."""
        try:
            self.rpc.supervisor.startProcess(name, wait)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != ALREADY_STARTED:
                raise AgentError(
                    f"cannot start {name}: {fault.faultString}", kind="service"
                ) from None

    def stop(self, name: str) -> None:
        """Stop ``name`` and wait (stop signal, then KILL after its stop timeout)."""
        try:
            self.rpc.supervisor.stopProcess(name, True)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode not in (BAD_NAME, NOT_RUNNING):
                raise

    def signal(self, name: str, signame: str) -> None:
        try:
            self.rpc.supervisor.signalProcess(name, signame)
        except xmlrpc.client.Fault as fault:
            raise AgentError(f"cannot signal {name}: {fault.faultString}", kind="service") from None

    def stop_nowait(self, name: str) -> None:
        """Send ``name`` its stop signal and return; ``remove`` later waits for its exit."""
        if self.info(name) is not None:
            self._stop_group(name, wait=False)

    def remove(self, name: str) -> None:
        """Stop ``name``, drop it from supervisord and delete its conf (idempotent)."""
        remove_program_conf(self.layout, name)
        if self.info(name) is None:
            return
        self._stop_group(name)
        try:
            self.rpc.supervisor.removeProcessGroup(name)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != BAD_NAME:
                raise


# --- starting and stopping supervisord --------------------------------------------------------


def find_supervisor(layout: Layout) -> str:
    """The dir to put on sys.path for supervisord: the newest ``tools/supervisor-*``, else the
    one this interpreter imports ``supervisor`` from."""

    def version_key(path: Path) -> tuple[int, ...]:
        parts = re.findall(r"\d+", path.name.split("-", 1)[-1])
        return tuple(int(p) for p in parts)

    try:
        found = [
            p
            for p in layout.tools.glob("supervisor-*")
            if (p / "supervisor" / "supervisord.py").is_file()
        ]
    except OSError:
        found = []
    if found:
        return str(max(found, key=version_key))
    try:
        import supervisor  # type: ignore[import-not-found]
    except ImportError:
        raise AgentError(
            f"supervisor is not available: no {layout.tools}/supervisor-* and no "
            f"importable supervisor in {sys.executable}",
            kind="service",
        ) from None
    return os.path.dirname(os.path.dirname(os.path.abspath(str(supervisor.__file__))))


# Run supervisord without PYTHONPATH in its environment: its programs inherit that environment,
# and the app must not see supervisor's package on its path.
# supervisord, with one change: a program without its own ``umask`` gets 022 (supervisord's
# default), not supervisord's own 027, so the app's files keep the modes they always had.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1))\n"
    "from supervisor import options\n"
    "configure = options.ProcessConfig.__init__\n"
    "def configure_umask(self, *args, **kwargs):\n"
    "    configure(self, *args, **kwargs)\n"
    "    if self.umask is None:\n"
    "        self.umask = 0o022\n"
    "options.ProcessConfig.__init__ = configure_umask\n"
    "from supervisor.supervisord import main; main()"
)


_STARTING = threading.Lock()  # one start at a time in this agent (install starts it early)


def ensure_running(layout: Layout, emit: Emit | None = None) -> Supervisor:
    """Return a client of this root's supervisord, starting it first when it is not answering.

    It is started detached (own session, no inherited stdio) so it never holds an SSH session
    open, and daemonizes itself; we poll its socket until it answers.
    """
    with _STARTING:
        return _ensure_running(layout, emit)


def _ensure_running(layout: Layout, emit: Emit | None) -> Supervisor:
    for d in (layout.run, programs_dir(layout), layout.log):
        d.mkdir(parents=True, exist_ok=True)
    restrict_logs(layout)
    write_if_changed(conf_path(layout), main_conf(layout))
    sup = Supervisor(layout)
    if sup.ping():
        return sup
    old = read_pid(layout)
    if old is not None and pid_alive(old) and _is_our_supervisord(layout, old):
        # Still there but not answering (starting up or shutting down): wait for one or the other.
        _wait(lambda: sup.ping() or not pid_alive(old), START_TIMEOUT)
        if sup.ping():
            return sup
    tools = find_supervisor(layout)
    if emit:
        emit({"phase": "services", "status": "supervisord", "detail": "starting supervisord"})
    start_log = layout.log / "supervisord.start.log"
    with (
        open(os.devnull, "rb") as devnull,
        open(os.open(start_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, LOG_FILE_MODE), "wb") as out,
    ):
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, tools, "-c", str(conf_path(layout))],
            stdin=devnull,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(layout.root),
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            start_new_session=True,
            close_fds=True,
        )
    try:
        code = proc.wait(timeout=START_TIMEOUT)  # the parent exits once the daemon has forked
    except subprocess.TimeoutExpired:
        code = None
    if code not in (0, None) or not _wait(sup.ping, START_TIMEOUT):
        output = "\n".join(tail_lines(start_log) + tail_lines(layout.log / "supervisord.log"))
        raise AgentError(f"supervisord did not start (exit {code}):\n{output}", kind="service")
    return sup


def restrict_logs(layout: Layout) -> None:
    """``log/`` 0750 and every file in it 0640 at most, also those an older agent (or a
    supervisord started by one, under umask 022) left readable by everyone."""
    os.chmod(layout.log, LOG_DIR_MODE)
    for entry in os.scandir(layout.log):
        try:
            mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
            if entry.is_file(follow_symlinks=False) and mode & ~LOG_FILE_MODE:
                os.chmod(entry.path, mode & LOG_FILE_MODE)
        except FileNotFoundError:  # rotated away meanwhile
            continue


def connect(layout: Layout) -> Supervisor | None:
    """A client when supervisord is answering, else None (never starts it)."""
    if not sock_path(layout).exists():
        return None
    sup = Supervisor(layout)
    return sup if sup.ping() else None


def shutdown(layout: Layout, timeout: float = SHUTDOWN_TIMEOUT) -> Shutdown:
    """Stop every program and supervisord itself; wait until its pid is gone (or a zombie)."""
    pid = read_pid(layout)
    sup = connect(layout)
    if sup is not None:
        try:
            pid = int(sup.rpc.supervisor.getPID())
            sup.rpc.supervisor.shutdown()
        except (OSError, xmlrpc.client.Error):
            pass
    elif pid is not None and pid_alive(pid) and _is_our_supervisord(layout, pid):
        os.kill(pid, signal.SIGTERM)
    if pid is not None and not _wait(lambda: not pid_alive(pid), timeout):
        raise AgentError(
            f"supervisord (pid {pid}) did not exit within {timeout:g}s", kind="service"
        )
    return {"supervisord_pid": pid, "stopped": pid is not None}


def read_pid(layout: Layout) -> int | None:
    try:
        return int(pid_path(layout).read_text().strip())
    except (OSError, ValueError):
        return None


def _is_our_supervisord(layout: Layout, pid: int) -> bool:
    """The recorded pid still runs this root's supervisord (pid files can outlive a reboot)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid file supervisord itself wrote
    return str(conf_path(layout)).encode() in cmdline


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
