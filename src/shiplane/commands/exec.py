"""``shiplane exec`` and ``shiplane console``: a command run on the stage's hosts in the live
release's environment, exactly as hooks get it (the agent's ``exec-env``: the venv's ``bin``
first on ``PATH``, the release's env file with its secrets, the release as working directory),
with the caller's terminal when there is one, and recorded in each host's ledger."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypedDict

from shiplane.agent.paths import Layout
from shiplane.agent_bundle import agent_zip
from shiplane.commands.common import StageContext, open_stage
from shiplane.commands.operate import _mask_known_secrets
from shiplane.errors import OperationError, UsageError
from shiplane.fleet import Fleet, TransportFactory, failures
from shiplane.plan import primary_host
from shiplane.secret import Masker
from shiplane.transport.session import AgentSession, HostError
from shiplane.transport.ssh import SSHTransport
from shiplane.whoami import holder

# out(host, stream, line): a line of a host's output ("stdout" or "stderr"), when it is captured
Output = Callable[[str, str, str], None]


@dataclass(frozen=True)
class Target:
    """One host to run on: the live release there and the local argv that runs the command."""

    host: str
    release: str
    argv: list[str]


class ExecHost(TypedDict):
    release: str
    exit_code: int
    seconds: float


class ExecReport(TypedDict):
    """``exec --json``/``console --json``'s result, before the CLI adds its ``lines``: the first
    failed exit code (shiplane's), per host its release, exit code and seconds, the command
    (masked)."""

    ok: bool
    exit_code: int
    command: list[str]
    hosts: dict[str, ExecHost]


@dataclass(frozen=True)
class ExecResult:
    """What ``exec``/``console`` return; the CLI renders what exec itself says
    (``ui.exec_lines``, to stderr) or prints ``to_json()``. ``unrecorded``: the hosts whose
    ledger did not take the entry, and why."""

    report: ExecReport
    unrecorded: dict[str, str]

    def to_json(self) -> ExecReport:
        return self.report


def pick_hosts(ctx: StageContext, names: Sequence[str], every: bool) -> list[str]:
    """The hosts a verb acts on: ``--all``, the ``--host`` names (each a host of the stage, by
    its whole name or its host part), or the stage's primary."""
    deploy = ctx.project.deploy
    hosts = list(deploy.stages[ctx.stage].hosts)
    if every and names:
        raise UsageError("give either --all or --host, not both")
    if every:
        return hosts
    if not names:
        return [primary_host(deploy, ctx.stage, hosts)]
    picked: list[str] = []
    for name in names:
        match = [h for h in hosts if h == name or h.split("@")[-1].split(":")[0] == name]
        if not match:
            raise UsageError(
                f"--host {name!r} is not a host of stage {ctx.stage!r}; its hosts are: {', '.join(hosts)}"
            )
        picked += [h for h in match if h not in picked]
    return picked


@contextmanager
def _connected(
    file: Path | None,
    stage: str | None,
    masker: Masker,
    *,
    names: Sequence[str],
    every: bool,
    hosts: str | None,
    sets: Sequence[str],
    transports: TransportFactory | None,
) -> Iterator[tuple[StageContext, Fleet, list[str]]]:
    """The chosen hosts of a stage, each with an agent session; only those are connected (one
    host down does not stop an exec on another). Every secret of the stage that can be found is
    masked (a user may type one on the command line); none is required, the hosts hold them."""
    ctx = open_stage(file, stage, masker, hosts=hosts, sets=sets, need_secrets=False)
    _mask_known_secrets(ctx.project, ctx.stage, masker)
    targets = pick_hosts(ctx, names, every)
    fleet = Fleet(ctx.project, ctx.stage, lambda event: None, transports=transports)
    try:
        bad = failures(fleet.connect(targets))
        if bad:
            raise OperationError("; ".join(e.message for e in bad.values()))
        yield ctx, fleet, targets
    finally:
        fleet.close()


def _live_releases(ctx: StageContext, fleet: Fleet, targets: list[str]) -> dict[str, str]:
    """Each target's live release; refused (nothing run anywhere) when a host serves none."""
    currents = {host: fleet.sessions[host].call("releases", {}).get("current") for host in targets}
    empty = [host for host, current in currents.items() if not current]
    if empty:
        raise UsageError(
            f"nothing is deployed on {', '.join(empty)} (stage {ctx.stage!r}): there is no live "
            "release to run in",
            hint=f"deploy first: shiplane deploy --stage {ctx.stage}",
        )
    return {host: str(current) for host, current in currents.items()}


def _argv(session: AgentSession, release: str, command: Sequence[str], tty: bool) -> list[str]:
    """The local argv that runs ``command`` in ``release`` on the session's host: the agent's
    ``exec-env`` (installed there by the session's bootstrap), through ssh for an SSH host."""
    root = str(session.hello["root"])
    agent = str(Layout(root).agent_dir / f"agent-{agent_zip()[1]}")
    remote = [
        str(session.hello["executable"]),
        "-S",
        agent,
        "exec-env",
        root,
        release,
        "--",
        *command,
    ]
    transport = session.transport
    if isinstance(transport, SSHTransport):
        return transport.command_argv(remote, tty=tty)
    return remote


def run_exec(
    file: Path | None,
    stage: str | None,
    command: Sequence[str],
    masker: Masker,
    *,
    out: Output,
    names: Sequence[str] = (),
    every: bool = False,
    tty: bool = False,
    capture: bool = False,
    hosts: str | None = None,
    sets: Sequence[str] = (),
    transports: TransportFactory | None = None,
) -> ExecResult:
    """Run ``command`` on the chosen hosts in the live release's environment; record it in each
    host's ledger (the command masked) and return its result (``ok``, ``exit_code``, ``hosts``...).

    One host, not ``capture``: the command gets this process's stdin/stdout/stderr, and with
    ``tty`` a terminal on the host. Several hosts (or ``capture``): they run at once, stdin
    empty, each output line given to ``out``. ``exit_code`` is the host's, or the first non-zero
    in host order; a command killed by a signal counts as 128 + its number."""
    if not command or not command[0].strip():
        raise UsageError(
            "no command given: put it after `--`, as in `shiplane exec --stage prod -- python -V`"
        )
    with _connected(
        file, stage, masker, names=names, every=every, hosts=hosts, sets=sets, transports=transports
    ) as (ctx, fleet, targets):
        releases = _live_releases(ctx, fleet, targets)
        return _execute(
            ctx, fleet, releases, list(command), masker, out=out, tty=tty, capture=capture
        )


def run_console(
    file: Path | None,
    stage: str | None,
    masker: Masker,
    *,
    out: Output,
    names: Sequence[str] = (),
    tty: bool = False,
    capture: bool = False,
    hosts: str | None = None,
    sets: Sequence[str] = (),
    transports: TransportFactory | None = None,
) -> ExecResult:
    """``run_exec`` of the framework's shell for the app (:func:`console_command`), on one host."""
    if len(names) > 1:
        raise UsageError("console opens one shell: give at most one --host")
    with _connected(
        file, stage, masker, names=names, every=False, hosts=hosts, sets=sets, transports=transports
    ) as (ctx, fleet, targets):
        releases = _live_releases(ctx, fleet, targets)
        host = targets[0]
        command = console_command(ctx, fleet.sessions[host], releases[host])
        return _execute(ctx, fleet, releases, command, masker, out=out, tty=tty, capture=capture)


def _execute(
    ctx: StageContext,
    fleet: Fleet,
    releases: dict[str, str],
    command: list[str],
    masker: Masker,
    *,
    out: Output,
    tty: bool,
    capture: bool,
) -> ExecResult:
    """``command`` on each host of ``releases`` (host -> its live release), recorded; the result."""
    captured = capture or len(releases) > 1
    plan = [
        Target(h, r, _argv(fleet.sessions[h], r, command, tty and not captured))
        for h, r in releases.items()
    ]
    started = time.time()
    with _sigint_to_children():
        codes, seconds = _run_captured(plan, out) if captured else _run_attached(plan[0])
    masked = [masker(word) for word in command]
    unrecorded = _record(ctx, fleet, plan, masked, codes, seconds, started)
    failed = [codes[t.host] for t in plan if codes[t.host] != 0]
    report: ExecReport = {
        "ok": not failed,
        "exit_code": failed[0] if failed else 0,
        "command": masked,
        "hosts": {
            t.host: {"release": t.release, "exit_code": codes[t.host], "seconds": seconds[t.host]}
            for t in plan
        },
    }
    return ExecResult(report, unrecorded)


@contextmanager
def _sigint_to_children() -> Iterator[None]:
    """While the command runs, Ctrl-C is the command's (it shares our terminal's process group):
    this process waits for it to end instead, then records it. A handler that does nothing,
    not SIG_IGN, which a child would inherit (a Python child would then ignore Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _run_attached(target: Target) -> tuple[dict[str, int], dict[str, float]]:
    """The command with this process's stdin, stdout and stderr (a terminal, a pipe, a file)."""
    started = time.monotonic()
    try:
        process = subprocess.Popen(target.argv)
    except OSError as exc:
        raise OperationError(f"cannot start {target.argv[0]!r}: {exc.strerror or exc}") from None
    code = _exit_code(process.wait())
    return {target.host: code}, {target.host: round(time.monotonic() - started, 3)}


def _run_captured(plan: list[Target], out: Output) -> tuple[dict[str, int], dict[str, float]]:
    """Every target at once, stdin empty; each output line to ``out`` as it comes."""
    started = time.monotonic()
    processes: dict[str, subprocess.Popen[bytes]] = {}
    readers: list[threading.Thread] = []
    try:
        for target in plan:
            processes[target.host] = subprocess.Popen(
                target.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
    except OSError as exc:
        for process in processes.values():
            process.kill()
            process.wait()
        raise OperationError(f"cannot start {plan[0].argv[0]!r}: {exc.strerror or exc}") from None
    lock = threading.Lock()  # one line at a time: lines of two hosts never interleave
    for host, process in processes.items():
        for name, stream in (("stdout", process.stdout), ("stderr", process.stderr)):
            assert stream is not None
            reader = threading.Thread(
                target=_read_lines, args=(stream, host, name, out, lock), daemon=True
            )
            reader.start()
            readers.append(reader)
    codes: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for host, process in processes.items():
        codes[host] = _exit_code(process.wait())
        seconds[host] = round(time.monotonic() - started, 3)
    for reader in readers:
        reader.join()
    return codes, seconds


def _read_lines(stream: IO[bytes], host: str, name: str, out: Output, lock: threading.Lock) -> None:
    for raw in stream:
        with lock:
            out(host, name, raw.decode(errors="replace").rstrip("\r\n"))
    stream.close()


def _record(
    ctx: StageContext,
    fleet: Fleet,
    plan: list[Target],
    command: list[str],
    codes: dict[str, int],
    seconds: dict[str, float],
    started: float,
) -> dict[str, str]:
    """Append the exec to each host's ledger; the hosts where it could not be, and why."""
    who = holder(" ".join(["shiplane", *sys.argv[1:]]), os.getpid()).to_json()
    unrecorded = {}
    for target in plan:
        entry = {
            "event": "exec",
            "stage": ctx.stage,
            "release": target.release,
            "command": command,
            "exit_code": codes[target.host],
            "outcome": "ok" if codes[target.host] == 0 else "failed",
            "user": who["user"],
            "controller": who["host"],
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration": seconds[target.host],
        }
        try:
            fleet.sessions[target.host].call("record", {"entry": entry}, timeout=30)
        except HostError as exc:  # the command ran: its code stands, the missing entry is said
            unrecorded[target.host] = exc.reason
    return unrecorded


# -- console ------------------------------------------------------------------------------------

_HAS_FLASK = "import importlib.util as u; print('flask' if u.find_spec('flask') else '-')"


def console_command(ctx: StageContext, session: AgentSession, release: str) -> list[str]:
    """The framework's shell for the app, as found in the live release on the session's host:
    Django's (``manage.py`` in the release), Flask's (``app.wsgi`` set and flask in the venv);
    refused otherwise, naming what to run with ``shiplane exec`` instead."""
    if session.call("read_release_file", {"release_id": release, "path": "manage.py"}).get(
        "exists"
    ):
        return ["python", "manage.py", "shell"]
    wsgi = ctx.project.deploy.app.wsgi
    if wsgi:
        try:
            probe = session.call(
                "hook",
                {"release_id": release, "command": f'python -c "{_HAS_FLASK}"', "timeout": 60},
                timeout=90,
            )
        except HostError:
            probe = {}
        if str(probe.get("output", "")).strip().endswith("flask"):
            return ["flask", "--app", wsgi, "shell"]
    found = (
        f"app.wsgi {wsgi!r} has no flask in its venv (Flask)"
        if wsgi
        else "the deploy file names no app.wsgi"
    )
    raise UsageError(
        f"shiplane cannot tell which shell this app has: the release on {session.host} has no "
        f"manage.py (Django) and {found}; run the one it has with exec, as in "
        f"`shiplane exec --stage {ctx.stage} -- python`"
    )
