"""Runs phases on many hosts: one agent session per host, bounded concurrency, per-host outcomes.

A phase is a function ``(host, session) -> result``; ``each`` runs it on every host in parallel and
returns what every host answered, or the HostError it raised. It never stops other hosts halfway.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from shiplane.agent.protocol import Event as AgentEvent
from shiplane.agent_bundle import agent_zip, bootstrap_argv
from shiplane.config import Project
from shiplane.errors import OperationError
from shiplane.events import Emit, Event
from shiplane.transport import ConnectSettings, Transport, cleanup, connect, on_controller, prewarm
from shiplane.transport.session import AgentSession, HostError

T = TypeVar("T")

# How long the main thread waits at most before it looks at signals again (see ``results``).
SIGNAL_SLICE = 0.25


def results(futures: Sequence[Future[T]]) -> list[T]:
    """Each future's result, in order, the main thread waiting in slices. Linux hands a Ctrl-C
    to another thread when the main thread already has a signal pending; Python then runs the
    handler only once the main thread runs Python code again, which an untimed wait never does
    while the hosts wait for us (a hook at a gate): the interrupt would be lost until then."""
    pending: set[Future[T]] = set(futures)
    while pending:
        pending = wait(pending, timeout=SIGNAL_SLICE).not_done
    return [future.result() for future in futures]


# How a Fleet reaches a host: its transport, by host name (tests give fake hosts, tests/fakehosts.py)
TransportFactory = Callable[[str], Transport]


@dataclass
class Outcome:
    """What one host did in one phase."""

    ok: bool
    seconds: float
    result: Any = None
    error: HostError | None = None


@dataclass
class Fleet:
    """The connected hosts of one stage for one command. ``transports`` gives each host's
    transport; by default the one the registry names for it (``shiplane.transport.TRANSPORTS``:
    ``local`` is a subprocess, any other host is reached over SSH)."""

    project: Project
    stage: str
    emit: Emit
    parallel: int = 16
    transports: TransportFactory | None = None
    sessions: dict[str, AgentSession] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    _pools: list[ThreadPoolExecutor] = field(default_factory=list)
    # phases running on hosts right now: settle() waits for none (pool bookkeeping alone can
    # miss one, when the interrupt lands while a pool is being set up or taken down)
    _busy: int = 0
    _idle: threading.Condition = field(default_factory=threading.Condition)
    _stopping: threading.Event = field(default_factory=threading.Event)  # interrupted: no next step

    @property
    def hosts(self) -> list[str]:
        return list(self.project.deploy.stages[self.stage].hosts)

    def root_for(self, host: str) -> str:
        """The deploy root on a host: a relative ``deploy_to`` is relative to the project (local)
        or the login directory (SSH)."""
        deploy_to = self.project.deploy.stages[self.stage].deploy_to
        if on_controller(host) and not os.path.isabs(os.path.expanduser(deploy_to)):
            return str((self.project.root / deploy_to).resolve())
        return deploy_to

    def connect_settings(self) -> ConnectSettings:
        """The stage's connection settings, for its hosts' transports."""
        stage = self.project.deploy.stages[self.stage]
        return ConnectSettings(
            ssh_config=str(self.project.root / stage.ssh_config) if stage.ssh_config else None,
            identity_file=stage.identity_file,
            ssh_options=tuple(stage.ssh_options),
            connect_timeout=stage.connect_timeout,
            ssh_persist=stage.ssh_persist,
            user=stage.deploy_user,
        )

    def _transport(self, host: str) -> Transport:
        if self.transports is not None:
            return self.transports(host)
        return connect(host, self.connect_settings())

    def python_for(self, host: str) -> str:
        """The interpreter the agent and the venvs use on ``host``: its own (``hosts`` tables,
        ``host_python``), the stage's ``python``, else ``app.python``."""
        stage = self.project.deploy.stages[self.stage]
        python = stage.python_of(host, self.project.deploy.app.python)
        if on_controller(host) and python == "python3":
            import sys

            # the controller's own interpreter, by its real path: `shiplane` and `python -m shiplane`
            # must give the same program lines, or supervisord would restart the front
            return os.path.realpath(sys.executable)
        return python

    def connect(self, hosts: Iterable[str] | None = None) -> dict[str, Outcome]:
        """Start (and bootstrap) an agent on every host, in parallel; failures are per host."""
        stage = self.project.deploy.stages[self.stage]

        def one(host: str) -> AgentSession:
            transport = self._transport(host)
            failed = prewarm.wait(
                host, stage.connect_timeout + 5
            )  # its SSH master, if the CLI started one
            if failed is not None:
                raise HostError(host, transport.explain_failure(*failed), "connect")
            # its agent too, if the CLI started it as this session would have
            remote = bootstrap_argv(
                self.python_for(host), self.root_for(host), agent_zip()[1], early=True
            )
            early = prewarm.adopt(host, transport, remote)
            try:
                session = self._session(transport, host, early)
            except HostError as error:
                # through a connection an earlier command left open that no longer works (the
                # host rebooted, the network changed): once more, over a new one
                if error.kind != "connect" or not transport.drop_stale():
                    raise
                session = self._session(self._transport(host), host)
            self.sessions[host] = session
            return session

        return self.each("connect", lambda host, _: one(host), hosts=hosts, need_session=False)

    def _session(
        self, transport: Transport, host: str, early: subprocess.Popen[bytes] | None = None
    ) -> AgentSession:
        stage = self.project.deploy.stages[self.stage]
        return AgentSession(
            transport,
            self.root_for(host),
            self.python_for(host),
            connect_timeout=stage.connect_timeout + 20,
            early=early,
            stopping=self._stopping,
        )

    def each(
        self,
        phase: str,
        work: Callable[[str, AgentSession], T],
        *,
        hosts: Iterable[str] | None = None,
        need_session: bool = True,
        quiet: bool = False,
    ) -> dict[str, Outcome]:
        """Run ``work`` on every host (at most ``parallel`` at once); never raises for a host."""
        targets = [
            h
            for h in (hosts if hosts is not None else self.hosts)
            if not need_session or h in self.sessions
        ]
        return dict(self._map(lambda host: (host, self._run(phase, work, host, quiet)), targets))

    def chain(
        self,
        steps: Sequence[tuple[str, Callable[[str, AgentSession], Any]]],
        *,
        hosts: Iterable[str] | None = None,
    ) -> dict[str, dict[str, Outcome]]:
        """Run the ``(phase, work)`` steps in order on every host, each host at its own pace (no
        host waits for another between steps); a host that fails a step skips the rest. Returns
        the outcomes per phase, of the hosts that ran it."""
        targets = [h for h in (hosts if hosts is not None else self.hosts) if h in self.sessions]

        def run_steps(host: str) -> dict[str, Outcome]:
            done: dict[str, Outcome] = {}
            for phase, work in steps:
                if self._stopping.is_set():  # Ctrl-C: the step under way ends, no next one starts
                    break
                done[phase] = self._run(phase, work, host, quiet=False)
                if not done[phase].ok:
                    break
            return done

        per_phase: dict[str, dict[str, Outcome]] = {phase: {} for phase, _ in steps}
        for host, done in self._map(lambda host: (host, run_steps(host)), targets):
            for phase, outcome in done.items():
                per_phase[phase][host] = outcome
        return per_phase

    def _run(
        self, phase: str, work: Callable[[str, AgentSession], Any], host: str, quiet: bool
    ) -> Outcome:
        """One phase on one host: events, timing, and any failure as the host's outcome."""
        with self._idle:
            self._busy += 1
        try:
            return self._run_counted(phase, work, host, quiet)
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def _run_counted(
        self, phase: str, work: Callable[[str, AgentSession], Any], host: str, quiet: bool
    ) -> Outcome:
        started = time.monotonic()
        if not quiet:
            self.emit(Event(phase, "start", host=host))
        try:
            result = work(host, self.sessions.get(host))  # type: ignore[arg-type]
        except HostError as exc:
            seconds = time.monotonic() - started
            self.emit(Event(phase, "failed", host=host, detail=exc.reason, seconds=seconds))
            return Outcome(False, seconds, error=exc)
        except OperationError as exc:
            seconds = time.monotonic() - started
            self.emit(Event(phase, "failed", host=host, detail=exc.message, seconds=seconds))
            return Outcome(False, seconds, error=HostError(host, exc.message))
        seconds = time.monotonic() - started
        self.timings.setdefault(host, {})[phase] = round(
            self.timings.get(host, {}).get(phase, 0) + seconds, 3
        )
        if not quiet:
            self.emit(Event(phase, "ok", host=host, seconds=seconds))
        return Outcome(True, seconds, result=result)

    def _map(self, fn: Callable[[str], T], targets: list[str]) -> list[T]:
        """``fn`` over ``targets`` on a pool of at most ``parallel`` threads (``settle`` waits for it)."""
        if not targets:
            return []
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.parallel, len(targets))))
        self._pools.append(pool)
        try:
            return results([pool.submit(fn, target) for target in targets])
        except KeyboardInterrupt:
            self.cancel()  # the shutdown below waits for what runs: hooks end now, not at their timeout
            raise
        finally:
            pool.shutdown(wait=True)
            self._pools.remove(pool)

    def cancel(self) -> None:
        """Ask every host's op in flight to end now where it can (a running hook); see
        ``AgentSession.cancel``; a host's chain of steps starts no next step."""
        self._stopping.set()
        prewarm.abort()  # the hosts still connecting: no handshake is waited for
        for session in list(self.sessions.values()):
            session.cancel()

    def settle(self) -> None:
        """Wait until every phase already running on a host has answered (after an interrupt:
        what a host did must be known before deciding what to undo)."""
        for pool in list(self._pools):
            pool.shutdown(wait=True)
        with self._idle:  # each phase is bounded by its own timeouts
            self._idle.wait_for(lambda: self._busy == 0)

    def forward(self, host: str, phase: str) -> Callable[[AgentEvent], None]:
        """Agent events of one host, into our event stream."""

        def handler(event: AgentEvent) -> None:
            self.emit(
                Event(
                    event.get("phase", phase),
                    event.get("status", "progress"),
                    host=host,
                    detail=str(event.get("detail", "")),
                    bytes=event.get("bytes"),
                    data={"total": event["total"]} if "total" in event else {},
                )
            )

        return handler

    def close(self) -> None:
        """End every host's session and SSH master, all hosts at once (one at a time, closing
        grew with the host count: ~30 ms each)."""

        def close_one(host: str) -> None:
            session = self.sessions.pop(host)
            session.close()
            session.transport.close()

        hosts = list(self.sessions)
        if hosts:
            with ThreadPoolExecutor(max_workers=max(1, min(self.parallel, len(hosts)))) as pool:
                list(pool.map(close_one, hosts))
        cleanup()


def failures(outcomes: dict[str, Outcome]) -> dict[str, HostError]:
    return {host: o.error for host, o in outcomes.items() if not o.ok and o.error is not None}


def local_ledger(project: Project, stage: str) -> Path:
    return project.root / ".shiplane" / "history" / f"{stage}.jsonl"
