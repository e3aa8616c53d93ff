"""``shiplane plan``: the deploy stopped after planning. Per host: the live release and the one to
come, whether its dependency venv is reused, the blobs and bytes to send, the config keys that
would change, and the services a switch restarts.

Read-only on every host: it takes no lock and calls only read ops (``inventory``,
``read_release_file``, ``history``). The one write anywhere is the controller's own build cache (it builds or
reuses the artifact, as ``deploy`` would); a host contacted for the very first time also receives
the agent itself (``.shiplane/agent-<sha>.pyz``), as any shiplane command does.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shiplane.commands.build import build_for_deploy
from shiplane.commands.operate import connected
from shiplane.commands.release_phase import checkout_inputs, last_run_inputs
from shiplane.config.formats import format_of, parse_env
from shiplane.config.layers import env_file_values, render_files
from shiplane.errors import ConfigError, OperationError
from shiplane.fleet import failures
from shiplane.plan import hook_hosts, manifest_blobs, primary_host, release_id, services_spec
from shiplane.secret import Masker
from shiplane.transport.session import AgentSession
from shiplane.ui import Reporter, human_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_FILE = "shiplane.env"


def run_plan(
    file: Path | None,
    stage: str | None,
    masker: Masker,
    *,
    hosts: str | None,
    sets: Sequence[str],
    as_json: bool,
    verbose: bool,
) -> dict[str, Any]:
    """What ``deploy --stage`` would do on every host, without changing any host.

    Returns ``{"ok": True, "stage", "artifact", "release", "hosts": {host: {...}}, "lines": [...]}``;
    raises OperationError (exit 1) when a host cannot be reached or inventoried.
    """
    reporter: Any = (
        (lambda event: None) if as_json else Reporter.for_terminal(False, masker, verbose)
    )
    with connected(file, stage, masker, hosts=hosts, sets=sets, need_secrets=True) as (ctx, fleet):
        deploy = ctx.project.deploy
        built = build_for_deploy(ctx.project, reporter)
        manifest, digest = built.manifest.to_dict(), built.digest
        rid = release_id(digest)
        blobs = manifest_blobs(manifest)
        sizes = dict(blobs)
        wanted = _wanted_files(ctx.project, ctx.layered)
        spec = services_spec(deploy, ctx.stage)

        def one(host: str, session: AgentSession) -> dict[str, Any]:
            inventory = session.call("inventory", {"blobs": [sha for sha, _ in blobs]}, timeout=120)
            current = inventory.get("current")
            live = next(
                (r for r in inventory.get("releases", []) if r.get("release_id") == current), None
            )
            missing = list(inventory.get("missing") or [])
            changes = _config_changes(session, current, wanted) if current else {}
            return {
                "current": current,
                "current_artifact": (live or {}).get("artifact"),
                "release": rid,
                "same_artifact": bool(live) and (live or {}).get("artifact") == digest,
                "venv_reused": manifest.get("dependency_digest") in (inventory.get("venvs") or []),
                "blobs": len(missing),
                "bytes": sum(sizes[sha] for sha in missing),
                "config": changes,
                "lock": inventory.get("lock"),
                "setup_pending": bool(deploy.hooks.setup) and not inventory.get("setup_done"),
            }

        outcomes = fleet.each("plan", one, quiet=True)
        bad = failures(outcomes)
        if bad:
            raise OperationError("plan failed: " + "; ".join(e.message for e in bad.values()))
        per_host = {host: outcomes[host].result for host in fleet.hosts if host in outcomes}
        primary = primary_host(deploy, ctx.stage, fleet.hosts)
        services = _services(spec)
        head = (
            f"plan for stage {ctx.stage}: artifact {digest[:12]}{' (reused)' if built.reused else ' (built)'}, "
            f"release {rid} (nothing changed on any host)"
        )
        lines = [head]
        for host, info in per_host.items():
            lines += _host_lines(host, info, services)
        where = hook_hosts(deploy, ctx.stage, list(per_host))
        runs_on = [h for h in where if _release_hook_runs(ctx, fleet.sessions[h])]
        hook_runs = bool(runs_on)
        hooks = (
            [
                f"release hook `{c}` once on {', '.join(runs_on)}"
                for c in deploy.hooks.release_commands()
            ]
            if runs_on
            else []
        )
        skips = [h for h in where if h not in runs_on]
        if skips and deploy.hooks.release_commands():
            watched = ", ".join(deploy.hooks.release_if_changed)
            hooks.append(
                f"no release hook on {', '.join(skips)}: nothing it depends on ({watched}, config) "
                "changed since it last ran there"
            )
        pending = [h for h in where if per_host[h]["setup_pending"]]
        if pending and deploy.hooks.setup:
            hooks.insert(
                0,
                f"setup hook `{deploy.hooks.setup}` on {', '.join(pending)} (its first deploy there)",
            )
        lines += [f"then: {h}" for h in hooks]
        rolling = deploy.stages[ctx.stage].rolling
        lines.append(f"switch in batches of {rolling.batch}, max_fail {rolling.max_fail}")
        return {
            "ok": True,
            "stage": ctx.stage,
            "artifact": digest,
            "release": rid,
            "primary": primary,
            "release_hook": "run" if hook_runs and deploy.hooks.release_commands() else "skip",
            "services": services,
            "hosts": per_host,
            "lines": lines,
        }


def _release_hook_runs(ctx: Any, session: AgentSession) -> bool:
    """Whether a deploy now would run the release hook (``hooks.release_if_changed``): read-only,
    the primary's ledger against the digest of what the hook depends on in this checkout."""
    inputs = checkout_inputs(ctx.project, ctx.layered)
    return inputs is None or last_run_inputs(session, 120) != inputs


def _services(spec: dict[str, Any]) -> list[str]:
    """What a switch does to each service: web blue/green (new process per release), workers restart."""
    out = []
    if spec.get("web"):
        out.append("web (new release started, health-checked, then takes traffic)")
    out += [f"{name} (restarted on the new release)" for name in spec.get("workers", {})]
    return out


def _host_lines(host: str, info: dict[str, Any], services: list[str]) -> list[str]:
    lines = [
        f"{host}:",
        f"  release   {info['current'] or '(none: first deploy)'} -> {info['release']}"
        + (" (same artifact as live)" if info["same_artifact"] else ""),
        f"  venv      {'reused' if info['venv_reused'] else 'built (dependencies installed)'}",
        f"  send      {info['blobs']} blob(s), {human_bytes(info['bytes'])}",
    ]
    config = info["config"]
    if not info["current"]:
        lines.append("  config    all new (no live release)")
    elif not any(keys for change in config.values() for keys in change.values()):
        lines.append("  config    unchanged")
    else:
        for path, keys in config.items():
            for kind in ("added", "changed", "removed"):
                if keys.get(kind):
                    lines.append(f"  config    {path}: {kind} {', '.join(keys[kind])}")
    lines.append(f"  services  {'; '.join(services) if services else 'none'}")
    if info["lock"]:
        lock = info["lock"]
        lines.append(
            f"  LOCKED    by {lock.get('user', '?')}@{lock.get('host', '?')} ({lock.get('command', '')}); "
            "a deploy would stop here"
        )
    return lines


# --- config diff: keys only, values compared by hash (secrets never printed) --------------------


def _wanted_files(project: Any, layered: Any) -> dict[str, tuple[str | None, str]]:
    """Path in the release -> (format or None for templates, content) of what a deploy writes."""
    specs = project.deploy.config.rendered_files()
    out: dict[str, tuple[str | None, str]] = {}
    for spec, rendered in zip(specs, render_files(project, layered)):
        fmt = None if spec.template else format_of(rendered.path, spec.format)
        out[rendered.path] = (fmt, rendered.content)
    env = env_file_values(layered)
    out[ENV_FILE] = (
        "shiplane-env",
        "".join(f"{k}={json.dumps(str(env[k]))}\n" for k in sorted(env)),
    )
    return out


def _config_changes(
    session: AgentSession, current: str, wanted: dict[str, tuple[str | None, str]]
) -> dict[str, dict[str, list[str]]]:
    changes: dict[str, dict[str, list[str]]] = {}
    for path, (fmt, content) in wanted.items():
        live = session.call("read_release_file", {"release_id": current, "path": path}, timeout=60)
        old = live.get("content") if live.get("exists") else None
        changes[path] = _diff_keys(old, content, fmt)
    return changes


def _diff_keys(old: str | None, new: str, fmt: str | None) -> dict[str, list[str]]:
    """Keys added, changed (by value hash) and removed between two renderings of one file."""
    if old is None:
        return {"added": ["(whole file)"]}
    try:
        before, after = _flat(old, fmt), _flat(new, fmt)
    except (ValueError, configparser.Error, tomllib.TOMLDecodeError, ConfigError):
        before, after = {"(whole file)": old}, {"(whole file)": new}
    digest = {k: hashlib.sha256(str(v).encode()).hexdigest() for k, v in before.items()}
    return {
        "added": sorted(k for k in after if k not in before),
        "changed": sorted(
            k
            for k in after
            if k in before and hashlib.sha256(str(after[k]).encode()).hexdigest() != digest[k]
        ),
        "removed": sorted(k for k in before if k not in after),
    }


def _flat(text: str, fmt: str | None) -> dict[str, Any]:
    if fmt == "ini":
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(text)
        return {f"{s}.{k}": v for s in parser.sections() for k, v in parser.items(s, raw=True)}
    if fmt == "toml":
        return _flatten(tomllib.loads(text))
    if fmt == "json":
        return _flatten(json.loads(text))
    if fmt in ("env", "shiplane-env"):
        return dict(parse_env(text, ENV_FILE))
    return {"(whole file)": text}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix or "(value)": tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return out
