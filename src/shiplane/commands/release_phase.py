"""The release phase of a deploy: the setup hook on a host's first deploy, then the release hook
(migrations), before any host switches -- once on the primary host, or on every host with
``hooks.run_on = "all"`` (state each host keeps, such as its own SQLite database) -- or skipped
where what it depends on is unchanged (``hooks.release_if_changed``, release_inputs.py)."""

from __future__ import annotations

from typing import Any

from shiplane.commands.deployment import Deployment, healthy, timeout
from shiplane.config import Project
from shiplane.config.layers import Layered
from shiplane.errors import OperationError
from shiplane.events import Event
from shiplane.fleet import failures
from shiplane.plan import hook_hosts
from shiplane.release_inputs import inputs_digest, last_inputs
from shiplane.transport.session import AgentSession, HostError


def run_release(d: Deployment) -> None:
    """The setup hook where it never ran, then the release hook, with the new code, config and
    environment, before any host switches: on the primary, or on every host (``hooks.run_on``),
    all hosts at once. A host that fails stops the deploy with nothing switched anywhere."""
    deploy = d.ctx.project.deploy
    targets = hook_hosts(deploy, d.ctx.stage, healthy(d))
    # what the hook depends on, digested once (None: an artifact not built from this checkout)
    inputs = (
        None
        if d.options.artifact or d.options.retry_failed
        else checkout_inputs(d.ctx.project, d.ctx.layered)
    )
    release = [] if d.resumed_release_hook else deploy.hooks.release_commands()
    if d.resumed_release_hook:
        d.ran_release_hook = True
    ran: dict[str, list[str]] = {}

    def on_host(host: str, session: AgentSession) -> None:
        commands: list[tuple[str, str]] = []
        if deploy.hooks.setup and not session.call(
            "inventory", {"blobs": []}, timeout=timeout(d)
        ).get("setup_done"):
            commands.append(("setup", deploy.hooks.setup))
        if release and not _release_unchanged(d, session, host, inputs):
            commands += [("release", cmd) for cmd in release]
            d.tried_release_hook = True  # recorded even if it fails: a None digest never matches
        for kind, command in commands:
            _run_hook(d, host, session, kind, command)
            ran.setdefault(host, []).append(kind)

    outcomes = d.fleet.each("release", on_host, hosts=targets, quiet=True)
    d.ran_setup = any("setup" in kinds for kinds in ran.values())
    d.ran_release_hook = d.ran_release_hook or any("release" in kinds for kinds in ran.values())
    bad = failures(outcomes)
    for host, error in bad.items():
        d.hosts[host].phase, d.hosts[host].outcome, d.hosts[host].error = (
            "release",
            "failed",
            error.reason,
        )
    if bad:
        listing = "; ".join(f"{h}: {e.reason}" for h, e in bad.items())
        raise OperationError(
            f"release phase failed on {len(bad)} of {len(targets)} host(s), nothing was switched: "
            f"{listing}"
        )
    if release and d.tried_release_hook:
        d.release_inputs = inputs  # every host ran or skipped it: each database is at these inputs


def _run_hook(d: Deployment, host: str, session: AgentSession, kind: str, command: str) -> None:
    """One setup or release command on one host, its output streamed; a setup that succeeded is
    recorded in that host's ledger at once, so it never runs there again (the deploy may still
    fail later, on another host or at the switch)."""
    hooks = d.ctx.project.deploy.hooks
    d.fleet.emit(Event(kind, "start", host=host, detail=command))
    try:
        result: Any = session.call(
            "hook",
            {
                "release_id": d.rid,
                "command": command,
                "timeout": hooks.timeout,
                "silence_timeout": hooks.silence_timeout,
            },
            on_event=d.fleet.forward(host, kind),
            timeout=hooks.timeout + 30,
        )
    except HostError as exc:
        raise OperationError(f"{kind} hook `{command}` failed: {exc.reason}") from None
    if kind == "setup":
        session.call(
            "record",
            {
                "entry": {
                    "event": "setup",
                    "stage": d.ctx.stage,
                    "release": d.rid,
                    "setup": True,
                    "command": command,
                    "outcome": "ok",
                }
            },
            timeout=timeout(d),
        )
    d.fleet.emit(Event(kind, "ok", host=host, seconds=float((result or {}).get("seconds") or 0)))


def checkout_inputs(project: Project, layered: Layered) -> str | None:
    """The digest of what the release hook depends on in this checkout, when the deploy file
    names it (``hooks.release_if_changed``); else None."""
    hooks = project.deploy.hooks
    if not hooks.release_if_changed:
        return None
    return inputs_digest(project.root, hooks.release_if_changed, hooks.release_commands(), layered)


def last_run_inputs(session: AgentSession, wait: float) -> str | None:
    """The digest the release hook last ran with on this host (its ledger), or None."""
    # the newest entries suffice: a digest older than that only means the hook runs once more
    return last_inputs(session.call("history", {"limit": 500}, timeout=wait).get("entries", []))


def _release_unchanged(d: Deployment, session: AgentSession, host: str, inputs: str | None) -> bool:
    """True (and said) when the release hook's inputs are those it last ran with on ``host``."""
    if inputs is None or last_run_inputs(session, timeout(d)) != inputs:
        return False
    d.tried_release_hook = True
    patterns = ", ".join(d.ctx.project.deploy.hooks.release_if_changed)
    d.fleet.emit(
        Event(
            "release",
            "skipped",
            host=host,
            detail=f"nothing the release hook depends on ({patterns}, config) changed since it last ran",
        )
    )
    return True
