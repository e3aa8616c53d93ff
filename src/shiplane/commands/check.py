"""``shiplane check`` and ``shiplane config show``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from shiplane.artifact import check_warnings, describe_lock, describe_packages
from shiplane.commands.common import open_stage
from shiplane.config import Layered, build_layers, load_project
from shiplane.config.layers import layer_files, render_files
from shiplane.errors import ConfigError
from shiplane.secret import Masker
from shiplane.tasks import Task, TaskGraph


class StageCheck(TypedDict):
    hosts: list[str]
    config_files: list[str]
    # the interpreter each host runs the agent and its venvs with (the deploy resolves the
    # wheelhouse for what it reports: docs/hosts.md, "Hosts on other Pythons")
    python: dict[str, str]


class CheckResult(TypedDict):
    """``shiplane check --json``'s result, before the CLI adds its ``lines``: the deploy file,
    the app's source (and why), each stage's hosts and config files."""

    ok: bool
    file: str
    source: str
    source_reason: str
    lock: str
    lock_warnings: list[str]  # a lock that does not pin everything, or no lock committed
    # where the build takes packages from (find-links, indexes, offline) and the host tools
    packages: str
    stages: dict[str, StageCheck]


@dataclass(frozen=True)
class StageWhere:
    """Where a stage deploys: this machine (``local``) or its hosts, into ``deploy_to``."""

    local: bool
    deploy_to: str


@dataclass(frozen=True)
class ProjectCheck:
    """What ``check`` returns; the CLI renders it (``ui.check_lines``) or prints ``to_json()``."""

    report: CheckResult
    app: str
    where: dict[str, StageWhere]

    def to_json(self) -> CheckResult:
        return self.report


def check_project(file: Path | None) -> ProjectCheck:
    """Validate the deploy file, the task graph and every stage's config layers, offline.

    Secrets are not required here (they may live only in CI); their absence is reported as a note.
    """
    project = load_project(file)
    deploy = project.deploy
    graph_from_project(project)
    source, reason = _source(project)
    lock = describe_lock(project.root, deploy.build.requirements)  # none: ConfigError, exit 2
    lock_warnings = check_warnings(project.root, deploy.build.requirements)
    packages = describe_packages(project.root, deploy.build.requirements)
    stages: dict[str, StageCheck] = {}
    where: dict[str, StageWhere] = {}
    for name, stage in deploy.stages.items():
        layered = build_layers(project, name, {})
        render_files(project, layered) if not deploy.config.secrets else None
        files = [str(p.relative_to(project.root)) for p in layer_files(project, name)]
        where[name] = StageWhere(local=stage.is_local, deploy_to=f"{stage.deploy_to}")
        stages[name] = {
            "hosts": list(stage.hosts),
            "config_files": files,
            "python": {h: stage.python_of(h, deploy.app.python) for h in stage.hosts},
        }
    report: CheckResult = {
        "ok": True,
        "file": str(project.path),
        "source": source,
        "source_reason": reason,
        "lock": lock,
        "lock_warnings": lock_warnings,
        "packages": packages,
        "stages": stages,
    }
    return ProjectCheck(report=report, app=deploy.app.name, where=where)


def _source(project: Any) -> tuple[str, str]:
    if project.deploy.app.source:
        return project.deploy.app.source, "set in shiplane.toml"
    try:
        from shiplane.artifact import detect_source
    except ImportError:  # pragma: no cover - during bootstrap of the package
        return "package", "default"
    return detect_source(project.root)


def graph_from_project(project: Any) -> TaskGraph:
    """The task graph of the deploy file; GraphError (exit 2) when names are unknown or cyclic."""
    user = {
        name: Task(
            name=name,
            run=spec.run,
            on=spec.on,
            needs=tuple(spec.needs),
            before=tuple(spec.before),
            after=tuple(spec.after),
        )
        for name, spec in project.deploy.tasks.items()
    }
    try:
        graph = TaskGraph.build(user)
        graph.deploy_points()  # a task hooked inside the lock/copy/install chain is refused here
        return graph
    except ConfigError as exc:
        raise type(exc)(f"{project.path}: {exc.message}", hint=exc.hint) from None


def show_config(
    file: Path | None,
    stage: str | None,
    masker: Masker,
    *,
    hosts: str | None = None,
    sets: Sequence[str] = (),
) -> Layered:
    """The merged config and environment of one stage (secrets resolved, and masked on output)."""
    return open_stage(file, stage, masker, hosts=hosts, sets=sets).layered
