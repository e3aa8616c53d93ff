"""The wheelhouse: every locked dependency as a wheel for the hosts' Python and platform.

Built with pip (``pip wheel`` for the controller's own target, ``pip download --only-binary``
for another one) and cached by the digest of the lock, the target and the server packages, so a
second build with the same lock never runs pip. A fully pinned lock's wheelhouse is cached per
user (``_cache.cache_root()``), so it also outlives ``shiplane clean`` and serves every project.
"""

from __future__ import annotations

import hashlib
import platform as _platform
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from ..errors import OperationError
from ..secret import Secret
from ._cache import cached_files
from ._direct import direct_reference, wheel_directs
from ._index import PackageAccess, absolute_find_links, whose_requirement
from ._locks import LockFile, export, find_lock, lock_format

Emit = Callable[[str, str], None]


@dataclass(frozen=True)
class Target:
    """The hosts' interpreter: "3.11" and a platform tag such as "linux_x86_64"; resolved for a
    host's own interpreter (``_interpreters.Interpreter``) also its full version, ABI tag,
    implementation and glibc, and the lock's markers are then evaluated for exactly that."""

    python_version: str
    platform: str
    native: bool  # the controller's own target: wheels can be built here with `pip wheel`
    python: str | None = None  # the full version "3.11.2"; None: any patch release
    abi: str | None = None  # "cp311"
    implementation: str | None = None  # "cpython"
    glibc: str | None = None  # the hosts' glibc "2.36": the newest manylinux tag they run

    def to_dict(self) -> dict[str, str]:
        exact = {
            "python": self.python,
            "abi": self.abi,
            "implementation": self.implementation,
            "glibc": self.glibc,
        }
        return {
            "python_version": self.python_version,
            "platform": self.platform,
            **{k: v for k, v in exact.items() if v},
        }


def controller_platform() -> str:
    """This machine's platform tag, e.g. ``linux_x86_64``."""
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


def resolve_target(python_version: str | None, platform: str | None) -> Target:
    """The build target; a missing value means the controller's own."""
    here_py = f"{sys.version_info.major}.{sys.version_info.minor}"
    here_plat = controller_platform()
    py = python_version or here_py
    plat = platform or here_plat
    return Target(py, plat, native=(py == here_py and plat == here_plat))


def _pip_platforms(plat: str, glibc: str | None = None) -> list[str]:
    """pip ``--platform`` values for a target: ``linux_<arch>`` also accepts manylinux wheels
    up to the hosts' ``glibc`` (else this controller's, or 2.17), ``manylinux_2_N_<arch>``
    those up to 2.N."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", plat)
    if m:
        top, arch = int(m.group(1)), m.group(2)
    elif plat.startswith("linux_"):
        arch = plat[len("linux_") :]
        libc, ver = ("glibc", glibc) if glibc else _platform.libc_ver()
        top = int(ver.split(".")[1]) if libc == "glibc" and ver.count(".") >= 1 else 17
    else:
        return [plat]
    tags = [f"manylinux_2_{n}_{arch}" for n in range(top, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for n, name in legacy.items() if n <= top]
    return [*tags, f"linux_{arch}"]


def _logical_lines(text: str) -> list[str]:
    """Requirement-file lines with continuations joined and comments removed."""
    joined = re.sub(r"\\\r?\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append(line)
    return out


@dataclass
class Lock:
    """A pip-style lock read for building: its bytes (with included files), pins and options."""

    path: Path
    data: bytes  # the lock's bytes and those of every `-r`/`-c` file it includes
    lines: list[str]  # normalised lines pip gets (editables dropped, included paths absolute)
    names: set[str]  # canonical names of the requirements
    pins: dict[str, str]  # canonical name -> "name==version" for exact pins
    hashed: bool
    format: str = "requirements"  # or "uv", "poetry", "pdm", "pipenv", "pyproject" (_locks)
    warning: str | None = None  # e.g. a pyproject.toml without a lock: not reproducible
    # VCS requirements at a commit and path ones (their files are in ``data``): as good as pins
    fixed: set[str] = field(default_factory=set)
    # [build] secrets pip expands in the lock's index options (``${NAME}``): never in ``data``
    secrets: tuple[Secret, ...] = field(default=(), compare=False, repr=False)


def load_lock(project: Path, requirements: str) -> Lock:
    """The lock of ``project``: ``requirements`` ([build] requirements) or, when it is empty,
    the one found (``_locks.DETECTION_ORDER``); none found is a ConfigError."""
    found = find_lock(project, requirements)
    lock = read_lock(found.path, format=found.format)
    lock.warning = lock.warning or unpinned_warning(lock)
    return lock


def unpinned_warning(lock: Lock) -> str | None:
    """An incomplete lock: requirements without an exact pin (``flask>=3``) resolve to whatever
    is newest at each build, so two builds may ship different versions."""
    loose = sorted(lock.names - set(lock.pins) - lock.fixed)
    if not loose:
        return None
    shown = ", ".join(loose[:5]) + (f" and {len(loose) - 5} more" if len(loose) > 5 else "")
    # a VCS requirement at a tag or branch (_direct): its fix is a commit, not a resolver
    moving = sorted(
        {d.name for x in lock.lines if (d := direct_reference(x, lock.path.parent)) and d.name}
        & set(loose)
    )
    if moving == loose:
        return (
            f"{lock.path.name} names {len(loose)} VCS requirement(s) by a tag or branch "
            f"({shown}), which can move: two builds may ship different code; name each "
            "one's commit (`...@<commit id>`)"
        )
    return (
        f"{lock.path.name} does not pin {len(loose)} requirement(s) ({shown}): each build takes "
        f"their newest versions, so two builds may differ; pin them all, e.g. "
        f"`uv pip compile requirements.in -o {lock.path.name}`"
        + (f" (and name the commit of {', '.join(moving)})" if moving else "")
    )


def read_lock(path: Path, *, format: str | None = None, _seen: set[Path] | None = None) -> Lock:
    """Read a requirements-style lock; ``-r``/``-c`` includes are read too (they are inputs).

    A lock of another format (``format``, or what the file's name says: uv.lock, poetry.lock,
    pdm.lock, Pipfile.lock, pyproject.toml) is turned into requirements lines first
    (``_locks.export``); ``data`` is then its bytes and those lines'."""
    if _seen is None and (format or lock_format(path.name)) != "requirements":
        fmt = format or lock_format(path.name)
        exported = export(LockFile(path.resolve(), fmt, detected=False))
        text = exported.text.encode()
        lock = _parse_lock(path.resolve(), text, set())
        # what parsing added after the text (a path requirement's files, _direct) stays
        lock.data = exported.data + lock.data[len(text) :]
        lock.format, lock.warning = fmt, exported.warning
        return lock
    seen = _seen if _seen is not None else set()
    path = path.resolve()
    if path in seen:
        return Lock(path, b"", [], set(), {}, False)
    seen.add(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise OperationError(
            f"cannot read the lock {path}: {exc.strerror}",
            hint="set [build] requirements to your requirements file",
        ) from exc
    return _parse_lock(path, raw, seen)


def _parse_lock(path: Path, raw: bytes, seen: set[Path]) -> Lock:
    lock = Lock(path, raw, [], set(), {}, False)
    for line in _logical_lines(raw.decode("utf-8", errors="replace")):
        m = re.match(r"^(-r|--requirement|-c|--constraint)[\s=]+(\S+)$", line)
        if m:
            included = read_lock(path.parent / m.group(2), _seen=seen)
            lock.data += b"\0" + included.data
            lock.lines.append(f"{m.group(1)} {included.path}")
            if m.group(1) in ("-r", "--requirement"):
                lock.names |= included.names
                lock.pins.update(included.pins)
                lock.hashed |= included.hashed
            continue
        direct = direct_reference(line, path.parent)
        if direct is not None:  # VCS or path: built into a wheel with the wheelhouse (_direct)
            if not direct.is_app:  # the app itself ships as the app wheel, never in the venv
                lock.lines.append(direct.line)
                lock.data += b"\0" + direct.digest()
                lock.names |= {direct.name} if direct.name else set()
                lock.fixed |= {direct.name} if direct.name and direct.fixed else set()
            continue
        if re.match(r"^(-e|--editable)\b", line):
            continue  # an editable of neither a path nor VCS: nothing a host could install
        line = absolute_find_links(line, path.parent)
        lock.lines.append(line)
        if line.startswith("-"):
            continue
        lock.hashed |= "--hash" in line
        try:
            req = Requirement(line.split(" --")[0].strip())
        except InvalidRequirement:
            continue
        name = canonicalize_name(req.name)
        lock.names.add(name)
        spec = list(req.specifier)
        if len(spec) == 1 and spec[0].operator in ("==", "==="):
            lock.pins[name] = f"{req.name}=={spec[0].version}"
    return lock


def _pip(
    args: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m pip`` with ``env`` (``PackageAccess.env``: the build secrets, offline)."""
    try:
        import pip  # noqa: F401
    except ModuleNotFoundError as exc:
        raise OperationError(
            f"pip is not installed in shiplane's environment ({sys.executable})",
            hint="install it there (`python -m ensurepip` or `uv pip install pip`)",
        ) from exc
    env = env if env is not None else PackageAccess().env()
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
    )


def _failed_requirement(output: str) -> str | None:
    for pattern in (
        r"No matching distribution found for ([^\s;]+)",
        r"Could not find a version that satisfies the requirement ([^\s;]+)",
        r"Failed to build ([^\s]+)",
        r"ERROR: Cannot install ([^\s]+)",
    ):
        m = re.search(pattern, output)
        if m:
            return m.group(1).rstrip(",.")
    return None


def _tail(output: str, n: int = 12) -> str:
    noise = ("is ignored: it is neither", "Looking in ", "━", "Downloading ", "Collecting ")
    lines = [ln for ln in output.splitlines() if ln.strip() and not any(x in ln for x in noise)]
    return "\n".join(lines[-n:])


def _fail(what: str, output: str) -> OperationError:
    req = _failed_requirement(output)
    bad_hash = re.search(r"DO NOT MATCH THE HASHES.*?\n\s+(\S+) from", output, re.DOTALL)
    if bad_hash:
        head = f"{what}: {bad_hash.group(1)} does not match the hash in the lock"
    elif req:
        head = f"{what}: {req} cannot be resolved"
    else:
        head = f"{what} failed"
    return OperationError(
        f"{head}\n{_tail(output)}", hint="check the pins in the lock (name, version, target Python)"
    )


def _wheels(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.whl") if p.is_file())


def pinned(lock: Lock | None, server_packages: Sequence[str]) -> bool:
    """True when the lock alone decides the wheelhouse: every requirement an exact pin (or
    hashed) and every server package in it. Such a wheelhouse may be cached beyond the project
    (``shiplane clean`` need not re-resolve it); a looser one is resolved again after a clean."""
    if lock is None or not lock.names:
        return False
    loose = lock.names - set(lock.pins) - lock.fixed
    return (not loose or lock.hashed) and all(
        canonicalize_name(p) in lock.names for p in server_packages
    )


def wheelhouse_key(lock: Lock | None, target: Target, server_packages: Sequence[str]) -> str:
    """The cache key of a wheelhouse: lock bytes + target + server packages."""
    h = hashlib.sha256(b"shiplane-wheelhouse-v2\0")  # v2: markers for any patch release
    h.update(lock.data if lock else b"")
    h.update(f"\0{target.python_version}\0{target.platform}\0".encode())
    if target.python:  # resolved for one host interpreter: its markers and tags decide
        h.update(
            f"{target.python}\0{target.abi}\0{target.implementation}\0{target.glibc}\0".encode()
        )
    h.update("\0".join(sorted(server_packages)).encode())
    return h.hexdigest()


def build_wheelhouse(
    lock: Lock | None,
    target: Target,
    server_packages: Sequence[str],
    cache: Path,
    emit: Emit,
) -> list[Path]:
    """Every dependency wheel for ``target`` (the lock plus missing server packages), cached."""
    names = lock.names if lock else set()
    missing = [p for p in server_packages if canonicalize_name(p) not in names]
    key = wheelhouse_key(lock, target, server_packages)
    if (cache / key / ".complete").is_file():
        emit("wheelhouse", f"reused {key[:12]}")
    access = PackageAccess.of(lock.lines, lock.secrets) if lock else PackageAccess()
    env = access.env()

    def fill(out: Path) -> None:
        work = out / ".work"
        work.mkdir()
        req_args: list[str] = []
        if lock:
            access.require_names(lock.lines, lock.path.name)
        # VCS and path requirements become wheels first, pinned by name and version (_direct)
        lines = wheel_directs(lock.lines, work, access, lock.hashed, emit) if lock else []
        if lock and lock.lines:
            normalised = work / "requirements.txt"
            normalised.write_text("\n".join(lines) + "\n")
            req_args = ["-r", str(normalised)]
        # Server packages resolve against the lock's pins; with hashes in the lock pip demands
        # hashes for everything, so they get a second run constrained by the pins.
        if lock and lock.hashed and missing:
            constraints = work / "constraints.txt"
            constraints.write_text(
                "".join(p + "\n" for p in [*access.options, *lock.pins.values()])
            )
            runs = [req_args, ["-c", str(constraints), *missing]]
        else:
            # In one run the lock's pins already constrain what the server packages may pull.
            runs = [req_args + missing]
        if lock and lock.lines and (not target.native or pinned(lock, [])):
            # pip evaluates markers against the controller's own Python, its patch release too
            # (3.11.7), not the hosts' (3.11.2: `python_full_version <= "3.11.2"`): pick the lock's
            # lines for the target ourselves, any patch release of it; a lock is complete, so no
            # resolving is needed
            normalised.write_text("\n".join(_for_target(lines, target)) + "\n")
            runs = [["--no-deps", *req_args]]
            if missing:
                constraints = work / "constraints.txt"
                constraints.write_text(
                    "".join(p + "\n" for p in [*access.options, *lock.pins.values()])
                )
                runs.append(["-c", str(constraints), *missing])
        verb = "pip wheel" if target.native else "pip download"
        for args in (a for a in runs if a):
            what = ([f"{len(lock.names)} locked"] if lock and "-r" in args else []) + [
                a for a in args if a in missing
            ]
            emit(
                "wheelhouse",
                f"{verb} ({' + '.join(what)}) for Python "
                f"{target.python_version} on {target.platform}",
            )
            try:
                if target.native:
                    _native(args, out, work, env)
                else:
                    _foreign(args, out, work, target, emit, env)
            except OperationError as exc:
                # pip names our normalised copy of the lock; the user knows the original.
                shown = exc.message.replace(
                    str(work / "requirements.txt"), str(lock.path if lock else "")
                )
                message, hint = whose_requirement(
                    shown,
                    exc.hint,
                    lock=lock.path if lock else None,
                    locked=names,
                    added=missing,
                    access=access,
                )
                raise OperationError(message, hint=hint) from None
        shutil.rmtree(work)

    wheels = cached_files(cache, key, fill)
    emit("wheelhouse", f"{len(wheels)} wheels")
    return wheels


def _native(args: list[str], out: Path, work: Path, env: Mapping[str, str]) -> None:
    result = _pip(["wheel", "--wheel-dir", str(out), *args], work, env)
    if result.returncode != 0:
        raise _fail("building the wheelhouse", result.stdout)


PATCH_RELEASES = 40  # patch releases of a Python minor version a host may run (3.X.0 .. 3.X.39)


def _for_target(lines: Sequence[str], target: Target) -> list[str]:
    """The lock's lines whose environment markers hold on the target, on any of its patch
    releases, without the markers."""
    from packaging.markers import default_environment
    from packaging.requirements import InvalidRequirement, Requirement

    os_name, arch = _target_os_arch(target.platform)
    env: dict[str, str] = {
        **{k: str(v) for k, v in default_environment().items()},
        "python_version": target.python_version,
        "python_full_version": f"{target.python_version}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": os_name,
        "platform_system": {"linux": "Linux", "darwin": "Darwin"}.get(os_name, os_name),
        "platform_machine": arch,
        "os_name": "posix",
    }
    # a host's own interpreter: its full version; else the hosts' patch release is known only
    # at install, and a line wanted on any of them ships
    patches = (
        [{**env, "python_full_version": target.python}]
        if target.python
        else [
            {**env, "python_full_version": f"{target.python_version}.{n}"}
            for n in range(PATCH_RELEASES)
        ]
    )
    out = []
    for line in lines:
        spec, sep, options = line.partition(" --")
        try:
            req = Requirement(spec.strip())
        except InvalidRequirement:
            out.append(line)
            continue
        if req.marker is not None and not any(req.marker.evaluate(patch) for patch in patches):
            continue
        req.marker = None
        out.append(str(req) + (f" --{options}" if sep else ""))
    return out


def _target_os_arch(platform: str) -> tuple[str, str]:
    """("linux", "x86_64") from "linux_x86_64" / "manylinux_2_17_x86_64"; ("darwin", ...) for macOS."""
    if platform.startswith("macosx"):
        return "darwin", platform.rsplit("_", 1)[-1] if not platform.endswith(
            "universal2"
        ) else "arm64"
    for arch in ("x86_64", "aarch64", "i686", "armv7l", "ppc64le", "s390x"):
        if platform.endswith(arch):
            return "linux", arch
    return "linux", platform.rsplit("_", 1)[-1]


def _foreign(
    args: list[str], out: Path, work: Path, target: Target, emit: Emit, env: Mapping[str, str]
) -> None:
    """``pip download`` wheels for another target; pure-Python sdists are built here once."""
    local = work / "built"
    local.mkdir(exist_ok=True)
    plat_args = [
        a for p in _pip_platforms(target.platform, target.glibc) for a in ("--platform", p)
    ]
    if target.abi and target.abi != "cp" + target.python_version.replace(".", ""):
        # a free-threaded or debug build (cp313t): pip's default ABI for the version is not it
        plat_args += ["--abi", target.abi, "--abi", "abi3", "--abi", "none"]
    tried: set[str] = set()
    while True:
        result = _pip(
            [
                "download",
                "--only-binary=:all:",
                "--implementation",
                "cp",
                "--python-version",
                target.python or target.python_version,  # Requires-Python of the exact version
                *plat_args,
                "--find-links",
                str(local),
                "--dest",
                str(out),
                *args,
            ],
            work,
            env,
        )
        if result.returncode == 0:
            return
        req = _failed_requirement(result.stdout)
        if (
            "requires a different python" in result.stdout.lower()
            or "requires-python" in result.stdout.lower()
        ):
            raise _fail(
                f"resolving the wheelhouse for Python {target.python_version} on {target.platform} "
                "(a pin does not support that Python)",
                result.stdout,
            )
        if req is None or req in tried:
            raise _fail(
                f"resolving the wheelhouse for Python {target.python_version} on {target.platform}",
                result.stdout,
            )
        tried.add(req)
        emit("wheelhouse", f"{req}: no wheel for the target, building it from source")
        built = work / "sdist-build"
        shutil.rmtree(built, ignore_errors=True)
        res = _pip(
            ["wheel", "--no-deps", "--no-binary=:all:", "--wheel-dir", str(built), req], work, env
        )
        if res.returncode != 0:
            raise OperationError(
                f"{req} cannot be resolved: no wheel for Python {target.python_version} on "
                f"{target.platform}, and no source distribution that builds\n{_tail(res.stdout)}",
                hint="check the pin, or pick a version that has wheels for the hosts",
            )
        for whl in _wheels(built):
            tags = parse_wheel_filename(whl.name)[3]
            if any(t.abi != "none" or t.platform != "any" for t in tags):
                raise OperationError(
                    f"{req} has no wheel for Python {target.python_version} on "
                    f"{target.platform} and is not pure Python, so it cannot be built here",
                    hint="build on a machine like the hosts, or pick a version with wheels",
                )
            shutil.move(str(whl), local / whl.name)
