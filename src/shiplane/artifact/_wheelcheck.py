"""Does a wheelhouse install on an interpreter? Checked before anything is sent.

The hosts install every wheel of their wheelhouse offline (agent/venvs.py), so each wheel's tags
must run on the host's interpreter, its ``Requires-Python`` admit the version, and every
requirement a wheel (or the lock) declares whose marker holds there, with the extras asked of
it, must have a wheel of a matching version beside it. A gap is the lock's: it was resolved for
another Python (``uv pip compile`` resolves for the Python it runs on), and ``uv pip install``
on the host would fail with a resolver message that never says so (docs/hosts.md, "Hosts on
other Pythons").
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from packaging import tags
from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from ..errors import UsageError
from ._wheelhouse import PATCH_RELEASES, Lock


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
