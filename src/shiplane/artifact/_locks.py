"""Lock formats: which file locks the app's dependencies, and its pins as requirements lines.

The wheelhouse builder (``_wheelhouse.read_lock``) reads pip-style requirements. Every other
lock is turned into that form here, once per build, and only its runtime (default/main) group:

- ``requirements.txt`` (pip, ``uv pip compile``, pip-tools): read as it is, ``-r``/``-c`` too.
- ``uv.lock``: ``uv export --frozen`` does it (uv comes with shiplane). uv's lock is a
  universal resolution whose format uv alone defines and still extends (forks, conflicts,
  workspaces), so its own exporter is the faithful reader; parsing it here would lag behind.
- ``poetry.lock`` / ``pdm.lock`` (TOML) and ``Pipfile.lock`` (JSON): parsed here. Running
  poetry/pdm/pipenv would make the deploying machine need them (and their plugins) installed,
  and these formats are stable and documented: a package table with name, version, the
  files' hashes, and (Poetry 2 / PDM 2) its groups and environment marker. A lock that does
  not record groups (Poetry < 2, old PDM strategies) is walked from the project's main
  dependencies in ``pyproject.toml``, as ``poetry export`` does.
- ``pyproject.toml`` without a lock: resolved at build time with ``uv pip compile --universal``
  (cached per pyproject.toml in ``.shiplane/build/locks``), with a warning: nothing committed
  pins the versions, so two builds may ship different dependencies.

Environment markers are kept on every line: each host's interpreter (and the builder, for a
foreign target) evaluates them. Hashes are kept when every locked package has one (pip then
checks every download); if one package has none (a git or path dependency) pip would refuse
the whole file in hash mode, so the hashes of that lock are dropped, all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.markers import InvalidMarker, Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ..errors import ConfigError, OperationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Looked for in this order when ``[build] requirements`` is unset (docs/dependencies.md): an
# explicit requirements file first (it is what shiplane always read), then the tools' locks,
# then a pyproject.toml's own dependencies, which lock nothing.
DETECTION_ORDER: tuple[tuple[str, str], ...] = (
    ("requirements.txt", "requirements"),
    ("uv.lock", "uv"),
    ("poetry.lock", "poetry"),
    ("pdm.lock", "pdm"),
    ("Pipfile.lock", "pipenv"),
    ("pyproject.toml", "pyproject"),
)
TOOL = {
    "requirements": "pip requirements",
    "uv": "uv",
    "poetry": "Poetry",
    "pdm": "PDM",
    "pipenv": "Pipenv",
    "pyproject": "no lock: resolved at each build",
}
NO_LOCK_HINT = (
    "lock the dependencies with one of: `uv pip compile requirements.in -o requirements.txt`, "
    "`uv lock`, `poetry lock`, `pdm lock`, `pipenv lock`; or set [build] requirements"
)
# the command that makes each format's lock (its tool's own)
MAKE_LOCK = {
    "requirements": "uv pip compile pyproject.toml -o {name}",
    "uv": "uv lock",
    "poetry": "poetry lock",
    "pdm": "pdm lock",
    "pipenv": "pipenv lock",
    "pyproject": "uv lock",
}
UNLOCKED_WARNING = (
    "{name} has no lock: its dependencies are resolved now, so two builds may ship different "
    "versions (deploys are not reproducible); commit a lock (`uv lock`)"
)


@dataclass(frozen=True)
class LockFile:
    """The file that locks the dependencies, and how to read it."""

    path: Path
    format: str  # a key of TOOL
    detected: bool  # found by looking, not named by [build] requirements


@dataclass(frozen=True)
class Exported:
    """A lock turned into requirements lines."""

    text: str  # pip-style requirements, one requirement a line
    data: bytes  # what the cache keys digest: the lock's bytes and the text made from them
    warning: str | None = None


def lock_format(name: str) -> str:
    """The format a file's name says: ``uv.lock`` -> "uv"; anything unknown is requirements."""
    base = name.rsplit("/", 1)[-1]
    for known, fmt in DETECTION_ORDER[1:]:
        if base == known or base.endswith(("." + known, "-" + known)):
            return fmt
    return "requirements"


def _toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise OperationError(
            f"cannot read {path}: {exc}", hint="fix the file, or lock the dependencies again"
        ) from exc


def _declares_dependencies(pyproject: Path) -> bool:
    try:
        project = _toml(pyproject).get("project")
    except OperationError:
        return False
    return isinstance(project, dict) and (
        "dependencies" in project or "dependencies" in project.get("dynamic", [])
    )


def find_lock(project: Path, requirements: str | None) -> LockFile:
    """The lock of ``project``: ``requirements`` ([build] requirements) when given (its file
    name says its format), else (None or "") the first of DETECTION_ORDER present. None found:
    ConfigError (exit 2), raised before anything is built."""
    if requirements:
        path, fmt = project / requirements, lock_format(requirements)
        if not path.is_file():
            raise ConfigError(
                f"[build] requirements names {requirements}, which is not in {project}",
                hint=f"make it with `{MAKE_LOCK[fmt].format(name=requirements)}`, or unset "
                "[build] requirements to detect the lock",
            )
        return LockFile(path, fmt, detected=False)
    for name, fmt in DETECTION_ORDER:
        path = project / name
        if path.is_file() and (fmt != "pyproject" or _declares_dependencies(path)):
            return LockFile(path, fmt, detected=True)
    raise ConfigError(
        f"no lock of the app's dependencies in {project}: looked for "
        + ", ".join(name for name, _ in DETECTION_ORDER[:-1])
        + " and dependencies in pyproject.toml's [project]",
        hint=NO_LOCK_HINT,
    )


def describe_lock(project: Path, requirements: str | None = None) -> str:
    """What ``shiplane check`` prints about the lock: "uv.lock (uv)", "requirements.txt (pip
    requirements)", "pyproject.toml (no lock: resolved at each build)". Raises ConfigError when
    there is none (its message and hint say how to make one)."""
    lock = find_lock(Path(project), requirements)
    try:
        shown = lock.path.relative_to(project).as_posix()
    except ValueError:
        shown = str(lock.path)
    return f"{shown} ({TOOL[lock.format]}{', detected' if lock.detected else ''})"


def check_warnings(project: Path, requirements: str | None = None) -> list[str]:
    """What ``shiplane check`` warns of about the lock, offline: a requirements file that does
    not pin everything, or a pyproject.toml with no lock at all."""
    from ._wheelhouse import read_lock, unpinned_warning  # it imports this module

    lock = find_lock(Path(project), requirements)
    if lock.format == "pyproject":
        return [UNLOCKED_WARNING.format(name=lock.path.name)]
    if lock.format != "requirements":
        return []
    warning = unpinned_warning(read_lock(lock.path, format="requirements"))
    return [warning] if warning else []


def export(lock: LockFile) -> Exported:
    """The lock as requirements text (default group only, markers kept); not for
    ``requirements`` files, which ``read_lock`` reads itself."""
    try:
        raw = lock.path.read_bytes()
    except OSError as exc:
        raise OperationError(
            f"cannot read the lock {lock.path}: {exc.strerror}",
            hint="set [build] requirements to your lock file",
        ) from exc
    if lock.format == "uv":
        text = _uv_export(lock.path)
    elif lock.format == "poetry":
        text = _poetry(lock.path, _toml(lock.path))
    elif lock.format == "pdm":
        text = _pdm(lock.path, _toml(lock.path))
    elif lock.format == "pipenv":
        text = _pipenv(lock.path, raw)
    elif lock.format == "pyproject":
        text = _compile_pyproject(lock.path, raw)
        return Exported(
            text, raw + b"\0" + text.encode(), UNLOCKED_WARNING.format(name=lock.path.name)
        )
    else:
        raise ValueError(f"not an exported format: {lock.format}")
    return Exported(text, raw + b"\0" + text.encode())


# -- uv ------------------------------------------------------------------------------------


def _uv_run(args: list[str], cwd: Path, what: str) -> str:
    from ._backend import _uv

    result = subprocess.run(
        [_uv(), *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        check=False,
        env=dict(os.environ, UV_PYTHON_DOWNLOADS="never", NO_COLOR="1"),
    )
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-12:])
        raise OperationError(
            f"{what} failed (exit {result.returncode})\n{tail}",
            hint="run it yourself in the project to see why",
        )
    return result.stdout


def _uv_export(path: Path) -> str:
    # --frozen: the lock as it is (never re-locked); --no-dev: not the dev group; the project
    # itself ships as the app, not as a dependency.
    args = ["export", "--frozen", "--no-dev", "--no-emit-project", "--format", "requirements-txt"]
    args += ["--no-header", "--no-annotate", "--quiet"]
    if path.name != "uv.lock":  # uv reads uv.lock beside pyproject.toml, by that name only
        raise OperationError(
            f"{path}: uv reads a lock named uv.lock only",
            hint="name it uv.lock, beside the project's pyproject.toml",
        )
    return _uv_run(args, path.parent, f"`uv {' '.join(args[:6])}` in {path.parent}")


def _compile_pyproject(path: Path, raw: bytes) -> str:
    """``uv pip compile --universal`` once per pyproject.toml's bytes (cached in the project)."""
    key = hashlib.sha256(b"shiplane-pyproject-v1\0" + raw).hexdigest()[:16]
    cached = path.parent / ".shiplane" / "build" / "locks" / f"pyproject-{key}.txt"
    if cached.is_file():
        return cached.read_text()
    args = ["pip", "compile", path.name, "--universal", "--no-header", "--no-annotate"]
    args += ["--quiet", "--python", sys.executable]
    text = _uv_run(args, path.parent, f"resolving {path.name}'s dependencies (`uv pip compile`)")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, cached)
    return text


# -- shared by the parsed formats --------------------------------------------------------


@dataclass
class _Pin:
    name: str
    version: str | None  # None: a direct reference (url) instead
    url: str | None = None
    marker: str | None = None
    hashes: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()


def _lines(pins: Iterable[_Pin]) -> str:
    """Requirements text, sorted by name; hashes only if every pin has them (see above)."""
    chosen = sorted(pins, key=lambda p: canonicalize_name(p.name))
    hashed = bool(chosen) and all(p.hashes for p in chosen)
    out = []
    for pin in chosen:
        name = pin.name + (f"[{','.join(sorted(pin.extras))}]" if pin.extras else "")
        line = f"{name} @ {pin.url}" if pin.url else f"{name}=={pin.version}"
        if pin.marker:
            line += f" ; {pin.marker}"
        if hashed:
            line += "".join(f" --hash={h}" for h in sorted(set(pin.hashes)))
        out.append(line)
    return "".join(line + "\n" for line in out)


def _file_hashes(files: Any) -> tuple[str, ...]:
    """``files = [{file = ..., hash = "sha256:..."}]`` (Poetry, PDM) as pip's ``sha256:...``."""
    hashes = []
    for entry in files if isinstance(files, list) else []:
        value = entry.get("hash") if isinstance(entry, dict) else None
        if isinstance(value, str) and ":" in value:
            hashes.append(value)
    return tuple(hashes)


def _and(a: str | None, b: str | None) -> str | None:
    if not a or not b:
        return a or b
    return f"({a}) and ({b})"


def _or(markers: list[str | None]) -> str | None:
    if any(not m for m in markers):
        return None  # one unconditional path: always needed
    unique = sorted({m for m in markers if m})
    return unique[0] if len(unique) == 1 else " or ".join(f"({m})" for m in unique)


Edge = tuple[str, "str | None", tuple[str, ...]]  # (canonical name, marker, extras)


def _walk(
    roots: list[Edge], edges: dict[str, list[Edge]], extra_edges: dict[str, dict[str, list[Edge]]]
) -> dict[str, str | None]:
    """Packages reachable from ``roots`` -> the marker under which each is needed (None:
    always): along a path markers are and-ed, across paths or-ed."""
    paths: dict[str, set[str | None]] = {}
    extras_of: dict[str, set[str]] = {}
    todo: list[tuple[str, str | None, tuple[str, ...], int]] = [(n, m, x, 0) for n, m, x in roots]
    while todo:
        name, marker, extras, depth = todo.pop()
        seen = paths.setdefault(name, set())
        new_extras = set(extras) - extras_of.setdefault(name, set())
        if (marker in seen or None in seen) and not new_extras:
            continue
        if depth > 64 or len(seen) > 16:  # a pathological graph: needed whenever reachable
            marker = None
        seen.add(marker)
        extras_of[name] |= set(extras)
        nexts = list(edges.get(name, []))
        for extra in extras_of[name]:
            nexts += extra_edges.get(name, {}).get(extra, [])
        for dep, dep_marker, dep_extras in nexts:
            todo.append((dep, _and(marker, dep_marker), dep_extras, depth + 1))
    return {name: _or(list(markers)) for name, markers in paths.items()}


def _pep508_edge(spec: str) -> Edge | None:
    try:
        req = Requirement(spec)
    except InvalidRequirement:
        return None
    return canonicalize_name(req.name), str(req.marker) if req.marker else None, tuple(req.extras)


def _project_roots(lock_path: Path) -> list[Edge]:
    """The main dependencies declared in pyproject.toml beside the lock ([project] and
    Poetry's [tool.poetry.dependencies])."""
    pyproject = lock_path.parent / "pyproject.toml"
    if not pyproject.is_file():
        raise OperationError(
            f"{lock_path.name} does not say which packages are the app's, and there is no "
            f"pyproject.toml beside it ({pyproject})",
            hint="lock again with a current version of the tool (it records groups)",
        )
    data = _toml(pyproject)
    roots = [
        e
        for s in data.get("project", {}).get("dependencies", [])
        if (e := _pep508_edge(s)) is not None
    ]
    poetry = data.get("tool", {}).get("poetry", {}).get("dependencies", {})
    for name, spec in poetry.items():
        if name.lower() == "python":
            continue
        for one in spec if isinstance(spec, list) else [spec]:
            table = one if isinstance(one, dict) else {}
            if table.get("optional"):
                continue
            roots.append(
                (canonicalize_name(name), table.get("markers"), tuple(table.get("extras", [])))
            )
    return roots


def _valid_marker(marker: Any) -> str | None:
    if not isinstance(marker, str) or not marker.strip():
        return None
    try:
        return str(Marker(marker))
    except InvalidMarker:
        return marker


# -- Poetry --------------------------------------------------------------------------------


def _poetry_source(pin: _Pin, source: Any, base: Path) -> None:
    if not isinstance(source, dict):
        return
    kind, url = source.get("type"), source.get("url", "")
    if kind == "git":
        ref = source.get("resolved_reference") or source.get("reference")
        pin.url = f"git+{url}" + (f"@{ref}" if ref else "")
        if source.get("subdirectory"):
            pin.url += f"#subdirectory={source['subdirectory']}"
    elif kind == "url":
        pin.url = url
    elif kind in ("file", "directory"):
        pin.url = (base / url).resolve().as_uri()


def _poetry(path: Path, data: dict[str, Any]) -> str:
    packages = [p for p in data.get("package", []) if isinstance(p, dict)]
    pins: dict[str, _Pin] = {}
    for p in packages:
        pin = _Pin(p["name"], str(p["version"]), hashes=_file_hashes(p.get("files")))
        _poetry_source(pin, p.get("source"), path.parent)
        pins[canonicalize_name(p["name"])] = pin
    if packages and all("groups" in p for p in packages):
        # Poetry 2 (lock-version 2.1): each package's groups, and its marker (per group)
        chosen = []
        for p in packages:
            if "main" not in p["groups"]:
                continue
            pin = pins[canonicalize_name(p["name"])]
            markers = p.get("markers")
            pin.marker = _valid_marker(
                markers.get("main") if isinstance(markers, dict) else markers
            )
            chosen.append(pin)
        return _lines(chosen)
    # Poetry 1 (lock-version 2.0): groups are not recorded; walk from the main dependencies
    edges: dict[str, list[Edge]] = {}
    extra_edges: dict[str, dict[str, list[Edge]]] = {}
    for p in packages:
        name = canonicalize_name(p["name"])
        for dep, spec in p.get("dependencies", {}).items():
            for one in spec if isinstance(spec, list) else [spec]:
                table = one if isinstance(one, dict) else {}
                if table.get("optional"):
                    continue  # needed through an extra only (below)
                edges.setdefault(name, []).append(
                    (
                        canonicalize_name(dep),
                        _valid_marker(table.get("markers")),
                        tuple(table.get("extras", [])),
                    )
                )
        for extra, deps in p.get("extras", {}).items():
            for spec in deps:
                m = re.match(r"\s*([A-Za-z0-9._-]+)(?:\[([^\]]*)\])?", spec)
                if m:
                    more = tuple(x.strip() for x in (m.group(2) or "").split(",") if x.strip())
                    extra_edges.setdefault(name, {}).setdefault(extra, []).append(
                        (canonicalize_name(m.group(1)), None, more)
                    )
    needed = _walk(_project_roots(path), edges, extra_edges)
    for key, marker in needed.items():
        if key in pins:
            pins[key].marker = marker
    return _lines(pins[key] for key in needed if key in pins)


# -- PDM -----------------------------------------------------------------------------------


def _pdm(path: Path, data: dict[str, Any]) -> str:
    packages = [p for p in data.get("package", []) if isinstance(p, dict)]
    pins: dict[str, _Pin] = {}
    for p in packages:
        name = canonicalize_name(p["name"])
        pin = pins.get(name)
        if pin is None:  # PDM lists "name[extra]" beside "name": one pin, the extras merged
            pin = pins[name] = _Pin(
                p["name"], p.get("version"), hashes=_file_hashes(p.get("files"))
            )
            if p.get("git"):
                ref = p.get("revision") or p.get("ref")
                pin.url = f"git+{p['git']}" + (f"@{ref}" if ref else "")
            elif p.get("url"):
                pin.url = p["url"]
            elif p.get("path"):
                pin.url = (path.parent / p["path"]).resolve().as_uri()
        pin.extras = tuple(sorted({*pin.extras, *p.get("extras", [])}))
    if packages and all("groups" in p for p in packages):
        chosen: dict[str, _Pin] = {}
        for p in packages:
            if "default" in p["groups"]:
                name = canonicalize_name(p["name"])
                pins[name].marker = _valid_marker(p.get("marker"))
                chosen[name] = pins[name]
        return _lines(chosen.values())
    edges: dict[str, list[Edge]] = {}
    for p in packages:
        for spec in p.get("dependencies", []):
            edge = _pep508_edge(spec)
            if edge is not None:
                edges.setdefault(canonicalize_name(p["name"]), []).append(edge)
    needed = _walk(_project_roots(path), edges, {})
    for key, marker in needed.items():
        if key in pins:
            pins[key].marker = marker
    return _lines(pins[key] for key in needed if key in pins)


# -- Pipenv --------------------------------------------------------------------------------


def _pipenv(path: Path, raw: bytes) -> str:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OperationError(
            f"cannot read {path}: {exc}", hint="lock again: `pipenv lock`"
        ) from exc
    pins = []
    for name, entry in (data.get("default") or {}).items():  # "develop": the dev packages
        if not isinstance(entry, dict):
            continue
        if entry.get("path") in (".", "./"):
            continue  # the app itself: it ships as the app, not as a dependency
        # another editable path (./libs/x) is a library: built into a wheel (_direct)
        version = str(entry.get("version", "")).lstrip("=") or None
        pin = _Pin(name, version, hashes=tuple(entry.get("hashes", [])))
        if entry.get("git"):
            ref = entry.get("ref")
            pin.url = f"git+{entry['git']}" + (f"@{ref}" if ref else "")
        elif entry.get("file"):
            pin.url = entry["file"]
        elif entry.get("path"):
            pin.url = (path.parent / entry["path"]).resolve().as_uri()
        pin.marker = _valid_marker(entry.get("markers"))
        pin.extras = tuple(entry.get("extras", []))
        if pin.version is None and pin.url is None:
            raise OperationError(f"{path}: {name} has no version", hint="lock again: `pipenv lock`")
        pins.append(pin)
    return _pipenv_sources(data) + _lines(pins)


def _pipenv_sources(data: dict[str, object]) -> str:
    """The Pipfile's package indexes other than PyPI as ``--extra-index-url`` lines, their
    ``${NAME}`` kept for pip to expand from a build secret (docs/dependencies.md, "Private
    indexes"); PyPI itself is left to the user's pip configuration (a mirror, say)."""
    meta = data.get("_meta")
    sources = meta.get("sources") if isinstance(meta, dict) else None
    lines = []
    for source in sources if isinstance(sources, list) else []:
        url = source.get("url") if isinstance(source, dict) else None
        if isinstance(url, str) and url and "://pypi.org/" not in url + "/":
            lines.append(f"--extra-index-url {url}\n")
    return "".join(lines)
