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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypedDict

from shiplane.agent.protocol import LockInfo
from shiplane.artifact import Interpreter, target_index
from shiplane.commands.build import build_for_deploy
from shiplane.commands.common import StageContext
from shiplane.commands.host_python import hosts_interpreters
from shiplane.commands.operate import connected
from shiplane.commands.release_phase import checkout_inputs, last_run_inputs
from shiplane.config import Layered, Project
from shiplane.config.formats import format_of, parse_env
from shiplane.config.layers import env_file_values, render_files
from shiplane.errors import ConfigError, OperationError
from shiplane.events import Emit
from shiplane.fleet import Fleet, failures
from shiplane.plan import (
    every_blob,
    hook_hosts,
    manifest_blobs,
    primary_host,
    release_id,
    services_spec,
)
from shiplane.secret import Masker
from shiplane.transfer import HostTransfer, describe, transfer_plan
from shiplane.transport.session import AgentSession

if TYPE_CHECKING:
    from shiplane.artifact import BuildResult

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_FILE = "shiplane.env"


class ConfigChange(TypedDict, total=False):
    """The keys of one config file a deploy would add, change (by value hash) or remove."""

    added: list[str]
    changed: list[str]
    removed: list[str]


class HostPlan(TypedDict):
    """What a deploy would do on one host (``plan --json``'s ``hosts``)."""

    current: str | None
    current_artifact: str | None
    release: str
    same_artifact: bool
    venv_reused: bool
    blobs: int
    bytes: int
    transfer: str  # where its blobs would come from (docs/DESIGN.md, "Blob transfer")
    config: dict[str, ConfigChange]
    lock: LockInfo | None
    setup_pending: bool
    python: str  # the host's interpreter, e.g. "CPython 3.11.2 (cp311, linux_x86_64)"


class PlanJson(TypedDict):
    """``plan --json``'s result, before the CLI adds the ``lines`` it prints."""

    ok: bool
    stage: str
    artifact: str
    release: str
    primary: str
    release_hook: Literal["run", "skip"]
    services: list[str]
    hosts: dict[str, HostPlan]


@dataclass(frozen=True)
class HookPlan:
    """The hooks a deploy would run: the setup hook on ``setup_pending`` hosts (their first
    deploy), the release hook's commands on ``runs_on``, none on ``skips`` (nothing changed)."""

    setup: str | None
    setup_pending: list[str]
    release_commands: list[str]
    runs_on: list[str]
    skips: list[str]
    watched: list[str]


@dataclass(frozen=True)
class PlanResult:
    """What ``plan`` found; the CLI renders it (``ui.plan_lines``) or prints ``to_json()``."""

    stage: str
    artifact: str
    reused: bool
    release: str
    primary: str
    services: list[str]
    hosts: dict[str, HostPlan]
    hooks: HookPlan
    batch: int | str
    max_fail: int | str

    @property
    def release_hook(self) -> Literal["run", "skip"]:
        return "run" if self.hooks.runs_on and self.hooks.release_commands else "skip"

    def to_json(self) -> PlanJson:
        return {
            "ok": True,
            "stage": self.stage,
            "artifact": self.artifact,
            "release": self.release,
            "primary": self.primary,
            "release_hook": self.release_hook,
            "services": self.services,
            "hosts": self.hosts,
        }


def run_plan(
    file: Path | None,
    stage: str | None,
    masker: Masker,
    emit: Emit,
    *,
    hosts: str | None,
    sets: Sequence[str],
) -> PlanResult:
    """What ``deploy --stage`` would do on every host, without changing any host; the build's
    events go to ``emit``. Raises OperationError (exit 1) when a host cannot be reached or
    inventoried."""
    with connected(file, stage, masker, hosts=hosts, sets=sets, need_secrets=True) as (ctx, fleet):
        deploy = ctx.project.deploy
        # as deploy does: a wheelhouse for each host's Python, so the artifact is the same
        built = build_for_deploy(
            ctx.project, emit, stage=ctx.stage, hosts=lambda: hosts_interpreters(fleet)
        )
        per_host = _survey(ctx, fleet, built)
        rolling = deploy.stages[ctx.stage].rolling
        return PlanResult(
            stage=ctx.stage,
            artifact=built.digest,
            reused=built.reused,
            release=release_id(built.digest),
            primary=primary_host(deploy, ctx.stage, fleet.hosts),
            services=_services(services_spec(deploy, ctx.stage)),
            hosts=per_host,
            hooks=_hook_plan(ctx, fleet, per_host),
            batch=rolling.batch,
            max_fail=rolling.max_fail,
        )


def _survey(ctx: StageContext, fleet: Fleet, built: BuildResult) -> dict[str, HostPlan]:
    """Every host's plan, read in parallel; raises when any host could not be read."""
    manifest = built.manifest.to_dict()
    rid = release_id(built.digest)
    wanted = _wanted_files(ctx.project, ctx.layered)
    setup = bool(ctx.project.deploy.hooks.setup)

    lacking: dict[str, list[str]] = {}

    def one(host: str, session: AgentSession) -> HostPlan:
        return _host_plan(session, manifest, built.digest, rid, wanted, setup, lacking, host)

    outcomes = fleet.each("plan", one, quiet=True)
    bad = failures(outcomes)
    if bad:
        raise OperationError("plan failed: " + "; ".join(e.message for e in bad.values()))
    per_host: dict[str, HostPlan] = {
        host: outcomes[host].result for host in fleet.hosts if host in outcomes
    }
    for host, text in _transfers(ctx, manifest, list(per_host), lacking).items():
        per_host[host]["transfer"] = text
    return per_host


def _transfers(
    ctx: StageContext, manifest: dict[str, object], hosts: list[str], lacking: dict[str, list[str]]
) -> dict[str, str]:
    """Where each host's blobs would come from: the controller, or a host that has them
    (``transfer = "auto"`` on several hosts; the deploy decides the same way)."""
    sizes = dict(every_blob(manifest))
    stage = ctx.project.deploy.stages[ctx.stage]
    lacking = {h: lacking.get(h, []) for h in hosts if lacking.get(h)}
    if stage.transfer == "auto" and not stage.is_local and len(hosts) > 1:
        holding = {h: set(sizes) - set(m) for h, m in lacking.items()}
        plans = transfer_plan(hosts, lacking, holding, sizes)
    else:
        plans = {h: HostTransfer(controller=list(m)) for h, m in lacking.items()}
    said = describe(plans, sizes)
    return {h: said.get(h, "nothing to send") for h in hosts}


def _host_plan(
    session: AgentSession,
    manifest: dict[str, object],
    digest: str,
    rid: str,
    wanted: dict[str, tuple[str | None, str]],
    setup: bool,
    lacking: dict[str, list[str]],
    host: str,
) -> HostPlan:
    """One host's plan, from its inventory (and its live release's config files); the blobs it
    lacks go in ``lacking``."""
    targets = manifest.get("targets")
    several = [t["target"] for t in targets] if isinstance(targets, list) and targets else None
    index = target_index(several, session.hello) if several else None
    own = targets[index] if isinstance(targets, list) and index is not None else manifest
    blobs = manifest_blobs(dict(manifest), index)
    sizes = dict(blobs)
    inventory = session.call("inventory", {"blobs": [sha for sha, _ in blobs]}, timeout=120)
    current = inventory.get("current")
    live = next((r for r in inventory.get("releases", []) if r.get("release_id") == current), None)
    missing = list(inventory.get("missing") or [])
    lacking[host] = missing
    return {
        "current": current,
        "current_artifact": (live or {}).get("artifact"),
        "release": rid,
        "same_artifact": bool(live) and (live or {}).get("artifact") == digest,
        "venv_reused": own.get("dependency_digest") in (inventory.get("venvs") or []),
        "blobs": len(missing),
        "bytes": sum(sizes[sha] for sha in missing),
        "transfer": "",  # the whole stage's plan decides it (_transfers)
        "config": _config_changes(session, current, wanted) if current else {},
        "lock": inventory.get("lock"),
        "setup_pending": setup and not inventory.get("setup_done"),
        "python": _interpreter(session),
    }


def _interpreter(session: AgentSession) -> str:
    interp = Interpreter.from_hello(session.hello)
    label = interp.label if interp else str(session.hello.get("python"))
    return f"{label} at {session.hello.get('executable')}"


def _hook_plan(ctx: StageContext, fleet: Fleet, per_host: dict[str, HostPlan]) -> HookPlan:
    hooks = ctx.project.deploy.hooks
    where = hook_hosts(ctx.project.deploy, ctx.stage, list(per_host))
    runs_on = [h for h in where if _release_hook_runs(ctx, fleet.sessions[h])]
    return HookPlan(
        setup=hooks.setup,
        setup_pending=[h for h in where if per_host[h]["setup_pending"]],
        release_commands=hooks.release_commands(),
        runs_on=runs_on,
        skips=[h for h in where if h not in runs_on],
        watched=list(hooks.release_if_changed),
    )


def _release_hook_runs(ctx: StageContext, session: AgentSession) -> bool:
    """Whether a deploy now would run the release hook (``hooks.release_if_changed``): read-only,
    the primary's ledger against the digest of what the hook depends on in this checkout."""
    inputs = checkout_inputs(ctx.project, ctx.layered)
    return inputs is None or last_run_inputs(session, 120) != inputs


def _services(spec: Mapping[str, object]) -> list[str]:
    """What a switch does to each service: web blue/green (new process per release), workers restart."""
    out = []
    if spec.get("web"):
        out.append("web (new release started, health-checked, then takes traffic)")
    workers = spec.get("workers")
    out += [
        f"{name} (restarted on the new release)"
        for name in (workers if isinstance(workers, dict) else {})
    ]
    jobs = spec.get("jobs")
    out += [
        f"job {name} ({job.get('schedule')}: scheduled on the primary host only)"
        for name, job in (jobs if isinstance(jobs, dict) else {}).items()
        if isinstance(job, dict)
    ]
    return out


# --- config diff: keys only, values compared by hash (secrets never printed) --------------------


def _wanted_files(project: Project, layered: Layered) -> dict[str, tuple[str | None, str]]:
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
) -> dict[str, ConfigChange]:
    changes: dict[str, ConfigChange] = {}
    for path, (fmt, content) in wanted.items():
        live = session.call("read_release_file", {"release_id": current, "path": path}, timeout=60)
        old = live.get("content") if live.get("exists") else None
        changes[path] = _diff_keys(old, content, fmt)
    return changes


def _diff_keys(old: str | None, new: str, fmt: str | None) -> ConfigChange:
    """Keys added, changed (by value hash) and removed between two renderings of one file."""
    if old is None:
        return {"added": ["(whole file)"]}
    before: dict[str, object]
    after: dict[str, object]
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


def _flat(text: str, fmt: str | None) -> dict[str, object]:
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


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix or "(value)": tree}
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return out
