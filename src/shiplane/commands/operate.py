"""Day-to-day verbs on a deployed stage: status, releases, history, start/stop/restart/reload,
rollback, prune, logs, lock/unlock. Each opens one agent session per host."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, TypeVar, cast

from shiplane.agent.protocol import (
    FrontState,
    HistoryResult,
    LockInfo,
    ReleaseMeta,
    ReleasesResult,
)
from shiplane.commands.common import StageContext, open_stage, silent
from shiplane.config import Project, resolve_secrets
from shiplane.errors import ConfigError, OperationError, UsageError
from shiplane.events import Emit
from shiplane.fleet import Fleet, TransportFactory, failures, local_ledger
from shiplane.plan import host_services, services_spec
from shiplane.secret import Masker
from shiplane.transport.session import AgentSession
from shiplane.whoami import holder

T = TypeVar("T")


class ServiceStatus(TypedDict, total=False):
    """One service in a host's ``status`` answer."""

    name: str
    kind: str
    state: str
    pid: int | None
    uptime: float | None
    release: str | None
    standby: bool
    preboot: bool
    live: bool


class HostStatus(TypedDict, total=False):
    """A host's ``status`` answer: the release its web serves, ``current``, its services."""

    live_release: str | None
    current: str | None
    services: list[ServiceStatus]
    front: FrontState  # a Caddy or nginx: every app it routes (agent/frontshare.py)
    jobs: list[dict[str, Any]]  # the scheduled jobs (agent/jobs.py JobStatus), on the primary


# Each verb returns its data; the CLI draws the lines it prints (``ui.status_lines`` and the
# like) and adds them to the --json result as ``lines``.


class StatusReport(TypedDict):
    hosts: dict[str, HostStatus]
    drift: list[str]
    ok: bool


class ReleasesReport(TypedDict):
    hosts: dict[str, ReleasesResult]


class HistoryReport(TypedDict):
    hosts: dict[str, HistoryResult]


class HostsReport(TypedDict):
    """A verb that did one thing on every host: each host's answer, passed through as it came."""

    ok: bool
    hosts: Mapping[str, Mapping[str, object]]


class LockReport(TypedDict):
    ok: bool
    hosts: dict[str, LockInfo | None]


class _RollbackExtras(TypedDict, total=False):
    from_hosts: dict[str, str | None]  # when the hosts served different releases


RollbackEntry = TypedDict(
    "RollbackEntry",
    {
        "event": str,
        "stage": str,
        "release": str,
        "from": "str | None",
        "outcome": str,
        "user": str,
        "controller": str,
        "started_at": str,
        "duration": float,
    },
)


class RollbackLedger(RollbackEntry, _RollbackExtras):
    """A rollback's ledger entry."""


class RollbackReport(RollbackLedger):
    """``rollback --json``'s result, before the CLI adds its ``lines``: its ledger entry,
    ``ok``, the releases skipped (why)."""

    ok: bool
    skipped: list[tuple[str, str]]


@dataclass(frozen=True)
class RollbackResult:
    """What ``rollback`` returns; the CLI renders it (``ui.rollback_lines``) or prints
    ``to_json()``. ``errors``: each failed host's message; ``unmarked``: the hosts whose left
    release could not be marked, and why."""

    report: RollbackReport
    errors: list[str]
    unmarked: dict[str, str]

    def to_json(self) -> RollbackReport:
        return self.report


def _releases(host: str, session: AgentSession) -> ReleasesResult:
    return cast(ReleasesResult, session.call("releases", {}))


@contextmanager
def connected(
    file: Path | None,
    stage: str | None,
    masker: Masker,
    *,
    hosts: str | None,
    sets: Sequence[str],
    need_secrets: bool = False,
    mask_secrets: bool = False,
    transports: TransportFactory | None = None,
) -> Iterator[tuple[StageContext, Fleet]]:
    """A stage's hosts, connected; raises when a host cannot be reached. ``mask_secrets``: the
    stage's secrets that can be found are masked in all output (none is required);
    ``transports``: how to reach each host (see ``Fleet``)."""
    ctx = open_stage(file, stage, masker, hosts=hosts, sets=sets, need_secrets=need_secrets)
    if mask_secrets and not need_secrets:
        _mask_known_secrets(ctx.project, ctx.stage, masker)
    fleet = Fleet(ctx.project, ctx.stage, silent, transports=transports)
    try:
        bad = failures(fleet.connect())
        if bad:
            raise OperationError("; ".join(e.message for e in bad.values()))
        yield ctx, fleet
    finally:
        fleet.close()


def _mask_known_secrets(project: Project, stage: str, masker: Masker) -> None:
    """Register with ``masker`` every secret of the stage that its sources hold.

    A verb that only reads (logs) must mask what the app may have printed, but must not fail
    for a secret it cannot find: when not all are there, each is looked for on its own.
    """
    deploy = project.deploy
    try:
        found = resolve_secrets(deploy, stage, project.root)
    except ConfigError:
        found = {}
        for name in deploy.config.secrets:
            alone = deploy.model_copy(
                update={"config": deploy.config.model_copy(update={"secrets": [name]})}
            )
            try:
                found.update(resolve_secrets(alone, stage, project.root))
            except ConfigError:
                continue  # not found (or its source refused): nothing to mask for it
    for secret in found.values():
        masker.add(secret.reveal())


def _all(fleet: Fleet, phase: str, work: Callable[[str, AgentSession], T]) -> dict[str, T]:
    outcomes = fleet.each(phase, work, quiet=True)
    bad = failures(outcomes)
    if bad:
        raise OperationError("; ".join(e.message for e in bad.values()))
    return {host: o.result for host, o in outcomes.items()}


def read_verb(
    name: str,
    file: Path | None,
    stage: str | None,
    masker: Masker,
    *,
    hosts: str | None,
    sets: Sequence[str],
    limit: int = 20,
) -> StatusReport | ReleasesReport | HistoryReport:
    with connected(file, stage, masker, hosts=hosts, sets=sets) as (ctx, fleet):
        if name == "status":
            return _status(ctx, fleet)
        if name == "releases":
            return {"hosts": _all(fleet, "releases", _releases)}
        history = _all(
            fleet, "history", lambda h, s: cast(HistoryResult, s.call("history", {"limit": limit}))
        )
        return {"hosts": history}


def _status(ctx: StageContext, fleet: Fleet) -> StatusReport:
    per_host = _all(fleet, "status", lambda h, s: cast(HostStatus, s.call("status", {})))
    live = {host: result.get("live_release") for host, result in per_host.items()}
    drift = []
    if len(set(live.values())) > 1:
        drift.append(
            "hosts run different releases: " + ", ".join(f"{h}={r}" for h, r in live.items())
        )
    ledger = local_ledger(ctx.project, ctx.stage)
    if ledger.exists():
        entries = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
        good = [e for e in entries if e.get("outcome") == "ok" and e.get("release")]
        if good:
            expected = good[-1]["release"]
            for host, release in live.items():
                if release != expected:
                    drift.append(
                        f"{host} runs {release}, the local ledger's last deploy is {expected}"
                    )
    for host, result in per_host.items():
        current = result.get("current")
        if current and result.get("live_release") and current != result["live_release"]:
            drift.append(
                f"{host}: `current` points at {current} but the web service serves {result['live_release']}"
            )
    for host, result in per_host.items():
        services = result.get("services", [])
        for service in services:
            if (
                service.get("release")
                and result.get("live_release")
                and service.get("kind") != "front"
                and not service.get("standby")
                and service["release"] != result["live_release"]
                and service.get("state") == "RUNNING"
            ):
                drift.append(
                    f"{host}: service {service.get('name')} runs {service['release']}, not the live release"
                )
        standbys = [str(s["release"]) for s in services if s.get("standby")]
        if len(standbys) > 1:
            drift.append(
                f"{host}: {len(standbys)} idle web servers ({', '.join(standbys)}); the next deploy stops all but one"
            )
    return {"hosts": per_host, "drift": drift, "ok": True}


def service_verb(
    name: str,
    file: Path | None,
    stage: str | None,
    services: list[str],
    masker: Masker,
    *,
    everything: bool,
    hosts: str | None,
    sets: Sequence[str],
) -> HostsReport:
    with connected(file, stage, masker, hosts=hosts, sets=sets) as (ctx, fleet):
        spec = services_spec(ctx.project.deploy, ctx.stage)
        names = services or None
        if name == "stop" and everything:
            per_host = _all(fleet, name, lambda h, s: s.call("shutdown", {}))
        elif name in ("start", "restart"):
            per_host = _all(
                fleet,
                name,
                lambda h, s: s.call(
                    name,
                    {
                        "services": names,
                        "spec": host_services(spec, ctx.project.deploy, ctx.stage, h),
                    },
                    timeout=300,
                ),
            )
        else:
            per_host = _all(
                fleet, name, lambda h, s: s.call(name, {"services": names}, timeout=300)
            )
        return {"ok": True, "hosts": per_host}


def run_rollback(
    file: Path | None,
    stage: str | None,
    to_release: str | None,
    yes: bool,
    masker: Masker,
    emit: Emit = silent,
    *,
    hosts: str | None,
    sets: Sequence[str],
    transports: TransportFactory | None = None,
) -> RollbackResult:
    """Switch every host back to an earlier release present on all of them, health-checked.

    Each host that switched marks the release it left ``rolled-back`` when the target is older
    than it, so repeated plain rollbacks walk back in time and never forth; ``--to`` may pick any
    release present on every host, a marked one too (going forward marks nothing).
    """
    started = time.time()
    with connected(file, stage, masker, hosts=hosts, sets=sets, transports=transports) as (
        ctx,
        fleet,
    ):
        per_host = _all(fleet, "releases", _releases)
        target, live, skipped = _pick_target(per_host, to_release)
        newest_live = max((rid for rid in live.values() if rid), default=None)
        # release.json does not say whether its deploy ran the release hook; the hosts' ledgers do
        ledgers = _all(fleet, "history", lambda h, s: cast(HistoryResult, s.call("history", {})))
        hooked = {
            e.get("release")
            for result in ledgers.values()
            for e in result.get("entries", [])
            if e.get("event") == "deploy" and e.get("release_hook")
        }
        migrated = [
            r
            for r in _releases_between(per_host, target, newest_live)
            if r.get("release_hook") or r["release_id"] in hooked
        ]
        if migrated and not yes:
            names = ", ".join(r["release_id"] for r in migrated)
            raise UsageError(
                f"rolling back to {target} crosses release(s) that ran the release hook (migrations): {names}",
                hint="The database stays migrated. If the old code works with it, confirm with --yes.",
            )
        spec = services_spec(ctx.project.deploy, ctx.stage)
        who = holder(" ".join(["shiplane", *sys.argv[1:]]), os.getpid()).to_json()
        fleet.emit = emit  # quiet until now: the lock, the switches and the unlock are shown
        _all(fleet, "lock", lambda h, s: s.call("lock", {"holder": who, "wait": 0}))
        try:
            outcomes = fleet.each(
                "rollback",
                lambda h, s: s.call(
                    "switch",
                    {
                        "release_id": target,
                        "services": host_services(spec, ctx.project.deploy, ctx.stage, h),
                    },
                    on_event=fleet.forward(h, "rollback"),
                    timeout=600,
                ),
            )
            unmarked = _mark_left(fleet, per_host, live, target, set(failures(outcomes)))
        finally:
            fleet.each("unlock", lambda h, s: s.call("unlock", {"force": False}), quiet=True)
        bad = failures(outcomes)
        same = len(set(live.values())) == 1
        entry: RollbackLedger = {
            "event": "rollback",
            "stage": ctx.stage,
            "release": target,
            "from": newest_live if same else None,
            "outcome": "ok" if not bad else "failed",
            "user": who["user"],
            "controller": who["host"],
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration": round(time.time() - started, 3),
        }
        if not same:
            entry["from_hosts"] = live
        # each host's own ledger says what that host left
        fleet.each(
            "record",
            lambda h, s: s.call("record", {"entry": {**entry, "from": live.get(h)}}),
            quiet=True,
        )
        ledger = local_ledger(ctx.project, ctx.stage)
        ledger.parent.mkdir(parents=True, exist_ok=True)
        with ledger.open("a") as handle:
            handle.write(json.dumps({**entry, "artifact": _artifact_of(per_host, target)}) + "\n")
        return RollbackResult(
            report={**entry, "ok": not bad, "skipped": skipped},
            errors=[e.message for e in bad.values()],
            unmarked=unmarked,
        )


def _mark_left(
    fleet: Fleet,
    per_host: dict[str, ReleasesResult],
    live: dict[str, str | None],
    target: str,
    failed: set[str],
) -> dict[str, str]:
    """Mark ``rolled-back`` the release each switched host left for the older ``target``.

    A release already marked bad keeps that mark. Returns, per host, why its mark could not be
    written (the rollback itself stands: a mark on any host makes a later rollback skip it).
    """

    def state_of(host: str, rid: str) -> str | None:
        found = [
            r.get("state") for r in per_host[host].get("releases", []) if r["release_id"] == rid
        ]
        return found[0] if found else None

    left = {
        host: rid
        for host, rid in live.items()
        if host not in failed and rid and rid > target and state_of(host, rid) != "bad"
    }
    if not left:
        return {}
    outcomes = fleet.each(
        "mark",
        lambda h, s: s.call("mark", {"release_id": left[h], "state": "rolled-back"}),
        hosts=list(left),
        quiet=True,
    )
    return {
        host: f"could not mark {left[host]} rolled-back: {error.message}"
        for host, error in failures(outcomes).items()
    }


def _pick_target(
    per_host: dict[str, ReleasesResult], to_release: str | None
) -> tuple[str, dict[str, str | None], list[tuple[str, str]]]:
    """The release to roll back to, each host's live release, and the newer ones skipped (why).

    Without ``to_release``: the newest release present on every host that is older than the
    live release and neither marked bad nor rolled back from. The live release is the one every
    host serves: when the hosts serve different ones (a rollback that failed on some), a plain
    rollback would walk some hosts forward, so it is refused and ``--to`` names the release.
    """
    sets = [
        {r["release_id"]: r for r in result.get("releases", [])} for result in per_host.values()
    ]
    live: dict[str, str | None] = {host: result.get("current") for host, result in per_host.items()}
    if to_release:
        if not all(to_release in s for s in sets):
            raise UsageError(f"release {to_release!r} is not present on every host of the stage")
        return to_release, live, []
    serving = set(live.values())
    if len(serving) > 1:
        which = ", ".join(f"{host} {rid or 'nothing'}" for host, rid in live.items())
        raise UsageError(
            f"the hosts serve different releases ({which}), so there is no one release to roll back from",
            hint="Name the release every host should serve: shiplane rollback --to ID "
            "(shiplane releases lists them). No host was changed.",
        )
    current = serving.pop() if serving else None
    if current is None:
        raise UsageError(
            "no release is live on the stage's hosts, so there is nothing to roll back from",
            hint="Deploy first, or name a release with --to ID.",
        )
    skipped: list[tuple[str, str]] = []
    common = sorted(set.intersection(*(set(s) for s in sets)) if sets else set(), reverse=True)
    for rid in common:
        if rid >= current:
            continue  # newer than the live one: rolling back never goes forward
        states = {s[rid].get("state") for s in sets}
        if "bad" in states:
            skipped.append((rid, "marked bad (its deploy failed or was undone)"))
            continue
        if "prepared" in states:  # installed by a deploy killed or stopped before its switch
            skipped.append((rid, "never went live (its deploy ended before the switch)"))
            continue
        if "rolled-back" in states:
            when = max(
                (str(s[rid].get("rolled_back_at")) for s in sets if s[rid].get("rolled_back_at")),
                default="",
            )
            skipped.append((rid, f"rolled back from at {when}" if when else "rolled back from"))
            continue
        return rid, live, skipped
    reasons = "; ".join(f"{rid} {why}" for rid, why in skipped)
    raise UsageError(
        f"no earlier good release is present on every host to roll back to (live: {current})"
        + (f"; skipped {reasons}" if reasons else ""),
        hint="rollback --to ID picks any release present on every host, one skipped here or a newer "
        "one too (shiplane releases lists them).",
    )


def _releases_between(
    per_host: dict[str, ReleasesResult], target: str, current: str | None
) -> list[ReleaseMeta]:
    first = next(iter(per_host.values()), None)
    if first is None:
        return []
    return [r for r in first.get("releases", []) if target < r["release_id"] <= (current or "")]


def _artifact_of(per_host: dict[str, ReleasesResult], release: str) -> str | None:
    for result in per_host.values():
        for r in result.get("releases", []):
            if r["release_id"] == release:
                return str(r.get("artifact"))
    return None


def run_prune(
    file: Path | None,
    stage: str | None,
    keep: int | None,
    masker: Masker,
    *,
    hosts: str | None,
    sets: Sequence[str],
) -> HostsReport:
    with connected(file, stage, masker, hosts=hosts, sets=sets) as (ctx, fleet):
        count = keep or ctx.project.deploy.app.keep_releases
        per_host = _all(fleet, "prune", lambda h, s: s.call("prune", {"keep": count}))
        return {"ok": True, "hosts": per_host}


def show_logs(
    file: Path | None,
    stage: str | None,
    service: str | None,
    lines: int,
    follow: bool,
    masker: Masker,
    out: Callable[[str, str], None],
    *,
    hosts: str | None,
    sets: Sequence[str],
) -> None:
    """Give ``out(host, line)`` the last ``lines`` lines of a service's log on every host (then
    new ones with ``follow``), with every secret of the stage that can be found
    masked: the app may have logged one."""
    with connected(file, stage, masker, hosts=hosts, sets=sets, mask_secrets=True) as (_ctx, fleet):

        def one(host: str, session: AgentSession) -> None:
            def line(event: Mapping[str, object]) -> None:
                out(host, masker(str(event.get("detail", ""))))

            result = session.call(
                "logs",
                {"service": service, "lines": lines, "follow": follow},
                on_event=line,
                timeout=10**9 if follow else 120,
            )
            for text in result.get("lines", []):
                out(host, masker(text))

        if not follow:
            _all(fleet, "logs", one)
            return
        # Following ends with Ctrl-C: the hosts' calls never return by themselves, so they run
        # beside the main thread, which cuts every session when interrupted (a pool would wait
        # for them forever on the way out).
        failed: list[BaseException] = []
        follower = threading.Thread(
            target=_catching, args=(lambda: _all(fleet, "logs", one), failed), daemon=True
        )
        follower.start()
        try:
            follower.join()
        except KeyboardInterrupt:
            for session in list(fleet.sessions.values()):
                session.kill()
            follower.join(timeout=30)
            raise
        if failed:
            raise failed[0]


def _catching(work: Callable[[], Any], failed: list[BaseException]) -> None:
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - handed to the main thread, which raises it
        failed.append(exc)


def lock_stage(
    file: Path | None,
    stage: str | None,
    masker: Masker,
    *,
    hosts: str | None,
    sets: Sequence[str],
    reason: str | None = None,
) -> HostsReport:
    """Hold the stage for maintenance: every host's deploy lock, kept until ``shiplane unlock``
    (by the same user from the same machine, or ``--force``); deploys are refused naming who,
    since when and ``reason``."""
    with connected(file, stage, masker, hosts=hosts, sets=sets) as (_ctx, fleet):
        who = holder(" ".join(["shiplane", *sys.argv[1:]]), os.getpid()).to_json()
        if reason:
            who["reason"] = reason
        # kept: held until `shiplane unlock`, not bound to this command's agent sessions
        per_host = _all(
            fleet,
            "lock",
            lambda h, s: s.call(
                "lock", {"holder": who, "wait": 0, "keep": True}, on_event=fleet.forward(h, "lock")
            ),
        )
        return {"ok": True, "hosts": per_host}


def lock_status(
    file: Path | None, stage: str | None, masker: Masker, *, hosts: str | None, sets: Sequence[str]
) -> LockReport:
    """Each host's deploy lock: who holds it, since when, why, and whether its holder lives."""
    with connected(file, stage, masker, hosts=hosts, sets=sets) as (_ctx, fleet):
        per_host = _all(fleet, "inventory", lambda h, s: s.call("inventory", {"blobs": []}))
        locks = {host: result.get("lock") for host, result in per_host.items()}
        return {"ok": True, "hosts": locks}


def unlock_stage(
    file: Path | None,
    stage: str | None,
    force: bool,
    masker: Masker,
    *,
    hosts: str | None,
    sets: Sequence[str],
) -> HostsReport:
    with connected(file, stage, masker, hosts=hosts, sets=sets) as (_ctx, fleet):
        who = holder(" ".join(["shiplane", *sys.argv[1:]]), os.getpid()).to_json()
        # without --force: our own lock (this user, from this machine, taken with `shiplane lock`)
        per_host = _all(
            fleet,
            "unlock",
            lambda h, s: s.call(
                "unlock", {"force": True, "by": who} if force else {"force": False, "holder": who}
            ),
        )
        if force:
            entry = {
                "event": "unlock",
                "forced": True,
                "user": who["user"],
                "controller": who["host"],
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            _all(fleet, "record", lambda h, s: s.call("record", {"entry": entry}))
        return {"ok": True, "hosts": per_host}
