"""Dependency venvs: ``venvs/<dependency_digest>/``, built offline from the store, shared by releases.

Venvs are not relocatable, so each is built in place; ``.complete`` is written last, and a
directory without it is a crashed build that is removed and redone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import AgentError, atomic_write
from .paths import Layout
from .store import require, valid_sha

Emit = Callable[[dict[str, Any]], None]

DIGEST_RE = re.compile(r"^[0-9a-f]{8,64}$")
OUTPUT_TAIL = 30


def valid_digest(digest: object) -> bool:
    """A dependency digest is hex (it becomes a directory name)."""
    return isinstance(digest, str) and bool(DIGEST_RE.match(digest))


def find_uv(layout: Layout | None = None) -> str | None:
    """uv on PATH, in its usual install places, or shipped by the controller into ``tools/``;
    None when absent or disabled.

    ``SHIPLANE_INSTALLER=pip`` forces the pip fallback (operators, and the tests of that path).
    """
    if os.environ.get("SHIPLANE_INSTALLER", "").lower() == "pip":
        return None
    found = shutil.which("uv")
    if found:
        return found
    for candidate in ("~/.local/bin/uv", "~/.cargo/bin/uv"):
        path = os.path.expanduser(candidate)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    if layout is not None and layout.tools.is_dir():
        for shipped in sorted(layout.tools.glob("uv-*/uv"), reverse=True):
            if os.access(shipped, os.X_OK):
                return str(shipped)
    return None


def install_uv(layout: Layout, sha256: object) -> dict[str, Any]:
    """Make the uv binary received as blob ``sha256`` runnable as ``tools/uv-<sha>/uv``.

    The controller ships its own uv to hosts of the same platform that lack one; a binary that
    does not run here (other libc) is refused (kind ``install``) and pip stays the installer.
    """
    if not valid_sha(sha256):
        raise AgentError(f"install_uv: not a sha256: {sha256!r}", kind="usage")
    require(layout, [str(sha256)])
    target = layout.tools / f"uv-{str(sha256)[:16]}" / "uv"
    if not (os.access(target, os.X_OK) and _runs(target)):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".uv.tmp-{os.getpid()}")
        shutil.copyfile(layout.blob(str(sha256)), tmp)
        os.chmod(tmp, 0o755)
        if not _runs(tmp):
            tmp.unlink()
            raise AgentError("the shipped uv does not run on this host; using pip", kind="install")
        os.replace(tmp, target)
    return {"path": str(target)}


def _runs(binary: Path) -> bool:
    try:
        return subprocess.run([str(binary), "--version"], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def list_venvs(layout: Layout) -> list[str]:
    """Digests of the complete venvs."""
    if not layout.venvs.is_dir():
        return []
    return sorted(p.name for p in layout.venvs.iterdir()
                  if not p.name.startswith(".") and (p / ".complete").is_file())


def ensure_venv(layout: Layout, dependency_digest: str, wheels: list[dict[str, Any]],
                python: str, emit: Emit) -> dict[str, Any]:
    """Make ``venvs/<digest>`` hold exactly ``wheels`` ({path, sha256}); reuse a complete one.

    Returns ``{reused, seconds, installer}``. Failures raise kind ``install`` with the
    installer's last output lines; the half-built venv is removed.
    """
    if not valid_digest(dependency_digest):
        raise AgentError(f"not a dependency digest: {dependency_digest!r}", kind="usage")
    target = layout.venv(dependency_digest)
    # exists() follows the bin/python symlink: a venv whose base interpreter was removed is rebuilt.
    if (target / ".complete").is_file() and (target / "bin" / "python").exists():
        return {"reused": True, "seconds": 0.0, "installer": None}
    started = time.monotonic()
    names = _validate_wheels(wheels)
    require(layout, [w["sha256"] for w in wheels])
    if target.exists() or target.is_symlink():
        emit({"phase": "venv", "status": "cleanup", "detail": f"removing partial venv {target}"})
        _remove(target)
    layout.venvs.mkdir(parents=True, exist_ok=True)
    layout.tmp.mkdir(parents=True, exist_ok=True)
    uv = find_uv(layout)
    installer = "uv" if uv else "pip"
    emit({"phase": "venv", "status": "building", "detail": f"{len(wheels)} wheels with {installer}"})
    wheeldir = Path(tempfile.mkdtemp(prefix="wheels-", dir=layout.tmp))
    try:
        for wheel, name in zip(wheels, names):
            _link_or_copy(layout.blob(wheel["sha256"]), wheeldir / name)
        reqs = wheeldir / "requirements.txt"
        reqs.write_text(_requirements(wheels, names), encoding="utf-8")
        venv_python = str(target / "bin" / "python")
        if uv:
            env = _uv_env(layout)
            _run([uv, "venv", "--python", python, str(target)], env)
            if wheels:
                # bytecode now, once per dependency set: services may not write to the venv,
                # and every start would compile everything again (seconds per boot)
                _run([uv, "pip", "install", "--python", venv_python, "--offline", "--no-index", "--compile-bytecode",
                      "--find-links", str(wheeldir), "--require-hashes", "-r", str(reqs)], env)
        else:
            env = _clean_env()
            _run([python, "-m", "venv", str(target)], env)
            if wheels:
                _run([venv_python, "-m", "pip", "install", "--no-index", "--no-input",
                      "--disable-pip-version-check", "--find-links", str(wheeldir),
                      "--require-hashes", "-r", str(reqs)], env)
        atomic_write(target / ".complete", "\n".join(sorted(names)) + "\n")
    except BaseException:
        _remove(target)
        raise
    finally:
        shutil.rmtree(wheeldir, ignore_errors=True)
    seconds = round(time.monotonic() - started, 3)
    emit({"phase": "venv", "status": "built", "detail": dependency_digest, "seconds": seconds})
    return {"reused": False, "seconds": seconds, "installer": installer}


def _validate_wheels(wheels: list[dict[str, Any]]) -> list[str]:
    names = []
    for wheel in wheels:
        name = wheel.get("path") if isinstance(wheel, dict) else None
        if (not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".")
                or not name.endswith(".whl") or name.count("-") < 4):
            raise AgentError(f"not a wheel file name: {name!r}", kind="usage")
        if not valid_sha(wheel.get("sha256")):
            raise AgentError(f"wheel {name} has no valid sha256", kind="usage")
        names.append(name)
    return names


def _requirements(wheels: list[dict[str, Any]], names: list[str]) -> str:
    """``name==version --hash=sha256:...`` lines; wheels of one version for several tags share a line."""
    pins: dict[tuple[str, str], list[str]] = {}
    for wheel, filename in zip(wheels, names):
        dist, version = filename.split("-")[:2]
        key = (re.sub(r"[-_.]+", "-", dist).lower(), version)
        pins.setdefault(key, []).append(wheel["sha256"])
    lines = []
    for (dist, version), shas in sorted(pins.items()):
        hashes = " ".join(f"--hash=sha256:{sha}" for sha in sorted(set(shas)))
        lines.append(f"{dist}=={version} {hashes}")
    return "\n".join(lines) + "\n"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "PIP_REQUIRE_VIRTUALENV", "CONDA_PREFIX"):
        env.pop(key, None)
    return env


def _uv_env(layout: Layout) -> dict[str, str]:
    env = _clean_env()
    env["UV_CACHE_DIR"] = str(layout.uv_cache)
    env["UV_NO_CONFIG"] = "1"
    env["UV_PYTHON_DOWNLOADS"] = "never"
    env.pop("UV_SYSTEM_PYTHON", None)
    return env


def _run(argv: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        lines = proc.stdout.decode("utf-8", "replace").splitlines()[-OUTPUT_TAIL:]
        tail = "\n".join(lines)
        raise AgentError(f"installing dependencies failed: `{' '.join(argv[:3])} ...` exited "
                         f"with {proc.returncode}:\n{tail}", kind="install", output_tail=tail)


def _remove(path: Path) -> None:
    """Move aside then delete, so a half-deleted venv never looks like a venv."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.exists():
        return
    trash = path.parent / f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_venv(layout: Layout, dependency_digest: str) -> None:
    """Delete one venv (prune calls this for venvs no remaining release uses)."""
    if valid_digest(dependency_digest):
        _remove(layout.venv(dependency_digest))


def default_python() -> str:
    """The interpreter venvs are built with: the one running the agent."""
    return sys.executable
