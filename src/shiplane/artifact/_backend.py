"""The app wheel: the project's PEP 517 build backend, called in a build environment kept per user.

``uv build --wheel`` makes a fresh isolated environment for every build (about 0.4 s before
the backend even starts). The environment only depends on ``[build-system] requires`` and the
interpreter, so it is made once under the user cache (``build-env/<key>``) and the backend's
``build_wheel`` hook is called there directly: same backend, same isolation from shiplane's own
packages, a tenth of the time. A backend that asks for more requirements at build time
(``get_requires_for_build_wheel``) is handed to ``uv build``, which installs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ..errors import OperationError
from . import _wheelpatch as wheelpatch
from ._cache import cache_root, digest_of
from ._index import PackageAccess
from ._manifest import FileEntry
from ._store import BlobStore

# Wheels are zip files with timestamps: a fixed one (1980-01-01, zip's epoch) makes the same
# code give the same bytes whatever the commit, so a redeploy sends only what really changed.
SOURCE_DATE_EPOCH = "315532800"

# PEP 517's fallback for projects without a [build-system] table (pip and uv do the same).
LEGACY_BACKEND = "setuptools.build_meta:__legacy__"
LEGACY_REQUIRES = ("setuptools>=40.8.0",)
# Exit code of the hook below when the backend wants requirements the environment lacks.
NEEDS_MORE = 3

# Run with the build environment's interpreter, in the source copy; argv: backend, its path
# entries (JSON), the output dir. Prints the wheel's file name last.
_HOOK = r"""
import importlib, json, os, sys
backend, paths, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
sys.path[:0] = [os.path.abspath(p) for p in paths]
module, _, attr = backend.partition(":")
hooks = importlib.import_module(module)
for part in filter(None, attr.split(".")):
    hooks = getattr(hooks, part)
get_requires = getattr(hooks, "get_requires_for_build_wheel", None)
extra = list(get_requires() if get_requires else [])
if extra:
    print(json.dumps(extra))
    sys.exit(3)
print(hooks.build_wheel(out))
"""


@dataclass(frozen=True)
class BuildSystem:
    """``[build-system]`` of a project, with PEP 517's defaults filled in."""

    requires: tuple[str, ...]
    backend: str
    backend_path: tuple[str, ...]

    @property
    def env_key(self) -> str:
        """Names the build environment: the requirements and the interpreter that runs them."""
        return digest_of(
            "shiplane-build-env-v2",
            os.path.realpath(sys.executable),
            sys.version,
            *sorted(self.requires),
        )[:24]


def read_build_system(pyproject: Path | None) -> BuildSystem:
    """The build system a ``pyproject.toml`` declares (PEP 517/518 defaults when absent)."""
    table: dict[str, object] = {}
    try:
        if pyproject is not None:
            table = tomllib.loads(pyproject.read_text()).get("build-system", {})
    except FileNotFoundError:
        pass
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OperationError(
            f"pyproject.toml cannot be read: {exc}",
            hint="fix the file; `uv build` shows the same error",
        ) from exc
    requires = table.get("requires", list(LEGACY_REQUIRES))
    backend = table.get("build-backend", LEGACY_BACKEND)
    paths = table.get("backend-path", [])
    if (
        not isinstance(requires, list)
        or not isinstance(backend, str)
        or not isinstance(paths, list)
    ):
        raise OperationError(
            "pyproject.toml: [build-system] requires/build-backend/backend-path "
            "have the wrong type",
            hint="see PEP 517 and PEP 518",
        )
    return BuildSystem(tuple(str(r) for r in requires), backend, tuple(str(p) for p in paths))


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def build_env(
    system: BuildSystem, uv: str, env: dict[str, str], access: PackageAccess | None = None
) -> Path:
    """The environment with ``system.requires`` installed, made once per user and reused.

    Made under a temporary name and renamed (only ``bin/python`` is ever run, which works from
    any path), so a crashed or concurrent build never leaves a half-made one in use.
    """
    root = cache_root() / "build-env"
    final = root / system.env_key
    if (final / ".complete").is_file() and (final / "bin" / "python").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{system.env_key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = _run([uv, "venv", "--quiet", "--python", sys.executable, str(tmp)], root, env)
        if result.returncode != 0:
            raise OperationError(f"making the build environment failed\n{_tail(result.stdout)}")
        if system.requires:
            _install_requires(system, uv, tmp, env, access)
        (tmp / ".complete").write_text("\n".join(system.requires) + "\n")
        if final.exists():
            shutil.rmtree(final)  # incomplete: its .complete or interpreter is missing
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / ".complete").is_file():  # not merely another build winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _tail(output: str, n: int = 15) -> str:
    return "\n".join(output.splitlines()[-n:])


def _install_requires(
    system: BuildSystem, uv: str, venv: Path, env: dict[str, str], access: PackageAccess | None
) -> None:
    """``[build-system] requires`` into ``venv``: fetched by pip as the user configured it (the
    lock's index options, pip.conf, PIP_* variables: an air-gapped or private-index build
    never asks a public index, docs/dependencies.md), then installed offline by uv, bytecode
    compiled now (every build imports the backend, and may not write its pycs)."""
    access = access or PackageAccess()
    wheels = venv / ".requires-wheels"
    wheels.mkdir()
    wanted = venv / ".requires.txt"
    wanted.write_text("".join(f"{line}\n" for line in (*access.options, *system.requires)))
    fetched = _run(
        [sys.executable, "-m", "pip", "wheel", "--wheel-dir", str(wheels), "-r", str(wanted)],
        venv,
        access.env(env),
    )
    if fetched.returncode != 0:
        offline = access.offline(env)
        raise OperationError(
            f"the app's build backend needs {', '.join(system.requires)} ([build-system] "
            f"requires in pyproject.toml), which pip cannot fetch from {access.sources(env)}\n"
            + access.scrub(_tail(fetched.stdout, 8)),
            hint=(
                "put their wheels into the find-links folder, or build once with an index: "
                f"shiplane keeps the build environment in {venv.parent} for every later build"
                if offline
                else "check [build-system] requires in pyproject.toml"
            ),
        )
    install = [uv, "pip", "install", "--quiet", "--compile-bytecode", "--offline", "--no-index"]
    install += ["--find-links", str(wheels), "--python", str(venv / "bin" / "python")]
    result = _run([*install, *system.requires], venv, env)
    if result.returncode != 0:
        raise OperationError(
            f"installing the build backend's requirements ({', '.join(system.requires)}) "
            f"failed\n{_tail(result.stdout)}",
            hint="check [build-system] requires in pyproject.toml",
        )
    shutil.rmtree(wheels)
    wanted.unlink()


def call_backend(
    system: BuildSystem, python: Path, src: Path, out: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run the backend's ``build_wheel`` into ``out``; exit ``NEEDS_MORE`` when it asks for
    more requirements. ``-I``: neither shiplane's environment nor the user's site leak in."""
    out.mkdir(parents=True, exist_ok=True)
    return _run(
        [str(python), "-I", "-c", _HOOK, system.backend, json.dumps(system.backend_path), str(out)],
        src,
        env,
    )


def _uv() -> str:
    try:
        import uv  # type: ignore[import-not-found,import-untyped,unused-ignore]

        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise OperationError(
                "uv is needed to build the app wheel and was not found",
                hint="install it: `pip install uv`",
            ) from None
        return found


def _run_uv_build(src: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [_uv(), "build", "--wheel", "--out-dir", str(out), "--python", sys.executable, str(src)]
    return _run(cmd, src, env)


def _build_wheel(
    project: Path,
    sources: Sequence[str],
    work: Path,
    system: BuildSystem,
    emit: Callable[[str, str], None],
    access: PackageAccess,
) -> Path:
    """The app wheel, built from a copy of exactly the source files that were digested: by the
    backend in its cached build environment, or by ``uv build`` when it needs more."""
    src, out = work / "src", work / "dist"
    for rel in sources:
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / rel, dest)
    env = dict(
        os.environ,
        SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH,
        PYTHONHASHSEED="0",
        UV_PYTHON_DOWNLOADS="never",
    )
    env.pop("PYTHONPATH", None)
    emit("wheel", f"build_wheel ({system.backend})")
    python = build_env(system, _uv(), env, access) / "bin" / "python"
    result = call_backend(system, python, src, out, env)
    how = "the build backend"
    if result.returncode == NEEDS_MORE:
        emit(
            "wheel",
            f"uv build --wheel (the backend needs {result.stdout.strip().splitlines()[-1]})",
        )
        shutil.rmtree(out, ignore_errors=True)
        if access.offline(env):  # uv reads no pip settings: offline is said in its own words
            env["UV_OFFLINE"] = "1"
        result, how = _run_uv_build(src, out, env), "uv build"
    wheels = sorted(out.glob("*.whl")) if out.is_dir() else []
    if result.returncode != 0 or len(wheels) != 1:
        tail = "\n".join(result.stdout.splitlines()[-15:])
        raise OperationError(
            f"building the app wheel failed ({how} exit {result.returncode})\n{tail}",
            hint="run `uv build --wheel` in the project to see why",
        )
    return wheels[0]


def app_wheel(
    project: Path,
    sources: Sequence[str],
    file_shas: Mapping[str, str],
    store: BlobStore,
    emit: Callable[[str, str], None],
    access: PackageAccess | None = None,
) -> FileEntry:
    """The app wheel built from ``sources`` (paths in ``project``, with their sha256 in
    ``file_shas``), stored; rebuilt only when the sources or the build system change."""
    system = read_build_system(project / "pyproject.toml" if "pyproject.toml" in sources else None)
    # Keyed by content, not by commit: committing what was deployed dirty builds nothing.
    key = digest_of(
        "app-wheel-v1",
        SOURCE_DATE_EPOCH,
        system.env_key,
        system.backend,
        *system.backend_path,
        *(f"{rel} {file_shas[rel]}" for rel in sources),
    )
    index = store.root.parent / "app-wheels" / key
    try:
        name, known, length = index.read_text().split()
        if store.has(known):
            emit("wheel", f"{name} (reused)")
            return FileEntry(name, known, int(length), "wheel")
    except (OSError, ValueError):
        pass
    system_key = digest_of(SOURCE_DATE_EPOCH, system.env_key, system.backend, *system.backend_path)
    last_path = store.root.parent / "app-wheels" / "last.json"
    with tempfile.TemporaryDirectory(prefix="shiplane-wheel-") as tmp:
        patched = _patched(project, file_shas, store, system_key, sources, last_path, Path(tmp))
        wheel = patched or _build_wheel(
            project, sources, Path(tmp), system, emit, access or PackageAccess()
        )
        sha, size = store.put_file(wheel)
        if patched is None and wheelpatch.plain_build(project, system.backend, sources):
            last = wheelpatch.record_last(wheel, system_key, sources, file_shas, sha)
            wheelpatch.save_last(last_path, last)
    how = " (the last one, patched: a code-only change)" if patched else ""
    emit("wheel", wheel.name + how)
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp_index = index.with_name(f".{key}.tmp-{os.getpid()}")
    tmp_index.write_text(f"{wheel.name} {sha} {size}\n")
    os.replace(tmp_index, index)
    return FileEntry(wheel.name, sha, size, "wheel")


def _patched(
    project: Path,
    file_shas: Mapping[str, str],
    store: BlobStore,
    system_key: str,
    sources: Sequence[str],
    last_path: Path,
    out: Path,
) -> Path | None:
    """The last backend-built wheel with the changed modules in it, when that is what the
    backend would make (``_wheelpatch``); None when the backend must run."""
    last = wheelpatch.LastWheel.load(last_path)
    if last is None or not store.has(last.sha256):
        return None
    members = wheelpatch.changes(last, system_key, sources, file_shas)
    if members is None:
        return None
    replaced = {}
    for member, rel in members.items():
        data = (project / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != file_shas[rel]:  # changed since it was hashed
            return None
        replaced[member] = data
    return wheelpatch.patch(last, store, replaced, out)
