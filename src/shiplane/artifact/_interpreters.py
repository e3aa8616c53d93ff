"""The hosts' interpreters: what each host runs, and which artifact target serves it.

Each host's agent reports its interpreter in its ``hello`` (implementation, full version, ABI
tag, platform tag, glibc). A deploy resolves one wheelhouse per distinct interpreter of the stage
(docs/DESIGN.md, "Artifact"), the lock's environment markers evaluated for that interpreter, and
checks each (``_wheelcheck``) before anything is sent; each host then installs the target that
fits it (:func:`target_index`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from ..errors import OperationError
from ._wheelcheck import check_wheelhouse, refuse_gaps
from ._wheelhouse import Lock, Target


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
    from shiplane.agent.interpreter import abi_tag, glibc_version

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
    # a wheelhouse found complete for a target stays so (~0.07 s of reading wheels' metadata
    # on every deploy): remembered by its wheels, the target and the lock's lines
    key = hashlib.sha256(
        json.dumps(
            [
                sorted((w.name, w.stat().st_size) for w in wheels),
                target.to_dict(),
                [str(r) for r in wanted],
            ]
        ).encode()
    ).hexdigest()
    checked = cache / "checked" / key
    if checked.exists():
        return wheels
    gaps = check_wheelhouse(wheels, target.to_dict(), wanted)
    refuse_gaps(
        gaps,
        _label(target),
        list(hosts) or ["the hosts"],
        lock.path.name if lock else "(none)",
    )
    try:
        checked.parent.mkdir(parents=True, exist_ok=True)
        checked.touch()
    except OSError:
        pass  # a read-only cache: checked again next time
    return wheels


def _label(target: Target) -> str:
    """``CPython 3.11.2 (cp311, linux_x86_64)``, or ``Python 3.11 on linux_x86_64``."""
    if target.python and target.abi and target.implementation:
        interp = Interpreter(target.python, target.implementation, target.abi, target.platform)
        return interp.label
    return f"Python {target.python_version} on {target.platform}"
