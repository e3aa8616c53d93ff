"""Open a command's SSH connections while the CLI is still starting: each host's handshake
(~0.25 s with OpenSSH 9.2's default key exchange) then overlaps the ~0.3 s of imports and deploy
file validation that come before any session, instead of following them.

Best effort, and it changes nothing on a host: it starts only control masters that run no remote
command (``ssh -N``), with the same options, control path and strict host-key checking as the
session that follows, which multiplexes over the master (a master that could not connect is that
host's connect error, explained as ssh's). Whatever this cannot work out from the command line and the raw deploy
file (``--set`` overrides, a promotion check first, no deploy file) is simply not pre-warmed; the
masters of a command that ends before its sessions (a config error) are stopped on the way out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from shiplane.agent_bundle import INTERPRETER, agent_zip, bootstrap_argv
from shiplane.verbs import CONNECTING_VERBS

from . import cleanup, connect
from .base import ConnectSettings, Prewarming

VERBS = CONNECTING_VERBS  # shiplane/verbs.py
MOST = 16  # hosts pre-warmed at once: deploy's default --parallel
POLL = 0.05  # seconds between looks at a master still connecting
# what ssh says when the control socket appeared while it connected (another command's master)
LOST_RACE = b"disabling multiplexing"


@dataclass
class Target:
    """A host to pre-warm: its transport, and the interpreter and deploy root its agent session
    will be started with (None: the raw file does not say for certain; no early agent)."""

    transport: Prewarming
    python: str | None = None
    root: str | None = None
    timeout: float = 15  # seconds the master may take (its session's connect timeout, +5)


@dataclass
class _Warming:
    """One host being pre-warmed, by a thread of its own."""

    target: Target
    thread: threading.Thread | None = None
    master: subprocess.Popen[bytes] | None = None  # None: an earlier command's is there
    stderr: int = -1  # the master's stderr (a dup of its temp file), -1 without a master
    failed: tuple[int, str] | None = None  # ssh's exit code and stderr when it could not connect
    agent: subprocess.Popen[bytes] | None = None  # the early agent session, waiting for its go
    agent_argv: list[str] = field(default_factory=list)  # the local argv that started it


_warming: dict[str, _Warming] = {}
_taken: set[str] = set()  # hosts whose session took the master over (its close stops it)
_closing = threading.Event()  # the command ends: no early agent starts any more


def start(argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
    """Pre-warm the hosts the command ``argv`` (without the program name) will connect to: start
    each one's control master, then (a thread per host, once the master is up) its agent session,
    which waits for the deploy file to be validated before it does anything (``early`` in
    agent_bundle.BOOTSTRAP)."""
    for host, target in targets(argv, env, cwd).items():
        warming = _Warming(target)
        try:
            with tempfile.TemporaryFile() as stderr:  # the process keeps its own descriptor
                warming.master = target.transport.prewarm(stderr)
                if warming.master is not None:  # else an earlier command's connection is there
                    warming.stderr = os.dup(stderr.fileno())
        except OSError:  # no ssh client: the session says so
            return
        _warming[host] = warming
        if warming.master is not None or target.python is not None:
            warming.thread = threading.Thread(target=_warm, args=(warming,), daemon=True)
            warming.thread.start()


def _warm(warming: _Warming) -> None:
    """A host's thread: its master's handshake, then its early agent session."""
    if warming.master is not None:
        warming.failed = _settle(warming.master, warming.stderr, warming.target.timeout)
    target = warming.target
    if warming.failed is not None or target.python is None or target.root is None:
        return
    try:
        remote = bootstrap_argv(target.python, target.root, agent_zip()[1], early=True)
        argv = target.transport.spawn_argv(remote)
        if not _closing.is_set():
            warming.agent_argv = argv  # before the agent: adopt() reads them in that order
            warming.agent = target.transport.spawn(remote)
    except Exception:  # noqa: BLE001, S110 - best effort: the session starts its own agent
        pass


def _settle(process: subprocess.Popen[bytes], err: int, seconds: float) -> tuple[int, str] | None:
    """Let a master finish its handshake. Returns ssh's exit code and stderr when it could not
    connect: trying again would only fail the same way, as late (an unreachable host would cost
    its connect timeout twice)."""
    deadline = time.monotonic() + seconds
    while (code := _exited(process, POLL)) is None:
        # another command connected to the host at the same moment and made the master this
        # one meant to: this one would stay connected in the foreground for nothing, and the
        # session multiplexes over the other's
        if time.monotonic() > deadline or LOST_RACE in _stderr(err):
            process.kill()
            return None
    if code == 0:
        return None
    return code, _stderr(err).decode(errors="replace")


def wait(host: str, seconds: float) -> tuple[int, str] | None:
    """Before a host's session starts: let its master finish the handshake, so the session
    multiplexes over it rather than racing it with a second connection (see ``_settle``)."""
    warming = _warming.get(host)
    if warming is None or host in _taken:  # a second connect (a retry) is the session's own
        return None
    _taken.add(host)
    if warming.thread is not None:
        warming.thread.join(seconds)
    return warming.failed


def adopt(host: str, transport: Any, remote: list[str]) -> subprocess.Popen[bytes] | None:
    """The host's early agent session, if it was started exactly as ``transport`` would start
    ``remote`` (the same ssh argv, interpreter, deploy root and agent): the session then only
    says ``go``. Otherwise it is ended, and None."""
    warming = _warming.get(host)
    if warming is None or warming.agent is None:
        return None
    agent, warming.agent = warming.agent, None
    same = isinstance(transport, Prewarming) and transport.spawn_argv(remote) == warming.agent_argv
    if same and agent.poll() is None:
        return agent
    _end(agent)
    return None


def _end(agent: subprocess.Popen[bytes]) -> None:
    """An early agent nobody took: EOF before its go, so it exits having done nothing."""
    agent.kill()  # the ssh client: its channel closes, the agent reads EOF
    agent.wait()
    for pipe in (agent.stdin, agent.stdout, agent.stderr):
        if pipe is not None:
            pipe.close()


def _exited(process: subprocess.Popen[bytes], seconds: float) -> int | None:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def _stderr(err: int) -> bytes:
    os.lseek(err, 0, os.SEEK_SET)
    return os.read(err, 1 << 16)


def abort() -> None:
    """The command is interrupted: stop the masters still connecting (a session waiting for one
    then fails at once instead of at its connect timeout) and start no more early agents; the
    command's end (``stop_unused``) does the rest."""
    _closing.set()
    for warming in list(_warming.values()):
        if warming.master is not None and warming.master.poll() is None:
            warming.master.kill()


def stop_unused() -> None:
    """At the command's end: end the early agents no session took; stop the masters no session
    took over (a command refused before connecting) that are still connecting, and those
    connected unless they persist for the next command (``ssh_persist``); a session's own close
    has already done the same for the others."""
    _closing.set()
    untaken = [warming for host, warming in _warming.items() if host not in _taken]
    for warming in untaken:  # first, so that no thread waits for a handshake nobody needs
        if warming.master is not None and warming.master.poll() is None:
            warming.master.kill()
    for warming in _warming.values():
        if warming.thread is not None:
            warming.thread.join()  # at most one spawn away now
        if warming.agent is not None:
            _end(warming.agent)
    for warming in untaken:
        if warming.master is not None:
            warming.target.transport.close()
    if any(w.master is not None for w in untaken):
        cleanup()
    for warming in _warming.values():
        if warming.stderr >= 0:
            os.close(warming.stderr)
    _warming.clear()
    _taken.clear()
    _closing.clear()


def targets(argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> dict[str, Target]:
    """host -> what to pre-warm, for the hosts ``argv`` will certainly connect to; empty when in
    doubt (and when one of them has a transport that cannot pre-warm: the local host, never
    slow)."""
    parsed = _parse(list(argv))
    if parsed is None:
        return {}
    file, stage_name, hosts_override, parallel = parsed
    stage_name = stage_name or env.get("SHIPLANE_STAGE")
    deploy_file = Path(file) if file else _find(cwd)
    if not stage_name or deploy_file is None:
        return {}
    try:
        data = tomllib.loads(deploy_file.read_text(encoding="utf-8"))
        stage = data["stages"][stage_name]
        hosts = hosts_override.split(",") if hosts_override else stage["hosts"]
        if stage.get("promote_from") or not isinstance(hosts, list):
            return {}  # a promotion check may refuse the artifact before any host is reached
        if not all(isinstance(h, str) for h in hosts):
            return {}
        ssh_config = stage.get("ssh_config")
        settings = ConnectSettings(
            ssh_config=str(deploy_file.parent / ssh_config) if ssh_config else None,
            identity_file=stage.get("identity_file"),
            ssh_options=tuple(stage.get("ssh_options", [])),
            connect_timeout=float(stage.get("connect_timeout", 10)),
            ssh_persist=int(stage.get("ssh_persist", 60)),
            user=stage.get("deploy_user"),
        )
        # every host's transport, as its session will make it: one that refuses its host or its
        # settings (ConfigError), or cannot pre-warm, leaves the whole command to the real load
        made = {h: connect(h, settings) for h in hosts}
        ready = {h: t for h, t in made.items() if isinstance(t, Prewarming)}
        if len(ready) != len(hosts):
            return {}
        chosen = list(ready.items())[: min(MOST, parallel)]
        return {
            h: Target(t, *_agent_args(data, stage, h), settings.connect_timeout + 5)
            for h, t in chosen
        }
    except Exception:  # noqa: BLE001 - anything unexpected here is the real load's to report
        return {}


def _agent_args(
    data: dict[str, Any], stage: dict[str, Any], host: str
) -> tuple[str | None, str | None]:
    """The interpreter and deploy root of ``host``'s agent session as the raw file gives them
    (``Fleet.python_for``, ``Fleet.root_for``), or Nones when they are not plain strings or
    the interpreter is not one the deploy file may name: its session is then not started
    early. A value the file's validation changes only means the early session is not taken."""
    tables = (
        (stage.get("host_python", {}), host),
        (stage, "python"),
        (data.get("app", {}), "python"),
    )
    python = next((table[key] for table, key in tables if key in table), "python3")
    root = stage.get("deploy_to")
    if isinstance(python, str) and INTERPRETER.match(python) and isinstance(root, str):
        return python, root
    return None, None


def _parse(argv: list[str]) -> tuple[str | None, str | None, str | None, int] | None:
    """(deploy file, stage, --hosts, --parallel) of a connecting verb, or None."""
    verb = None
    values: dict[str, str] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        name, eq, inline = word.partition("=")
        if word in ("-h", "--help", "--version") or name == "--set":
            return None
        if name in ("-f", "--file", "-s", "--stage", "--hosts", "--parallel"):
            if not eq:
                i += 1
                if i >= len(argv):
                    return None
                inline = argv[i]
            values[name] = inline
        elif word.startswith("-s") and len(word) > 2 and not word.startswith("--"):
            values["-s"] = word[2:]
        elif not word.startswith("-") and verb is None:
            verb = word
        i += 1
    if verb not in VERBS:
        return None
    file = values.get("-f") or values.get("--file")
    stage = values.get("-s") or values.get("--stage")
    hosts = values.get("--hosts")
    try:
        parallel = max(1, int(values.get("--parallel", MOST)))
    except ValueError:
        return None
    return file, stage, hosts, parallel


def _find(cwd: Path) -> Path | None:
    """The deploy file as the loader finds it (``find_deploy_file``, which this light module
    must not import: the config package brings pydantic)."""
    for folder in (cwd.resolve(), *cwd.resolve().parents):
        if (folder / "shiplane.toml").is_file():
            return folder / "shiplane.toml"
    return None


def enabled(env: Mapping[str, str]) -> bool:
    """``SHIPLANE_PREWARM=0`` turns pre-warming off."""
    return env.get("SHIPLANE_PREWARM", "1") != "0"
