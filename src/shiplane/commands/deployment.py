"""The state of one deploy, shared by its phases (deploy.py runs them, release_phase.py is one).

A host that fails a prepare phase takes no further part; the others go on preparing, so a
later ``--retry-failed`` only has the failed hosts to do. Nothing switches while any host failed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from shiplane.commands.common import StageContext
from shiplane.errors import OperationError
from shiplane.fleet import Fleet, Outcome


class HostSummary(TypedDict):
    """One host in a deploy's ledger entry: how it ended, what it serves, its phases' seconds."""

    outcome: str
    release: str | None
    bytes: int  # received from the controller
    peer_bytes: int  # fetched from other hosts of the stage (commands/relay.py)
    error: str | None
    phases: dict[str, float]


class Overrides(TypedDict):
    hosts: str | None
    set: list[str]


class _LedgerExtras(TypedDict, total=False):
    release_inputs: str | None  # only once the release hook was tried


class DeployEntry(_LedgerExtras):
    """A deploy's ledger entry (each host's ledger and the local one)."""

    event: str
    stage: str
    release: str | None
    artifact: str | None
    git_commit: str | None
    ref: str | None  # deploy --ref as given (the commit is git_commit); None: the working tree
    outcome: str
    error: str | None
    user: str
    controller: str
    started_at: str
    duration: float
    release_hook: bool
    setup: bool
    skip_tests: bool
    overrides: Overrides | None
    hosts: dict[str, HostSummary]


class DeploySummary(DeployEntry):
    """``deploy --json``'s result (``copy``, ``install``, ``promote``), before the CLI adds the
    ``lines`` it prints: the ledger entry and ``ok`` (False: exit 1)."""

    ok: bool


@dataclass(frozen=True)
class DeployResult:
    """What ``deploy`` (``copy``, ``install``) returns; the CLI renders it (``ui.deploy_lines``)
    or prints ``to_json()``. ``hosts``: each host's state at the end (phase reached, release
    served before, whether it switched); ``serving_port``: where a local stage now serves."""

    summary: DeploySummary
    app: str
    until: str | None
    hosts: dict[str, HostState]
    serving_port: int | None

    def to_json(self) -> DeploySummary:
        return self.summary


@dataclass(frozen=True)
class PromoteResult:
    """``promote``'s result: the deploy's, the artifact promoted and the stage it came from
    (``promote --json``: the deploy's, its ``lines``, then ``promoted_from``)."""

    deploy: DeployResult
    artifact: str
    promoted_from: str
    to_stage: str | None


@dataclass(frozen=True)
class DeployOptions:
    stage: str | None
    artifact: str | None = None
    skip_tests: bool = False
    parallel: int = 16
    lock_wait: float = 0.0
    hosts: str | None = None
    sets: Sequence[str] = ()
    as_json: bool = False
    verbose: bool = False
    retry_failed: bool = False
    until: str | None = None  # "copy" | "install": the first pipeline steps alone
    ref: str | None = None  # deploy --ref: build from that commit's files, not the working tree
    require_clean: bool = False  # refuse (exit 2) a working tree with uncommitted changes


@dataclass
class HostState:
    phase: str = "pending"
    outcome: str = "pending"
    release: str | None = None
    previous: str | None = None
    bytes_sent: int = 0  # from the controller
    bytes_from_peers: int = 0  # fetched from other hosts (commands/relay.py)
    error: str | None = None
    switched: bool = False
    schedules_jobs: bool = False  # its inventory listed scheduled jobs (it was the primary)
    # the artifact's ``targets`` entry this host installs (its Python's wheels); None: the
    # artifact has one target
    target: int | None = None


@dataclass
class Deployment:
    ctx: StageContext
    fleet: Fleet
    options: DeployOptions
    manifest: dict[str, Any] = field(default_factory=dict)
    digest: str = ""
    rid: str = ""
    hosts: dict[str, HostState] = field(default_factory=dict)
    locked: list[str] = field(default_factory=list)
    ran_release_hook: bool = False
    # what the release hook ran with (release_inputs.py); the ledger key is set only once tried
    release_inputs: str | None = None
    tried_release_hook: bool = False
    ran_setup: bool = False
    resumed_release_hook: bool = False
    failed_hosts: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)


def require_all(d: Deployment, phase: str, outcomes: dict[str, Outcome]) -> None:
    """After a phase every host must have succeeded, else the deploy stops here."""
    note(d, phase, outcomes)
    stop_if_any_failed(d, phase)


def note(d: Deployment, phase: str, outcomes: dict[str, Outcome]) -> None:
    """Record each host's outcome of a prepare phase; a failed host takes no further part, but
    the others go on preparing, so a later ``--retry-failed`` only has the failed hosts to do."""
    for host, outcome in outcomes.items():
        state = d.hosts[host]
        state.phase = phase
        if not outcome.ok:
            state.outcome, state.error = (
                "failed",
                outcome.error.reason if outcome.error else "failed",
            )
            d.failed_hosts[host] = f"{phase}: {state.error}"


def stop_if_any_failed(d: Deployment, phase: str) -> None:
    if d.failed_hosts:
        listing = "; ".join(f"{h}: {why}" for h, why in d.failed_hosts.items())
        raise OperationError(
            f"{phase} failed on {len(d.failed_hosts)} of {len(d.hosts)} host(s), "
            f"nothing was switched: {listing}"
        )


def healthy(d: Deployment) -> list[str]:
    return [h for h in d.fleet.hosts if h not in d.failed_hosts and h in d.fleet.sessions]


def timeout(d: Deployment) -> float:
    """How long a host may stay silent during a phase before it is a per-host error (never a
    hang): the stage's ``command_timeout``. The agent streams progress, so this bounds silence."""
    return d.ctx.project.deploy.stages[d.ctx.stage].command_timeout
