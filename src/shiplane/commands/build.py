"""``shiplane build|compile|pack|clean|test``: the artifact and the test gate."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypedDict

from shiplane.artifact import (
    BuildResult,
    BuildSpec,
    GitInfo,
    Interpreter,
    build,
    check_entry,
    clean,
    compile_app,
    export_ref,
    pack,
    remove_cache,
    run_gate,
)
from shiplane.config import Project, load_project
from shiplane.config.loader import find_deploy_file
from shiplane.config.secrets import resolve_build_secrets
from shiplane.errors import ConfigError
from shiplane.events import Emit, Event


def build_spec(
    project: Project, ref: str | None = None, git: GitInfo | None = None, stage: str | None = None
) -> BuildSpec:
    """The build of ``project``'s checkout; with ``ref``, of that commit's files (``deploy
    --ref``): exported under ``.shiplane/build/refs/<sha>``, the deploy file and config files
    staying the checkout's. ``stage``: where ``[build] secrets`` are looked for beside the
    environment."""
    deploy = project.deploy
    secrets = resolve_build_secrets(deploy, stage, project.root) if deploy.build.secrets else {}
    tree = export_ref(project.root, ref, project.root / ".shiplane" / "build") if ref else None
    servers: tuple[str, ...] = ()
    if "web" in deploy.services:
        servers = ("gunicorn", "uvicorn") if deploy.app.asgi else ("gunicorn",)
    return BuildSpec(
        project=project.root,
        app_name=deploy.app.name,
        source=deploy.app.source,
        requirements=deploy.build.requirements,
        include=tuple(deploy.build.include),
        exclude=tuple(deploy.build.exclude),
        config_files=tuple(deploy.config.files),
        shared=(*deploy.shared.dirs, *deploy.shared.files),
        server_packages=servers,
        python_version=deploy.build.python_version,
        platform=deploy.build.platform,
        ref_tree=tree,
        git=git,
        secrets=tuple(secrets.values()),
    )


def build_for_deploy(
    project: Project,
    emit: Emit,
    ref: str | None = None,
    git: GitInfo | None = None,
    hosts: Callable[[], Mapping[str, Interpreter]] | None = None,
    stage: str | None = None,
) -> BuildResult:
    """Build (or reuse) the artifact for these inputs (``ref``: of that commit's files; ``git``:
    what git said of the checkout just before, when nothing ran since; ``hosts``: the hosts'
    interpreters, asked once the files are read, each given its own wheelhouse)."""
    spec = build_spec(project, ref, git, stage)
    return build(spec, on_event=_progress(emit), hosts=hosts)


def gate(
    project: Project, verbose: bool, emit: Emit, ref: str | None = None, stage: str | None = None
) -> None:
    """The test gate on the checkout, or with ``ref`` on that commit's export (what ships);
    ``stage``: where ``[build] secrets`` (a private index's token) are looked for."""
    deploy = project.deploy
    secrets = resolve_build_secrets(deploy, stage, project.root) if deploy.build.secrets else {}
    assert deploy.build.test
    root = (
        export_ref(project.root, ref, project.root / ".shiplane" / "build").root
        if ref
        else project.root
    )
    run_gate(
        root,
        deploy.build.test,
        deploy.build.requirements,
        extra=tuple(deploy.build.test_requirements),
        output=lambda line: emit(Event("gate", "output", detail=line)),
        secrets=tuple(secrets.values()),
    )
    # the tests passed; the entry gunicorn/uvicorn will load must be there too (a typo in
    # app.wsgi would otherwise fail only at the hosts' health check)
    key, entry = ("asgi", deploy.app.asgi) if deploy.app.asgi else ("wsgi", deploy.app.wsgi)
    if entry:
        check_entry(
            root,
            entry,
            key,
            deploy.build.requirements,
            tuple(deploy.build.test_requirements),
        )


def run_test_gate(file: Path | None, emit: Emit) -> None:
    project = load_project(file)
    if not project.deploy.build.test:
        from shiplane.errors import UsageError

        raise UsageError(f"{project.path}: build.test is not set, so there is no test gate to run")
    gate(project, True, emit)


class Compiled(TypedDict):
    """``shiplane compile``: what was compiled (the app's wheel or source tree)."""

    ok: bool
    summary: str
    result: str


class Built(TypedDict):
    """``shiplane build`` and ``pack``: the artifact's digest, and how it came to be."""

    ok: bool
    digest: str
    reused: bool
    seconds: float
    dependency_digest: str | None
    git_commit: str | None
    files: int


def _progress(emit: Emit) -> Callable[[str, str], None]:
    """Build steps as events: progress (shown with -v), but a warning (a lock that does not pin
    the build) is shown always."""

    def event(step: str, detail: str) -> None:
        if step == "warning":
            emit(Event("build", "warning", detail=detail))
        else:
            emit(Event("build", "progress", detail=f"{step}: {detail}"))

    return event


def compile_artifact(file: Path | None, emit: Emit) -> Compiled:
    result = compile_app(build_spec(load_project(file)), on_event=_progress(emit))
    return {"ok": True, "summary": str(result), "result": str(result)}


def build_artifact(file: Path | None, emit: Emit, *, step: str) -> Built:
    """``step`` "build" (or reuse) the artifact, or "pack" its second half."""
    spec = build_spec(load_project(file))
    runner = pack if step == "pack" else build
    done = runner(spec, on_event=_progress(emit))
    manifest = done.manifest.to_dict()
    return {
        "ok": True,
        "digest": done.digest,
        "reused": done.reused,
        "seconds": round(done.seconds, 3),
        "dependency_digest": manifest.get("dependency_digest"),
        "git_commit": manifest.get("git_commit"),
        "files": len(manifest.get("app_files", [])) + len(manifest.get("dependencies", [])),
    }


def clean_build(file: Path | None, cache: bool = False) -> list[str]:
    """What ``shiplane clean`` removed: the project's build output; with ``cache`` also the
    per-user cache (wheelhouses, bytecode, tools, build envs shared by every project), which
    may be cleaned from anywhere, in a project or not."""
    removed: list[str] = []
    if file is None:
        try:
            file = find_deploy_file(Path.cwd())
        except ConfigError:  # not in a project: only the cache, if that was asked
            if not cache:
                raise
    if file is not None:
        removed += [str(path) for path in clean(load_project(file).root)]
    if cache and (gone := remove_cache()) is not None:
        path, size = gone
        removed.append(f"{path} ({size / (1 << 20):.1f} MiB)")
    return removed
