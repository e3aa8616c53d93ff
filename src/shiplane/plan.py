"""Pure planning: config + artifact manifest + host inventories -> what to send each host.

Nothing here does I/O; the deploy command sends what this module decides, and `shiplane plan`
prints it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from shiplane.agent.protocol import InstallArgs, ServicesSpec, WebSpec
from shiplane.config import DeployFile, Layered, Rendered, env_file_values
from shiplane.config.schema import Service

Blob = tuple[str, int]  # (sha256, size)


def release_id(digest: str, now: float | None = None) -> str:
    """Sortable: UTC time to the millisecond, then the artifact digest's head, e.g.
    ``20261125T101500123Z-1a2b3c4d``. Milliseconds, because two deploys may now land in one
    second (a failed one and its fix): ids of one second would sort by digest, not by time, and
    rollback and prune go by that order. Ids of whole seconds (older releases) sort among them."""
    at = now if now is not None else time.time()
    millis = int((at % 1) * 1000)
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(at))}{millis:03d}Z-{digest[:8]}"


def manifest_blobs(manifest: Mapping[str, object], target: int | None = None) -> list[Blob]:
    """Every blob a host needs for this artifact, without duplicates, in a stable order; with
    ``target``, the dependencies are those of that ``targets`` entry (a mixed stage's host gets
    the wheels of its own Python only)."""
    seen: dict[str, int] = {}
    own: Mapping[str, object] = manifest
    targets = manifest.get("targets")
    if target is not None and isinstance(targets, list):
        own = targets[target]
    for group in ("tools", "dependencies", "app_files"):
        entries = (own if group == "dependencies" else manifest).get(group, [])
        for entry in entries if isinstance(entries, list) else []:
            seen.setdefault(str(entry["sha256"]), int(entry["size"]))
    return list(seen.items())


def every_blob(manifest: Mapping[str, object]) -> list[Blob]:
    """The blobs of every host's share of the artifact: a mixed stage's targets' wheels too."""
    seen = dict(manifest_blobs(manifest))
    targets = manifest.get("targets")
    for index in range(len(targets) if isinstance(targets, list) else 0):
        seen.update(manifest_blobs(manifest, index))
    return list(seen.items())


def services_spec(deploy: DeployFile, stage: str) -> ServicesSpec:
    """The services part of a switch/start request (see docs/DESIGN.md, "Services")."""
    stage_cfg = deploy.stages[stage]
    web = deploy.services.get("web")
    nginx = stage_cfg.nginx
    return {
        "app": deploy.app.name,
        "stage": stage,
        "front": stage_cfg.front,
        "web": None if web is None else _web_spec(deploy, stage, web),
        "workers": {
            name: {
                # config/schema.py refuses a service other than web without a command
                "command": service.command or "",
                "stop_signal": service.stop_signal,
                "stop_timeout": service.stop_timeout,
            }
            for name, service in deploy.services.items()
            if name != "web"
        },
        # every host's spec names them; host_services keeps them on the primary host only
        "jobs": {
            name: {"schedule": job.schedule, "command": job.command, "timeout": job.timeout}
            for name, job in deploy.jobs.items()
        },
        # the local stage runs under the daemon backend even on a systemd laptop
        "backend": "daemon"
        if stage_cfg.backend == "auto" and stage_cfg.is_local
        else stage_cfg.backend,
        "nginx": {
            "server_name": nginx.server_name,
            "tls_cert": nginx.tls_cert,
            "tls_key": nginx.tls_key,
            "static": dict(nginx.static),
            "site_dir": nginx.site_dir,
            "conf": nginx.conf,
            "pid_file": nginx.pid_file,
        }
        if stage_cfg.front == "nginx"
        else None,
        "caddy": {
            "domains": list(stage_cfg.domains),
            "acme_ca": stage_cfg.caddy.acme_ca,
            "acme_email": stage_cfg.caddy.acme_email,
            "acme_ca_root": stage_cfg.caddy.acme_ca_root,
            "data_dir": stage_cfg.caddy.data_dir,
            "http_port": stage_cfg.caddy.http_port,
            "https_port": stage_cfg.caddy.https_port,
            "issue_timeout": stage_cfg.caddy.issue_timeout,
            "renew_interval": stage_cfg.caddy.renew_interval,
        }
        if stage_cfg.front == "caddy"
        else None,
    }


def host_services(spec: ServicesSpec, deploy: DeployFile, stage: str, host: str) -> ServicesSpec:
    """The services spec as ``host`` gets it: the scheduled jobs on the stage's primary host
    (the one that runs the release hook), none on the others, so a job runs on one host."""
    if not spec["jobs"] or host == primary_host(deploy, stage, deploy.stages[stage].hosts):
        return spec
    return {**spec, "jobs": {}}


def jobs_after_rollout(
    spec: ServicesSpec,
    deploy: DeployFile,
    stage: str,
    rollout: list[list[str]],
    scheduling: set[str],
) -> str | None:
    """The primary host, when it must schedule the jobs only once the rollout is over: a host
    that schedules them now (``scheduling``: the primary before ``roles.primary`` changed)
    switches in a later batch, and until its switch unschedules them both would run each job.
    None when the primary may take them at its own switch."""
    if not spec["jobs"]:
        return None
    order = {host: index for index, batch in enumerate(rollout) for host in batch}
    primary = next((h for h in order if host_services(spec, deploy, stage, h)["jobs"]), None)
    if primary is None:
        return None
    later = [h for h in scheduling if h != primary and order.get(h, -1) > order[primary]]
    return primary if later else None


def _web_spec(deploy: DeployFile, stage: str, web: Service) -> WebSpec:
    """The web service's part of the services spec."""
    stage_cfg = deploy.stages[stage]
    return {
        "kind": "asgi" if deploy.app.asgi else "wsgi",
        # config/schema.py refuses a web service without app.wsgi or app.asgi
        "target": deploy.app.asgi or deploy.app.wsgi or "",
        "workers": web.workers or 2,
        "worker_class": web.worker_class,
        "bind": stage_cfg.bind or ("127.0.0.1" if stage_cfg.is_local else "0.0.0.0"),
        "port": deploy.web_port(stage) or 8000,  # an int: the stage has a web service
        "timeout": web.timeout,
        "graceful_timeout": web.graceful_timeout,
        "threads": web.threads,
        "max_requests": web.max_requests,
        "max_requests_jitter": web.max_requests_jitter,
        "keepalive": web.keepalive,
        "access_log": web.access_log,
        "forwarded_allow_ips": web.forwarded_allow_ips,
        "front": stage_cfg.front,
        "options": list(web.options),
        "standby": web.standby,
        "preboot": web.preboot,
        "health": {
            "path": web.healthcheck.path,
            "timeout": web.healthcheck.timeout,
            "host": web.healthcheck.host,
        },
        "smoke": [
            {"path": check.path, "expect": check.expect, "status": check.status}
            for check in web.smoke
        ],
    }


def install_request(
    deploy: DeployFile,
    stage: str,
    rid: str,
    manifest: dict[str, Any],
    layered: Layered,
    rendered: list[Rendered],
) -> InstallArgs:
    """The ``install`` op's arguments for every host of the stage (they are all the same)."""
    services = services_spec(deploy, stage)
    web = services["web"]
    return {
        "release_id": rid,
        "stage": stage,
        "manifest": manifest,
        "python": deploy.stages[stage].python or deploy.app.python,
        # the local stage installs from the user's uv cache, which the build already filled
        "uv_cache": "user" if deploy.stages[stage].is_local else "root",
        "rendered": [
            {"path": r.path, "content": r.content, "mode": r.mode, "shared": r.shared}
            for r in rendered
        ],
        "env": env_file_values(layered),
        "shared": {"dirs": list(deploy.shared.dirs), "files": list(deploy.shared.files)},
        "hooks": list(deploy.hooks.after_install),
        "hook_timeout": deploy.hooks.timeout,
        "hook_silence": deploy.hooks.silence_timeout,
        # the process manager the switch will use: the agent starts supervisord while installing
        "backend": services["backend"] if web else None,
        # and the web server, with only its libraries, once the release and its venv are there
        "preboot_web": web if web and web["preboot"] else None,
        "target": None,  # a mixed stage's deploy names each host's own (manifest "targets")
    }


def primary_host(deploy: DeployFile, stage: str, hosts: list[str]) -> str:
    """The host that runs once-only work (release hook, primary tasks): roles.primary's first, else the first host."""
    members = deploy.stages[stage].roles.get("primary", [])
    for member in members:
        for host in hosts:
            if host == member or host.split("@")[-1].split(":")[0] == member:
                return host
    return hosts[0]


def hook_hosts(deploy: DeployFile, stage: str, hosts: list[str]) -> list[str]:
    """Where the setup and release hooks run (``hooks.run_on``): the primary, or every host."""
    return list(hosts) if deploy.hooks.run_on == "all" else [primary_host(deploy, stage, hosts)]


def role_hosts(deploy: DeployFile, stage: str, hosts: list[str], scope: str) -> list[str]:
    """The hosts a task scope names: all, primary, role:NAME."""
    if scope == "all":
        return hosts
    if scope == "primary":
        return [primary_host(deploy, stage, hosts)]
    role = scope.split(":", 1)[1]
    members = deploy.stages[stage].roles.get(role, [])
    return [h for h in hosts if h in members or h.split("@")[-1].split(":")[0] in members]


def _count(value: int | str, total: int, *, minimum: int) -> int:
    if isinstance(value, str):
        return max(minimum, math.floor(total * int(value.rstrip("%")) / 100))
    return max(minimum, value)


def batches(hosts: list[str], batch: int | str) -> list[list[str]]:
    """Rolling batches: a count or a percentage of the hosts (at least one host per batch)."""
    size = _count(batch, len(hosts), minimum=1)
    return [hosts[i : i + size] for i in range(0, len(hosts), size)]


def max_failures(max_fail: int | str, batch_size: int) -> int:
    """Failures a batch may have and the rollout still go on; reaching more than this aborts."""
    return _count(max_fail, batch_size, minimum=0)
