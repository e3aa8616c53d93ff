"""``shiplane run`` for tasks that run on the stage's hosts (scopes all, primary, role:NAME):
each in the live release's directory, with its venv and environment, through the agent."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shiplane.commands.operate import connected
from shiplane.errors import OperationError, UsageError
from shiplane.events import Emit, Event
from shiplane.fleet import failures
from shiplane.plan import role_hosts
from shiplane.secret import Masker
from shiplane.tasks import Task, TaskGraph, run_graph, run_local_command


def run_remote_tasks(
    file: Path | None,
    graph: TaskGraph,
    names: list[str],
    stage: str | None,
    masker: Masker,
    emit: Emit,
    *,
    verbose: bool,
    force: bool,
    hosts: str | None,
    sets: Sequence[str],
) -> None:
    builtin = [n for n in names if graph.task(n).builtin]
    if builtin:
        raise UsageError(
            f"task {names[-1]!r} needs pipeline step(s) {', '.join(builtin)}, which run only as part of "
            f"`shiplane deploy`; hook it into the pipeline with before/after instead"
        )
    with connected(file, stage, masker, hosts=hosts, sets=sets, need_secrets=True) as (ctx, fleet):
        fleet.emit = emit
        deploy = ctx.project.deploy

        def runner(task: Task) -> None:
            assert task.run is not None
            timeout = deploy.tasks[task.name].timeout or deploy.hooks.timeout
            if task.on == "local":
                import os

                from shiplane.config import env_file_values

                run_local_command(
                    task.run,
                    cwd=ctx.project.root,
                    env={**os.environ, **env_file_values(ctx.layered)},
                    timeout=timeout,
                    output=lambda line: emit(Event(task.name, "output", detail=line)),
                )
                return
            targets = role_hosts(deploy, ctx.stage, fleet.hosts, task.on)
            if not targets:
                raise OperationError(f"scope {task.on!r} names no host of stage {ctx.stage!r}")
            outcomes = fleet.each(
                task.name,
                lambda h, s: _hook_in_current(
                    s, task.run or "", timeout, fleet.forward(h, task.name)
                ),
                hosts=targets,
            )
            bad = failures(outcomes)
            if bad:
                raise OperationError("; ".join(e.message for e in bad.values()))

        result = run_graph(
            graph,
            names,
            runner,
            on_event=lambda n, st, sec: emit(Event(n, st, seconds=sec if st != "start" else None)),
        )
        if not result.ok:
            failed = result.failed[0]
            raise OperationError(f"task {failed!r} failed: {result.outcomes[failed].error}")


def _hook_in_current(session: Any, command: str, timeout: float, on_event: Any) -> Any:
    inventory = session.call("inventory", {"blobs": []})
    current = inventory.get("current")
    if not current:
        raise OperationError("nothing is deployed on this host yet")
    return session.call(
        "hook",
        {"release_id": current, "command": command, "timeout": timeout},
        on_event=on_event,
        timeout=timeout + 30,
    )


def run_setup_hook(
    file: Path | None,
    stage: str | None,
    masker: Masker,
    emit: Emit,
    *,
    verbose: bool,
    force: bool,
    hosts: str | None,
    sets: Sequence[str],
) -> None:
    """``shiplane run setup``: the ``hooks.setup`` command, once, on the primary host, in the live
    release, under the deploy lock. It ran on the stage's first deploy and is destructive, so a
    rerun needs ``--force``; the rerun is recorded in the ledgers like a deploy."""
    import json
    import os
    import sys
    import time

    from shiplane.fleet import local_ledger
    from shiplane.plan import primary_host
    from shiplane.whoami import holder

    with connected(file, stage, masker, hosts=hosts, sets=sets, need_secrets=True) as (ctx, fleet):
        deploy = ctx.project.deploy
        command = deploy.hooks.setup or ""
        primary = primary_host(deploy, ctx.stage, fleet.hosts)
        session = fleet.sessions[primary]
        inventory = session.call("inventory", {"blobs": []})
        current = inventory.get("current")
        if not current:
            raise OperationError(
                f"nothing is deployed on {primary} yet",
                hint="the first `shiplane deploy` runs the setup hook",
            )
        if inventory.get("setup_done") and not force:
            raise UsageError(
                f"the setup hook `{command}` already ran on stage {ctx.stage!r} (first deploy); "
                "it may destroy data",
                hint="rerun it deliberately with --force",
            )
        fleet.emit = emit
        who = holder(" ".join(["shiplane", *sys.argv[1:]]), os.getpid()).to_json()
        started = time.time()
        session.call("lock", {"holder": who, "wait": 0})
        error: str | None = None
        try:
            emit(Event("setup", "start", host=primary, detail=command))
            _hook_in_current(
                session, command, deploy.hooks.timeout, fleet.forward(primary, "setup")
            )
        except OperationError as exc:
            error = exc.message
        finally:
            entry = {
                "event": "setup",
                "stage": ctx.stage,
                "release": current,
                "setup": error is None,
                "forced": force,
                "command": command,
                "outcome": "ok" if error is None else "failed",
                "error": error,
                "user": who["user"],
                "controller": who["host"],
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "duration": round(time.time() - started, 3),
            }
            fleet.each("record", lambda h, s: s.call("record", {"entry": entry}), quiet=True)
            session.call("unlock", {"force": False})
            ledger = local_ledger(ctx.project, ctx.stage)
            ledger.parent.mkdir(parents=True, exist_ok=True)
            with ledger.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
        if error is not None:
            raise OperationError(f"setup hook `{command}` failed on {primary}: {error}")
        emit(Event("setup", "ok", host=primary, seconds=time.time() - started))
