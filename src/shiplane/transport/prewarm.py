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
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from shiplane.verbs import CONNECTING_VERBS

from . import cleanup, connect
from .base import ConnectSettings, Prewarming

VERBS = CONNECTING_VERBS  # shiplane/verbs.py
MOST = 16  # hosts pre-warmed at once: deploy's default --parallel
POLL = 0.05  # seconds between looks at a master still connecting
# what ssh says when the control socket appeared while it connected (another command's master)
LOST_RACE = b"disabling multiplexing"

_started: dict[str, tuple[Prewarming, subprocess.Popen[bytes], int]] = {}  # + its stderr
_taken: set[str] = set()  # hosts whose session took the master over (its close stops it)


def start(argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
    """Pre-warm the hosts the command ``argv`` (without the program name) will connect to."""
    for host, transport in targets(argv, env, cwd).items():
        try:
            with tempfile.TemporaryFile() as stderr:  # the process keeps its own descriptor
                process = transport.prewarm(stderr)
                if process is not None:  # else an earlier command's connection is there
                    _started[host] = (transport, process, os.dup(stderr.fileno()))
        except OSError:  # no ssh client: the session says so
            return


def wait(host: str, seconds: float) -> tuple[int, str] | None:
    """Before a host's session starts: let its master finish the handshake, so the session
    multiplexes over it rather than racing it with a second connection. Returns ssh's exit code
    and stderr when it could not connect: trying again would only fail the same way, as late
    (an unreachable host would cost its connect timeout twice)."""
    started = _started.get(host)
    if started is None or host in _taken:  # a second connect (a retry) is the session's own
        return None
    _taken.add(host)
    _, process, err = started
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


def _exited(process: subprocess.Popen[bytes], seconds: float) -> int | None:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def _stderr(err: int) -> bytes:
    os.lseek(err, 0, os.SEEK_SET)
    return os.read(err, 1 << 16)


def stop_unused() -> None:
    """At the command's end: stop the masters no session took over (a command refused before
    connecting) that are still connecting, and those connected unless they persist for the next
    command (``ssh_persist``); a session's own close has already done the same for the others."""
    untaken = [started for host, started in _started.items() if host not in _taken]
    for transport, process, _ in untaken:
        if process.poll() is None:
            process.kill()
        transport.close()
    if untaken:
        cleanup()
    for _, _, err in _started.values():
        os.close(err)
    _started.clear()
    _taken.clear()


def targets(argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> dict[str, Prewarming]:
    """host -> its transport, for the hosts ``argv`` will certainly connect to; empty when in doubt
    (and when one of them has a transport that cannot pre-warm: the local host, never slow)."""
    parsed = _parse(list(argv))
    if parsed is None:
        return {}
    file, stage_name, hosts_override, parallel = parsed
    stage_name = stage_name or env.get("SHIPLANE_STAGE")
    deploy_file = Path(file) if file else _find(cwd)
    if not stage_name or deploy_file is None:
        return {}
    try:
        stage = tomllib.loads(deploy_file.read_text(encoding="utf-8"))["stages"][stage_name]
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
        return dict(list(ready.items())[: min(MOST, parallel)])
    except Exception:  # noqa: BLE001 - anything unexpected here is the real load's to report
        return {}


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
