"""This host's interpreter as wheel tags name it: its ABI tag and its C library's version.

Apart from the agent's ``hello`` so the controller can read its own (the ``local`` stage's
interpreter) without importing the agent's session code.
"""

from __future__ import annotations

import platform
import sys
import sysconfig


def abi_tag() -> str:
    """This interpreter's ABI tag as wheel names carry it (PEP 425): ``cp312``, ``cp313t``
    (free-threaded), ``pypy39_pp73``; the controller resolves each host's wheels for it."""
    soabi = sysconfig.get_config_var("SOABI") or ""
    if sys.implementation.name == "cpython":
        threaded = "t" if sysconfig.get_config_var("Py_GIL_DISABLED") else ""
        debug = "d" if hasattr(sys, "gettotalrefcount") else ""
        return "cp{}{}{}{}".format(*sys.version_info[:2], threaded, debug)
    # PyPy and others: SOABI's first two parts ("pypy39-pp73-x86_64-linux-gnu")
    return "_".join(soabi.split("-")[:2]).replace(".", "_") or sys.implementation.name


def glibc_version() -> str | None:
    """The C library's version when it is glibc ("2.36"): the newest manylinux wheels that run
    here are ``manylinux_2_36``; None on musl or another OS."""
    libc, version = platform.libc_ver()
    return version if libc == "glibc" and version else None
