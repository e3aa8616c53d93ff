"""A release's runtime: its id, its metadata and the environment its processes run with.

Kept apart from ``releases`` (install, prune) and light on imports: ``exec-env`` runs it before
every gunicorn and worker start, so each module it imports is paid on the switch's critical path.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from . import AgentError
from .paths import Layout

# UTC time (to the millisecond; whole seconds from older controllers) and the artifact's digest
RELEASE_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}(?:[0-9]{3})?Z-[0-9a-f]{8}$")
DIGEST_RE = re.compile(r"^[0-9a-f]{8,64}$")
PARTIAL_META = ".release.partial.json"


def valid_release_id(release_id: object) -> str:
    """Return ``release_id`` if it is ``YYYYmmddTHHMMSS[mmm]Z-<8 hex>``; fail kind ``usage`` otherwise."""
    if not isinstance(release_id, str) or not RELEASE_ID_RE.match(release_id):
        raise AgentError(f"not a release id: {release_id!r}", kind="usage")
    return release_id


def valid_digest(digest: object) -> bool:
    """A dependency digest is hex (it becomes a directory name)."""
    return isinstance(digest, str) and bool(DIGEST_RE.match(digest))


def placeholders(layout: Layout, release_id: str) -> dict[str, str]:
    """What ``{deploy_to}``, ``{shared}`` and ``{release}`` stand for on this host, in env values,
    rendered files and hook commands (``DATABASE_URL = "sqlite:///{shared}/db.sqlite3"``): each
    stage's paths without repeating them in the deploy file."""
    return {
        "{deploy_to}": str(layout.root),
        "{shared}": str(layout.shared),
        "{release}": str(layout.release(release_id)),
    }


def expand(text: str, values: dict[str, str]) -> str:
    """``text`` with each placeholder of :func:`placeholders` replaced; other braces untouched."""
    for token, value in values.items():
        text = text.replace(token, value)
    return text


def read_meta(layout: Layout, release_id: str) -> dict[str, Any] | None:
    """``release.json`` of a complete release (or the partial one during install), else None."""
    for path in (layout.release_meta(release_id), layout.release(release_id) / PARTIAL_META):
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            continue
        if isinstance(meta, dict):
            return meta
    return None


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a ``shiplane.env`` (KEY=<json string> per line)."""
    out: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value if isinstance(value, str) else json.dumps(value)
    return out


def runtime_env(layout: Layout, release_id: str) -> dict[str, str]:
    """The environment services, hooks and tasks of a release run with.

    ``os.environ``, then the release's env file, then the venv's ``bin`` first on ``PATH``, the
    release code on ``PYTHONPATH`` and ``SHIPLANE_*``/``VIRTUAL_ENV``.
    """
    valid_release_id(release_id)
    meta = read_meta(layout, release_id)
    if meta is None:
        raise AgentError(f"release {release_id} is not installed", kind="missing")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
    env.pop("PYTHONPATH", None)
    env.pop("SHIPLANE_AGENT_DIR", None)
    env.update(read_env_file(layout.env_file(release_id)))
    release_dir = layout.release(release_id)
    digest = meta.get("dependency_digest")
    if isinstance(digest, str) and valid_digest(digest):
        venv = layout.venv(digest)
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", os.defpath)
    code = release_dir / "lib" if meta.get("source") == "package" else release_dir
    extra = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(code) + (os.pathsep + extra if extra else "")
    env["SHIPLANE_RELEASE"] = release_id
    env["SHIPLANE_STAGE"] = str(meta.get("stage") or "")
    env["SHIPLANE_ROOT"] = str(layout.root)
    return env


def exec_in_release(layout: Layout, release_id: str, argv: list[str]) -> None:
    """Replace this process with ``argv`` run in the release dir with its runtime env."""
    if not argv:
        raise AgentError("exec-env: no command given", kind="usage")
    env = runtime_env(layout, release_id)
    os.chdir(layout.release(release_id))
    os.execvpe(argv[0], argv, env)
