"""``shiplane deploy``: gate, build, lock, copy, install, release, switch (each candidate verified), finalize.

Two phases: every host is prepared fully (artifact, venv, config, hooks) before any switch; the
switch goes in rolling batches and a failed batch returns every switched host to its previous
release. Locks are always released, on success, failure and Ctrl-C alike.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from shiplane.agent.protocol import HistoryResult, InstallArgs, LedgerEntry, ServicesSpec
from shiplane.artifact import GitInfo
from shiplane.commands.build import build_for_deploy
from shiplane.commands.check import graph_from_project
from shiplane.commands.common import StageContext, open_stage, silent
from shiplane.commands.deployment import (
    DeployEntry,
    Deployment,
    DeployOptions,
    DeployResult,
    HostState,
    healthy,
    note,
    require_all,
    stop_if_any_failed,
    timeout,
)
from shiplane.commands.host_python import (
    BuildHosts,
    assign_targets,
    hosts_interpreters,
    interpreters_for_build,
)
from shiplane.commands.relay import Relay
from shiplane.commands.release_phase import run_release
from shiplane.commands.user_tasks import run_point
from shiplane.config.layers import render_files
from shiplane.errors import OperationError, UsageError
from shiplane.events import Emit, Event
from shiplane.fleet import Fleet, Outcome, TransportFactory, failures, local_ledger, results
from shiplane.plan import (
    batches,
    every_blob,
    host_services,
    install_request,
    jobs_after_rollout,
    manifest_blobs,
    max_failures,
    release_id,
    services_spec,
)
from shiplane.secret import Masker
from shiplane.transport.session import AgentSession, HostError
from shiplane.transport.tools import install_shipped_uv, uv_blob
from shiplane.ui import human_bytes
from shiplane.whoami import holder

CHUNK = 1 << 20


def run_deploy(
    file: Path | None,
    options: DeployOptions,
    masker: Masker,
    emit: Emit = silent,
    *,
    transports: TransportFactory | None = None,
) -> DeployResult:
    """The whole pipeline on one stage, its events to ``emit``. Returns its result (the CLI draws
    it with ``ui.deploy_lines``); ``ok`` False means exit 1. ``transports``: how to reach each
    host (default: local or SSH; tests give fake hosts)."""
    ctx = open_stage(file, options.stage, masker, hosts=options.hosts, sets=options.sets)
    # a bad --ref, or a dirty tree with --require-clean: exit 2
    source_git = _check_source(ctx, options, emit)
    graph = graph_from_project(ctx.project)  # a bad task graph stops us before anything runs
    # user tasks hooked into the deploy, by the step they run before ("": after the last)
    points = graph.deploy_points()

    def tasks_before(step: str, installed: bool = False) -> None:
        run_point(deployment, graph, points.get(step, []), installed=installed)

    rendered = render_files(ctx.project, ctx.layered)
    with interrupts_as_keyboard():
        fleet = Fleet(
            ctx.project, ctx.stage, emit, parallel=options.parallel, transports=transports
        )
        deployment = Deployment(ctx, fleet, options)
        for host in fleet.hosts:
            deployment.hosts[host] = HostState()
        outcome, error = "interrupted", "interrupted"
        # Hosts are connected while the gate and the build run: neither needs the other. Not
        # when a promotion check may still refuse the artifact: a refusal touches no host.
        connecting = ThreadPoolExecutor(max_workers=1)
        early = not ctx.project.deploy.stages[ctx.stage].promote_from
        connected = connecting.submit(fleet.connect) if early else None

        def connected_now() -> dict[str, Outcome]:
            """The hosts' connections: the early ones once made, else made now."""
            return results([connected])[0] if connected else fleet.connect()

        try:
            if options.retry_failed:  # what to retry is read from the hosts: connect first
                note(deployment, "connect", connected_now())
                _resume_failed(deployment, emit)
            else:
                tasks_before("gate")
                if connected is not None and _gate_runs(deployment):
                    # the gate takes seconds: a host that cannot be reached stops us before it
                    _stop_if_unreachable(deployment, results([connected])[0])
                _gate(deployment, emit)
                tasks_before("build")
                # nothing ran since the source check (no gate, no task): its answer still holds
                ran = _gate_runs(deployment) or points.get("gate") or points.get("build")
                # the wheelhouse is resolved for each host's Python, asked of the connections
                hosts = interpreters_for_build(deployment, connected)
                _build(deployment, emit, None if ran else source_git, hosts)
                _check_promotion(deployment)
                deployment.rid = release_id(deployment.digest)
                note(deployment, "connect", connected_now())
            assign_targets(deployment)  # each host's Python has its wheels, or nothing is sent
            tasks_before("lock")
            _prepare(deployment, rendered)
            if options.until is None:
                tasks_before("release", installed=True)
                run_release(deployment)
                tasks_before("switch", installed=True)
                _switch(deployment)
                _after_deploy(deployment)
                tasks_before("finalize", installed=True)
                tasks_before("", installed=True)
            else:
                for state in deployment.hosts.values():
                    state.outcome = {"copy": "copied", "install": "installed"}[options.until]
            outcome, error = "ok", ""
        except UsageError:
            outcome = "refused"  # refused before any host was touched: no ledger entry, exit 2
            raise
        except OperationError as exc:
            outcome, error = "failed", exc.message
            emit(Event("deploy", "failed", detail=exc.message))
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: phases already running on hosts finished (the pool waits for
            # them); hosts this deploy switched go back, so the stage serves one release
            outcome, error = (
                "interrupted",
                "interrupted by a signal; every host serves the release it served before",
            )
            emit(Event("deploy", "failed", detail=error))
            with signals_ignored():
                fleet.cancel()  # a running hook ends now; a switch still running finishes (and counts)
                fleet.settle()
                _undo(
                    deployment,
                    [h for h, st in deployment.hosts.items() if st.switched],
                    services_spec(ctx.project.deploy, ctx.stage),
                )
        finally:
            with signals_ignored():  # a second Ctrl-C must not leave the locks behind
                connecting.shutdown(wait=True)  # every session it opened is closed below
                if outcome != "refused":
                    summary = _finalize(deployment, outcome, error)
                fleet.close()
    return summary


@contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """SIGTERM (a CI job cancelled) takes the same clean path as Ctrl-C."""

    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _resume_failed(d: Deployment, emit: Emit) -> None:
    """``--retry-failed``: the same deploy again (same artifact, same release id). Hosts that were
    prepared answer copy/install from what they have (both are idempotent), so only the hosts
    that failed do real work; a release hook that already ran is not run twice. The last deploy
    is the hosts' record of it, so any clone of the project (another laptop, a CI job) can retry
    it; this clone's own ledger only fills in for hosts that cannot be read."""
    stage = d.ctx.stage
    last = _last_deploy(d)
    if last is None or last.get("outcome") == "ok" or not last.get("release"):
        raise UsageError(
            f"--retry-failed: the last deploy of stage {stage!r} did not fail; nothing to retry"
        )
    artifact = str(last.get("artifact") or "")
    d.manifest, d.digest = _artifact_of(d, artifact, last.get("git_commit"), emit)
    d.rid = str(last["release"])
    d.resumed_release_hook = bool(last.get("release_hook"))
    failed = [
        h
        for h, info in (last.get("hosts") or {}).items()
        if info.get("outcome") not in ("ok", "switched")
    ]
    by = f"{last.get('user') or '?'}@{last.get('controller') or '?'}"
    how = (
        "was interrupted (Ctrl-C or a signal), not failed"
        if last.get("outcome") == "interrupted"
        else "failed"
    )
    d.fleet.emit(
        Event(
            "deploy",
            "info",
            detail=f"the last deploy ({by}, {last.get('started_at') or '?'}) {how}: retrying "
            f"release {d.rid} (artifact {d.digest[:12]}); hosts not done: {', '.join(failed) or 'none'}",
        )
    )


def _last_deploy(d: Deployment) -> LedgerEntry | None:
    """The stage's newest deploy as recorded in the hosts' ledgers (every connected host has
    the entry of each deploy it took part in) and in this clone's own."""
    read = d.fleet.each(
        "history", lambda h, s: cast(HistoryResult, s.call("history", {"limit": 50})), quiet=True
    )
    entries: list[LedgerEntry] = [
        e for o in read.values() if o.ok for e in cast(HistoryResult, o.result)["entries"]
    ]
    ledger = local_ledger(d.ctx.project, d.ctx.stage)
    if ledger.exists():
        entries += [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
    deploys = [
        e for e in entries if e.get("event") == "deploy" and e.get("stage") in (None, d.ctx.stage)
    ]
    return max(
        deploys, key=lambda e: (e.get("started_at") or "", e.get("release") or ""), default=None
    )


def _artifact_of(
    d: Deployment, digest: str, commit: str | None, emit: Emit
) -> tuple[dict[str, Any], str]:
    """The failed deploy's artifact: from this clone's build store, or built again from this
    checkout when it is another clone (the build is reproducible: the same commit builds the
    same artifact), refused when the checkout builds something else."""
    from shiplane.artifact import load_manifest

    try:
        manifest = load_manifest(d.ctx.project.root, digest)
        return manifest.to_dict(), manifest.digest
    except UsageError:
        pass  # not built here
    emit(
        Event("build", "start", detail=f"artifact {digest[:12]} is not in this clone: building it")
    )
    # for the hosts' interpreters, as a deploy's build is (they are connected now); else for the
    # deploy file's target, as `shiplane build` makes the artifact a --artifact deploy ships
    built = build_for_deploy(
        d.ctx.project, emit, stage=d.ctx.stage, hosts=lambda: hosts_interpreters(d.fleet)
    )
    if built.digest != digest:
        built = build_for_deploy(d.ctx.project, emit, stage=d.ctx.stage)
    if built.digest != digest:
        raise UsageError(
            f"--retry-failed: the last deploy of stage {d.ctx.stage!r} shipped artifact "
            f"{digest[:12]}{f' (git commit {commit[:12]})' if commit else ''}, which is not in "
            f"this clone, and this checkout builds another one ({built.digest[:12]})",
            hint=(f"check out {commit[:12]} and retry, or " if commit else "")
            + "run a plain deploy to ship this checkout; no host was changed",
        )
    emit(Event("build", "ok", detail=f"artifact {digest[:12]}: the same as the failed deploy's"))
    return built.manifest.to_dict(), built.digest


def _gate_runs(d: Deployment) -> bool:
    """Whether the test gate runs: one is set, not skipped (recorded), no ``--artifact`` given
    (it was built, and tested, before)."""
    return bool(
        d.ctx.project.deploy.build.test and not d.options.skip_tests and not d.options.artifact
    )


def _stop_if_unreachable(d: Deployment, outcomes: dict[str, Outcome]) -> None:
    """Hosts that could not be connected (unreachable, an unknown host key, no python) end the
    deploy before the gate and the build run: nothing ran, nothing was sent."""
    note(d, "connect", outcomes)
    if d.failed_hosts:
        listing = "; ".join(f"{h}: {why}" for h, why in d.failed_hosts.items())
        raise OperationError(
            f"cannot connect to {len(d.failed_hosts)} of {len(d.hosts)} host(s), so the test gate "
            f"did not run and nothing was sent: {listing}"
        )


def _gate(d: Deployment, emit: Any) -> None:
    """The test gate, unless skipped (recorded) or the artifact is given (it was built before)."""
    started = time.monotonic()
    if _gate_runs(d):
        from shiplane.commands.build import gate

        emit(Event("gate", "start"))
        gate(d.ctx.project, d.options.verbose, emit, d.options.ref, d.ctx.stage)  # --ref: its tests
        emit(Event("gate", "ok", seconds=time.monotonic() - started))


def _check_source(ctx: StageContext, options: DeployOptions, emit: Emit) -> GitInfo | None:
    """What the artifact is built from, checked before anything runs: ``--ref`` must name a
    commit (the working tree's changes then do not matter); without it a working tree with
    uncommitted changes ships them, said by a warning, refused with ``--require-clean``. Returns
    what git said of the working tree (None with ``--ref``, ``--artifact``, ``--retry-failed``)."""
    from shiplane.artifact import git_info, resolve_ref

    if options.ref is not None:
        if options.artifact or options.retry_failed:
            given = "--artifact" if options.artifact else "--retry-failed"
            raise UsageError(
                f"--ref and {given} do not go together: {given} names what ships, --ref builds it"
            )
        resolve_ref(ctx.project.root, options.ref)
        return None
    if options.artifact or options.retry_failed:
        return None  # built before: the working tree is not what ships
    info = git_info(ctx.project.root)
    commit = info.commit
    if commit is not None and not commit.endswith("-dirty"):
        return info
    why = (
        "the working tree has uncommitted changes: this deploy ships them; commit, or deploy --ref"
        if commit
        else "the project is not in git (or has no commit yet): what ships is no commit's"
    )
    if options.require_clean:
        raise UsageError(
            f"--require-clean: {why.split(':')[0]}; nothing was built or sent",
            hint="commit (or stash) the changes, or deploy a commit with --ref",
        )
    if commit:
        emit(Event("deploy", "warning", detail=why))
    return info


def _build(
    d: Deployment, emit: Any, git: GitInfo | None = None, hosts: BuildHosts | None = None
) -> None:
    """The artifact: built (or reused) from the checkout (``--ref``: from that commit's files),
    or the one ``--artifact`` names. ``git``: what git said of the checkout when nothing ran
    since (issue 21: its four git processes not run twice)."""
    if d.options.artifact:
        from shiplane.artifact import load_manifest

        manifest = load_manifest(d.ctx.project.root, d.options.artifact)
        d.manifest, d.digest = manifest.to_dict(), manifest.digest
        return
    started = time.monotonic()
    emit(Event("build", "start"))
    result = build_for_deploy(d.ctx.project, emit, d.options.ref, git, hosts, stage=d.ctx.stage)
    d.manifest, d.digest = result.manifest.to_dict(), result.digest
    emit(
        Event(
            "build",
            "ok",
            detail=f"artifact {d.digest[:12]}{' (reused)' if result.reused else ''}",
            seconds=time.monotonic() - started,
        )
    )


def _check_promotion(d: Deployment) -> None:
    """A stage with ``promote_from`` takes only artifacts that went live, healthy, there first."""
    source = d.ctx.project.deploy.stages[d.ctx.stage].promote_from
    if not source:
        return
    ledger = local_ledger(d.ctx.project, source)
    entries = (
        [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
        if ledger.exists()
        else []
    )
    if not any(
        e.get("artifact") == d.digest
        and e.get("outcome") == "ok"
        and e.get("event") in ("deploy", "rollback")
        for e in entries
    ):
        raise UsageError(
            f"stage {d.ctx.stage!r} takes only artifacts deployed healthy on {source!r} first; "
            f"artifact {d.digest[:12]} never was",
            hint=f"Deploy it to {source} first, or run: shiplane promote --from {source} --to {d.ctx.stage}",
        )


def _lock(d: Deployment) -> Any:
    """The deploy lock on a host; the step before copy (see ``_prepare``). The agent session
    holds it (a flock) for as long as it lives: no heartbeat is needed, and a lock whose session
    died with its controller is broken by the next deploy, which says so (the op's events)."""
    who = holder(" ".join(["shiplane", *sys.argv[1:]]), os.getpid()).to_json()

    def lock(host: str, session: AgentSession) -> Any:
        result = session.call(
            "lock",
            {"holder": who, "wait": d.options.lock_wait},
            on_event=d.fleet.forward(host, "lock"),
            timeout=d.options.lock_wait + 60,
        )
        d.locked.append(host)
        return result

    return lock


def _prepare(d: Deployment, rendered: Any) -> None:
    # a mixed stage's artifact holds a wheelhouse per Python: each host gets its own only
    own = {host: manifest_blobs(d.manifest, d.hosts[host].target) for host in d.hosts}
    sizes = dict(every_blob(d.manifest))
    store = _blob_store(d)
    shipped: dict[str, Path] = {}  # blobs from outside the build's store (uv), by sha256
    relay = _relay(d, sizes, lambda host, session, shas: send(host, session, shas))

    request = install_request(
        d.ctx.project.deploy, d.ctx.stage, d.rid, d.manifest, d.ctx.layered, rendered
    )
    if d.options.until:  # no switch follows: a server started early would only idle
        request["preboot_web"] = None

    def host_request(host: str) -> InstallArgs:
        """The install request for ``host``: the venv is made with the interpreter its agent runs
        with (its own ``python``; the controller's for the local stage's "python3"), from the
        wheels of that Python's target."""
        mine = request.copy()
        mine["python"], mine["target"] = d.fleet.python_for(host), d.hosts[host].target
        return mine

    def venv_hint(host: str) -> dict[str, Any] | None:
        """The host starts making the venv it lacks (uv's interpreter query) while blobs arrive."""
        if d.options.until == "copy":
            return None
        target = d.hosts[host].target
        deps = d.manifest if target is None else d.manifest["targets"][target]
        return {
            "digest": deps.get("dependency_digest"),
            "python": d.fleet.python_for(host),
            "uv_cache": request["uv_cache"],
        }

    web = services_spec(d.ctx.project.deploy, d.ctx.stage)["web"]
    builtin_front = d.ctx.project.deploy.stages[d.ctx.stage].front == "builtin"
    front_port = (
        {"bind": web["bind"], "port": web["port"]}
        if web and builtin_front and web.get("port")
        else None
    )

    def send(host: str, session: AgentSession, shas: list[str]) -> int:
        if shas:
            session.call(
                "receive",
                {"blobs": [{"sha256": sha, "size": sizes[sha]} for sha in shas]},
                payload=_stream_blobs(store, shas, shipped),
                on_event=d.fleet.forward(host, "copy"),
                timeout=timeout(d),
            )
        return sum(sizes[sha] for sha in shas)

    def copy(host: str, session: AgentSession) -> Any:
        # the controller's uv, to a host without one (its venv builds in a second instead of
        # many): one more blob of the deploy, relayed as the others
        uv = uv_blob(session)
        if uv is not None:
            shipped[uv.sha256], sizes[uv.sha256] = uv.path, uv.size
        # uv first: the host unpacks it while the other blobs arrive (inventory's uv hint)
        wanted = ([uv.sha256] if uv else []) + [sha for sha, _ in own[host]]
        hint = {"sha256": uv.sha256, "binary_sha256": uv.binary_sha256} if uv else None
        inventory = session.call(
            "inventory",
            {"blobs": wanted, "venv": venv_hint(host), "port": front_port, "uv": hint},
            timeout=timeout(d),
        )
        d.hosts[host].previous = inventory.get("current")
        d.hosts[host].schedules_jobs = bool((inventory.get("services") or {}).get("jobs"))
        if inventory.get("port_taken"):  # the switch would fail there: say so before sending a byte
            raise OperationError(
                f"the stage's port is taken by another program ({inventory['port_taken']}), "
                "not by this stage's front; nothing was sent. Free it, or give the stage "
                "another `port`"
            )
        missing = inventory.get("missing", [])
        moved = relay.transfer(host, session, wanted, missing)
        if uv is not None:
            install_shipped_uv(
                session,
                uv,
                lambda text: d.fleet.emit(Event("copy", "info", host=host, detail=text)),
            )
        total, peers = moved.from_controller, sum(moved.from_peers.values())
        d.hosts[host].bytes_sent, d.hosts[host].bytes_from_peers = total, peers
        fetched = "".join(
            f"; fetched {human_bytes(size)} from {source}"
            for source, size in moved.from_peers.items()
        )
        d.fleet.emit(
            Event(
                "copy",
                "progress",
                host=host,
                detail=f"sent {moved.blobs_from_controller} blob(s), {human_bytes(total)}{fetched}",
                bytes=total,
                data={"from_controller": total, "from_peers": peers, "peers": moved.from_peers},
            )
        )
        return {"blobs": len(missing), "bytes": total, "peer_bytes": peers}

    def install(host: str, session: AgentSession) -> Any:
        resent = 0
        while True:
            try:
                return session.call(
                    "install",
                    host_request(host),
                    on_event=d.fleet.forward(host, "install"),
                    timeout=timeout(d),
                )
            except HostError as exc:
                # stored blobs changed on the host's disk since they arrived: the agent checks each
                # one it uses and quarantines those that no longer match; they are sent again
                bad = (
                    [sha for sha in exc.data.get("blobs") or [] if sha in sizes]
                    if exc.kind == "integrity"
                    else []
                )
                resent += 1
                if not bad or resent > 3:
                    raise
            d.fleet.emit(
                Event(
                    "install",
                    "info",
                    host=host,
                    detail=f"{len(bad)} stored blob(s) did not match their "
                    "sha256 (quarantined there): sending them again",
                )
            )
            d.hosts[host].bytes_sent += send(host, session, bad)

    def reached(phase: str, work: Any) -> Any:
        def step(host: str, session: AgentSession) -> Any:
            # recorded in the worker: after Ctrl-C the steps under way still finish, and what a
            # host reached must be known to clean up after it (finalize marks what it installed)
            d.hosts[host].phase = phase
            return work(host, session)

        return step

    # each host goes lock -> copy -> install at its own pace: a slow host delays no other
    steps = [
        (name, reached(name, relay_step(relay, name, work)))
        for name, work in [("lock", _lock(d)), ("copy", copy)]
        + ([] if d.options.until == "copy" else [("install", install)])
    ]
    try:
        chained = d.fleet.chain(steps, hosts=healthy(d))
    finally:
        relay.stop(d.fleet.each)  # the hosts' servers end with the transfers
    for phase, outcomes in chained.items():
        note(d, phase, outcomes)
    stop_if_any_failed(d, d.options.until or "prepare")


def _relay(d: Deployment, sizes: dict[str, int], send: Any) -> Relay:
    """The deploy's blob transfer: each blob leaves the controller once, the hosts relay it to
    each other (commands/relay.py); the direct copy alone for one host, the ``local`` stage, or
    ``transfer = "direct"``."""
    stage = d.ctx.project.deploy.stages[d.ctx.stage]
    hosts = healthy(d)
    enabled = stage.transfer == "auto" and not stage.is_local and len(hosts) > 1
    return Relay(
        hosts,
        sizes,
        send,
        d.fleet.emit,
        enabled=enabled,
        ttl=timeout(d) * 10,
        port=stage.transfer_port,
        first=hosts[: max(1, d.fleet.parallel)],  # fleet.chain starts these at once
    )


def relay_step(relay: Relay, phase: str, work: Any) -> Any:
    """``work`` as a step the relay follows: hosts that start (lock) are waited for; a host that
    fails its lock or copy is not (nor fetched from)."""

    def step(host: str, session: AgentSession) -> Any:
        if phase == "lock":
            relay.arrive(host)
        try:
            return work(host, session)
        except BaseException:
            if phase in ("lock", "copy"):
                relay.leave(host)
            raise

    return step


def _blob_store(d: Deployment) -> Any:
    from shiplane.artifact import BlobStore

    return BlobStore(d.ctx.project.root / ".shiplane" / "build" / "blobs")


def _stream_blobs(store: Any, shas: list[str], shipped: dict[str, Path]) -> Any:
    for sha in shas:
        with shipped[sha].open("rb") if sha in shipped else store.open(sha) as handle:
            while chunk := handle.read(CHUNK):
                yield chunk


def _switch(d: Deployment) -> None:
    deploy = d.ctx.project.deploy
    stage = deploy.stages[d.ctx.stage]
    spec = services_spec(deploy, d.ctx.stage)
    switched: list[str] = []
    rollout = batches(d.fleet.hosts, stage.rolling.batch)
    scheduling = {h for h, state in d.hosts.items() if state.schedules_jobs}
    later = jobs_after_rollout(spec, deploy, d.ctx.stage, rollout, scheduling)
    for batch in rollout:

        def switch(host: str, session: AgentSession) -> Any:
            services = host_services(spec, deploy, d.ctx.stage, host)
            result = session.call(
                "switch",
                {
                    "release_id": d.rid,
                    "services": {**services, "jobs": {}} if host == later else services,
                },
                on_event=d.fleet.forward(host, "switch"),
                timeout=timeout(d),
            )
            d.hosts[host].switched = True  # recorded in the worker: an interrupt may come any time
            return result

        outcomes = d.fleet.each("switch", switch, hosts=batch)
        for host, outcome in outcomes.items():
            state = d.hosts[host]
            state.phase = "switch"
            if outcome.ok:
                state.switched, state.release, state.outcome = True, d.rid, "switched"
                switched.append(host)
            else:
                state.outcome, state.error = (
                    "failed",
                    outcome.error.reason if outcome.error else "failed",
                )
        bad = failures(outcomes)
        if len(bad) > max_failures(stage.rolling.max_fail, len(batch)):
            _undo(d, switched, spec)
            listing = "; ".join(f"{h}: {e.reason}" for h, e in bad.items())
            raise OperationError(
                f"switch failed on {len(bad)} host(s) ({listing}); {_left_with(d)}"
            )
    if later is not None and d.hosts[later].switched:
        _schedule_jobs(d, later, host_services(spec, deploy, d.ctx.stage, later))


def _schedule_jobs(d: Deployment, host: str, services: ServicesSpec) -> None:
    """The primary's jobs, once every host that scheduled them has switched (plan.py's
    ``jobs_after_rollout``): the same switch again, which finds its release live and only
    schedules them. A failure is the host's, the release stays live."""
    outcomes = d.fleet.each(
        "switch",
        lambda h, s: s.call(
            "switch",
            {"release_id": d.rid, "services": services},
            on_event=d.fleet.forward(h, "switch"),
            timeout=timeout(d),
        ),
        hosts=[host],
    )
    for failed, error in failures(outcomes).items():
        d.fleet.emit(
            Event("switch", "warning", host=failed, detail=f"jobs not scheduled: {error.reason}")
        )


def _undo(d: Deployment, switched: list[str], spec: ServicesSpec) -> None:
    """Return every host this deploy switched to the release it served before; a host that served
    nothing before (a first deploy) is withdrawn: it serves nothing again, so no host is left
    serving a release the stage rejected (all or nothing, first deploys included)."""
    back = [h for h in switched if d.hosts[h].previous]
    deploy = d.ctx.project.deploy
    outcomes = d.fleet.each(
        "undo",
        lambda host, s: s.call(
            "switch",
            {
                "release_id": d.hosts[host].previous,
                "services": host_services(spec, deploy, d.ctx.stage, host),
            },
            timeout=timeout(d),
        ),
        hosts=back,
    )
    for host, outcome in outcomes.items():
        state = d.hosts[host]
        state.outcome = "undone" if outcome.ok else "undo-failed"
        state.release = state.previous if outcome.ok else state.release
    _withdraw(d, [h for h in switched if not d.hosts[h].previous])


def _withdraw(d: Deployment, hosts: list[str]) -> None:
    """Hosts that served nothing before this deploy serve nothing after it, and run nothing."""
    outcomes = d.fleet.each(
        "undo",
        lambda host, s: s.call("withdraw", {"release_id": d.rid}, timeout=timeout(d)),
        hosts=hosts,
        quiet=True,
    )
    for host, outcome in outcomes.items():
        state = d.hosts[host]
        if state.switched:
            state.outcome = "withdrawn" if outcome.ok else "undo-failed"
        state.switched = state.switched and not outcome.ok
        state.release = None if outcome.ok else state.release


def _left_with(d: Deployment) -> str:
    """What each host serves now, in a few words (the summary lists it host by host)."""
    undone = [h for h, s in d.hosts.items() if s.outcome == "undone"]
    withdrawn = [h for h, s in d.hosts.items() if s.outcome == "withdrawn"]
    stuck = [h for h, s in d.hosts.items() if s.outcome == "undo-failed"]
    parts = [f"{', '.join(undone)} back on the release served before"] if undone else []
    parts += (
        [f"{', '.join(withdrawn)} serve nothing again (there was no earlier release)"]
        if withdrawn
        else []
    )
    parts += [f"{', '.join(stuck)} could not be undone and still serve {d.rid}"] if stuck else []
    return "; ".join(parts) or "no host had switched"


def _after_deploy(d: Deployment) -> None:
    deploy = d.ctx.project.deploy
    switched = [h for h, state in d.hosts.items() if state.switched]
    for command in deploy.hooks.after_deploy:

        def hook(host: str, session: AgentSession, command: str = command) -> Any:
            return session.call(
                "hook",
                {
                    "release_id": d.rid,
                    "command": command,
                    "timeout": deploy.hooks.timeout,
                    "silence_timeout": deploy.hooks.silence_timeout,
                },
                on_event=d.fleet.forward(host, "after_deploy"),
                timeout=deploy.hooks.timeout + 30,
            )

        # on the hosts this deploy switched: one that failed within max_fail serves the old release
        require_all(d, "after_deploy", d.fleet.each("after_deploy", hook, hosts=switched))
    for host in switched:
        d.hosts[host].outcome = "ok"


def _finalize(d: Deployment, outcome: str, error: str | None) -> DeployResult:
    """Unlock, mark releases, record the ledger on every host and locally, prune. Always runs."""
    fleet = d.fleet
    deploy = d.ctx.project.deploy
    duration = round(time.time() - d.started, 3)
    if outcome != "ok":
        for (
            state
        ) in d.hosts.values():  # hosts the failed deploy never switched: say so, not "pending"
            if state.outcome == "pending":
                state.outcome = "not switched"
    entry: DeployEntry = {
        "event": d.options.until or "deploy",
        "stage": d.ctx.stage,
        "release": d.rid or None,
        "artifact": d.digest or None,
        "git_commit": d.manifest.get("git_commit"),
        "ref": d.options.ref,
        "outcome": outcome,
        "error": error or None,
        "user": holder("", os.getpid()).user,
        "controller": holder("", os.getpid()).host,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d.started)),
        "duration": duration,
        "release_hook": d.ran_release_hook,
        "setup": d.ran_setup,
        "skip_tests": d.options.skip_tests,
        "release_inputs": d.release_inputs,
        "overrides": {"hosts": d.options.hosts, "set": list(d.options.sets)}
        if (d.options.hosts or d.options.sets)
        else None,
        "hosts": {
            h: {
                "outcome": s.outcome,
                "release": s.release,
                "bytes": s.bytes_sent,
                "peer_bytes": s.bytes_from_peers,
                "error": s.error,
                "phases": fleet.timings.get(h, {}),
            }
            for h, s in d.hosts.items()
        },
    }
    if not d.tried_release_hook:  # the key is there only once the hook was tried
        del entry["release_inputs"]
    connected = list(fleet.sessions)
    if d.rid and connected:
        # a successful switch marked the release live on the host; a failed deploy marks it bad
        # wherever it was installed, so `rollback` never picks it
        installed = [
            h
            for h, s in d.hosts.items()
            if h in connected
            and (s.phase not in ("pending", "connect", "lock", "copy") or s.switched)
        ]
        if outcome != "ok":
            # a host this deploy would have been the first to serve runs nothing after it either
            _withdraw(
                d,
                [
                    h
                    for h in installed
                    if not d.hosts[h].previous
                    and not d.hosts[h].switched
                    and d.hosts[h].outcome != "withdrawn"
                ],
            )
            fleet.each(
                "finalize",
                lambda host, s: s.call("mark", {"release_id": d.rid, "state": "bad"}, timeout=60),
                hosts=installed,
                quiet=True,
            )
        fleet.each(
            "finalize",
            lambda host, s: s.call("record", {"entry": entry}, timeout=60),
            hosts=connected,
            quiet=True,
        )
        if outcome == "ok":
            fleet.each(
                "prune",
                lambda host, s: s.call("prune", {"keep": deploy.app.keep_releases}, timeout=300),
                hosts=connected,
                quiet=True,
            )
    locked, d.locked = list(d.locked), []
    fleet.each(
        "unlock",
        lambda host, s: s.call("unlock", {"force": False}, timeout=60),
        hosts=locked,
        quiet=True,
    )
    ledger = local_ledger(d.ctx.project, d.ctx.stage)
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with ledger.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
    return _summary(d, entry)


def _summary(d: Deployment, entry: DeployEntry) -> DeployResult:
    ok = entry["outcome"] == "ok"
    deploy = d.ctx.project.deploy
    local = deploy.stages[d.ctx.stage].is_local and not d.options.until
    return DeployResult(
        summary={**entry, "ok": ok},
        app=deploy.app.name,
        until=d.options.until,
        hosts=dict(d.hosts),
        serving_port=(deploy.web_port(d.ctx.stage) or None) if local else None,
    )
