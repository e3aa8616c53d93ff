"""The release phase of a deploy: the setup hook on a stage's first deploy, then the release hook
(migrations), once, on the primary host, before any host switches -- or skipped when what it
depends on is unchanged (``hooks.release_if_changed``, release_inputs.py)."""

from __future__ import annotations

import time

from shiplane.commands.deployment import Deployment, timeout
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
    if d.resumed_release_hook:
        d.ran_release_hook = True
    elif deploy.hooks.release_commands() and not _release_unchanged(d, session, primary):
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
        d.release_inputs = _inputs(d)  # every command succeeded: the database is at these inputs


def _inputs(d: Deployment) -> str | None:
    """The release hook's inputs digest when this deploy built its artifact from the checkout
    and the deploy file names them (``hooks.release_if_changed``); else None."""
    hooks = d.ctx.project.deploy.hooks
    if not hooks.release_if_changed or d.options.artifact or d.options.retry_failed:
        return None
    return inputs_digest(d.ctx.project.root, hooks.release_if_changed, hooks.release_commands(), d.ctx.layered)


def _release_unchanged(d: Deployment, session: AgentSession, primary: str) -> bool:
    """True (and said) when the release hook's inputs are those it last ran with on the primary."""
    inputs = _inputs(d)
    if inputs is None:
        return False
    started = time.monotonic()
    # the newest entries suffice: a digest older than that only means the hook runs once more
    entries = session.call("history", {"limit": 500}, timeout=timeout(d)).get("entries", [])
    if last_inputs(entries) != inputs:
        return False
    d.release_inputs, d.tried_release_hook = inputs, True
    d.fleet.timings.setdefault(primary, {})["release"] = round(time.monotonic() - started, 3)
    patterns = ", ".join(d.ctx.project.deploy.hooks.release_if_changed)
    d.fleet.emit(Event("release", "skipped", host=primary,
                       detail=f"nothing the release hook depends on ({patterns}, config) changed since it last ran"))
    return True
