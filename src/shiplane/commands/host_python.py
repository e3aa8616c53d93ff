"""The deploy and the hosts' interpreters: what the build resolves the wheelhouse for, and which
of the artifact's targets each host installs (docs/hosts.md, "Hosts on other Pythons").

The deploy connects to the hosts while the gate and the build's file hashing run; the build then
asks :func:`interpreters_for_build` for each host's interpreter (its agent's ``hello``) and
resolves one wheelhouse per distinct interpreter. After the build :func:`assign_targets` gives
each host the artifact target that fits it, or stops the deploy, before anything is sent, naming
the hosts that no target fits.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from packaging.requirements import Requirement

from shiplane.artifact import (
    BlobStore,
    Gap,
    Interpreter,
    check_wheelhouse,
    controller_interpreter,
    host_misfit,
    load_manifest,
    target_fits,
    target_index,
    target_of,
)
from shiplane.commands.deployment import Deployment
from shiplane.errors import OperationError, UsageError
from shiplane.fleet import Fleet, Outcome, local_ledger, results
from shiplane.transport import on_controller

Connected = Future[dict[str, Outcome]]
BuildHosts = Callable[[], Mapping[str, Interpreter]]


def interpreters_for_build(d: Deployment, connected: Connected | None) -> BuildHosts:
    """What the build resolves the wheelhouse for, asked once it has read the project: each
    connected host's interpreter; for a stage with ``promote_from`` (which connects after the
    build) the interpreters its source stage's last healthy artifact was built for, so the same
    code builds the same artifact there."""

    def hosts() -> Mapping[str, Interpreter]:
        if connected is None:
            return _promoted(d)
        own = _controllers_own(d.fleet)
        if own is not None:  # nothing to wait for: the build overlaps the connection (~0.1 s)
            return own
        results([connected])  # the hosts that could not be connected are told of after the build
        return hosts_interpreters(d.fleet)

    return hosts


def _controllers_own(fleet: Fleet) -> dict[str, Interpreter] | None:
    """The interpreters of a stage whose every host is this machine running its own Python (the
    ``local`` stage, unless it names another ``python``): this process's, known without asking."""
    own = os.path.realpath(sys.executable)
    if not fleet.hosts or any(
        not on_controller(host) or fleet.python_for(host) != own for host in fleet.hosts
    ):
        return None
    return dict.fromkeys(fleet.hosts, controller_interpreter())


def hosts_interpreters(fleet: Fleet) -> dict[str, Interpreter]:
    """Each connected host's interpreter, in the stage's order (not the connections'): the
    artifact's targets, and so its digest, follow it."""
    found = {
        host: Interpreter.from_hello(fleet.sessions[host].hello)
        for host in fleet.hosts
        if host in fleet.sessions
    }
    return {host: interp for host, interp in found.items() if interp is not None}


def _promoted(d: Deployment) -> Mapping[str, Interpreter]:
    source = d.ctx.project.deploy.stages[d.ctx.stage].promote_from
    if not source:
        return {}
    ledger = local_ledger(d.ctx.project, source)
    entries = (
        [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
        if ledger.exists()
        else []
    )
    healthy = [
        e for e in entries if e.get("outcome") == "ok" and e.get("event") in ("deploy", "rollback")
    ]
    if not healthy or not healthy[-1].get("artifact"):
        return {}
    try:
        manifest = load_manifest(d.ctx.project.root, str(healthy[-1]["artifact"])).to_dict()
    except UsageError:
        return {}
    found: dict[str, Interpreter] = {}
    for n, target in enumerate(_targets(manifest)):
        interp = Interpreter.from_hello(target)
        if interp is not None:
            found[f"{source}'s hosts ({n + 1})"] = interp
    return found


def _targets(manifest: Mapping[str, Any]) -> list[dict[str, str]]:
    """The artifact's targets: one per interpreter (``targets``), or its one ``target``."""
    several = manifest.get("targets") or []
    if several:
        return [dict(t.get("target") or {}) for t in several]
    return [dict(manifest.get("target") or {})]


def assign_targets(d: Deployment) -> None:
    """Each connected host's target in the artifact (``HostState.target``: the index into the
    manifest's ``targets``, None for a one-target artifact); hosts no target fits stop the deploy
    before any host is locked or sent a byte: a venv for another Python would fail to install,
    or install wheels that cannot load."""
    targets = _targets(d.manifest)
    several = bool(d.manifest.get("targets"))
    misfits: dict[str, Mapping[str, Any]] = {}
    gaps: dict[str, list[Gap]] = {}
    for host, session in d.fleet.sessions.items():
        if host not in d.hosts:
            continue
        index = target_index(targets, session.hello)
        if index is None:
            index, gaps[host] = _checked_fit(d, targets, session.hello)
        if index is None:
            misfits[host] = session.hello
        else:
            d.hosts[host].target = index if several else None
    if not misfits:
        return
    for host, hello in misfits.items():
        state = d.hosts[host]
        state.phase, state.outcome = "connect", "failed"
        state.error = _why(targets, hello, gaps.get(host, []))
    raise OperationError(_refusal(d, targets, misfits, gaps))


def _checked_fit(
    d: Deployment, targets: list[dict[str, str]], hello: Mapping[str, Any]
) -> tuple[int | None, list[Gap]]:
    """A host on another patch release (or glibc) than any target's, as when an artifact built
    by `shiplane build` or for another stage ships with ``--artifact`` or ``promote``: the first
    target of its minor version, ABI and platform whose wheels (read from this clone's store)
    check clean for its exact interpreter; else None and what that target lacks there."""
    interp = Interpreter.from_hello(hello)
    if interp is None:
        return None, []
    store = BlobStore(d.ctx.project.root / ".shiplane" / "build" / "blobs")
    several = d.manifest.get("targets") or []
    lacking: list[Gap] = []
    for index, target in enumerate(targets):
        same_kind = {k: v for k, v in target.items() if k not in ("python", "glibc")}
        if not target_fits(same_kind, hello):
            continue
        deps = (several[index] if several else d.manifest).get("dependencies") or []
        wheels = [
            (str(e["path"]), store.path(str(e["sha256"])))
            for e in deps
            if str(e.get("path", "")).endswith(".whl")
        ]
        if not all(path.is_file() for _, path in wheels):
            continue  # not built in this clone: not checked, not taken
        wanted = [Requirement(r) for r in d.manifest.get("requires") or []]
        gaps = check_wheelhouse(wheels, target_of(interp).to_dict(), wanted, "the artifact")
        if not gaps:
            return index, []
        lacking = lacking or gaps
    return None, lacking


def _why(targets: list[dict[str, str]], hello: Mapping[str, Any], gaps: list[Gap]) -> str:
    """What about a host no target fits: what the wheels lack there, else the first target's
    differences in words."""
    if gaps:
        shown = "; ".join(f"{g.package}: {g.why}" for g in gaps[:3])
        return f"the artifact's wheels lack what it needs: {shown}"
    reason = host_misfit(targets[0], hello)
    if reason:
        return reason
    have = Interpreter.from_hello(hello)
    return f"{have.label if have else hello.get('python')}, not {_shown(targets[0])}"


def _shown(target: Mapping[str, str]) -> str:
    interp = Interpreter.from_hello(target)
    if interp is not None:
        return interp.label
    return f"Python {target.get('python_version')} on {target.get('platform')}"


def _refusal(
    d: Deployment,
    targets: list[dict[str, str]],
    misfits: dict[str, Mapping[str, Any]],
    gaps: dict[str, list[Gap]],
) -> str:
    listing = "; ".join(
        f"{h} runs {_host_label(s, bool(gaps.get(h)))}"
        + (f", and {_why(targets, s, gaps[h])}" if gaps.get(h) else "")
        for h, s in misfits.items()
    )
    built = ", ".join(_shown(t) for t in targets)
    build = d.ctx.project.deploy.build
    if build.python_version or build.platform:
        how = f"{_config_fix(targets[0], misfits)}, then deploy again"
    elif d.options.artifact or d.options.retry_failed:
        how = (
            "deploy without --artifact: the build then resolves a wheelhouse for each host's Python"
        )
    else:
        how = (
            "give these hosts a Python the artifact was built for (their `python` in the "
            "deploy file), or deploy a build made for theirs"
        )
    return (
        f"{listing}, but artifact {d.digest[:12]} was built for {built}: its wheels do not fit "
        f"there; nothing was sent. To fix: {how}"
    )


def _host_label(hello: Mapping[str, Any], exact: bool = False) -> str:
    """``Python 3.11 on linux_x86_64``; ``exact``: its whole interpreter (the patch release
    is what differs)."""
    interp = Interpreter.from_hello(hello)
    if exact and interp is not None:
        return interp.label
    return f"Python {hello.get('python_version')} on {hello.get('platform')}"


def _config_fix(target: Mapping[str, str], misfits: dict[str, Mapping[str, Any]]) -> str:
    """The deploy file's [build] target is what they differ from: the keys to change, or to drop."""
    facts = {(str(h.get("python_version")), str(h.get("platform"))) for h in misfits.values()}
    if len(facts) > 1:
        return (
            "remove python_version and platform from the [build] table of the deploy file: "
            "the wheelhouse is then resolved for each host's own Python"
        )
    (py, plat), fix, hello = next(iter(facts)), [], next(iter(misfits.values()))
    if host_misfit({"python_version": target.get("python_version", "")}, hello):
        fix.append(f'python_version = "{py}"')
    if host_misfit({"platform": target.get("platform", "")}, hello):
        fix.append(f'platform = "{plat}"')
    keys = ", ".join(f"build.{f.split(' ')[0]}" for f in fix)
    return f"set {' and '.join(fix)} in the [build] table of the deploy file ({keys})"
