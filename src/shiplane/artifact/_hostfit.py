"""Does a host fit an artifact? Its Python and platform against the artifact's build target.

The wheelhouse is resolved for one target (``[build] python_version`` / ``platform``); a host
whose interpreter is another minor version, or whose OS or CPU differs, cannot install it offline
(compiled wheels carry the ABI and the platform in their tags), so the deploy stops before it
sends anything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# Every Linux platform tag names the same OS: the generic one a Linux host reports and the
# manylinux/musllinux ones a wheelhouse may be resolved for.
_LINUX = re.compile(
    r"^(?:linux|manylinux1|manylinux2010|manylinux2014|manylinux_\d+_\d+|musllinux_\d+_\d+)_(.+)$"
)
_MACOS = re.compile(r"^macosx_\d+_\d+_(.+)$")
# macOS "fat" targets and the architectures they hold
_FAT = {
    "universal2": {"x86_64", "arm64"},
    "universal": {"x86_64", "i386", "ppc", "ppc64"},
    "intel": {"x86_64", "i386"},
    "fat64": {"x86_64", "ppc64"},
    "fat3": {"x86_64", "i386", "ppc"},
}


def os_and_arch(platform: str) -> tuple[str, str]:
    """``linux_x86_64`` and ``manylinux_2_17_x86_64`` -> ("linux", "x86_64");
    ``macosx_11_0_arm64`` -> ("macosx", "arm64"); ``win_amd64`` -> ("win", "amd64")."""
    tag = platform.strip().lower().replace("-", "_").replace(".", "_")
    for os_name, pattern in (("linux", _LINUX), ("macosx", _MACOS)):
        found = pattern.match(tag)
        if found:
            return os_name, found.group(1)
    if tag == "win32":
        return "win", "x86"
    os_name, _, arch = tag.partition("_")
    return os_name, arch


def platform_fits(target: str, host: str) -> bool:
    """True if wheels resolved for the ``target`` platform tag run on a ``host`` reporting
    ``host`` (``sysconfig.get_platform()`` style): same OS and CPU; manylinux fits Linux."""
    t_os, t_arch = os_and_arch(target)
    h_os, h_arch = os_and_arch(host)
    if t_os != h_os:
        return False
    return t_arch == h_arch or h_arch in _FAT.get(t_arch, set())


def _minor(version: str) -> str:
    return ".".join(version.strip().split(".")[:2])


def host_misfit(target: Mapping[str, str], hello: Mapping[str, object]) -> str | None:
    """Why a host (its agent's ``hello``) cannot run an artifact built for ``target`` (the
    manifest's ``target``), or None when it can. Facts missing on either side are not held
    against the host (older manifests and agents do not carry them)."""
    want_py, want_plat = target.get("python_version"), target.get("platform")
    have_py, have_plat = hello.get("python_version"), hello.get("platform")
    reasons = []
    if want_py and isinstance(have_py, str) and _minor(have_py) != _minor(want_py):
        reasons.append(f"Python {have_py}, not {want_py}")
    if want_plat and isinstance(have_plat, str) and not platform_fits(want_plat, have_plat):
        reasons.append(f"platform {have_plat}, not {want_plat}")
    return "; ".join(reasons) or None
