"""The hosts' interpreters, and whether a wheelhouse serves one of them.

Each host's agent reports its interpreter in its ``hello`` (implementation, full version, ABI
tag, platform tag, glibc). A deploy resolves one wheelhouse per distinct interpreter of the stage
(docs/DESIGN.md, "Artifact"), the lock's environment markers evaluated for that interpreter, and
checks it here before anything is sent: every requirement a wheel declares for that interpreter
(``Requires-Dist`` whose marker holds there) has a wheel of a matching version in the same
wheelhouse, and every wheel's tags run there. A gap is the lock's: it was made for another Python
(``uv pip compile`` resolves for the Python it runs on), and ``uv pip install`` on the host
would fail with a resolver message that never says so.
"""

from __future__ import annotations

import platform
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from packaging import tags
from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from ..errors import OperationError, UsageError
from ._wheelhouse import PATCH_RELEASES, Lock, Target


@dataclass(frozen=True)
class Interpreter:
    """One host's Python, as its agent's ``hello`` says."""

    python: str  # the full version: "3.11.2"
    implementation: str  # "cpython"
    abi: str  # "cp311"
    platform: str  # "linux_x86_64"
    glibc: str | None = None  # "2.36"

    @property
    def python_version(self) -> str:
        return ".".join(self.python.split(".")[:2])

    @property
    def label(self) -> str:
        """``CPython 3.11.2 (cp311, linux_x86_64)``: how output names it."""
        name = {"cpython": "CPython", "pypy": "PyPy"}.get(self.implementation, self.implementation)
        return f"{name} {self.python} ({self.abi}, {self.platform})"

    @classmethod
    def from_hello(cls, hello: Mapping[str, object]) -> Interpreter | None:
        """The interpreter a hello reports; None when it lacks the facts (an older agent)."""
        python, abi, plat = hello.get("python"), hello.get("abi"), hello.get("platform")
        impl, glibc = hello.get("implementation"), hello.get("glibc")
        if not all(isinstance(v, str) and v for v in (python, abi, plat, impl)):
            return None
        return cls(
            str(python), str(impl), str(abi), str(plat), glibc if isinstance(glibc, str) else None
        )


def target_of(interp: Interpreter) -> Target:
    """The build target for one host interpreter. Native (``pip wheel`` here, which can build
    sdists) when this controller runs the same minor version, ABI and platform and the host's
    glibc is not older than ours (our wheels would need ours); else ``pip download`` for it."""
    from ._wheelhouse import controller_platform

    here = "{}.{}".format(*sys.version_info[:2])
    here_libc = platform.libc_ver()[1] if platform.libc_ver()[0] == "glibc" else ""
    native = (
        interp.python_version == here
        and interp.platform == controller_platform()
        and interp.implementation == sys.implementation.name == "cpython"
        and interp.abi == "cp{}{}".format(*sys.version_info[:2])
        and (not interp.glibc or not here_libc or _version(interp.glibc) >= _version(here_libc))
    )
    return Target(
        interp.python_version,
        interp.platform,
        native=native,
        python=interp.python,
        abi=interp.abi,
        implementation=interp.implementation,
        glibc=interp.glibc,
    )


def controller_interpreter() -> Interpreter:
    """This machine's interpreter, as its own agent would report it (the ``local`` stage's)."""
    from shiplane.agent.server import abi_tag, glibc_version

    from ._wheelhouse import controller_platform

    return Interpreter(
        platform.python_version(),
        sys.implementation.name,
        abi_tag(),
        controller_platform(),
        glibc_version(),
    )


def distinct(hosts: Mapping[str, Interpreter]) -> list[tuple[Interpreter, list[str]]]:
    """The stage's distinct interpreters, each with its hosts, in the hosts' order."""
    out: dict[Interpreter, list[str]] = {}
    for host, interp in hosts.items():
        out.setdefault(interp, []).append(host)
    return list(out.items())


# --- which target of an artifact a host installs ------------------------------------------------


def _minor(version: str) -> str:
    return ".".join(version.strip().split(".")[:2])


def target_fits(target: Mapping[str, str], hello: Mapping[str, object]) -> bool:
    """Whether wheels resolved for ``target`` (a manifest's target) serve the host of ``hello``:
    the same minor version and platform, and, when the target names them (a target resolved for
    a host's interpreter), the same full version, ABI and glibc ceiling or a newer glibc."""
    from ._hostfit import platform_fits

    want_py, have_py = target.get("python_version"), hello.get("python_version")
    if want_py and isinstance(have_py, str) and _minor(have_py) != _minor(want_py):
        return False
    want_plat, have_plat = target.get("platform"), hello.get("platform")
    if want_plat and isinstance(have_plat, str) and not platform_fits(want_plat, have_plat):
        return False
    for key in ("python", "abi", "implementation"):
        if target.get(key) and isinstance(hello.get(key), str) and hello.get(key) != target[key]:
            return False
    want_libc, have_libc = target.get("glibc"), hello.get("glibc")
    older = isinstance(have_libc, str) and _version(have_libc) < _version(want_libc or "0")
    return not (want_libc and older)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def target_index(targets: Sequence[Mapping[str, str]], hello: Mapping[str, object]) -> int | None:
    """The artifact target the host installs: the first that fits it; None when none does."""
    for index, target in enumerate(targets):
        if target_fits(target, hello):
            return index
    return None


# --- the check: does a wheelhouse install on an interpreter -------------------------------------


@dataclass(frozen=True)
class _Dist:
    name: str  # canonical
    version: Version | None
    requires: tuple[Requirement, ...]
    requires_python: str | None
    wheel: str


def _metadata(entry: Path | tuple[str, Path]) -> _Dist:
    """A wheel's name, version and requirements; ``entry`` a wheel file, or (its file name, the
    path it is stored at) for a blob of the build's store."""
    filename, wheel = (entry.name, entry) if isinstance(entry, Path) else entry
    name, version, _, _ = parse_wheel_filename(filename)
    requires: list[Requirement] = []
    requires_python = None
    with zipfile.ZipFile(wheel) as archive:
        member = next(
            (
                n
                for n in archive.namelist()
                if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
            ),
            None,
        )
        if member is not None:
            headers = HeaderParser().parsestr(archive.read(member).decode("utf-8", "replace"))
            requires_python = headers.get("Requires-Python")
            for line in headers.get_all("Requires-Dist") or []:
                try:
                    requires.append(Requirement(line))
                except InvalidRequirement:
                    continue
    return _Dist(str(canonicalize_name(name)), version, tuple(requires), requires_python, filename)


def marker_env(target: Mapping[str, str]) -> dict[str, str]:
    """PEP 508 marker variables of a target's interpreter (its full version when known)."""
    from ._wheelhouse import _target_os_arch

    os_name, arch = _target_os_arch(target.get("platform", "linux_x86_64"))
    impl = target.get("implementation", "cpython")
    py = target.get("python_version", "3")
    return {
        **{k: str(v) for k, v in default_environment().items()},
        "python_version": py,
        "python_full_version": target.get("python") or f"{py}.0",
        "implementation_name": impl,
        "platform_python_implementation": {"cpython": "CPython", "pypy": "PyPy"}.get(impl, impl),
        "sys_platform": os_name,
        "platform_system": {"linux": "Linux", "darwin": "Darwin"}.get(os_name, os_name),
        "platform_machine": arch,
        "os_name": "posix",
    }


def _supported_tags(target: Mapping[str, str]) -> set[tags.Tag] | None:
    """The wheel tags the target's interpreter installs; None when not CPython (not checked)."""
    from ._wheelhouse import _pip_platforms

    if target.get("implementation", "cpython") != "cpython":
        return None
    version = tuple(int(p) for p in target.get("python_version", "3.11").split("."))
    plats = _pip_platforms(target.get("platform", "linux_x86_64"), target.get("glibc"))
    abi = target.get("abi") or "cp{}{}".format(*version[:2])
    return {
        *tags.cpython_tags(version, abis=[abi], platforms=plats),
        *tags.compatible_tags(version, f"cp{version[0]}{version[1]}", plats),
    }


@dataclass(frozen=True)
class Gap:
    """What a wheelhouse lacks for one interpreter, in words for the user."""

    package: str
    why: str
    conditional: bool = False  # a requirement with a marker that holds there (not everywhere)


def check_wheelhouse(
    wheels: Iterable[Path | tuple[str, Path]],
    target: Mapping[str, str],
    wanted: Iterable[Requirement] = (),
    holder: str = "the lock",
) -> list[Gap]:
    """What keeps ``wheels`` from installing offline on ``target``'s interpreter: a requirement of
    a wheel (or of the lock, ``wanted``) whose marker holds there and that no wheel satisfies, a
    wheel whose tags do not run there, a wheel whose ``Requires-Python`` excludes it. ``holder``
    names what lacks the package in the gaps' words (the lock; at a deploy, the artifact)."""
    dists = {d.name: d for d in map(_metadata, wheels)}
    base = marker_env(target)
    # without the full version, a requirement counts when it holds on every patch release
    envs = (
        [base]
        if target.get("python")
        else [
            {**base, "python_full_version": f"{target.get('python_version')}.{n}"}
            for n in range(PATCH_RELEASES)
        ]
    )
    supported = _supported_tags(target)
    gaps: list[Gap] = []
    for dist in dists.values():
        if supported is not None and not any(
            t in supported for t in parse_wheel_filename(dist.wheel)[3]
        ):
            gaps.append(Gap(dist.name, f"its wheel {dist.wheel} does not run there"))
        if dist.requires_python and target.get("python"):
            try:
                if Version(target["python"]) not in SpecifierSet(dist.requires_python):
                    gaps.append(
                        Gap(dist.name, f"it requires Python {dist.requires_python} ({dist.wheel})")
                    )
            except (InvalidSpecifier, InvalidVersion):
                pass
    # the host installs every wheel of its wheelhouse (agent/venvs.py): each one's requirements,
    # and those of the extras asked of it (by the lock or by another package), must be there
    extras: dict[str, set[str]] = {name: set() for name in dists}
    _missing([("the lock", req, {""}) for req in wanted], dists, envs, extras, gaps, holder)
    grew = True
    while grew:  # each pass may ask new extras of a package: at most one pass per extra
        grew = _missing(
            [
                (f"{d.name} {d.version}", req, {"", *extras[d.name]})
                for d in dists.values()
                for req in d.requires
            ],
            dists,
            envs,
            extras,
            gaps,
            holder,
        )
    return _unique(gaps)


def _missing(
    asked: list[tuple[str, Requirement, set[str]]],
    dists: Mapping[str, _Dist],
    envs: Sequence[Mapping[str, str]],
    extras: dict[str, set[str]],
    gaps: list[Gap],
    holder: str,
) -> bool:
    """One pass over the requirements ``asked`` (who asks, what, with which extras): unmet ones
    become gaps; extras newly asked of a package are recorded. True when any was new."""
    grew = False
    for who, req, with_extras in asked:
        marker = req.marker
        if marker is not None and not all(
            any(marker.evaluate({**env, "extra": extra}) for extra in with_extras) for env in envs
        ):
            continue
        name = str(canonicalize_name(req.name))
        have = dists.get(name)
        if have is None or (
            have.version is not None and not req.specifier.contains(have.version, prereleases=True)
        ):
            shown = f"; {marker}" if marker else ""
            has = f"{have.name} {have.version}" if have else f"no {req.name}"
            holds = ", which holds there," if marker else ""
            gaps.append(
                Gap(
                    req.name,
                    f"{who} requires `{req.name}{req.specifier}{shown}`{holds} and {holder} "
                    f"has {has}",
                    conditional=marker is not None,
                )
            )
        elif not set(req.extras) <= extras[name]:
            extras[name] |= set(req.extras)
            grew = True
    return grew


def lock_requirements(lock: Lock | None) -> list[str]:
    """The lock's requirements as the manifest records them (``requires``): name, extras,
    version and marker, no URL (a VCS or index URL may carry a credential) and no hashes, so a
    deploy can check the artifact for a host of another patch release as the build did."""
    found: set[str] = set()
    for line in lock.lines if lock else []:
        try:
            req = Requirement(line.split(" --")[0].strip())
        except InvalidRequirement:
            continue
        if req.url is None:
            found.add(str(req))
    return sorted(found)


def _unique(gaps: list[Gap]) -> list[Gap]:
    out: dict[tuple[str, str], Gap] = {}
    for gap in gaps:
        out.setdefault((gap.package, gap.why), gap)
    return list(out.values())


def refuse_gaps(gaps: Sequence[Gap], label: str, hosts: Sequence[str], lock_name: str) -> None:
    """The build's error for a wheelhouse that would not install on some hosts: one paragraph
    naming the package, the requirement and its marker, the hosts and their interpreter (exit 2:
    the lock is the user's to fix, and nothing was sent)."""
    if not gaps:
        return
    shown = "; ".join(f"{g.package}: {g.why}" for g in gaps[:5])
    more = f" (and {len(gaps) - 5} more)" if len(gaps) > 5 else ""
    where = ", ".join(hosts)
    why = (
        "The lock was resolved for another Python than theirs"
        if any(g.conditional for g in gaps)
        else "The lock is incomplete"
    )
    raise UsageError(
        f"the lock {lock_name} lacks what {where} need{'s' if len(hosts) == 1 else ''} on "
        f"{label}: {shown}{more}. {why}; nothing was sent.",
        hint="lock for every Python the hosts run (e.g. `uv pip compile --universal "
        "requirements.in -o requirements.txt`, or `uv lock`), then deploy again",
    )


def checked_wheelhouse(
    lock: Lock | None,
    target: Target,
    hosts: Sequence[str],
    server_packages: Sequence[str],
    cache: Path,
    emit: Callable[[str, str], None],
) -> list[Path]:
    """The wheelhouse for one target (``_wheelhouse.build_wheelhouse``), checked for it: a lock
    that lacks a package there, or a wheel that does not run there, stops the build naming the
    package, its marker and the ``hosts`` (the deploy file's target when none are named)."""
    from ._wheelhouse import build_wheelhouse

    if hosts:
        emit("wheelhouse", f"for {', '.join(hosts)}: {_label(target)}")
    wheels = build_wheelhouse(lock, target, server_packages, cache, emit)
    have = {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels}
    for pkg in server_packages:
        if canonicalize_name(pkg) not in have:
            raise OperationError(
                f"the wheelhouse for {_label(target)} has no {pkg} wheel, which the app's "
                "server needs"
            )
    wanted = []
    for line in lock.lines if lock else []:
        try:
            wanted.append(Requirement(line.split(" --")[0].strip()))
        except InvalidRequirement:
            continue
    gaps = check_wheelhouse(wheels, target.to_dict(), wanted)
    refuse_gaps(
        gaps,
        _label(target),
        list(hosts) or ["the hosts"],
        lock.path.name if lock else "(none)",
    )
    return wheels


def _label(target: Target) -> str:
    """``CPython 3.11.2 (cp311, linux_x86_64)``, or ``Python 3.11 on linux_x86_64``."""
    if target.python and target.abi and target.implementation:
        interp = Interpreter(target.python, target.implementation, target.abi, target.platform)
        return interp.label
    return f"Python {target.python_version} on {target.platform}"
