"""VCS and local path requirements, built into wheels on the controller so hosts install offline.

A lock may name a package by where its source is instead of by version:
``mylib @ git+https://host/mylib@v1.2``, ``git+file:///srv/mylib@<commit>#egg=mylib``,
``./libs/mylib``, ``-e ./libs/mylib`` or ``mylib @ file:///abs/libs/mylib``. Each is built here
with ``pip wheel --no-deps`` when the wheelhouse is made, and its line becomes ``name==version``
found in a folder of those wheels, so the rest of the wheelhouse (markers for the target,
hashes, another target's pip download) treats it as any pin. A path's files are digested into
the lock's bytes, the caches' key: an edit to the library makes a new wheelhouse. A path that
holds the lock is the app itself, which ships as the app's own wheel (docs/dependencies.md,
"VCS and path requirements").
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from ..errors import ConfigError, OperationError
from ._index import PackageAccess

_VCS = ("git+", "hg+", "svn+", "bzr+")
# never a library's source: VCS data, build output, caches
_SKIP = {".git", ".hg", ".svn", "build", "dist", "__pycache__", ".venv", ".tox", ".nox"}
_COMMIT = re.compile(r"@[0-9a-f]{40}(?:#|$)")


@dataclass(frozen=True)
class Direct:
    """One VCS or path requirement of a lock."""

    source: str  # what pip builds: a VCS URL or an absolute path
    name: str | None  # canonical name, when the line or the path says it
    marker: str | None
    path: Path | None  # a local directory
    is_app: bool = False  # the directory that holds the lock: the app itself

    @property
    def fixed(self) -> bool:
        """Builds the same every time: a path (its files are digested) or a VCS commit."""
        return self.path is not None or bool(_COMMIT.search(self.source))

    @property
    def line(self) -> str:
        """The line pip gets: an absolute path, or ``name @ URL``; never ``-e``."""
        named = f"{self.name} @ {self.source}" if self.name and self.path is None else self.source
        return named + (f" ; {self.marker}" if self.marker else "")

    def digest(self) -> bytes:
        """What the caches' key adds: the source, and a path's files and their bytes."""
        h = hashlib.sha256(self.source.encode())
        if self.path is not None and self.path.is_file():  # a wheel or sdist file
            h.update(b"\0" + self.path.read_bytes())
        elif self.path is not None and not self.is_app:
            for file in _files(self.path):
                h.update(f"\0{file.relative_to(self.path)}\0".encode() + file.read_bytes())
        return h.hexdigest().encode()


def direct_reference(line: str, base: Path) -> Direct | None:
    """The line as a VCS or path requirement (paths against the lock's folder ``base``), or
    None for any other line."""
    text = re.sub(r"^(-e|--editable)[\s=]+", "", line)  # hosts get a wheel, never an editable
    if text.startswith("-"):
        return None  # an option: -r, --hash, --index-url user@host...
    spec, _, marker_text = text.partition(";")
    spec, marker = spec.strip(), marker_text.strip() or None
    if spec.startswith(_VCS):
        egg = re.search(r"#egg=([A-Za-z0-9._-]+)", spec)
        return Direct(spec, canonicalize_name(egg.group(1)) if egg else None, marker, None)
    if spec.startswith((".", "/", "file:")):
        return _path(spec.removeprefix("file://").removeprefix("file:"), None, marker, base)
    if " @ " not in spec and "@" not in spec.split("[")[0]:
        return None
    try:
        req = Requirement(text)
    except InvalidRequirement:
        return None
    if not req.url:
        return None
    marker = str(req.marker) if req.marker else None
    name = canonicalize_name(req.name)
    if req.url.startswith("file:"):
        return _path(req.url.removeprefix("file://").removeprefix("file:"), name, marker, base)
    if req.url.startswith(_VCS):
        return Direct(req.url, name, marker, None)
    return None  # an archive URL: pip fetches it as it is


def _path(where: str, name: str | None, marker: str | None, base: Path) -> Direct:
    path = (base / where).resolve()
    is_app = path == base.resolve() or path in base.resolve().parents
    if not is_app and not path.exists():  # bad input: exit 2, before anything is built
        raise ConfigError(
            f"the lock names the path {where}, which does not exist ({path})",
            hint="fix the path in the lock (it is read against the lock's own folder)",
        )
    if path.suffix == ".whl" and name is None:
        name = canonicalize_name(parse_wheel_filename(path.name)[0])
    return Direct(str(path), name or _project_name(path), marker, path, is_app)


def _project_name(path: Path) -> str | None:
    """``[project] name`` of a directory's pyproject.toml, when it says one."""
    try:
        text = (path / "pyproject.toml").read_text()
    except OSError:
        return None
    m = re.search(r'(?ms)^\[project\].*?^name\s*=\s*"([^"]+)"', text)
    return canonicalize_name(m.group(1)) if m else None


def _files(root: Path) -> list[Path]:
    found = []
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if any(p in _SKIP or p.endswith(".egg-info") for p in parts):
            continue
        if path.is_file() and not path.is_symlink():
            found.append(path)
    return found


def wheel_directs(
    lines: Sequence[str],
    work: Path,
    access: PackageAccess,
    hashed: bool,
    emit: Callable[[str, str], None],
) -> list[str]:
    """``lines`` with every VCS or path requirement built into a wheel under ``work/direct``
    and named ``name==version`` there (``--hash`` of that wheel when the lock is hashed)."""
    found = [(i, d) for i, line in enumerate(lines) if (d := direct_reference(line, work))]
    if not found:
        return list(lines)
    out = work / "direct"
    out.mkdir(exist_ok=True)
    lines = list(lines)
    for i, direct in found:
        emit("wheelhouse", f"pip wheel {direct.name or direct.source} (from its source)")
        source = direct.source
        if direct.path is not None and direct.path.is_dir():
            # a copy: pip's build leaves build/ and *.egg-info behind
            copy = work / "direct-src" / str(i)
            for file in _files(direct.path):
                dest = copy / file.relative_to(direct.path)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, dest)
            source = str(copy)
        before = set(out.glob("*.whl"))
        # in a requirements file, where pip expands ${NAME} (a token in a VCS URL) from the
        # build secrets in its environment; never on a command line
        listed = work / f"direct-{i}.txt"
        listed.write_text(f"{source}\n")  # a bare URL: pip < 24 refuses `name @ git+file:///`
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out)]
            + ["-r", str(listed)],
            cwd=work,
            env=access.env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
        )
        made = sorted(set(out.glob("*.whl")) - before)
        if done.returncode != 0 or len(made) != 1:
            tail = access.scrub("\n".join(done.stdout.splitlines()[-10:]))
            raise OperationError(
                f"{direct.name or direct.source}: building a wheel from {direct.source} failed "
                f"(a VCS or path requirement of the lock)\n{tail}",
                hint="check the URL or path and its ref; `pip wheel --no-deps SOURCE` shows why",
            )
        name, version, _, _ = parse_wheel_filename(made[0].name)
        pin = f"{name}=={version}" + (f" ; {direct.marker}" if direct.marker else "")
        if hashed:
            pin += f" --hash=sha256:{hashlib.sha256(made[0].read_bytes()).hexdigest()}"
        lines[i] = pin
    return [f"--find-links {out}", *lines]
