"""The release phase of a deploy: the setup hook on a stage's first deploy, then the release hook
(migrations), once, on the primary host, before any host switches -- or skipped when what it
depends on is unchanged (``hooks.release_if_changed``, release_inputs.py)."""

from __future__ import annotations

import time

from shiplane.commands.deployment import Deployment, timeout
from shiplane.config import Project
from shiplane.config.layers import Layered
from shiplane.errors import OperationError
from shiplane.events import Event
from shiplane.plan import primary_host
from shiplane.release_inputs import inputs_digest, last_inputs
from shiplane.transport.session import AgentSession


def run_release(d: Deployment) -> None:
    """The setup hook on a stage's first deploy, then the release hook: once, on the primary host,
    with the new code, config and environment, before any host switches."""
    deploy = d.ctx.project.deploy
    primary = primary_host(deploy, d.ctx.stage, d.fleet.hosts)
    session = d.fleet.sessions[primary]
    commands: list[tuple[str, str]] = []
    if deploy.hooks.setup:
        inventory = session.call("inventory", {"blobs": []}, timeout=timeout(d))
        if not inventory.get("setup_done"):
            commands.append(("setup", deploy.hooks.setup))
    # what the hook depends on, digested once (None: an artifact not built from this checkout)
    inputs = None if d.options.artifact or d.options.retry_failed else checkout_inputs(d.ctx.project, d.ctx.layered)
    if d.resumed_release_hook:
        d.ran_release_hook = True
    elif deploy.hooks.release_commands() and not _release_unchanged(d, session, primary, inputs):
        commands += [("release", cmd) for cmd in deploy.hooks.release_commands()]
        d.tried_release_hook = True
    for kind, command in commands:
        started = time.monotonic()
        d.fleet.emit(Event(kind, "start", host=primary, detail=command))
        try:
            session.call("hook", {"release_id": d.rid, "command": command, "timeout": deploy.hooks.timeout},
                         on_event=d.fleet.forward(primary, kind), timeout=deploy.hooks.timeout + 30)
        except OperationError as exc:
            d.hosts[primary].outcome, d.hosts[primary].error = "failed", str(exc)
            raise OperationError(f"{kind} hook `{command}` failed on {primary}, nothing was switched: {exc}") from None
        d.fleet.timings.setdefault(primary, {})[kind] = round(time.monotonic() - started, 3)
        d.fleet.emit(Event(kind, "ok", host=primary, seconds=time.monotonic() - started))
        if kind == "setup":
            d.ran_setup = True
        else:
            d.ran_release_hook = True
    if d.ran_release_hook and d.tried_release_hook:
        d.release_inputs = inputs  # every command succeeded: the database is at these inputs


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


def _release_unchanged(d: Deployment, session: AgentSession, primary: str, inputs: str | None) -> bool:
    """True (and said) when the release hook's inputs are those it last ran with on the primary."""
    if inputs is None:
        return False
    started = time.monotonic()
    if last_run_inputs(session, timeout(d)) != inputs:
        return False
    d.release_inputs, d.tried_release_hook = inputs, True
    d.fleet.timings.setdefault(primary, {})["release"] = round(time.monotonic() - started, 3)
    patterns = ", ".join(d.ctx.project.deploy.hooks.release_if_changed)
    d.fleet.emit(Event("release", "skipped", host=primary,
                       detail=f"nothing the release hook depends on ({patterns}, config) changed since it last ran"))
    return True
