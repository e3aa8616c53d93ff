"""``prune``: old releases beyond ``keep_releases``, venvs no release uses (and then uv's cache),
the store's blobs no release lists, agent versions nothing runs, and leftovers of crashed installs. Never the live
release, the previous one (the standby), the newest known-good one, nor one whose server still
runs."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .paths import Layout
from .protocol import Emit, PruneResult
from .releases import current_release, list_releases, previous_release, remove_tree
from .runtime import RELEASE_ID_RE
from .venvs import list_venvs, remove_venv


def prune(layout: Layout, keep: int, emit: Emit) -> PruneResult:
    """Remove the oldest releases beyond ``keep``; never the live, the previous, nor the newest
    ``good`` one. Then drop venvs no remaining release uses and leftovers of crashed installs."""
    keep = max(1, int(keep))
    metas = list_releases(layout)
    current, previous = current_release(layout), previous_release(layout)
    # the newest known-good release other than the live one: `previous` when there is one
    good = [
        m["release_id"]
        for m in metas
        if m.get("state") in ("good", "previous") and m["release_id"] != current
    ]
    protected = {current, previous if previous else (good[-1] if good else None)}
    # a release whose server still runs (the standby, an interrupted switch's candidate)
    protected |= {m["release_id"] for m in metas if layout.release_socket(m["release_id"]).exists()}
    ids = [m["release_id"] for m in metas]
    excess = len(ids) - keep
    removed: list[str] = []
    for rid in ids:
        if excess <= 0:
            break
        if rid in protected:
            continue
        emit({"phase": "prune", "status": "remove", "detail": rid})
        remove_tree(layout.release(rid))
        removed.append(rid)
        excess -= 1
    _remove_leftovers(layout)
    used = {m.get("dependency_digest") for m in list_releases(layout)}
    venvs_removed = [d for d in list_venvs(layout) if d not in used]
    for digest in venvs_removed:
        emit({"phase": "prune", "status": "remove-venv", "detail": digest})
        remove_venv(layout, digest)
    if venvs_removed:
        # uv's cache holds every wheel ever unpacked here, the gone venvs' too, and would grow
        # with each dependency change; the venvs hard-link their files, so they keep them
        remove_tree(layout.uv_cache)
    return {
        "removed": removed,
        "venvs_removed": venvs_removed,
        "blobs_removed": _prune_store(layout),
        "agents_removed": _prune_agents(layout),
    }


def _prune_store(layout: Layout) -> int:
    """Drop the store's blobs that no remaining release lists (prune runs under the deploy
    lock, so no copy is in flight); returns how many. Nothing goes while any release does not
    list its blobs (written by an older agent): what it needs is unknown."""
    metas = list_releases(layout)
    if any(not isinstance(m.get("blobs"), list) for m in metas):
        return 0
    wanted = {str(sha) for m in metas for sha in m["blobs"]}
    removed = 0
    try:
        entries = list(layout.store.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if re.fullmatch(r"[0-9a-f]{64}", entry.name) and entry.name not in wanted:
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


AGENT_VERSION = re.compile(r"agent-[0-9a-f]{64}")
# Where a program that runs an agent version is written down: the daemon backend's confs under
# run/, the systemd backend's units (system or user)
UNIT_DIRS = (Path("/etc/systemd/system"), Path.home() / ".config" / "systemd" / "user")


def _prune_agents(layout: Layout) -> list[str]:
    """Remove ``.shiplane/agent-<sha>/`` versions (left by earlier shiplane releases) that no
    program config and no running process names; never the one running this prune. Cheap when
    there is nothing to do: the configs and processes are read only if an old version exists."""
    running = os.path.basename(os.environ.get("SHIPLANE_AGENT_DIR", "").rstrip("/"))
    try:
        old = [
            p
            for p in layout.agent_dir.iterdir()
            if AGENT_VERSION.fullmatch(p.name.removesuffix(".pyz")) and p.name != running
        ]
    except OSError:
        return []
    if not old:
        return []
    used = _named_agent_versions(layout)
    removed = []
    for path in old:
        if path.name.removesuffix(".pyz") in used:
            continue
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def _named_agent_versions(layout: Layout) -> set[str]:
    """Every ``agent-<sha>`` that a config under ``run/``, a systemd unit or a process's command
    line mentions (a supervised program, the front proxy, a detached after-switch, a session)."""
    texts: list[bytes] = []
    files = [p for p in layout.run.rglob("*") if p.is_file()] if layout.run.is_dir() else []
    for directory in UNIT_DIRS:
        try:
            files += [p for p in directory.iterdir() if p.is_file()]
        except OSError:
            continue
    for path in files:
        try:
            texts.append(path.read_bytes()[: 1 << 20])
        except OSError:
            continue
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                texts.append(handle.read())
        except OSError:
            continue
    named = re.compile(AGENT_VERSION.pattern.encode())  # the same name, in bytes
    return {m.decode() for text in texts for m in named.findall(text)}


def _remove_leftovers(layout: Layout) -> None:
    """Temp dirs of installs that crashed (never our own live work: prune runs under the lock)."""
    if not layout.releases.is_dir():
        return
    live = current_release(layout)
    for entry in layout.releases.iterdir():
        name = entry.name
        crashed_tmp = name.startswith((".tmp-", ".trash-")) and not name.endswith(f"-{os.getpid()}")
        # A release dir without release.json is an install that died after its rename.
        incomplete = (
            bool(RELEASE_ID_RE.match(name))
            and name != live
            and not layout.release_meta(name).exists()
        )
        if crashed_tmp or incomplete:
            shutil.rmtree(entry, ignore_errors=True)
