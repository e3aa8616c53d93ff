"""``shiplane tasks`` and ``shiplane run TASK``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from shiplane.commands.check import graph_from_project
from shiplane.commands.common import open_stage
from shiplane.config import env_file_values, load_project
from shiplane.errors import OperationError, UsageError
from shiplane.events import Emit, Event
from shiplane.secret import Masker
from shiplane.tasks import Task, TaskGraph, run_graph, run_local_command


def task_graph(file: Path | None) -> TaskGraph:
    return graph_from_project(load_project(file))


def run_user_task(
    file: Path | None,
    name: str,
    stage: str | None,
    masker: Masker,
    emit: Emit,
    *,
    verbose: bool = False,
    force: bool = False,
    hosts: str | None = None,
    sets: Sequence[str] = (),
) -> None:
    """Run a task and what it needs; independent tasks in parallel; exit 1 naming the failed task."""
    project = load_project(file)
    if name == "setup" and project.deploy.hooks.setup and "setup" not in project.deploy.tasks:
        from shiplane.commands.remote_tasks import run_setup_hook

        run_setup_hook(
            file, stage, masker, emit, verbose=verbose, force=force, hosts=hosts, sets=sets
        )
        return
    graph = graph_from_project(project)
    graph.task(name)  # unknown name -> exit 2 with "did you mean"
    names = graph.closure([name])
    remote = [n for n in names if graph.task(n).builtin or graph.task(n).on != "local"]
    if remote:
        from shiplane.commands.remote_tasks import run_remote_tasks

        run_remote_tasks(
            file,
            graph,
            names,
            stage,
            masker,
            emit,
            verbose=verbose,
            force=force,
            hosts=hosts,
            sets=sets,
        )
        return
    context = (
        open_stage(file, stage, masker, hosts=hosts, sets=sets)
        if (stage or os.environ.get("SHIPLANE_STAGE"))
        else None
    )
    env = {**os.environ, **(env_file_values(context.layered) if context else {})}

    def runner(task: Task) -> None:
        assert task.run is not None
        spec = project.deploy.tasks[task.name]
        run_local_command(
            task.run,
            cwd=project.root,
            env=env,
            timeout=spec.timeout,
            output=lambda line: emit(Event(task.name, "output", detail=line)),
        )

    def on_event(task_name: str, status: str, seconds: float) -> None:
        emit(Event(task_name, status, seconds=seconds if status != "start" else None))

    result = run_graph(graph, names, runner, on_event=on_event)
    if not result.ok:
        failed = result.failed[0]
        error = result.outcomes[failed].error or "failed"
        skipped = [n for n, o in result.outcomes.items() if o.status == "skipped"]
        more = f"; not run because of it: {', '.join(skipped)}" if skipped else ""
        raise OperationError(f"task {failed!r} failed: {error}{more}")


__all__ = ["UsageError", "run_user_task", "task_graph"]
