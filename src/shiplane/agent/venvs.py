"""Dependency venvs: ``venvs/<dependency_digest>/``, built offline from the store, shared by releases.

Venvs are not relocatable, so each is built in place; ``.complete`` is written last, and a
directory without it is a crashed build that is removed and redone.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from . import AgentError, atomic_write
from .paths import Layout
from .protocol import Emit
from .runtime import valid_digest
from .store import file_sha256, quarantine, require, valid_sha, verify

OUTPUT_TAIL = 30
# A dependency entry of this kind is the controller's compiled bytecode of the wheels, not a wheel.
BYTECODE = "bytecode"
BYTECODE_META = "SHIPLANE-BYTECODE.json"


class _WheelFile(TypedDict):
    path: str  # the wheel's file name
    sha256: str


class WheelEntry(_WheelFile, total=False):
    """A dependency of the manifest (``dependencies``): a wheel, or with ``kind`` ``bytecode``
    the controller's compiled bytecode of them all."""

    size: int
    kind: str


class _VenvOutcome(TypedDict):
    reused: bool
    seconds: float
    installer: str | None  # "uv" or "pip"; None when reused


class VenvResult(_VenvOutcome, total=False):
    """What :func:`ensure_venv` did; ``bytecode`` ("shipped" or "compiled") when it built."""

    bytecode: str


class UvInstalled(TypedDict):
    path: str  # the runnable uv


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


def install_uv(layout: Layout, sha256: object, binary_sha256: object = None) -> UvInstalled:
    """Make the uv binary received as blob ``sha256`` runnable as ``tools/uv-<sha>/uv``.

    The controller ships its own uv to hosts of the same platform that lack one, gzipped (half
    the bytes) when ``binary_sha256`` names the binary inside: the unpacked binary must have
    that sha256. A binary that does not run here (other libc) is refused (kind ``install``) and
    pip stays the installer.
    """
    if not valid_sha(sha256) or (binary_sha256 is not None and not valid_sha(binary_sha256)):
        raise AgentError(f"install_uv: not a sha256: {sha256!r}", kind="usage")
    require(layout, [str(sha256)])
    target = layout.tools / f"uv-{str(binary_sha256 or sha256)[:16]}" / "uv"
    if not (os.access(target, os.X_OK) and _runs(target)):
        verify(layout, [str(sha256)])
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".uv.tmp-{os.getpid()}")
        if binary_sha256 is None:
            shutil.copyfile(layout.blob(str(sha256)), tmp)
        else:
            _gunzip_checked(layout.blob(str(sha256)), tmp, str(binary_sha256))
        os.chmod(tmp, 0o755)
        if not _runs(tmp):
            tmp.unlink()
            raise AgentError("the shipped uv does not run on this host; using pip", kind="install")
        os.replace(tmp, target)
    return {"path": str(target)}


class EarlyUv:
    """``install_uv`` started as soon as the shipped uv's blob is in the store (``inventory``'s
    ``uv`` hint), in a thread: its unpacking (~0.2 s of CPU for the gzipped binary) overlaps
    the rest of the deploy's blobs arriving, instead of following them. ``result()`` is what
    ``install_uv`` returns or raises; the ``install_uv`` op waits for it."""

    def __init__(self, layout: Layout, sha256: str, binary_sha256: str | None) -> None:
        if not valid_sha(sha256) or (binary_sha256 is not None and not valid_sha(binary_sha256)):
            raise AgentError(f"inventory: uv: not a sha256: {sha256!r}", kind="usage")
        self.layout, self.sha256, self.binary_sha256 = layout, sha256, binary_sha256
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._outcome: UvInstalled | AgentError | None = None
        if layout.blob(sha256).is_file():  # the host has it from an earlier deploy
            self.stored(sha256)

    def matches(self, sha256: object, binary_sha256: object) -> bool:
        return sha256 == self.sha256 and binary_sha256 == self.binary_sha256

    def stored(self, sha256: str) -> None:
        """A blob is in the store: start unpacking if it is uv's (once)."""
        with self._lock:
            if sha256 != self.sha256 or self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="early-uv", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome = install_uv(self.layout, self.sha256, self.binary_sha256)
        except AgentError as exc:
            self._outcome = exc
        except OSError as exc:
            self._outcome = AgentError(f"the shipped uv could not be placed: {exc}", kind="install")

    def result(self) -> UvInstalled | None:
        """``install_uv``'s answer once the thread ended; None when it never started (the
        blob did not arrive: the op then does the work itself)."""
        with self._lock:
            thread = self._thread
        if thread is None:
            return None
        thread.join()
        if isinstance(self._outcome, AgentError):
            raise self._outcome
        return self._outcome


def _gunzip_checked(source: Path, target: Path, sha256: str) -> None:
    digest = hashlib.sha256()
    with gzip.open(source, "rb") as src, open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        target.unlink()
        raise AgentError(
            "the shipped uv unpacked to other bytes than the controller's; using pip",
            kind="install",
        )


def _runs(binary: Path) -> bool:
    try:
        return (
            subprocess.run(
                [str(binary), "--version"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def list_venvs(layout: Layout) -> list[str]:
    """Digests of the complete venvs."""
    if not layout.venvs.is_dir():
        return []
    return sorted(
        p.name
        for p in layout.venvs.iterdir()
        if not p.name.startswith(".") and (p / ".complete").is_file()
    )


SHELL_MARK = ".shell"  # an empty venv made by VenvShells.start; .complete comes with the packages


class VenvShells:
    """The empty venvs (``uv venv``) one agent session starts during ``inventory``, while the
    blobs still arrive, by dependency digest: its ``install`` waits for the one it needs
    (:func:`ensure_venv`'s ``shells``). Each session owns its own, so a session never waits for,
    nor installs into, a venv another session's thread is still making."""

    def __init__(self) -> None:
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def start(
        self, layout: Layout, dependency_digest: object, python: object, user_cache: bool = False
    ) -> None:
        """Create ``venvs/<digest>`` empty in the background: its interpreter query takes ~0.2 s,
        paid by a first deploy only. Without uv (it may arrive with the blobs) nothing starts."""
        if not valid_digest(dependency_digest) or not isinstance(python, str) or not python:
            return
        digest = str(dependency_digest)
        target = layout.venv(digest)
        uv = find_uv(layout)
        if uv is None or target.exists() or target.is_symlink():
            return
        with self._lock:
            if digest in self._threads:
                return
            thread = threading.Thread(
                target=_make_shell,
                args=(layout, uv, python, target, user_cache),
                name="venv-shell",
                daemon=True,
            )
            self._threads[digest] = thread
        thread.start()

    def wait(self, dependency_digest: str) -> None:
        """Return once the shell started for this digest, if any, is made (or failed)."""
        with self._lock:
            thread = self._threads.pop(dependency_digest, None)
        if thread is not None:
            thread.join()


def _make_shell(layout: Layout, uv: str, python: str, target: Path, user_cache: bool) -> None:
    try:
        layout.venvs.mkdir(parents=True, exist_ok=True)
        _run([uv, "venv", "--python", python, str(target)], _uv_env(layout, user_cache))
        (target / SHELL_MARK).write_text(python + "\n", encoding="utf-8")
    except Exception:  # noqa: BLE001, S110 - ensure_venv removes a partial one and starts over
        pass


@dataclass(frozen=True)
class _Build:
    """One venv build: where, from which wheels (and their compiled bytecode), with what."""

    target: Path
    wheels: list[WheelEntry]
    names: list[str]  # the wheels' file names, validated
    python: str  # the base interpreter
    uv: str | None  # None: pip
    env: dict[str, str]
    bundle: Path | None  # the controller's bytecode of the wheels, verified

    @property
    def venv_python(self) -> str:
        return str(self.target / "bin" / "python")

    @property
    def installer(self) -> str:
        return "uv" if self.uv else "pip"


def ensure_venv(
    layout: Layout,
    dependency_digest: str,
    wheels: list[WheelEntry],
    python: str,
    emit: Emit,
    user_cache: bool = False,
    shells: VenvShells | None = None,
) -> VenvResult:
    """Make ``venvs/<digest>`` hold exactly ``wheels`` ({path, sha256}); reuse a complete one.
    ``user_cache``: uv uses the user's own cache instead of the deploy root's (see ``_uv_env``).
    ``shells``: the session's venvs started early, one of which may be this one's empty venv.

    Returns ``{reused, seconds, installer}``. Failures raise kind ``install`` with the
    installer's last output lines; the half-built venv is removed.
    """
    if not valid_digest(dependency_digest):
        raise AgentError(f"not a dependency digest: {dependency_digest!r}", kind="usage")
    target = layout.venv(dependency_digest)
    if _is_complete(target):
        return {"reused": True, "seconds": 0.0, "installer": None}
    started = time.monotonic()
    wheels, bundle = _checked_wheels(layout, wheels)
    if shells is not None:
        shells.wait(dependency_digest)
    reuse_shell = _is_shell_for(target, python)
    if (target.exists() or target.is_symlink()) and not reuse_shell:
        emit({"phase": "venv", "status": "cleanup", "detail": f"removing partial venv {target}"})
        _remove(target)
    layout.venvs.mkdir(parents=True, exist_ok=True)
    layout.tmp.mkdir(parents=True, exist_ok=True)
    uv = find_uv(layout)
    build = _Build(
        target=target,
        wheels=wheels,
        names=[w["path"] for w in wheels],
        python=python,
        uv=uv,
        env=_uv_env(layout, user_cache) if uv else _clean_env(),
        bundle=bundle,
    )
    emit(
        {
            "phase": "venv",
            "status": "building",
            "detail": f"{len(wheels)} wheels with {build.installer}",
        }
    )
    compiled = _build_venv(layout, build, reuse_shell, emit)
    seconds = round(time.monotonic() - started, 3)
    emit({"phase": "venv", "status": "built", "detail": dependency_digest, "seconds": seconds})
    return {
        "reused": False,
        "seconds": seconds,
        "installer": build.installer,
        "bytecode": "shipped" if compiled else "compiled",
    }


def _is_complete(target: Path) -> bool:
    # exists() follows the bin/python symlink: a venv whose base interpreter was removed is rebuilt.
    return (target / ".complete").is_file() and (target / "bin" / "python").exists()


def _checked_wheels(
    layout: Layout, entries: list[WheelEntry]
) -> tuple[list[WheelEntry], Path | None]:
    """The dependency wheels (names valid, blobs present and intact: AgentError otherwise) and
    the bytecode bundle's blob when it is usable."""
    bundles = [w for w in entries if isinstance(w, dict) and w.get("kind") == BYTECODE]
    wheels = [w for w in entries if not (isinstance(w, dict) and w.get("kind") == BYTECODE)]
    _validate_wheels(wheels)
    require(layout, [w["sha256"] for w in wheels])
    verify(layout, [w["sha256"] for w in wheels])
    return wheels, _usable_bundle(layout, [str(b.get("sha256")) for b in bundles])


def _usable_bundle(layout: Layout, shas: list[str]) -> Path | None:
    """The bytecode is an optimisation: without its blob (or with one changed on disk, which is
    quarantined) the host compiles, as it always could."""
    for sha in shas:
        if valid_sha(sha) and layout.blob(sha).is_file():
            if file_sha256(layout.blob(sha)) == sha:
                return layout.blob(sha)
            quarantine(layout, sha)
    return None


def _is_shell_for(target: Path, python: str) -> bool:
    """Whether ``target`` is an empty venv a shell job made for this very interpreter."""
    try:
        return (
            (target / SHELL_MARK).read_text(encoding="utf-8").strip() == python
            and not (target / ".complete").exists()
            and (target / "bin" / "python").exists()
        )
    except OSError:
        return False


def _build_venv(layout: Layout, build: _Build, reuse_shell: bool, emit: Emit) -> bool:
    """Create the venv, install the wheels, place their bytecode, write ``.complete``; True
    when the shipped bytecode was used. On any failure the venv is removed."""
    wheeldir = Path(tempfile.mkdtemp(prefix="wheels-", dir=layout.tmp))
    placing: _Unpack | None = None
    try:
        reqs = _stage_wheels(layout, build, wheeldir)
        if not (reuse_shell and build.uv):  # else made while the blobs arrived
            _create_venv(build)
        # Bytecode now, once per dependency set: services may not write to the venv, and every
        # start would compile everything again (seconds per boot). The controller's compiled
        # bundle saves the host that work when it suits this interpreter.
        site = _bundle_target(build.target, build.bundle) if build.bundle and build.wheels else None
        # The pycs go in while the installer places the sources (two processes, two cores):
        # each is a new file in a __pycache__ dir, which no installer writes to.
        placing = _Unpack(build.bundle, site) if site is not None and build.bundle else None
        _install_wheels(build, wheeldir, reqs, compiled=site is not None)
        compiled = site is not None and _bytecode_placed(build, placing, site, emit)
        atomic_write(build.target / ".complete", "\n".join(sorted(build.names)) + "\n")
    except BaseException:
        if placing is not None:
            placing.join()  # never remove the venv under a thread still writing into it
        _remove(build.target)
        raise
    finally:
        shutil.rmtree(wheeldir, ignore_errors=True)
    return compiled


def _stage_wheels(layout: Layout, build: _Build, wheeldir: Path) -> Path:
    """The wheels under their file names in ``wheeldir`` (the installers find them by name),
    and the hash-pinned requirements file naming them, which is returned."""
    for wheel, name in zip(build.wheels, build.names):
        _link_or_copy(layout.blob(wheel["sha256"]), wheeldir / name)
    reqs = wheeldir / "requirements.txt"
    reqs.write_text(_requirements(build.wheels, build.names), encoding="utf-8")
    return reqs


def _create_venv(build: _Build) -> None:
    if build.uv:
        _run([build.uv, "venv", "--python", build.python, str(build.target)], build.env)
    else:
        _run([build.python, "-m", "venv", str(build.target)], build.env)


def _install_wheels(build: _Build, wheeldir: Path, reqs: Path, compiled: bool) -> None:
    """Install offline, hashes required; ``compiled``: the bundle brings the bytecode, so the
    installer writes none."""
    if not build.wheels:
        return
    if build.uv:
        argv = [
            build.uv,
            "pip",
            "install",
            "--python",
            build.venv_python,
            "--offline",
            "--no-index",
            *([] if compiled else ["--compile-bytecode"]),
        ]
    else:
        argv = [
            build.venv_python,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-input",
            "--disable-pip-version-check",
            *(["--no-compile"] if compiled else []),
        ]
    _run([*argv, "--find-links", str(wheeldir), "--require-hashes", "-r", str(reqs)], build.env)


def _bytecode_placed(build: _Build, placing: _Unpack | None, site: Path, emit: Emit) -> bool:
    """Wait for the bundle's pycs; when it was unusable, compile here instead (False)."""
    if placing is not None and placing.join():
        return True
    emit({"phase": "venv", "status": "compile", "detail": "bytecode bundle unusable"})
    _run(
        [build.venv_python, "-m", "compileall", "-q", "-j", "0", str(site)],
        {k: v for k, v in build.env.items() if k != "PYTHONDONTWRITEBYTECODE"},
    )
    return False


def _bundle_target(venv: Path, bundle: Path) -> Path | None:
    """The venv's site-packages if the bundle was compiled for its Python version, else None
    (the installer then compiles on this host).

    The version comes from ``pyvenv.cfg``, not from running the interpreter: a pyc whose magic
    number does not match is ignored by Python anyway, so this only decides who compiles.
    """
    try:
        with zipfile.ZipFile(bundle) as zf:
            meta = json.loads(zf.read(BYTECODE_META))
        cfg = (venv / "pyvenv.cfg").read_text(encoding="utf-8")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    found = re.search(r"^\s*(?:version|version_info)\s*=\s*(\d+)\.(\d+)", cfg, re.MULTILINE)
    if (
        not found
        or not isinstance(meta, dict)
        or meta.get("python_version") != f"{found.group(1)}.{found.group(2)}"
        or meta.get("cache_tag") != f"cpython-{found.group(1)}{found.group(2)}"
        or "pypy" in cfg.lower()
    ):
        return None
    # Where posix venvs keep their packages (venv and uv alike).
    return venv / "lib" / f"python{found.group(1)}.{found.group(2)}" / "site-packages"


class _Unpack:
    """``_unpack_bytecode`` in a thread; ``join()`` returns its result."""

    def __init__(self, bundle: Path, site: Path) -> None:
        self.ok = False
        self.thread = threading.Thread(target=self._run, args=(bundle, site), daemon=True)
        self.thread.start()

    def _run(self, bundle: Path, site: Path) -> None:
        self.ok = _unpack_bytecode(bundle, site)

    def join(self) -> bool:
        self.thread.join()
        return self.ok


def _unpack_bytecode(bundle: Path, site: Path) -> bool:
    """Place the bundle's ``.pyc`` files in ``site`` (site-packages), where the wheels' modules
    are (being) installed.

    Only ``<dir>/__pycache__/<module>.<tag>.pyc`` entries are written, each as a new file
    (never through an existing one: installers hard-link their cache into venvs). They are
    checked-hash pycs: Python verifies each against its source's hash on import, so one
    without a source, or for another source, is never run. False when the bundle is
    unreadable (the caller then compiles here).
    """
    try:
        with zipfile.ZipFile(bundle) as zf:
            for info in zf.infolist():
                parts = info.filename.split("/")
                if (
                    len(parts) < 2
                    or parts[-2] != "__pycache__"
                    or not parts[-1].endswith(".pyc")
                    or any(p in ("", ".", "..") for p in parts)
                    or info.filename.startswith("/")
                ):
                    continue
                pycache = site.joinpath(*parts[:-1])
                pycache.mkdir(parents=True, exist_ok=True)
                try:
                    # O_EXCL: a new file, never written through a link into uv's cache; no temp
                    # file needed, since a crash leaves the venv without .complete (rebuilt)
                    fd = os.open(pycache / parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "wb") as f:
                    f.write(zf.read(info))
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    return True


def _validate_wheels(wheels: list[WheelEntry]) -> list[str]:
    names = []
    for wheel in wheels:
        name = wheel.get("path") if isinstance(wheel, dict) else None
        if (
            not isinstance(name, str)
            or "/" in name
            or "\\" in name
            or name.startswith(".")
            or not name.endswith(".whl")
            or name.count("-") < 4
        ):
            raise AgentError(f"not a wheel file name: {name!r}", kind="usage")
        if not valid_sha(wheel.get("sha256")):
            raise AgentError(f"wheel {name} has no valid sha256", kind="usage")
        names.append(name)
    return names


def _requirements(wheels: list[WheelEntry], names: list[str]) -> str:
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
    for key in (
        "VIRTUAL_ENV",
        "PYTHONHOME",
        "PYTHONPATH",
        "PIP_REQUIRE_VIRTUALENV",
        "CONDA_PREFIX",
    ):
        env.pop(key, None)
    return env


def _uv_env(layout: Layout, user_cache: bool = False) -> dict[str, str]:
    """uv's environment. Its cache is the deploy root's, on the venvs' filesystem (installs
    hard-link from it) and gone with the deploy root; with ``user_cache`` (the ``local`` stage:
    the controller's own machine and user) it is the user's own, where the test gate's venv and
    earlier deploys have already unpacked these very wheels: a first deploy then installs in a
    third of the time."""
    env = _clean_env()
    if not user_cache:
        env["UV_CACHE_DIR"] = str(layout.uv_cache)
    env["UV_NO_CONFIG"] = "1"
    env["UV_PYTHON_DOWNLOADS"] = "never"
    env.pop("UV_SYSTEM_PYTHON", None)
    return env


def _run(argv: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
    )
    if proc.returncode != 0:
        lines = proc.stdout.decode("utf-8", "replace").splitlines()[-OUTPUT_TAIL:]
        tail = "\n".join(lines)
        raise AgentError(
            f"installing dependencies failed: `{' '.join(argv[:3])} ...` exited "
            f"with {proc.returncode}:\n{tail}",
            kind="install",
            output_tail=tail,
        )


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
