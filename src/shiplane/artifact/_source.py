"""The app's source: which files it has, what git says about them, and what kind of app it is."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Directories never part of an app: VCS data, shiplane's own output, secrets, virtualenvs, caches.
SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".shiplane",
        ".secrets",
        ".venv",
        "venv",
        "__pycache__",
        "node_modules",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".tox",
        ".nox",
    }
)
# Top-level directories that must never ship, whatever git or an include list says.
FORBIDDEN_TOP = frozenset({".shiplane", ".secrets", ".git"})


def is_forbidden(rel: str) -> bool:
    """True for paths that never enter an artifact: secrets, shiplane's output, byte code."""
    parts = rel.split("/")
    return parts[0] in FORBIDDEN_TOP or "__pycache__" in parts or rel.endswith((".pyc", ".pyo"))


@dataclass(frozen=True)
class GitInfo:
    """What git knows about the project: whether it is a work tree, and its commit."""

    is_repo: bool
    commit: str | None  # "<sha>" or "<sha>-dirty"; None outside git or before the first commit


def _git(project: Path, *args: str) -> subprocess.CompletedProcess[bytes] | None:
    if shutil.which("git") is None:
        return None
    return subprocess.run(["git", *args], cwd=project, capture_output=True, check=False)


def git_info(project: Path) -> GitInfo:
    """Ask git for HEAD and whether the project's files differ from it (then ``-dirty``)."""
    inside = _git(project, "rev-parse", "--is-inside-work-tree")
    if inside is None or inside.returncode != 0 or inside.stdout.strip() != b"true":
        return GitInfo(False, None)
    head = _git(project, "rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return GitInfo(True, None)
    commit = head.stdout.decode().strip()
    # Exclude pathspecs keep git from walking shiplane's own output (fast with big caches).
    status = _git(
        project,
        "status",
        "--porcelain",
        "-z",
        "--untracked-files=all",
        "--",
        ".",
        *(f":(exclude){d}" for d in sorted(FORBIDDEN_TOP)),
    )
    prefix = (_git(project, "rev-parse", "--show-prefix") or head).stdout.decode().strip()
    dirty = False
    if status is not None:
        for item in status.stdout.decode(errors="replace").split("\0"):
            path = item[3:] if len(item) > 3 else ""
            path = path.removeprefix(prefix)
            # shiplane's own output and secrets do not make the source dirty.
            if path and not is_forbidden(path):
                dirty = True
                break
    return GitInfo(True, commit + ("-dirty" if dirty else ""))


def list_source_files(project: Path) -> list[str]:
    """The app's files as sorted POSIX paths relative to ``project``.

    In a git work tree: the tracked and untracked-but-not-ignored files
    (``git ls-files -co --exclude-standard``). Elsewhere: a walk that skips VCS data,
    virtualenvs, caches, ``.shiplane`` and ``.secrets``. Never secrets or byte code.
    """
    # -x keeps git from walking shiplane's own output (blobs, venvs, a local stage's hosts).
    out = _git(
        project,
        "ls-files",
        "-co",
        "--exclude-standard",
        "-z",
        *(f"--exclude={d}/" for d in sorted(FORBIDDEN_TOP)),
    )
    files: set[str] = set()
    if out is not None and out.returncode == 0:
        for rel in out.stdout.decode().split("\0"):
            if rel and not is_forbidden(rel) and (project / rel).is_file():
                files.add(rel)
        if not files:
            _refuse_ignored(project)
    else:
        for dirpath, dirnames, filenames in os.walk(project):
            dirnames[:] = [
                d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")
            ]
            base = Path(dirpath).relative_to(project)
            for name in filenames:
                rel = (base / name).as_posix()
                if not is_forbidden(rel) and os.path.isfile(os.path.join(dirpath, name)):
                    files.add(rel)
    return sorted(files)


def _refuse_ignored(project: Path) -> None:
    """A project git lists no file of because its folder is ignored: say so (UsageError), rather
    than build from nothing (a package build would fail on its missing files)."""
    ignored = _git(project, "check-ignore", "-v", ".")
    if ignored is None or ignored.returncode != 0:
        return  # not ignored: the project has no files git would list (an empty project)
    tracked = _git(project, "ls-files", "-c", "-z", "--", ".")
    if tracked is not None and tracked.stdout.strip(b"\0"):
        return  # its files were added despite the rule (git add -f): git lists those
    rule, _, _ = ignored.stdout.decode(errors="replace").partition("\t")
    top = _git(project, "rev-parse", "--show-toplevel")
    where = (
        top.stdout.decode(errors="replace").strip()
        if top is not None and top.returncode == 0
        else ""
    )
    source, _, pattern = rule.rpartition(":")
    if where and source and not source.startswith("/"):
        source = f"{where}/{source}"
    raise UsageError(
        f"{project}: git tracks none of this project's files: the git repository {where or '(unknown)'} "
        f"ignores its folder ({source} pattern {pattern.strip()!r}), so shiplane finds no source to ship",
        hint=(
            "Change that rule so it no longer covers the project and `git add` its files (the project's "
            ".gitignore keeps its own secrets and output out), or move the project out of the ignored folder."
        ),
    )


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    pat = pattern.strip()
    while pat.startswith("./"):
        pat = pat[2:]
    pat = pat.strip("/")
    anchored = "/" in pat
    i, out = 0, []
    while i < len(pat):
        c = pat[i]
        if pat.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and "]" in pat[i + 1 :]:
            end = pat.index("]", i + 1)
            body = pat[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    # Like .gitignore: a pattern without "/" matches at any depth; a match of a directory
    # covers everything below it.
    lead = "" if anchored else "(?:.*/)?"
    return re.compile(f"^{lead}{''.join(out)}(?:/.*)?$")


def matches(pattern: str, rel: str) -> bool:
    """True when the POSIX relative path ``rel`` is matched by the glob ``pattern``.

    ``*`` and ``?`` stay within one path segment, ``**`` spans segments, a pattern naming a
    directory covers its contents, and a pattern without ``/`` matches at any depth.
    """
    return _glob_regex(pattern).match(rel) is not None


def detect_source(project: Path, files: list[str] | None = None) -> tuple[str, str]:
    """How the app ships: ``("package"|"tree"|"none", reason)``.

    A ``pyproject.toml`` with a ``[project]`` or ``[build-system]`` table, or a ``setup.py``,
    makes a package; otherwise Python files (``manage.py``, modules) make a source tree; a project
    with neither is only a lock (it serves an app from an installed package). ``files``: the
    project's files when they are known (a commit's export), else :func:`list_source_files`.
    """
    if files is None:
        _refuse_ignored(project)  # before "package": its build would find none of its files
    pyproject = project / "pyproject.toml"
    note = ""
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            data = {"project": {}}  # a broken pyproject still means "package": the build says why
        if "project" in data or "build-system" in data:
            return "package", "pyproject.toml defines a package"
        note = "pyproject.toml has no [project] or [build-system] table; "
    if (project / "setup.py").is_file():
        return "package", note + "setup.py defines a package"
    if (project / "manage.py").is_file():
        return "tree", note + "manage.py found: a Django project ships as its source tree"
    py = [f for f in (list_source_files(project) if files is None else files) if f.endswith(".py")]
    if py:
        return "tree", note + f"Python files found (e.g. {py[0]}) but no package metadata"
    return "none", note + "no Python source: only the locked dependencies are shipped"
