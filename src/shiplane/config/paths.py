"""Rules for the paths a deploy file names: the project's own files stay inside the project, and
a stage's ``deploy_to`` is a directory of the app's own, never the system's.

Pure string checks (no I/O): the schema calls them while validating; the loader adds the checks
that need the disk (symlinks, the checkout's own location). Each raises ValueError with a
message that says what was expected and what was found, as pydantic reports it.
"""

from __future__ import annotations

import re

# The one placeholder paths of project files may hold (``config/{stage}.ini``).
PLACEHOLDERS = ("stage",)
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
NAME_MAX = 255  # bytes in one file name (Linux file systems)

# Directories that hold the system itself: no deploy_to at or below them.
SYSTEM_TREES = (
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/boot",
    "/dev",
    "/proc",
    "/sys",
    "/run",
    "/var/run",
    "/var/lock",
)
# Directories shared by many things: a deploy_to below them is fine, but not the directory itself
# (a deploy writes releases/, run/, log/, store/ ... straight into it).
SHARED_DIRS = frozenset(
    {
        "/",
        "/var",
        "/var/lib",
        "/var/log",
        "/var/cache",
        "/var/tmp",
        "/var/spool",
        "/var/mail",
        "/var/opt",
        "/var/www",
        "/var/backups",
        "/tmp",
        "/root",
        "/home",
        "/srv",
        "/opt",
        "/mnt",
        "/media",
        "/snap",
        "/lost+found",
        "/usr/local",
    }
)


def project_path(value: str, what: str, *, placeholders: tuple[str, ...] = ()) -> str:
    """A path (or glob) of a file of the project: relative, without ``..``, control characters or
    placeholders other than ``placeholders`` (each written ``{name}``)."""
    if not value.strip():
        raise ValueError(f"{what} must name a file of the project, found {value!r}")
    if _CONTROL.search(value):
        raise ValueError(f"{what} must not contain control characters, found {value!r}")
    if value.startswith(("/", "~")):
        raise ValueError(f"{what} must be a relative path inside the project, found {value!r}")
    if ".." in value.split("/"):
        raise ValueError(
            f"{what} must be a relative path inside the project (no '..'), found {value!r}"
        )
    if any(len(part.encode()) > NAME_MAX for part in value.split("/")):
        raise ValueError(
            f"{what} has a name longer than {NAME_MAX} bytes, which no file system takes"
        )
    _check_placeholders(value, what, placeholders)
    return value


def _check_placeholders(value: str, what: str, allowed: tuple[str, ...]) -> None:
    known = " and ".join(f"{{{name}}}" for name in allowed) if allowed else ""
    allowed_text = (
        f"; the only placeholder is {known}"
        if len(allowed) == 1
        else (f"; the placeholders are {known}" if allowed else "; it takes no placeholders")
    )
    for match in _PLACEHOLDER.finditer(value):
        if match[1] not in allowed:
            raise ValueError(
                f"{what} has an unknown placeholder {match[0]} in {value!r}{allowed_text}"
            )
    rest = _PLACEHOLDER.sub("", value) if allowed else value
    if "{" in rest or "}" in rest:
        raise ValueError(f"{what} has a brace that is not a placeholder in {value!r}{allowed_text}")


def normalized(path: str) -> str:
    """An absolute POSIX path without empty or ``.`` components (``//etc/./`` -> ``/etc``)."""
    return "/" + "/".join(part for part in path.split("/") if part not in ("", "."))


def system_dir(path: str) -> str | None:
    """The system directory an absolute ``path`` is or lies in, or None."""
    norm = normalized(path)
    if norm in SHARED_DIRS:
        return norm
    for tree in SYSTEM_TREES:
        if norm == tree or norm.startswith(tree + "/"):
            return tree
    return None


def deploy_root(value: str, *, local: bool | None) -> str:
    """A stage's ``deploy_to``: a directory of the app's own.

    ``local`` is True for the ``local`` stage (a relative path is then under the project, ``~``
    under the user's home), False for a stage with remote hosts (absolute only), None when the
    hosts are unknown (their own error is reported; only the rules common to both are checked).
    """
    example = "e.g. /srv/<app>" if not local else "e.g. .shiplane/local"
    if not value.strip():
        raise ValueError(
            f"deploy_to must name the directory the stage deploys into ({example}), found {value!r}"
        )
    if _CONTROL.search(value) or value != value.strip():
        raise ValueError(
            f"deploy_to must not contain control characters or surrounding spaces, found {value!r}"
        )
    if ".." in value.split("/"):
        raise ValueError(f"deploy_to must not contain '..', found {value!r}")
    if value.startswith("~"):
        if local is False:
            raise ValueError(
                f"deploy_to of a stage with SSH hosts must be an absolute path ({example}), found {value!r}"
            )
        head, _, rest = value.partition("/")
        if not rest.strip("/."):
            raise ValueError(
                f"deploy_to {value!r} is a home directory itself; use a folder of the app's own in it, "
                f"e.g. {head}/apps/<app>"
            )
        return value
    if not value.startswith("/"):
        if local is False:
            raise ValueError(
                f"deploy_to of a stage with SSH hosts must be an absolute path ({example}), found {value!r}"
            )
        if not value.strip("/."):
            raise ValueError(
                f"deploy_to {value!r} is the project itself; use a folder inside it, e.g. .shiplane/local"
            )
        return value
    hit = system_dir(value)
    if hit is not None:
        where = (
            "a system directory"
            if hit == normalized(value)
            else f"inside {hit}, a system directory"
        )
        raise ValueError(
            f"deploy_to {value!r} is {where}: a deploy writes releases/, run/ and log/ there; "
            f"use a directory of the app's own ({example})"
        )
    return value
