"""``deploy --ref``: the app's files as one commit has them, not as the working tree does.

The ref is resolved to a commit (``git rev-parse --verify REF^{commit}``) and the project's
folder of that commit is exported with ``git archive`` into ``.shiplane/build/refs/<sha>/tree``:
a cache keyed by the commit, written once (to a temporary folder renamed into place) and reused.
Every member of the archive is checked before it is written: a relative path inside the
project's folder, no ``..``, a regular file, a folder or a symlink that stays inside the export;
anything else refuses the ref (exit 2), nothing half-written is kept.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import UsageError
from ._source import is_forbidden


@dataclass(frozen=True)
class RefTree:
    """One commit's export of the project's folder: where it is and which files it has."""

    ref: str  # as given: a tag, a branch, a sha
    commit: str  # the full sha it resolved to
    root: Path  # the project's folder in the export
    files: tuple[str, ...]  # its files, sorted POSIX paths relative to ``root``


def _git(project: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    if shutil.which("git") is None:
        raise UsageError("deploy --ref needs git, which is not on PATH")
    return subprocess.run(["git", *args], cwd=project, capture_output=True, check=False)


def check_ref(ref: str) -> str:
    """The ref string, refused when git could read it as an option or it holds control characters."""
    if not ref or ref.startswith("-") or any(ord(c) < 32 or c == "\x7f" for c in ref):
        raise UsageError(
            f"--ref {ref!r} is not a git ref",
            hint="give a tag, a branch or a commit sha (it may not start with '-')",
        )
    return ref


def resolve_ref(project: Path, ref: str) -> tuple[str, str]:
    """``(sha, prefix)``: the commit ``ref`` names, and the project's folder within the repository
    (``""`` at its top, else ending in ``/``). UsageError when the project is not in git or the
    ref names no commit."""
    check_ref(ref)
    inside = _git(project, "rev-parse", "--is-inside-work-tree")
    if inside.returncode != 0 or inside.stdout.strip() != b"true":
        raise UsageError(
            f"--ref {ref}: {project} is not in a git work tree, so there is no commit to deploy",
            hint="deploy without --ref to ship the project's folder as it is",
        )
    found = _git(project, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    sha = found.stdout.decode(errors="replace").strip()
    if found.returncode != 0 or len(sha) not in (40, 64) or not _hex(sha):
        raise UsageError(
            f"--ref {ref}: no commit of this repository is named {ref!r}",
            hint="give a tag, a branch or a commit sha `git log` shows (fetch it first if it is remote)",
        )
    prefix = _git(project, "rev-parse", "--show-prefix").stdout.decode(errors="replace").strip()
    return sha, prefix


def _hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def export_ref(project: Path, ref: str, build_root: Path) -> RefTree:
    """The project's folder as commit ``ref`` has it, exported under ``build_root/refs/<sha>``
    (reused when already there)."""
    sha, prefix = resolve_ref(project, ref)
    refs = build_root / "refs"
    dest = refs / sha
    listing = dest / "files.json"
    if not listing.is_file():
        refs.mkdir(parents=True, exist_ok=True)
        tmp = refs / f".{sha}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            files = _export(project, ref, sha, prefix, tmp / "tree")
            (tmp / "files.json").write_text(json.dumps(files))
            try:
                os.replace(tmp, dest)
            except OSError:  # another deploy exported it meanwhile: theirs is the same
                if not listing.is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    files = json.loads(listing.read_text())
    return RefTree(ref, sha, dest / "tree", tuple(files))


def _export(project: Path, ref: str, sha: str, prefix: str, root: Path) -> list[str]:
    # from the repository's top: in a subdirectory git archive takes paths relative to it
    top = _git(project, "rev-parse", "--show-toplevel").stdout.decode(errors="replace").strip()
    args = ["archive", "--format=tar", sha]
    if prefix:
        args += ["--", prefix]
    proc = subprocess.Popen(
        ["git", *args], cwd=top or project, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    files: list[str] = []
    broken = ""
    try:
        files = extract(proc.stdout, prefix, root, what=f"--ref {ref} ({sha[:12]})")
    except tarfile.TarError as exc:
        broken = str(exc)  # no archive came, or a broken one: git says why below
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        code = proc.wait()
    if code != 0 or broken:
        raise UsageError(
            f"--ref {ref}: git archive of {sha[:12]} failed: {err or broken or f'exit {code}'}",
            hint=f"does the project's folder {prefix or '.'} exist at {ref}?",
        )
    return files


def extract(stream: IO[bytes], prefix: str, root: Path, *, what: str) -> list[str]:
    """Write the tar ``stream``'s members below ``prefix`` into ``root``, each one checked first;
    return the files (and symlinks to files) as sorted paths relative to ``root``. Shiplane's
    own output, secrets and byte code are left out, as they are from every artifact."""
    root.mkdir(parents=True)
    files: list[str] = []
    links: list[tuple[str, str]] = []
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            rel = member_path(member, prefix, what)
            if rel is None or is_forbidden(rel):
                continue
            if any(rel == link or rel.startswith(link + "/") for link, _ in links):
                raise UsageError(f"{what}: the archive's member {rel} goes through a symlink")
            target = root / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                data = archive.extractfile(member)
                assert data is not None
                with open(target, "wb") as out:
                    shutil.copyfileobj(data, out)
                os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)
                files.append(rel)
            else:  # a symlink: member_path refused every other kind
                link_target(rel, member.linkname, what)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(member.linkname, target)
                links.append((rel, member.linkname))
    # a link counts as a file when it leads to one, as a checkout's would in `git ls-files`
    files += [rel for rel, _ in links if (root / rel).is_file()]
    return sorted(set(files))


def member_path(member: tarfile.TarInfo, prefix: str, what: str) -> str | None:
    """The member's path relative to the project's folder (None: the folder itself, or the
    pax header git writes); UsageError for an absolute path, ``..``, a path outside ``prefix``,
    or a kind other than a file, a folder or a symlink."""
    name = member.name
    if name == "pax_global_header":
        return None
    parts = name.rstrip("/").split("/") if name.rstrip("/") else []
    if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise UsageError(f"{what}: the archive's member {name!r} is not a plain relative path")
    path = "/".join(parts)
    if prefix and not (path + "/").startswith(prefix):
        raise UsageError(f"{what}: the archive's member {name!r} is outside {prefix}")
    if not (member.isfile() or member.isdir() or member.issym()):
        raise UsageError(f"{what}: the archive's member {name!r} is not a file, folder or symlink")
    rel = path[len(prefix) :]
    return rel or None


def link_target(rel: str, linkname: str, what: str) -> str:
    """Where the symlink ``rel`` leads, relative to the export; UsageError when it leads out."""
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(rel), linkname))
    if not linkname or linkname.startswith("/") or joined == ".." or joined.startswith("../"):
        raise UsageError(
            f"{what}: the symlink {rel} -> {linkname} leads out of the project's folder",
            hint="a deployed tree must be self-contained: replace the link by the file",
        )
    return joined
