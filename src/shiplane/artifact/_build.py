"""`shiplane build`: the app (wheel or tree) + wheelhouse + tools + config -> one manifest.

Everything is content-addressed: files go into the BlobStore by sha256, the manifest is named
by the sha256 of its canonical JSON, and the inputs (source files, lock, settings, target) are
digested first so an unchanged project reuses its artifact without doing any other work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from packaging.utils import parse_wheel_filename

from ..errors import OperationError
from ..secret import Secret
from . import _bytecode as bytecode
from ._backend import app_wheel
from ._cache import cache_root, cached_sha256
from ._gitref import RefTree
from ._index import PackageAccess
from ._interpreters import (
    Interpreter,
    checked_wheelhouse,
    controller_interpreter,
    distinct,
    target_of,
)
from ._manifest import (
    FileEntry,
    Manifest,
    TargetEntry,
    dependency_digest,
    read_manifest_file,
    write_manifest,
)
from ._source import GitInfo, detect_source, git_info, is_forbidden, list_source_files, matches
from ._store import BlobStore, sha256_file
from ._tools import TOOLS, tool_wheels
from ._wheelcheck import lock_requirements
from ._wheelhouse import (
    Lock,
    Target,
    load_lock,
    pinned,
    resolve_target,
)

# Bumped when what an artifact contains changes, so old input digests stop matching.
BUILD_FORMAT = 1
# Never shipped nor handed to a build backend, whatever git tracks: conventional secret files.
SECRET_FILES = (".env", ".env.*")

EventSink = Callable[[str, str], None]
# the hosts' interpreters by host name, asked once the project's files are read (the deploy
# connects to the hosts meanwhile); empty or None: the target is the deploy file's or ours
Hosts = Callable[[], Mapping[str, Interpreter]]


@dataclass(frozen=True)
class BuildSpec:
    """What to build. Paths in the globs and lists are relative to ``project``."""

    project: Path
    app_name: str
    source: Literal["package", "tree", "none"] | None  # None: detect_source()
    # the lock: requirements.txt (hashes honoured), uv.lock, poetry.lock, pdm.lock, Pipfile.lock
    # or pyproject.toml (artifact/_locks.py); "": the first of those found in the project
    requirements: str
    include: tuple[str, ...] = ()  # extra files shipped beside the app (globs)
    exclude: tuple[str, ...] = ()  # removed from a tree app (and from include matches)
    config_files: tuple[str, ...] = ()  # config templates; "{stage}" expands to every stage
    # [shared] dirs/files: they live on the hosts and replace any shipped copy, so the checkout's
    # own (a developer's db.sqlite3, uploads) never ships
    shared: tuple[str, ...] = ()
    server_packages: tuple[str, ...] = ("gunicorn",)
    python_version: str | None = None  # the hosts' "3.11"; None = the controller's
    platform: str | None = None  # the hosts' platform tag; None = the controller's
    # deploy --ref: the app's files, lock and includes come from this export of a commit (its
    # sha is the artifact's git_commit); the config files stay the checkout's, as the deploy file
    ref_tree: RefTree | None = None
    # what git said of the checkout a moment ago, when the caller asked it and nothing ran
    # since (deploy's source check, without a gate or a task before the build): not asked again
    git: GitInfo | None = None
    # [build] secrets (a private index's token): in pip's environment only, in no digest
    secrets: tuple[Secret, ...] = ()


@dataclass
class BuildResult:
    """A built (or reused) artifact."""

    manifest: Manifest
    digest: str
    reused: bool
    seconds: float
    store: BlobStore


@dataclass(frozen=True)
class CompiledApp:
    """The app half of an artifact: its wheel or tree files, already in the store."""

    source: str
    reason: str
    version: str | None
    files: tuple[FileEntry, ...]


@dataclass(frozen=True)
class _Layout:
    root: Path  # .shiplane/build

    @property
    def store(self) -> BlobStore:
        return BlobStore(self.root / "blobs")


@dataclass
class _Plan:
    """Every decision about which files go in, made before anything is built."""

    project: Path  # where the app's files are read: the checkout, or a --ref export
    source: str
    reason: str
    files: list[str]  # the project's source files (git-aware)
    app_files: list[str]  # tree: the files shipped; package/none: []
    includes: list[str]
    config: list[str]
    lock: Lock | None
    git_commit: str | None
    target: Target  # the first of ``targets``
    inputs_digest: str = field(default="")
    # every interpreter the wheelhouse is resolved for, with the hosts that run it (none: the
    # deploy file's [build] target, or this controller's)
    targets: list[tuple[Target, list[str]]] = field(default_factory=list)
    file_shas: dict[str, str] = field(default_factory=dict)  # rel -> sha256, hashed once
    config_root: Path | None = None  # where the config files are read, when not ``project``


def _noop(step: str, detail: str) -> None:
    pass


def _layout(spec: BuildSpec, build_dir: Path | None) -> _Layout:
    root = Path(build_dir) if build_dir else Path(spec.project) / ".shiplane" / "build"
    return _Layout(root.resolve())


def _relative(project: Path, path: Path, what: str) -> str:
    """``path`` relative to the project, refusing anything outside it."""
    rel = os.path.relpath(path, project).replace(os.sep, "/")
    if rel == ".." or rel.startswith("../"):
        raise OperationError(f"{what} {rel} is outside the project {project}")
    return rel


def _is_shared(spec: BuildSpec, rel: str) -> bool:
    """True for a path at or below a shared dir/file (exact paths, not globs)."""
    return any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in spec.shared)


def _select_includes(project: Path, files: list[str], spec: BuildSpec) -> list[str]:
    chosen: set[str] = set()
    for pattern in spec.include:
        found = {f for f in files if matches(pattern, f)}
        if not found:
            # Generated files (built assets) are often git-ignored: look on disk too.
            for p in project.glob(pattern.strip("/")):
                for f in [p] if p.is_file() else (x for x in p.rglob("*") if x.is_file()):
                    rel = _relative(project, f, "build include")
                    if not is_forbidden(rel):
                        found.add(rel)
        if not found:
            raise OperationError(
                f"build include {pattern!r} matches no file in {project}",
                hint="fix the pattern or remove it from [build] include",
            )
        chosen |= found
    return sorted(
        f
        for f in chosen
        if not any(matches(x, f) for x in spec.exclude) and not _is_shared(spec, f)
    )


def _select_config(project: Path, spec: BuildSpec) -> list[str]:
    chosen: set[str] = set()
    for name in spec.config_files:
        if "{stage}" in name:
            found = [p for p in project.glob(name.replace("{stage}", "*")) if p.is_file()]
        else:
            found = [project / name] if (project / name).is_file() else []
            if not found:
                raise OperationError(
                    f"config file {name} does not exist in {project}",
                    hint="create it or remove it from [config] files",
                )
        for p in found:
            rel = _relative(project, p, "config file")
            if is_forbidden(rel):
                raise OperationError(
                    f"config file {rel} is inside {rel.split('/')[0]}/, "
                    "which never ships (secrets live outside the artifact)"
                )
            chosen.add(rel)
    return sorted(chosen)


def _targets(spec: BuildSpec, hosts: Hosts | None) -> list[tuple[Target, list[str]]]:
    """What the wheelhouse is resolved for: ``[build] python_version``/``platform`` when the
    deploy file sets them (one target, any patch release); else each distinct interpreter the
    hosts run (their markers evaluated for its full version); else this controller's own (the
    same artifact as a deploy to the local stage)."""
    if spec.python_version or spec.platform:
        return [(resolve_target(spec.python_version, spec.platform), [])]
    known = distinct(hosts()) if hosts is not None else []
    if not known:  # `shiplane build`: as a deploy to this machine's local stage builds it
        return [(target_of(controller_interpreter()), [])]
    return [(target_of(interp), names) for interp, names in known]


def _plan(
    spec: BuildSpec,
    *,
    with_lock: bool = True,
    hosts: Hosts | None = None,
    files_read: Callable[[_Plan], None] | None = None,
) -> _Plan:
    """What to build; ``files_read(plan)`` is called once the project's files are read and
    hashed, before the hosts' interpreters are asked for (which may wait for their hello)."""
    project = Path(spec.project).resolve()
    if not project.is_dir():
        raise OperationError(f"project directory {project} does not exist")
    checkout, tree = project, spec.ref_tree
    if tree is not None:  # deploy --ref: the app's files as that commit has them
        project = tree.root
    listed = list(tree.files) if tree is not None else list_source_files(project)
    if spec.source is None:
        # ``listed`` is list_source_files' answer, which already refused an ignored project (it
        # lists files only when git tracks some): not asked of git again (issue 21)
        source, reason = detect_source(project, listed)
    else:
        source, reason = spec.source, "set in the deploy file"
    # shared paths are neither shipped, digested nor handed to a build backend
    files = [f for f in listed if not _is_shared(spec, f)]
    app_files: list[str] = []
    if source == "tree":
        drop = (*SECRET_FILES, *spec.exclude)
        app_files = [f for f in files if not any(matches(x, f) for x in drop)]
    # compile_app alone needs no lock: the app is built without its dependencies
    lock = load_lock(project, spec.requirements) if with_lock else None
    if lock is not None:
        lock.secrets = spec.secrets
    plan = _Plan(
        project,
        source,
        reason,
        files,
        app_files,
        _select_includes(project, files, spec),
        _select_config(checkout, spec),
        lock,
        tree.commit if tree is not None else (spec.git or git_info(project)).commit,
        resolve_target(spec.python_version, spec.platform),
        config_root=checkout if tree is not None else None,
    )
    _hash_files(plan)  # while the deploy still connects to the hosts
    if files_read is not None:
        files_read(plan)
    plan.targets = _targets(spec, hosts)
    plan.target = plan.targets[0][0]
    plan.inputs_digest = _inputs_digest(spec, plan)
    return plan


def _hash_files(plan: _Plan) -> None:
    config = [] if plan.config_root else plan.config
    for rel in sorted({*plan.files, *plan.includes, *config}):
        plan.file_shas[rel] = sha256_file(plan.project / rel)[0]


def _inputs_digest(spec: BuildSpec, plan: _Plan) -> str:
    h = hashlib.sha256()
    settings = {
        "format": BUILD_FORMAT,
        "app": spec.app_name,
        "source": plan.source,
        "requirements": spec.requirements,
        "include": list(spec.include),
        "exclude": list(spec.exclude),
        "shared": list(spec.shared),
        "config_files": list(spec.config_files),
        "server_packages": list(spec.server_packages),
        "target": plan.target.to_dict(),
        "targets": [t.to_dict() for t, _ in plan.targets[1:]],
        "tools": [[t.name, t.version] for t in TOOLS],
        "git_commit": plan.git_commit,
        "bytecode": bytecode.wanted(plan.target),
    }
    h.update(json.dumps(settings, sort_keys=True).encode() + b"\0")
    h.update(plan.lock.data if plan.lock else b"")
    config = [] if plan.config_root else plan.config
    for rel in sorted({*plan.files, *plan.includes, *config}):
        if rel not in plan.file_shas:
            plan.file_shas[rel] = sha256_file(plan.project / rel)[0]
        h.update(f"\0{rel}\0{plan.file_shas[rel]}".encode())
    if plan.config_root:  # --ref: the checkout's config files, apart from the commit's files
        for rel in plan.config:
            h.update(f"\0config\0{rel}\0{sha256_file(plan.config_root / rel)[0]}".encode())
    return h.hexdigest()


def _app_wheel(plan: _Plan, store: BlobStore, emit: EventSink) -> FileEntry:
    sources = [rel for rel in plan.files if not any(matches(x, rel) for x in SECRET_FILES)]
    # the build backend's requirements come from where the lock's do (its index options)
    access = PackageAccess.of(plan.lock.lines, plan.lock.secrets) if plan.lock else None
    return app_wheel(plan.project, sources, plan.file_shas, store, emit, access)


def _check_app_platform(plan: _Plan, app: CompiledApp) -> None:
    """A platform-specific app wheel runs only where it was built (known once the hosts are)."""
    for entry in app.files:
        if entry.kind != "wheel":
            continue
        tags = parse_wheel_filename(entry.path)[3]
        if not plan.target.native and any(t.platform != "any" for t in tags):
            raise OperationError(
                f"the app wheel {entry.path} is platform-specific and cannot be "
                f"built here for {plan.target.platform} / Python "
                f"{plan.target.python_version}",
                hint="build on a machine like the hosts",
            )


def _compile(plan: _Plan, store: BlobStore, emit: EventSink) -> CompiledApp:
    entries: list[FileEntry] = []
    version: str | None = None
    if plan.source == "package":
        wheel = _app_wheel(plan, store, emit)
        version = str(parse_wheel_filename(wheel.path)[1])
        entries.append(wheel)
    elif plan.source == "tree":
        emit("tree", f"{len(plan.app_files)} files")
    elif plan.source != "none":
        raise OperationError(
            f"unknown app source {plan.source!r}", hint="use one of: package, tree, none"
        )
    for rel in sorted({*plan.app_files, *plan.includes}):
        sha, size = store.put_file(plan.project / rel)
        entries.append(FileEntry(rel, sha, size, "file"))
    return CompiledApp(plan.source, plan.reason, version, tuple(entries))


def compile_app(
    spec: BuildSpec, *, build_dir: Path | None = None, on_event: EventSink | None = None
) -> CompiledApp:
    """The article's `make compile`: the app's wheel (package) or its tree files, stored."""
    plan = _plan(spec, with_lock=False)
    app = _compile(plan, _layout(spec, build_dir).store, on_event or _noop)
    _check_app_platform(plan, app)
    return app


def _pack(
    spec: BuildSpec,
    plan: _Plan,
    layout: _Layout,
    emit: EventSink,
    started: float,
    app_job: Future[CompiledApp] | None = None,
) -> BuildResult:
    store = layout.store
    shared = cache_root()
    house = (
        shared / "wheelhouse"
        if pinned(plan.lock, spec.server_packages)
        else layout.root / "wheelhouse"
    )
    # The app wheel and the tools do not wait for pip: on a cold cache each takes a core.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="shiplane-build") as pool:
        if app_job is None:
            app_job = pool.submit(_compile, plan, store, emit)
        tools_job = pool.submit(tool_wheels, shared / "tools", emit)
        # one wheelhouse per interpreter the hosts run, each checked before anything is sent
        houses = [
            checked_wheelhouse(plan.lock, target, hosts, spec.server_packages, house, emit)
            for target, hosts in plan.targets
        ]
        app, tool_files = app_job.result(), tools_job.result()
    _check_app_platform(plan, app)
    entries = [
        _dependencies(target, wheels, store, emit)
        for (target, _), wheels in zip(plan.targets, houses)
    ]
    deps = list(entries[0].dependencies)
    tools = [
        FileEntry(w.name, *store.put_file(w, link=True, digest=cached_sha256)) for w in tool_files
    ]
    config_root = plan.config_root or plan.project
    config = [FileEntry(rel, *store.put_file(config_root / rel)) for rel in plan.config]
    manifest = Manifest(
        app_name=spec.app_name,
        app_version=app.version,
        source=app.source,
        app_files=app.files,
        dependencies=tuple(deps),
        dependency_digest=dependency_digest(deps),
        tools=tuple(tools),
        config_files=tuple(config),
        git_commit=plan.git_commit,
        built_at=_source_date(plan),
        target=plan.target.to_dict(),
        targets=tuple(entries) if len(entries) > 1 else (),
        requires=tuple(lock_requirements(plan.lock)),
    )
    write_manifest(layout.root / "artifacts", manifest)
    _record_inputs(layout, plan.inputs_digest, manifest.digest)
    emit("manifest", manifest.digest)
    return BuildResult(manifest, manifest.digest, False, time.monotonic() - started, store)


def _dependencies(
    target: Target, wheels: list[Path], store: BlobStore, emit: EventSink
) -> TargetEntry:
    """One target's wheels in the store (and their bytecode, when it runs on the controller's
    CPython): the per-user cache's files, their hashes remembered, not recomputed per build."""
    deps = [FileEntry(w.name, *store.put_file(w, link=True, digest=cached_sha256)) for w in wheels]
    if deps and bytecode.wanted(target):
        bundle = bytecode.bytecode_bundle([(w, e.sha256) for w, e in zip(wheels, deps)], emit)
        deps.append(
            FileEntry(
                bytecode.bundle_name(),
                *store.put_file(bundle, link=True, digest=cached_sha256),
                bytecode.KIND,
            )
        )
    return TargetEntry(target.to_dict(), tuple(deps), dependency_digest(deps))


def _source_date(plan: _Plan) -> str:
    """The manifest's ``built_at``: for a clean commit, the commit's own time (as
    SOURCE_DATE_EPOCH is, for reproducible builds), so every clone of that commit builds the
    same artifact, digest included (``deploy --retry-failed`` from another clone relies on it);
    otherwise the time of the build."""
    when = datetime.now(timezone.utc)
    if plan.git_commit and not plan.git_commit.endswith("-dirty"):
        shown = subprocess.run(
            ["git", "show", "-s", "--format=%ct", plan.git_commit],
            cwd=plan.config_root or plan.project,  # a --ref export is not a work tree: the checkout
            capture_output=True,
            text=True,
            check=False,
        )
        if shown.returncode == 0 and shown.stdout.strip().isdigit():
            when = datetime.fromtimestamp(int(shown.stdout.strip()), timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _record_inputs(layout: _Layout, inputs_digest: str, digest: str) -> None:
    inputs = layout.root / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    tmp = inputs / f".{inputs_digest}.tmp-{os.getpid()}"
    tmp.write_text(digest + "\n")
    os.replace(tmp, inputs / inputs_digest)


def pack(
    spec: BuildSpec, *, build_dir: Path | None = None, on_event: EventSink | None = None
) -> BuildResult:
    """The article's `make pack`: compile the app, then wheelhouse + tools + manifest.

    Always builds (caches still apply to the wheelhouse and tools); see :func:`build`.
    """
    started = time.monotonic()
    plan = _plan(spec)
    _warn_lock(plan, on_event or _noop)
    return _pack(spec, plan, _layout(spec, build_dir), on_event or _noop, started)


def _warn_lock(plan: _Plan, emit: EventSink) -> None:
    """Step "warning": a lock that does not make the build reproducible (no lock committed)."""
    if plan.lock is not None and plan.lock.warning:
        emit("warning", plan.lock.warning)


def _reuse(layout: _Layout, inputs_digest: str) -> Manifest | None:
    try:
        digest = (layout.root / "inputs" / inputs_digest).read_text().strip()
        manifest = read_manifest_file(layout.root / "artifacts" / f"{digest}.json")
    except (OSError, OperationError):
        return None
    store = layout.store
    if not all(store.has(sha) for sha, _, _ in manifest.blobs()):
        return None
    return manifest


def build(
    spec: BuildSpec,
    *,
    build_dir: Path | None = None,
    on_event: EventSink | None = None,
    hosts: Hosts | None = None,
) -> BuildResult:
    """Build the artifact, or reuse the one built from the same inputs (``reused=True``).

    Inputs are the source files (git-tracked, or a walk outside git), the lock's bytes, the
    include/exclude/config lists, the server packages, the target and the git commit.
    ``on_event(step, detail)`` reports progress; steps are "wheel", "tree", "wheelhouse",
    "bytecode", "tools" and "manifest" (detail "reused <digest>" when nothing was built), and
    "warning" when the lock does not pin the build (a pyproject.toml without a lock).
    ``hosts``: the hosts' interpreters (by host name), asked once the project's files are read;
    the wheelhouse is resolved for each distinct one (unless [build] names the target).
    Events may come from two threads: the app wheel and the tools are made while pip runs.
    """
    started = time.monotonic()
    emit = on_event or _noop
    layout = _layout(spec, build_dir)
    # The app wheel (a build backend's run, ~0.15 s) depends on the app's files alone: it is
    # built while the hosts' hello, which names their interpreters, is still on its way. Keyed
    # by content, it costs a lookup when the whole artifact turns out to be reused. A tree app
    # is left to _pack: storing its files early would hash them all again on a reuse.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shiplane-app") as early:
        app_job: Future[CompiledApp] | None = None

        def compile_early(plan: _Plan) -> None:
            nonlocal app_job
            if plan.source == "package":
                app_job = early.submit(_compile, plan, layout.store, emit)

        plan = _plan(spec, hosts=hosts, files_read=compile_early)
        _warn_lock(plan, emit)
        manifest = _reuse(layout, plan.inputs_digest)
        if manifest is not None:
            emit("manifest", f"reused {manifest.digest}")
            return BuildResult(
                manifest, manifest.digest, True, time.monotonic() - started, layout.store
            )
        return _pack(spec, plan, layout, emit, started, app_job)


def clean(project: Path) -> list[Path]:
    """The article's `make clean`: remove ``.shiplane/build``; return what was removed."""
    root = Path(project) / ".shiplane" / "build"
    if not root.exists():
        return []
    shutil.rmtree(root)
    return [root]


def load_manifest(project: Path, digest: str) -> Manifest:
    """The manifest of a built artifact; ``digest`` may be a unique prefix."""
    from ._manifest import find_manifest

    return read_manifest_file(
        find_manifest(Path(project) / ".shiplane" / "build" / "artifacts", digest)
    )
