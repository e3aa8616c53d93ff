"""The manifest: what an artifact is made of. Its digest is the artifact's identity.

The JSON shape is the contract in docs/DESIGN.md ("Artifact"); canonical JSON is
``json.dumps(obj, sort_keys=True, separators=(",", ":"))`` and the digest is its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from ..errors import OperationError, UsageError

SCHEMA = 1


def canonical_json(obj: Any) -> str:
    """The one serialisation that digests are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def sha256_text(text: str) -> str:
    """sha256 hex digest of the UTF-8 bytes of ``text``."""
    return hashlib.sha256(text.encode()).hexdigest()


class _FileEntryDoc(TypedDict):
    path: str
    sha256: str
    size: int


class FileEntryDoc(_FileEntryDoc, total=False):
    """A file entry of the manifest JSON (``kind`` only when it has one)."""

    kind: str


@dataclass(frozen=True)
class FileEntry:
    """One file of the artifact. ``kind`` is "wheel" or "file" for app files, "bytecode" for the
    dependencies' bytecode bundle, None for dependency wheels, tools and config files."""

    path: str
    sha256: str
    size: int
    kind: str | None = None

    def to_dict(self) -> FileEntryDoc:
        d: FileEntryDoc = {"path": self.path, "sha256": self.sha256, "size": self.size}
        if self.kind is not None:
            d["kind"] = self.kind
        return d

    @classmethod
    def from_dict(cls, d: FileEntryDoc) -> FileEntry:
        return cls(
            path=str(d["path"]), sha256=str(d["sha256"]), size=int(d["size"]), kind=d.get("kind")
        )


def dependency_digest(dependencies: list[FileEntry]) -> str:
    """sha256 over the sorted "path sha256" lines of the dependency wheels: names the venv.

    The wheels' bytecode bundle (kind ``bytecode``) is left out: it is derived from the wheels,
    and the same wheels make the same venv whoever compiled their bytecode.
    """
    lines = sorted(f"{e.path} {e.sha256}" for e in dependencies if e.kind != "bytecode")
    return sha256_text("".join(line + "\n" for line in lines))


@dataclass(frozen=True)
class TargetEntry:
    """One interpreter's wheelhouse, in an artifact built for several (a mixed stage): its
    target (as the manifest's ``target``), its dependency wheels and their digest."""

    target: dict[str, str]
    dependencies: tuple[FileEntry, ...]
    dependency_digest: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": dict(self.target),
            "dependencies": [e.to_dict() for e in self.dependencies],
            "dependency_digest": self.dependency_digest,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetEntry:
        return cls(
            target={str(k): str(v) for k, v in d.get("target", {}).items()},
            dependencies=tuple(FileEntry.from_dict(e) for e in d.get("dependencies", [])),
            dependency_digest=str(d["dependency_digest"]),
        )


@dataclass(frozen=True)
class Manifest:
    """A typed view of the manifest JSON (see docs/DESIGN.md)."""

    app_name: str
    app_version: str | None
    source: str
    app_files: tuple[FileEntry, ...]
    dependencies: tuple[FileEntry, ...]
    dependency_digest: str
    tools: tuple[FileEntry, ...]
    config_files: tuple[FileEntry, ...]
    git_commit: str | None
    built_at: str
    target: dict[str, str] = field(default_factory=dict)
    # several interpreters (a mixed stage): one entry each, the first the same as ``target``,
    # ``dependencies`` and ``dependency_digest``; empty for one interpreter
    targets: tuple[TargetEntry, ...] = ()
    # the lock's requirements with their markers (no URLs, no hashes): what a deploy checks the
    # wheels of an artifact shipped as it is against, for a host of another patch release
    requires: tuple[str, ...] = ()
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain JSON-able data."""
        several = {"targets": [t.to_dict() for t in self.targets]} if self.targets else {}
        requires = {"requires": list(self.requires)} if self.requires else {}
        return {
            **several,
            **requires,
            "schema": self.schema,
            "app": {"name": self.app_name, "version": self.app_version, "source": self.source},
            "app_files": [e.to_dict() for e in self.app_files],
            "dependencies": [e.to_dict() for e in self.dependencies],
            "dependency_digest": self.dependency_digest,
            "tools": [e.to_dict() for e in self.tools],
            "config_files": [e.to_dict() for e in self.config_files],
            "git_commit": self.git_commit,
            "built_at": self.built_at,
            "target": dict(self.target),
        }

    def to_json(self) -> str:
        """Canonical JSON: the bytes the digest is computed over."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Read the manifest from plain data; a missing key raises KeyError."""

        def entries(key: str) -> tuple[FileEntry, ...]:
            return tuple(FileEntry.from_dict(e) for e in d.get(key, []))

        app = d["app"]
        return cls(
            schema=int(d.get("schema", SCHEMA)),
            app_name=str(app["name"]),
            app_version=app.get("version"),
            source=str(app["source"]),
            app_files=entries("app_files"),
            dependencies=entries("dependencies"),
            dependency_digest=str(d["dependency_digest"]),
            tools=entries("tools"),
            config_files=entries("config_files"),
            git_commit=d.get("git_commit"),
            built_at=str(d["built_at"]),
            target={str(k): str(v) for k, v in d.get("target", {}).items()},
            targets=tuple(TargetEntry.from_dict(t) for t in d.get("targets", [])),
            requires=tuple(str(r) for r in d.get("requires", [])),
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse manifest JSON (canonical or not)."""
        return cls.from_dict(json.loads(text))

    @property
    def digest(self) -> str:
        """The artifact's digest: sha256 of the canonical JSON."""
        return sha256_text(self.to_json())

    def blobs(self) -> list[tuple[str, int, str]]:
        """Every blob the artifact needs as (sha256, size, path), each sha256 once."""
        seen: set[str] = set()
        out: list[tuple[str, int, str]] = []
        every_target = [e for t in self.targets for e in t.dependencies]
        for group in (
            self.app_files,
            self.config_files,
            self.dependencies,
            tuple(every_target),
            self.tools,
        ):
            for e in group:
                if e.sha256 not in seen:
                    seen.add(e.sha256)
                    out.append((e.sha256, e.size, e.path))
        return out


def write_manifest(artifacts_dir: Path, manifest: Manifest) -> Path:
    """Write ``<artifacts_dir>/<digest>.json`` atomically; return its path."""
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    dest = artifacts_dir / f"{manifest.digest}.json"
    tmp = artifacts_dir / f".{manifest.digest}.tmp-{os.getpid()}"
    tmp.write_text(manifest.to_json())
    os.replace(tmp, dest)
    return dest


def read_manifest_file(path: Path) -> Manifest:
    """Read a stored manifest and check that its bytes still hash to the digest in its name."""
    text = path.read_text()
    try:
        manifest = Manifest.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise OperationError(f"artifact manifest {path} is unreadable: {exc}") from exc
    if sha256_text(text) != path.stem:
        raise OperationError(
            f"artifact manifest {path} does not match its digest (it was modified)",
            hint="run `shiplane clean` and build again",
        )
    return manifest


def find_manifest(artifacts_dir: Path, digest: str) -> Path:
    """The manifest file whose digest is ``digest`` or starts with it (a unique prefix)."""
    prefix = digest.strip().lower()
    if not prefix or any(c not in "0123456789abcdef" for c in prefix):
        raise UsageError(f"artifact digest {digest!r} is not a hex digest (or prefix of one)")
    names = (
        sorted(p for p in artifacts_dir.glob("*.json") if p.stem.startswith(prefix))
        if artifacts_dir.is_dir()
        else []
    )
    if not names:
        raise UsageError(
            f"no artifact {digest!r} in {artifacts_dir}", hint="run `shiplane build` to make one"
        )
    if len(names) > 1:
        shown = ", ".join(p.stem[:12] for p in names[:5])
        raise UsageError(
            f"artifact prefix {digest!r} is ambiguous: matches {shown}", hint="give more digits"
        )
    return names[0]
