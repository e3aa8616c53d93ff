"""Releases: install (unpack, render, link, venv, hooks), metadata, order, prune, runtime env.

A release directory is complete when its ``release.json`` exists (written last). Order comes
from release ids / recorded metadata, never from file mtimes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypedDict, cast

from . import AgentError, atomic_write, fsync_dir, ledger, utc_now
from .hooks import Limits, run_hook
from .paths import Layout
from .protocol import AppInfo, Emit, InstallArgs, ReleaseMeta, RenderedFile, SharedSpec
from .runtime import PARTIAL_META, RELEASE_ID_RE, expand, placeholders, read_meta, valid_release_id
from .store import require, safe_relpath, unpack_wheel, valid_sha, verify
from .venvs import VenvResult, VenvShells, WheelEntry, ensure_venv

ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# "rolled-back": a rollback left it for an older release; a plain rollback skips it from then on
STATES = ("prepared", "live", "previous", "good", "bad", "rolled-back")
RESERVED = {"release.json", "shiplane.env", PARTIAL_META}
PARALLEL_COMPILE = 300  # .py files from which compileall gets a worker per core


class _AppFileRequired(TypedDict):
    path: str
    sha256: str


class AppFile(_AppFileRequired, total=False):
    """One of the manifest's ``app_files``: ``kind`` ``wheel`` (the app's own wheel, unpacked
    into ``lib/``) or ``file`` (copied to ``path``)."""

    size: int
    kind: str
    mode: int | str


class TargetDeps(TypedDict, total=False):
    """A ``targets`` entry of the manifest: one Python's wheels (a mixed stage)."""

    target: dict[str, str]
    dependencies: list[WheelEntry]
    dependency_digest: str


class Manifest(TypedDict, total=False):
    """The parts of the artifact's manifest (artifact/_manifest.py) an install reads."""

    targets: list[TargetDeps]
    app: AppInfo
    app_files: list[AppFile]
    dependencies: list[WheelEntry]
    dependency_digest: str
    tools: list[WheelEntry]
    git_commit: str | None


class InstallResult(TypedDict):
    release_id: str
    reused: bool  # the release was installed already
    venv_reused: bool
    venv_seconds: float
    seconds: float


def artifact_digest(manifest: Mapping[str, object]) -> str:
    """sha256 of the manifest's canonical JSON (the artifact's identity)."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --- metadata -------------------------------------------------------------------------------


def _write_meta(layout: Layout, release_id: str, meta: Mapping[str, object]) -> None:
    atomic_write(layout.release_meta(release_id), json.dumps(meta, indent=1, sort_keys=True))


def _as_meta(meta: Mapping[str, object]) -> ReleaseMeta:
    """``release.json`` as read from disk (runtime.read_meta: a JSON object) is what install and
    mark wrote there."""
    return cast(ReleaseMeta, meta)


def update_meta(layout: Layout, release_id: str, **fields: object) -> ReleaseMeta:
    """Merge ``fields`` into a complete release's ``release.json`` (atomically)."""
    valid_release_id(release_id)
    if not layout.release_meta(release_id).is_file():
        raise AgentError(f"release {release_id} is not installed", kind="missing")
    meta = read_meta(layout, release_id) or {}
    meta.update(fields)
    _write_meta(layout, release_id, meta)
    return _as_meta(meta)


def list_releases(layout: Layout) -> list[ReleaseMeta]:
    """``release.json`` of every complete release, oldest first (ordered by release id)."""
    if not layout.releases.is_dir():
        return []
    out = []
    for entry in sorted(layout.releases.iterdir(), key=lambda p: p.name):
        if RELEASE_ID_RE.match(entry.name) and layout.release_meta(entry.name).is_file():
            meta = read_meta(layout, entry.name)
            if meta is not None:
                out.append(_as_meta(meta))
    return out


def current_release(layout: Layout) -> str | None:
    """The live release id (where ``current`` points), or None."""
    try:
        target = os.readlink(layout.current)
    except OSError:
        return None
    name = PurePosixPath(target).name
    if RELEASE_ID_RE.match(name) and layout.release(name).is_dir():
        return name
    return None


def previous_release(layout: Layout) -> str | None:
    """The release that was live before the current one: from the ledger, else the states."""
    current = current_release(layout)
    present = {m["release_id"]: m for m in list_releases(layout) if "release_id" in m}
    for entry in reversed(ledger.read(layout)):
        rid = entry.get("release_id") or entry.get("release")
        prev = entry.get("previous")
        if current and rid == current and isinstance(prev, str) and prev != current:
            if prev in present:
                return str(prev)
            break
    for wanted in ("previous", "good", "live"):
        ids = [rid for rid, m in present.items() if m.get("state") == wanted and rid != current]
        if ids:
            return str(max(ids))
    return None


def mark(layout: Layout, release_id: str, state: str) -> ReleaseMeta:
    """Set a release's state, stamped ``<state>_at`` (``rolled_back_at`` for ``rolled-back``).

    Marking one ``live`` demotes the old live to ``previous`` and the old previous to ``good``,
    so the states always say which release was live before; ``bad`` and ``rolled-back`` marks
    stay until that release is live again."""
    if state not in STATES:
        raise AgentError(
            f"unknown release state {state!r} (one of {', '.join(STATES)})", kind="usage"
        )
    if state == "live":
        for meta in list_releases(layout):
            rid = meta.get("release_id")
            if rid == release_id or not isinstance(rid, str):
                continue
            if meta.get("state") == "previous":
                update_meta(layout, rid, state="good")
        for meta in list_releases(layout):
            rid = meta.get("release_id")
            if rid != release_id and isinstance(rid, str) and meta.get("state") == "live":
                update_meta(layout, rid, state="previous")
    stamp = {f"{state.replace('-', '_')}_at": utc_now()}
    return update_meta(layout, release_id, state=state, **stamp)


def remove_tree(path: Path) -> None:
    """Rename aside first: a half-deleted release must never look like a release."""
    if not path.exists():
        return
    trash = path.parent / f".trash-{path.name}-{os.getpid()}"
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


# --- install -----------------------------------------------------------------------------------


def _compile(layout: Layout, release: Path, digest: str | None, python: str) -> None:
    """Byte-compile the release's code in place (after the rename: .pyc files record their path),
    so the candidate server and the hooks do not compile it on every start. Best effort: a file
    that does not compile is the app's to report when it is imported."""
    interpreter = str(layout.venv(digest) / "bin" / "python") if digest else python
    # A worker pool costs more than it saves for an app of a few hundred modules or less.
    sources = sum(1 for _ in zip(range(PARALLEL_COMPILE), release.rglob("*.py")))
    if digest and _same_python(layout.venv(digest)):
        # this very interpreter writes the same .pyc files, without a process start (~0.06 s)
        import compileall

        try:
            compileall.compile_dir(
                str(release), quiet=2, workers=0 if sources >= PARALLEL_COMPILE else 1
            )
        except Exception:  # noqa: BLE001, S110 - best effort, as below
            pass
        return
    jobs = ["-j", "0"] if sources >= PARALLEL_COMPILE else []
    subprocess.run(
        [interpreter, "-m", "compileall", "-q", *jobs, str(release)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=300,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
    )


def _same_python(venv: Path) -> bool:
    """Whether the venv's Python is this CPython's version (so their bytecode is the same)."""
    try:
        cfg = (venv / "pyvenv.cfg").read_text(encoding="utf-8")
    except OSError:
        return False
    found = re.search(r"^version(?:_info)?\s*=\s*(\d+)\.(\d+)", cfg, re.MULTILINE)
    return (
        found is not None
        and sys.implementation.name == "cpython"
        and (int(found[1]), int(found[2])) == sys.version_info[:2]
    )


def _install_tools(layout: Layout, tools: list[WheelEntry], emit: Emit) -> None:
    """Unpack the artifact's tool wheels (supervisor) into ``tools/<wheel name>/``, once each.

    They are pure-Python wheels run with ``PYTHONPATH`` set to that dir, so they need no venv and
    outlive every release.
    """
    require(layout, [str(t.get("sha256")) for t in tools])
    for tool in tools:
        name = str(tool.get("path") or "")
        if "/" in name or not name.endswith(".whl"):
            raise AgentError(f"tool {name!r}: not a wheel file name", kind="usage")
        dest = layout.tools / name[: -len(".whl")]
        if (dest / ".complete").exists():
            continue
        emit({"phase": "install", "status": "tools", "detail": name})
        tmp = layout.tools / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        verify(layout, [str(tool["sha256"])])
        unpack_wheel(layout.blob(str(tool["sha256"])), tmp, name)
        (tmp / ".complete").write_text("")
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)


@dataclass(frozen=True)
class _Release:
    """What an install makes, read once from its request and the artifact's manifest."""

    release_id: str
    artifact: str  # the manifest's digest
    manifest: Manifest
    digest: str | None  # the dependency venv's, None for an app without dependencies
    deps: list[WheelEntry]
    app_files: list[AppFile]
    tools: list[WheelEntry]
    python: str  # the interpreter the venv is built with
    user_cache: bool  # uv's cache is the user's own (the local stage)


def install(
    layout: Layout,
    args: InstallArgs,
    emit: Emit,
    on_tools: Callable[[], None] | None = None,
    on_placed: Callable[[], None] | None = None,
    shells: VenvShells | None = None,
) -> InstallResult:
    """The ``install`` op: build ``releases/<id>`` completely or not at all.

    Reuses an existing complete release of the same artifact. Everything is built in
    ``releases/.tmp-<id>-<pid>`` and renamed into place; the ``after_install`` hooks then run in
    it and ``release.json`` is written last. Any failure removes the release dir; ``current`` is
    never touched. ``on_tools`` is called once the tools are in place (the server starts the
    process manager then, while the venv builds); ``on_placed`` once the release dir and its
    venv are (the server preboots the web server then, while the code compiles and hooks run).
    ``shells``: the session's venvs started early (``inventory``), one may be this release's.
    """
    started = time.monotonic()
    release = _release_of(args)
    existing = (
        read_meta(layout, release.release_id)
        if layout.release_meta(release.release_id).is_file()
        else None
    )
    if existing is not None:
        if existing.get("artifact") != release.artifact:
            raise AgentError(
                f"release {release.release_id} exists with another artifact "
                f"({existing.get('artifact')})",
                kind="conflict",
            )
        venv = _release_venv(layout, release, emit, shells)  # it may have been pruned since
        if on_placed is not None:
            on_placed()
        return _install_result(release, venv, reused=True, seconds=0.0)
    _remove_incomplete(layout, release.release_id, emit)
    require(layout, [str(f.get("sha256")) for f in [*release.app_files, *release.deps]])
    _install_tools(layout, release.tools, emit)
    if on_tools is not None:
        on_tools()
    meta = _prepared_meta(release, args)
    venv = _build_release(layout, release, args, meta, emit, on_placed, shells)
    return _install_result(
        release, venv, reused=False, seconds=round(time.monotonic() - started, 3)
    )


def _release_of(args: InstallArgs) -> _Release:
    release_id = valid_release_id(args.get("release_id"))
    raw = args.get("manifest")
    if not isinstance(raw, dict):
        raise AgentError("install: manifest missing", kind="usage")
    manifest = cast(Manifest, raw)  # JSON from the controller; each entry is checked where used
    own = _target_of(manifest, args.get("target"))
    return _Release(
        release_id=release_id,
        artifact=artifact_digest(manifest),
        manifest=manifest,
        digest=own.get("dependency_digest") or None,
        deps=list(own.get("dependencies") or []),
        app_files=list(manifest.get("app_files") or []),
        tools=list(manifest.get("tools") or []),
        python=str(args.get("python") or sys.executable),
        user_cache=args.get("uv_cache") == "user",
    )


def _target_of(manifest: Manifest, index: object) -> TargetDeps:
    """The dependencies this host installs: those of the manifest's ``targets`` entry for its
    Python (an artifact for a mixed stage, docs/DESIGN.md "Artifact"), else the top level's."""
    if index is None:
        return {
            "dependencies": list(manifest.get("dependencies") or []),
            "dependency_digest": manifest.get("dependency_digest") or "",
        }
    targets = manifest.get("targets") or []
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(targets):
        raise AgentError(
            f"install: target {index!r} is not one of the manifest's {len(targets)} targets",
            kind="usage",
        )
    return targets[index]


def _install_result(
    release: _Release, venv: VenvResult, reused: bool, seconds: float
) -> InstallResult:
    return {
        "release_id": release.release_id,
        "reused": reused,
        "venv_reused": venv["reused"],
        "venv_seconds": venv.get("seconds", 0.0),
        "seconds": seconds,
    }


def _remove_incomplete(layout: Layout, release_id: str, emit: Emit) -> None:
    """A release dir without ``release.json`` is a crashed install: removed and redone."""
    final = layout.release(release_id)
    if final.exists() or final.is_symlink():
        if current_release(layout) == release_id:
            raise AgentError(f"release {release_id} is live but incomplete", kind="conflict")
        emit({"phase": "install", "status": "cleanup", "detail": f"removing incomplete {final}"})
        remove_tree(final)


def _prepared_meta(release: _Release, args: InstallArgs) -> ReleaseMeta:
    """The new release's ``release.json`` (state ``prepared``); ``blobs`` lists every blob it
    uses, so prune keeps them."""
    manifest = release.manifest
    app = manifest.get("app")
    files = [*release.app_files, *release.deps, *release.tools]
    return {
        "release_id": release.release_id,
        "artifact": release.artifact,
        "dependency_digest": release.digest,
        "git_commit": manifest.get("git_commit"),
        "created_at": utc_now(),
        "stage": args.get("stage"),
        "state": "prepared",
        "source": (app.get("source") if app else None) or "package",
        "app": app,
        "blobs": sorted({str(f.get("sha256")) for f in files}),
    }


def _build_release(
    layout: Layout,
    release: _Release,
    args: InstallArgs,
    meta: ReleaseMeta,
    emit: Emit,
    on_placed: Callable[[], None] | None,
    shells: VenvShells | None,
) -> VenvResult:
    """Fill a temp dir, rename it to ``releases/<id>``, compile, run the hooks, then write
    ``release.json``; on any failure nothing of the release remains."""
    final = layout.release(release.release_id)
    layout.releases.mkdir(parents=True, exist_ok=True)
    tmp = layout.releases / f".tmp-{release.release_id}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    placed = False
    try:
        tmp.mkdir()
        emit({"phase": "install", "status": "unpack", "detail": release.release_id})
        _write_release_files(layout, tmp, final, release, args)
        atomic_write(tmp / PARTIAL_META, json.dumps(meta, sort_keys=True))
        if release.digest:
            emit({"phase": "install", "status": "venv", "detail": str(release.digest)})
        venv = _release_venv(layout, release, emit, shells)
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(layout.releases)
        placed = True
        if on_placed is not None:
            on_placed()
        _compile(layout, final, release.digest, release.python)
        _run_hooks(layout, release.release_id, args, emit)
        _write_meta(layout, release.release_id, meta)
        (final / PARTIAL_META).unlink()
    except BaseException:
        if placed:
            remove_tree(final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return venv


def _write_release_files(
    layout: Layout, tmp: Path, final: Path, release: _Release, args: InstallArgs
) -> None:
    """The app's files, the rendered config, the env file and the links into ``shared/``."""
    _place_app_files(layout, tmp, release.app_files)
    values = placeholders(layout, release.release_id)  # {deploy_to}, {shared}, {release} here
    shared_rendered = _write_rendered(layout, tmp, list(args.get("rendered") or []), values)
    _write_env(tmp, args.get("env") or {}, values)
    _link_shared(layout, tmp, final, args.get("shared"), shared_rendered)


def _release_venv(
    layout: Layout, release: _Release, emit: Emit, shells: VenvShells | None
) -> VenvResult:
    if not release.digest:
        return {"reused": True, "seconds": 0.0, "installer": None}
    return ensure_venv(
        layout, release.digest, release.deps, release.python, emit, release.user_cache, shells
    )


def _run_hooks(layout: Layout, release_id: str, args: InstallArgs, emit: Emit) -> None:
    """The ``after_install`` hooks, in order, each with its limits; the first failure raises."""
    default_timeout = float(args.get("hook_timeout") or 600)
    silence = float(args.get("hook_silence") or 0)
    for hook in args.get("hooks") or []:
        command, timeout = _hook_command(hook, default_timeout)
        run_hook(layout, release_id, command, Limits(timeout, silence), emit)


def _hook_command(hook: object, default_timeout: float) -> tuple[str, float]:
    """A hook is its command, or ``{command, timeout}`` (a timeout of its own)."""
    if isinstance(hook, dict):
        return str(hook.get("command")), float(hook.get("timeout", default_timeout))
    return str(hook), default_timeout


def _place_app_files(layout: Layout, base: Path, app_files: list[AppFile]) -> None:
    for item in app_files:
        if not valid_sha(item.get("sha256")):
            raise AgentError(f"app file {item.get('path')!r} has no valid sha256", kind="usage")
    verify(
        layout, [str(item["sha256"]) for item in app_files]
    )  # what reaches the release is what was built
    for item in app_files:
        blob = layout.blob(str(item["sha256"]))
        if item.get("kind") == "wheel":
            unpack_wheel(blob, base / "lib", str(item.get("path")))
            continue
        rel = safe_relpath(item.get("path"), "app file")
        has_wheel = any(f.get("kind") == "wheel" for f in app_files)
        if rel in RESERVED or (has_wheel and (rel == "lib" or rel.startswith("lib/"))):
            raise AgentError(f"app file path {rel!r} is reserved", kind="usage")
        dest = base / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        # A copy, not a hard link: the app (or a hook) editing its file must not corrupt the store.
        shutil.copyfile(blob, dest)
        mode = item.get("mode")
        os.chmod(dest, _mode(mode, 0o644))


def _mode(value: object, default: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value & 0o7777
    try:
        return int(str(value), 8) & 0o7777
    except ValueError as exc:
        raise AgentError(f"invalid file mode {value!r}", kind="usage") from exc


def _write_rendered(
    layout: Layout, base: Path, rendered: list[RenderedFile], values: dict[str, str]
) -> list[str]:
    """Write rendered config files (placeholders expanded); returns the paths of those placed
    under ``shared/``."""
    shared_paths = []
    for item in rendered:
        rel = safe_relpath(item.get("path"), "rendered file")
        content = item.get("content")
        if not isinstance(content, str):
            raise AgentError(f"rendered file {rel}: content must be text", kind="usage")
        content = expand(content, values)
        mode = _mode(item.get("mode"), 0o644)
        if item.get("shared"):
            atomic_write(layout.shared / rel, content, mode)
            shared_paths.append(rel)
        else:
            if rel in RESERVED:
                raise AgentError(f"rendered file path {rel!r} is reserved", kind="usage")
            atomic_write(base / rel, content, mode)
    return shared_paths


def _write_env(base: Path, env: dict[str, str], values: dict[str, str]) -> None:
    if not isinstance(env, dict):
        raise AgentError("install: env must be an object", kind="usage")
    lines = []
    for key in sorted(env):
        if not ENV_KEY_RE.match(str(key)):
            raise AgentError(f"invalid environment variable name {key!r}", kind="usage")
        lines.append(f"{key}={json.dumps(expand(str(env[key]), values))}")
    atomic_write(base / "shiplane.env", "".join(line + "\n" for line in lines), 0o600)


def _link_shared(
    layout: Layout, base: Path, final: Path, shared: SharedSpec | None, rendered: list[str]
) -> None:
    """Link shared dirs and files into the release with relative symlinks.

    Links are computed from the final ``releases/<id>`` location (same depth as the temp dir).
    A missing shared file is left for the app to create through the link.
    """
    # (the protocol's default is {}: either list may be absent)
    dirs = [safe_relpath(d, "shared dir") for d in (shared.get("dirs") if shared else None) or []]
    files = [
        safe_relpath(f, "shared file") for f in (shared.get("files") if shared else None) or []
    ]
    covered = dirs + files
    # Rendered shared files get a link too, unless a shared dir or file entry already covers them.
    files += [r for r in rendered if not any(r == c or r.startswith(c + "/") for c in covered)]
    for rel in dirs + files:
        if rel in RESERVED:
            raise AgentError(f"shared path {rel!r} is reserved", kind="usage")
        outer = [d for d in dirs if rel.startswith(d + "/")]
        if outer:
            # Linking through another link would replace a file inside shared/ itself.
            raise AgentError(
                f"shared path {rel!r} lies inside shared dir {outer[0]!r}", kind="usage"
            )
        target = layout.shared / rel
        if rel in dirs:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
        link = base / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if (
            not os.path.realpath(link.parent).startswith(os.path.realpath(base) + os.sep)
            and link.parent != base
        ):
            raise AgentError(f"shared path {rel!r} leads outside the release", kind="usage")
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(
                link
            )  # the artifact's copy (e.g. an empty logs/) yields to the shared one
        final_parent = final / PurePosixPath(rel).parent
        os.symlink(os.path.relpath(target, final_parent), link)
