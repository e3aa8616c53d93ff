"""``shiplane promote --from S1 --to S2``: deploy to S2 the exact artifact live and healthy on S1.

Build once, deploy everywhere: the artifact's digest is read from the live ``release.json`` of every
host of S1 (they must all agree, and every host's web service must run that release), then the
ordinary deploy pipeline runs on S2 with ``--artifact <digest>`` (no rebuild, no test gate: that
artifact already passed both). S2's ``promote_from`` check still applies.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from shiplane.commands.common import silent
from shiplane.commands.deploy import run_deploy
from shiplane.commands.deployment import DeployOptions, PromoteResult
from shiplane.commands.operate import connected
from shiplane.errors import OperationError, UsageError
from shiplane.events import Emit
from shiplane.fleet import TransportFactory, failures
from shiplane.secret import Masker
from shiplane.transport.session import AgentSession


def run_promote(
    file: Path | None,
    from_stage: str,
    options: DeployOptions,
    masker: Masker,
    emit: Emit = silent,
    *,
    transports: TransportFactory | None = None,
) -> PromoteResult:
    """Deploy ``from_stage``'s live artifact to ``options.stage``; the deploy's result (``ok`` False: exit 1).
    ``transports``: how to reach each host (see ``Fleet``)."""
    if options.stage == from_stage:
        raise UsageError(f"promote --from and --to both name stage {from_stage!r}")
    digest = live_artifact(file, from_stage, masker, transports=transports)
    result = run_deploy(
        file,
        replace(options, artifact=digest, skip_tests=True),
        masker,
        emit,
        transports=transports,
    )
    return PromoteResult(
        deploy=result, artifact=digest, promoted_from=from_stage, to_stage=options.stage
    )


def live_artifact(
    file: Path | None, stage: str, masker: Masker, *, transports: TransportFactory | None = None
) -> str:
    """The artifact digest every host of ``stage`` serves, healthy; OperationError otherwise."""
    with connected(file, stage, masker, hosts=None, sets=(), transports=transports) as (
        _ctx,
        fleet,
    ):

        def facts(host: str, session: AgentSession) -> dict[str, Any]:
            return {
                "releases": session.call("releases", {}, timeout=60),
                "status": session.call("status", {}, timeout=60),
            }

        outcomes = fleet.each("promote", facts, quiet=True)
        bad = failures(outcomes)
        if bad:
            raise OperationError(
                f"cannot read stage {stage!r}: " + "; ".join(e.message for e in bad.values())
            )
        digests: dict[str, str | None] = {}
        problems: list[str] = []
        for host in fleet.hosts:
            info = outcomes[host].result
            current = info["releases"].get("current")
            live = next(
                (r for r in info["releases"].get("releases", []) if r.get("release_id") == current),
                None,
            )
            if not current or live is None:
                problems.append(f"{host} has no live release")
                continue
            digests[host] = live.get("artifact")
            if live.get("state") == "bad":
                problems.append(f"{host}: its live release {current} is marked bad")
            web = [
                s
                for s in info["status"].get("services", [])
                if s.get("name") == "web" and s.get("live")
            ]
            if not web or any(s.get("state") != "RUNNING" for s in web):
                state = web[0].get("state") if web else "not running"
                problems.append(f"{host}: the web service of {current} is {str(state).lower()}")
        if problems:
            raise OperationError(
                f"stage {stage!r} is not healthy, nothing to promote: " + "; ".join(problems)
            )
        distinct = {d for d in digests.values() if d}
        if len(distinct) != 1:
            listing = ", ".join(f"{h}={(d or '?')[:12]}" for h, d in digests.items())
            raise OperationError(
                f"the hosts of stage {stage!r} serve different artifacts ({listing}); "
                f"deploy one artifact to all of them first"
            )
        return distinct.pop()
