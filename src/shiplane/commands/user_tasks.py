"""User tasks hooked into a deploy (``[tasks.NAME]`` with ``before``/``after`` a pipeline step): run
at their point of the pipeline, locally or on the stage's hosts by their scope, their output
streamed and their failure stopping the deploy as a hook's does (``TaskGraph.deploy_points``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from shiplane.commands.deployment import Deployment, healthy
from shiplane.config import env_file_values
from shiplane.errors import OperationError
from shiplane.events import Event
from shiplane.fleet import failures
from shiplane.plan import role_hosts
from shiplane.tasks import Task, TaskGraph, run_graph, run_local_command
from shiplane.transport.session import AgentSession


def run_point(d: Deployment, graph: TaskGraph, names: Sequence[str], *, installed: bool) -> None:
    """Run the user tasks hooked at one point, independent ones at once. On hosts they run in the
    new release (``installed``: the point is after install) or in the live one (before it)."""
    if not names:
        return
    deploy, emit = d.ctx.project.deploy, d.fleet.emit

    def runner(task: Task) -> None:
        assert task.run is not None
        timeout = deploy.tasks[task.name].timeout or deploy.hooks.timeout
        if task.on == "local":
            run_local_command(
                task.run,
                cwd=d.ctx.project.root,
                env={**os.environ, **env_file_values(d.ctx.layered)},
                timeout=timeout,
                output=lambda line: emit(Event(task.name, "output", detail=line)),
            )
            return
        targets = role_hosts(deploy, d.ctx.stage, healthy(d), task.on)
        if not targets:
            raise OperationError(f"scope {task.on!r} names no host of stage {d.ctx.stage!r}")

        def on_host(host: str, session: AgentSession) -> object:
            release = (
                d.rid if installed else session.call("inventory", {"blobs": []}).get("current")
            )
            if not release:
                raise OperationError(
                    f"task {task.name!r} runs before install, and nothing is deployed on {host} yet; "
                    'hook it after = ["install"] to run it in the new release'
                )
            return session.call(
                "hook",
                {
                    "release_id": release,
                    "command": task.run,
                    "timeout": timeout,
                    "silence_timeout": deploy.hooks.silence_timeout,
                },
                on_event=d.fleet.forward(host, task.name),
                timeout=timeout + 30,
            )

        bad = failures(d.fleet.each(task.name, on_host, hosts=targets))
        if bad:
            raise OperationError("; ".join(f"{h}: {e.reason}" for h, e in bad.items()))

    result = run_graph(
        graph,
        list(names),
        runner,
        on_event=lambda n, st, sec: emit(Event(n, st, seconds=sec if st != "start" else None)),
    )
    if not result.ok:
        failed = result.failed[0]
        raise OperationError(f"task {failed!r} failed: {result.outcomes[failed].error}")
