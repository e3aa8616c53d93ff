"""A code-only change to a package app, applied to its last wheel instead of running the backend.

The backend's run is most of a warm redeploy's build: an interpreter, the backend's imports and
its file walk (~0.15 CPU-s for hatchling, 0.2 s of the deploy's wall time; docs/DESIGN.md,
"The app wheel"). Yet when a module's text is all that changed, the wheel the backend would
make is the last one with that member's bytes and its RECORD line replaced.

That holds only where the backend copies the file verbatim and nothing else reads it, so the
patch is taken only when every one of these is true, and the backend runs otherwise:

- the last wheel was built by the backend from the same list of files, with the same build
  system, and is still in the blob store;
- the backend is one whose wheel is its files plus static metadata (hatchling, flit-core,
  pdm-backend, setuptools, poetry-core), with no build hooks or build script in the project and
  nothing in ``[project] dynamic`` (a version read from a module would go stale);
- every changed file was in the last wheel byte for byte, at the path it has in the project or
  a suffix of it (``src/app/views.py`` as ``app/views.py``), outside ``.dist-info`` and
  ``.data`` (whose scripts a backend may rewrite), and is not a build file
  (pyproject.toml, setup.py, setup.cfg, a readme: those make the metadata).

The members keep their order, names, dates and compression, so the patched wheel is the one
the backend makes, byte for byte (tests/test_wheelpatch.py builds both and compares them).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ._store import BlobStore

# Backends whose wheel is the project's files plus metadata from pyproject.toml.
PLAIN_BACKENDS = frozenset(
    {
        "hatchling.build",
        "flit_core.buildapi",
        "pdm.backend",
        "setuptools.build_meta",
        "poetry.core.masonry.api",
    }
)
# Files that make the wheel's metadata or run code at build time.
BUILD_FILES = frozenset(
    {"pyproject.toml", "setup.py", "setup.cfg", "hatch_build.py", "pdm_build.py"}
)
_RECORD = ".dist-info/RECORD"


@dataclass(frozen=True)
class LastWheel:
    """What the backend's last build of the project was made of, kept beside the store."""

    system: str  # the build system's key: a different one builds again
    files: dict[str, str]  # source path -> its sha256
    verbatim: dict[str, str]  # source path -> the wheel member holding its bytes
    name: str
    sha256: str
    size: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> LastWheel | None:
        try:
            data = json.loads(path.read_text())
            return cls(
                str(data["system"]),
                {str(k): str(v) for k, v in data["files"].items()},
                {str(k): str(v) for k, v in data["verbatim"].items()},
                str(data["name"]),
                str(data["sha256"]),
                int(data["size"]),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


def plain_build(project: Path, backend: str, sources: Sequence[str]) -> bool:
    """Whether the project's wheel is its files plus static metadata (see the module's doc)."""
    if backend not in PLAIN_BACKENDS or "pyproject.toml" not in sources:
        return False
    if any(Path(rel).name in BUILD_FILES - {"pyproject.toml"} for rel in sources):
        return False
    try:
        data = tomllib.loads((project / "pyproject.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    project_table, tool = data.get("project"), data.get("tool", {})
    if not isinstance(project_table, dict) or project_table.get("dynamic"):
        return False
    readme = project_table.get("readme", "README")
    if not isinstance(readme, str) or not _metadata_file(readme):  # a table, or an odd name
        return False
    hatch, poetry, setuptools = (
        tool.get(name, {}) if isinstance(tool, dict) else {}
        for name in ("hatch", "poetry", "setuptools")
    )
    return not (
        _has_key(hatch, "hooks") or _has_key(poetry, "build") or _has_key(setuptools, "cmdclass")
    )


def _metadata_file(rel: str) -> bool:
    """A file the metadata is made from: a readme or a license (``[project] readme`` as a
    table is refused by plain_build; as a string it names a file like these)."""
    name = Path(rel).name
    return name in BUILD_FILES or name.lower().startswith(
        ("readme", "license", "licence", "copying")
    )


def _has_key(table: object, key: str) -> bool:
    """``key`` anywhere in nested tables (hatch's hooks may sit under any build target)."""
    if not isinstance(table, dict):
        return False
    return key in table or any(_has_key(v, key) for v in table.values())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plain_member(info: zipfile.ZipInfo) -> bool:
    """A member that can be a source file's bytes: not the metadata, not a ``.data`` directory
    (an installer, or the backend, may rewrite a script's first line there), and a name that
    RECORD holds without CSV quoting."""
    top = info.filename.split("/", 1)[0]
    return (
        not info.is_dir()
        and not top.endswith((".dist-info", ".data"))
        and not any(c in info.filename for c in ',"\r\n')
    )


def _is_suffix(member: str, rel: str) -> bool:
    m, r = member.split("/"), rel.split("/")
    return len(m) <= len(r) and r[len(r) - len(m) :] == m


def record_last(
    wheel: Path, system: str, sources: Sequence[str], file_shas: Mapping[str, str], sha256: str
) -> LastWheel:
    """The record of a wheel the backend just built: which source files it holds verbatim."""
    by_sha: dict[str, list[str]] = {}
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if _plain_member(info):
                by_sha.setdefault(_sha(zf.read(info)), []).append(info.filename)
    verbatim = {}
    for rel in sources:
        if _metadata_file(rel):
            continue
        found = [m for m in by_sha.get(file_shas[rel], []) if _is_suffix(m, rel)]
        if len(found) == 1:
            verbatim[rel] = found[0]
    files = {rel: file_shas[rel] for rel in sources}
    return LastWheel(system, files, verbatim, wheel.name, sha256, wheel.stat().st_size)


def changes(
    last: LastWheel, system: str, sources: Sequence[str], file_shas: Mapping[str, str]
) -> dict[str, str] | None:
    """The wheel members to replace (member -> source path), or None when the backend must run."""
    if last.system != system or set(sources) != set(last.files):
        return None
    changed = [rel for rel in sources if file_shas[rel] != last.files[rel]]
    if not changed or any(rel not in last.verbatim for rel in changed):
        return None
    return {last.verbatim[rel]: rel for rel in changed}


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def _new_record(record: bytes, replaced: Mapping[str, bytes]) -> bytes:
    lines = []
    for line in record.decode().splitlines(keepends=True):
        path = line.rsplit(",", 2)[0] if line.count(",") >= 2 else ""
        if path in replaced:
            end = "\r\n" if line.endswith("\r\n") else "\n" if line.endswith("\n") else ""
            data = replaced[path]
            line = f"{path},{_record_hash(data)},{len(data)}{end}"
        lines.append(line)
    return "".join(lines).encode()


def patch(last: LastWheel, store: BlobStore, replaced: Mapping[str, bytes], dest: Path) -> Path:
    """The last wheel with ``replaced`` members' bytes, written as ``dest/<name>``."""
    out_path = dest / last.name
    with (
        store.open(last.sha256) as raw,
        zipfile.ZipFile(raw) as old,
        zipfile.ZipFile(out_path, "w") as new,
    ):
        for info in old.infolist():
            data = old.read(info)
            if info.filename.endswith(_RECORD) and info.filename.count("/") == 1:
                data = _new_record(data, replaced)
            elif info.filename in replaced:
                data = replaced[info.filename]
            new.writestr(info, data, compress_type=info.compress_type)
    return out_path


def save_last(path: Path, last: LastWheel) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(last.to_json())
    os.replace(tmp, path)
