"""SSH through the system's OpenSSH client, so ~/.ssh/config, agents, ProxyJump and known_hosts
work as everywhere else. One multiplexed connection per host (ControlMaster), strict host-key
checking always.

A host's connection outlives its command by ``ssh_persist`` seconds of idleness (ControlPersist,
as Ansible's), so the next command within that time multiplexes over it instead of paying the
handshake again: the sockets live in the user's own 0700 dir, each named by a digest of
everything that decides what the connection is (the destination, every ssh option and config
file, the known_hosts files' states), so a command with other settings never borrows another's
connection. ``ssh_persist = 0``, or a shared dir that is not safely the user's, gives a private
per-command dir whose masters are stopped when the command ends (docs/DESIGN.md, "Connections")."""

from __future__ import annotations

import hashlib
import math
import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, ClassVar

from shiplane.errors import ConfigError
from shiplane.userdir import private_dir

from .base import ConnectSettings

# [user@]host[:port], the shape config/schema.py's HOST validates (repeated here: this module is
# imported before the config package, to pre-warm): nothing ssh could read as an option
HOST = re.compile(
    r"^(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]{0,63})@)?"
    r"(?P<host>[A-Za-z0-9_][A-Za-z0-9._-]{0,252}|\[[0-9a-fA-F:.]+\])(?::(?P<port>[0-9]{1,5}))?$"
)
_LOGIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
_OPTION = re.compile(
    r"^[A-Za-z][A-Za-z0-9]*(?:=|\s+)[^\x00-\x1f\x7f]+$"
)  # Key=Value, given as -o Key=Value
_FORBIDDEN = (
    "stricthostkeychecking",
    "userknownhostsfile=/dev/null",
    "globalknownhostsfile=/dev/null",
)


def remove_control_dir() -> None:
    """Remove this process's control-socket dir once every connection is closed (if empty)."""
    try:
        os.rmdir(_private_dir_path())
    except OSError:
        pass


def _private_dir_path() -> Path:
    return Path(tempfile.gettempdir()) / f"shiplane-ssh-{os.getuid()}-{os.getpid()}"


def _control_dir() -> Path:
    """A private directory for control sockets, one per controller process."""
    path = _private_dir_path()
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


# the sockets of the masters this process started: a session over any other one found in the
# shared dir goes through a connection an earlier command left open
_opened: set[Path] = set()


def shared_control_dir() -> Path | None:
    """The user's dir for connections that outlive their command (None: nothing persists)."""
    return private_dir("ssh")


def _file_state(path: str) -> str:
    """What a config or known_hosts file is now (its inode, size and mtime): a connection made
    before it changed is not reused after."""
    try:
        info = os.stat(os.path.expanduser(path))
    except OSError:
        return "-"
    return f"{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"


class SSHTransport:
    """Any other host spec, ``[user@]host[:port]`` (an alias of ~/.ssh/config too)."""

    on_controller: ClassVar[bool] = False

    @classmethod
    def claims(cls, host: str) -> bool:
        return True  # the last transport tried (shiplane.transport.TRANSPORTS): every other spec

    @classmethod
    def connect(cls, host: str, settings: ConnectSettings) -> SSHTransport:
        return cls(
            host,
            ssh_config=settings.ssh_config,
            identity_file=settings.identity_file,
            options=settings.ssh_options,
            connect_timeout=settings.connect_timeout,
            ssh_persist=settings.ssh_persist,
            user=settings.user,
        )

    @classmethod
    def cleanup(cls) -> None:
        remove_control_dir()

    def __init__(
        self,
        host: str,
        *,
        ssh_config: str | None = None,
        identity_file: str | None = None,
        options: Sequence[str] = (),
        connect_timeout: float = 10,
        ssh_persist: int = 60,
        user: str | None = None,
    ) -> None:
        match = HOST.match(host)
        if not match or (match["port"] and not 1 <= int(match["port"]) <= 65535):
            raise ConfigError(f"host {host!r}: expected [user@]host[:port] (not starting with '-')")
        if not math.isfinite(connect_timeout) or not 0 < connect_timeout <= 600:
            raise ConfigError(
                f"connect_timeout {connect_timeout!r}: expected seconds between 0 and 600"
            )
        if not 0 <= ssh_persist <= 3600:
            raise ConfigError(f"ssh_persist {ssh_persist!r}: expected seconds between 0 and 3600")
        for option in options:
            if not _OPTION.match(option):
                raise ConfigError(
                    f"ssh_options {option!r}: expected an OpenSSH option as Key=Value"
                )
            if any(bad in option.lower().replace(" ", "") for bad in _FORBIDDEN):
                raise ConfigError(
                    f"ssh_options {option!r}: host keys are always checked strictly by shiplane",
                    hint="Trust a host by adding its key to known_hosts (ssh-keyscan, after checking the fingerprint).",
                )
        self.host = host
        login = match["user"] or user  # the host's own user, else the stage's deploy_user
        if login is not None and not _LOGIN.match(login):
            raise ConfigError(f"user {login!r}: expected a login name")
        self._target = f"{login}@{match['host']}" if login else str(match["host"])
        self._address = str(match["host"]).strip("[]")
        self._port = match["port"]
        base = ["ssh"]
        if ssh_config:
            base += ["-F", ssh_config]
        if identity_file:
            base += ["-i", os.path.expanduser(identity_file), "-o", "IdentitiesOnly=yes"]
        if self._port:
            base += ["-p", self._port]
        base += [
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"ConnectTimeout={int(max(1, connect_timeout))}",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=3",
        ]
        own = [word for option in options for word in ("-o", option)]
        shared = shared_control_dir() if ssh_persist else None
        self._socket: Path | None = None  # a persisting connection's socket
        if shared is not None:
            # the socket's name is everything that decides what the connection is: the digest
            # of the argv (destination, options, -F/-i files) and of the files ssh reads
            files = [ssh_config or "~/.ssh/config", "~/.ssh/known_hosts", "/etc/ssh/ssh_config"]
            what = "\0".join([*base, *own, self._target, *map(_file_state, files)])
            self._socket = shared / hashlib.sha256(what.encode()).hexdigest()[:24]
            control = [f"ControlPath={self._socket}", f"ControlPersist={ssh_persist}"]
        else:  # within the command only: its close stops the master
            control = [f"ControlPath={_control_dir()}/%C", "ControlPersist=60"]
        # before the user's options: ssh takes the first value of each, so these are ours
        control = ["ControlMaster=auto", *control]
        self._base = [*base, *(word for c in control for word in ("-o", c)), *own]

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        if self._socket is not None and not self._socket.is_socket():
            _opened.add(self._socket)  # no connection to reuse: this session makes its own
        return subprocess.Popen(
            self._command(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def spawn_argv(self, argv: list[str]) -> list[str]:
        return self._command(argv)

    def command_argv(self, argv: list[str], *, tty: bool) -> list[str]:
        """The local argv that runs ``argv`` on the host for a caller who starts it with its own
        stdin/stdout/stderr (``shiplane exec``): ``tty`` asks for a terminal there (``ssh -t``, so
        shells and REPLs are interactive), else ``-T``. Same options, control master and strict
        host-key checking as every session."""
        return self._command(argv, ["-t" if tty else "-T"])

    def _command(self, argv: list[str], flags: Sequence[str] = ()) -> list[str]:
        # the remote side gets one string for its shell: every word quoted; "--" before the
        # destination: nothing after it is read as an option of ssh's
        return [*self._base, *flags, "--", self._target, shlex.join(argv)]

    def prewarm(self, stderr: BinaryIO) -> subprocess.Popen[bytes] | None:
        """Start this host's control master now, running nothing on the host (``-N``); with
        ControlPersist it goes to the background once connected, so the process exits then
        (0, or ssh's 255 and its reason in ``stderr``: a file, as the background master keeps it).
        None when an earlier command's master is there to reuse (a dead one's socket is the
        session's to replace: ssh unlinks a socket nobody listens on). ``ControlMaster=auto``:
        a master another command made meanwhile is used (the process exits at once); two that
        connect at the same moment are sorted out by ``prewarm.wait``."""
        if self._socket is not None and self._socket.is_socket():
            return None
        if self._socket is not None:
            _opened.add(self._socket)
        return subprocess.Popen(
            [*self._base, "-N", "--", self._target],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )

    def explain_failure(self, returncode: int | None, stderr: str) -> str:
        text = stderr.strip()
        if (
            "Host key verification failed" in text
            or "REMOTE HOST IDENTIFICATION HAS CHANGED" in text
        ):
            changed = "REMOTE HOST IDENTIFICATION HAS CHANGED" in text
            address, port, known_hosts = self._resolved()
            scan = f"ssh-keyscan {'-p ' + port + ' ' if port != '22' else ''}{address} >> {known_hosts}"
            if changed:
                return (
                    f"the SSH host key of {self.host} has CHANGED since it was trusted; shiplane checks host "
                    f"keys strictly. If the host was really reinstalled, check its new fingerprint, remove the "
                    f"old key (ssh-keygen -R {address} -f {known_hosts}) and add the new one: {scan}"
                )
            return (
                f"the SSH host key of {self.host} is not known; shiplane checks host keys strictly and never "
                f"accepts an unknown one. To trust this host, check its fingerprint (ssh-keyscan {address} | "
                f"ssh-keygen -lf -) and add it: {scan}"
            )
        lines = [line for line in text.splitlines() if line.strip()]
        if returncode == 255:
            return (
                f"cannot reach {self.host} over SSH: {lines[-1] if lines else 'connection failed'}"
            )
        return f"the agent on {self.host} exited with code {returncode}" + (
            f": {' / '.join(lines[-3:])}" if lines else ""
        )

    def config_values(self, key: str) -> list[str]:
        """The values OpenSSH resolves for ``key`` (lower case, as ``ssh -G`` prints it) for this
        host with these options: ``identityfile`` lists the keys ssh would offer."""
        return [value for name, value in self._resolved_config() if name == key and value]

    def _resolved(self) -> tuple[str, str, str]:
        """(address, port, known_hosts file) as OpenSSH resolves this host (aliases, -F config)."""
        address, port, known_hosts = self._address, self._port or "22", "~/.ssh/known_hosts"
        for key, value in self._resolved_config():
            if key == "hostname" and value:
                address = value
            elif key == "port" and value:
                port = value
            elif key == "userknownhostsfile" and value:
                known_hosts = value.split()[0]
        return address, port, known_hosts

    def _resolved_config(self) -> list[tuple[str, str]]:
        """``ssh -G``: every setting as OpenSSH resolves it for this host, (key, value) pairs;
        none when ssh cannot be asked."""
        try:
            done = subprocess.run(
                [*self._base, "-G", "--", self._target],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [
            (key, value)
            for key, _, value in (line.partition(" ") for line in done.stdout.splitlines())
        ]

    def close(self) -> None:
        """Stop this host's control master, unless it persists for the next command (the private
        dir goes with ``remove_control_dir``, once every host is closed: removing it here would
        race other hosts still connecting)."""
        if self._socket is None:
            self._exit_master()

    def drop_stale(self) -> bool:
        # whether the session went through an earlier command's connection: a socket this
        # process did not open (prewarm's masters and sessions that found none are in _opened)
        if self._socket is None or self._socket in _opened or not self._socket.is_socket():
            return False
        self._exit_master()
        if self._socket is not None:  # a master too stuck to exit: the next ssh starts anew
            self._socket.unlink(missing_ok=True)
        return True

    def _exit_master(self) -> None:
        try:
            subprocess.run(
                [*self._base, "-O", "exit", "--", self._target],
                capture_output=True,
                timeout=10,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            pass
