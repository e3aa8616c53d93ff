"""The controller <-> agent contract, in one place: every op, its request fields (type, whether
required, default) and what it answers. Stdlib only, as the whole agent; the controller imports it
too, so both sides check the same definition:

- the agent decodes each request with :func:`decode` before its handler runs: an unknown op, an
  unknown or missing field, or a field of the wrong type is refused (kind ``protocol``) with the
  field's name, never read as a silent default;
- the controller checks each request with :func:`decode` before it sends it (a misspelt key is a
  bug, caught on the spot);
- docs/DESIGN.md's op table is :func:`markdown` (tests/test_protocol.py fails when it is stale).

Wire format (docs/DESIGN.md, "Protocol"): one JSON object per line, ``{"id", "op", "args"}``; the
agent answers events ``{"id", "event"}`` then ``{"id", "ok": true, "result"}`` or ``{"id", "ok":
false, "error": {"kind", "message", ...}}``. ``receive`` alone carries bytes after its line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

from .errors import AgentError

VERSION = 1


# --- the shapes the ops carry -----------------------------------------------------------------
# TypedDicts, not classes: they are the JSON objects themselves (no conversion on either side),
# and mypy checks every key the code reads or writes. Annotations stay strings (``from __future__
# import annotations``), so ``X | None`` is fine on the hosts' Python 3.9.


class Event(TypedDict, total=False):
    """What an op reports while it runs: ``{"phase", "status", "detail"}`` plus a few extras."""

    phase: str
    status: str
    detail: str
    seconds: float
    bytes: int
    total: int
    command: str
    release_id: str
    service: str


Emit = Callable[[Event], None]


class HealthSpec(TypedDict):
    path: str
    timeout: float
    host: str | None


class SmokeSpec(TypedDict):
    path: str
    expect: str | None
    status: int


class WebSpec(TypedDict):
    """The web service of a stage (the controller's ``plan.services_spec``)."""

    kind: str  # "wsgi" or "asgi"
    target: str  # "module:app"
    workers: int
    worker_class: str | None
    bind: str
    port: int
    timeout: float
    graceful_timeout: float
    threads: int | None
    max_requests: int | None
    max_requests_jitter: int | None
    keepalive: int | None
    access_log: bool
    forwarded_allow_ips: str | None
    options: list[str]
    standby: bool
    preboot: bool
    health: HealthSpec
    smoke: list[SmokeSpec]


class WorkerSpec(TypedDict):
    command: str
    stop_signal: str
    stop_timeout: float


class NginxSpec(TypedDict):
    server_name: str
    tls_cert: str | None
    tls_key: str | None
    static: dict[str, str]
    site_dir: str
    conf: str | None
    pid_file: str | None


class ServicesSpec(TypedDict):
    """The services of a stage: what ``switch`` starts and the backend and front that run them."""

    app: str
    stage: str
    front: str
    web: WebSpec | None
    workers: dict[str, WorkerSpec]
    backend: str  # "auto", "systemd", "daemon"
    nginx: NginxSpec | None


class RenderedFile(TypedDict):
    path: str
    content: str
    mode: int
    shared: bool


class SharedSpec(TypedDict):
    dirs: list[str]
    files: list[str]


# --- requests: one TypedDict per op, keys exactly its fields (tests/test_protocol.py checks) -----


class InstallArgs(TypedDict):
    release_id: str
    manifest: dict[str, Any]  # the artifact's manifest (artifact/_manifest.py)
    stage: str | None
    python: str | None
    uv_cache: str | None
    rendered: list[RenderedFile]
    env: dict[str, str]
    shared: SharedSpec
    hooks: list[str]
    hook_timeout: float
    hook_silence: float | None
    backend: str | None
    preboot_web: WebSpec | None


class SwitchArgs(TypedDict):
    release_id: str
    services: ServicesSpec


class Holder(TypedDict, total=False):
    """Who holds (or asks for) the deploy lock."""

    user: str
    host: str
    pid: int
    command: str
    started_at: str
    reason: str

# JSON types a field may take; "number" is an int or a float, never a bool
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


@dataclass(frozen=True)
class Field:
    """One request field: its JSON type(s) (``"string|null"``), whether it must be given, and
    its default when it may be left out."""

    name: str
    type: str
    doc: str
    required: bool = False
    default: Any = None

    def accepts(self, value: Any) -> bool:
        for kind in self.type.split("|"):
            if kind == "null" and value is None:
                return True
            if kind == "any":
                return True
            allowed = _TYPES.get(kind, ())
            if isinstance(value, allowed) and not (
                kind in ("integer", "number") and isinstance(value, bool)
            ):
                return True
        return False


@dataclass(frozen=True)
class Op:
    name: str
    doc: str
    result: str
    fields: tuple[Field, ...] = ()
    payload: bool = False  # bytes follow the request line (receive)


def _release_id(doc: str = "the release", required: bool = True) -> Field:
    return Field("release_id", "string", doc, required=required)


_SERVICES = Field("services", "array|null", "service names (default: all)")

OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op(
            "inventory",
            "what the host has: missing blobs, releases, venvs, lock, services, setup done",
            "{missing, current, previous, releases, venvs, lock, services, setup_done, port_taken?}",
            (
                Field("blobs", "array", "sha256 of the blobs the deploy needs", default=()),
                Field(
                    "venv",
                    "object|null",
                    "{digest, python, uv_cache}: start making this venv while blobs arrive",
                ),
                Field(
                    "port",
                    "object|null",
                    "{bind, port}: say in port_taken if another program holds it",
                ),
            ),
        ),
        Op(
            "receive",
            "store blobs whose bytes follow the request line, each verified by its sha256",
            "{received, bytes}",
            (Field("blobs", "array", "[{sha256, size}] in the order of the bytes", required=True),),
            payload=True,
        ),
        Op(
            "install",
            "unpack a release, its venv, config and shared links; after_install hooks",
            "{release_id, reused, venv_reused, venv_seconds, seconds}",
            (
                _release_id(),
                Field("manifest", "object", "the artifact's manifest", required=True),
                Field("stage", "string|null", "the stage name"),
                Field("python", "string|null", "the interpreter for the venv"),
                Field(
                    "uv_cache",
                    "string|null",
                    "'user' (the local stage) or 'root' (in the deploy root)",
                ),
                Field(
                    "rendered", "array", "[{path, content, mode, shared}] config files", default=()
                ),
                Field("env", "object", "the release's environment (0600 env file)", default={}),
                Field("shared", "object", "{dirs, files} linked from shared/", default={}),
                Field("hooks", "array", "after_install commands", default=()),
                Field("hook_timeout", "number", "seconds each hook may run", default=600),
                Field(
                    "hook_silence", "number|null", "seconds a hook may print nothing (0: no limit)"
                ),
                Field("backend", "string|null", "the process manager to start while installing"),
                Field(
                    "preboot_web",
                    "object|null",
                    "the web spec: start its server with its libraries early",
                ),
            ),
        ),
        Op(
            "hook",
            "run a command in a release with its environment, output streamed",
            "{exit_code, output, output_tail, seconds}",
            (
                _release_id(),
                Field("command", "string", "the shell command", required=True),
                Field("timeout", "number", "seconds in all", default=600),
                Field(
                    "silence_timeout", "number|null", "seconds it may print nothing (0: no limit)"
                ),
            ),
        ),
        Op(
            "switch",
            "blue/green: start, check and move traffic to a release (docs/DESIGN.md, Services)",
            "{previous, current, seconds, standby, workers, stopping, ...}",
            (_release_id(), Field("services", "object", "the services spec", required=True)),
        ),
        Op(
            "start",
            "start services of the live release",
            "{started}",
            (_SERVICES, Field("spec", "object|null", "the services spec (default: the saved one)")),
        ),
        Op("stop", "stop services (the manager keeps running)", "{stopped}", (_SERVICES,)),
        Op(
            "restart",
            "restart services (web: zero downtime)",
            "{restarted}",
            (_SERVICES, Field("spec", "object|null", "the services spec (default: the saved one)")),
        ),
        Op("reload", "reload services", "{reloaded}", (_SERVICES,)),
        Op(
            "status",
            "services, live release, backend",
            "{live_release, current, backend, services}",
        ),
        Op("shutdown", "stop every service and the manager", "{stopped}"),
        Op(
            "withdraw",
            "serve nothing again (the undo of a failed first deploy)",
            "{withdrawn, stopped}",
            (_release_id("the release the failed deploy installed"),),
        ),
        Op("verify", "re-hash every stored blob; quarantine bad ones", "{blobs, bad}"),
        Op(
            "logs",
            "a service's last log lines; with follow, new lines as events",
            "{service, path, lines}",
            (
                Field("service", "string|null", "the service (default: web)"),
                Field("lines", "integer", "how many", default=100),
                Field(
                    "follow",
                    "boolean|number",
                    "follow: until the reader goes, or this many seconds",
                    default=False,
                ),
            ),
        ),
        Op("releases", "the releases with their states", "{releases, current, previous}"),
        Op(
            "history",
            "the host's ledger, oldest first",
            "{entries}",
            (Field("limit", "integer|null", "the newest this many"),),
        ),
        Op(
            "read_release_file",
            "a file of a release (plan's config diff)",
            "{content}",
            (_release_id(), Field("path", "string", "relative to the release", required=True)),
        ),
        Op(
            "install_uv",
            "make the shipped uv runnable",
            "{path}",
            (
                Field("sha256", "string", "the blob", required=True),
                Field("binary_sha256", "string|null", "the binary inside the gzipped blob"),
            ),
        ),
        Op(
            "record",
            "append an entry to the host's ledger",
            "the entry",
            (Field("entry", "object", "the ledger entry", required=True),),
        ),
        Op(
            "mark",
            "set a release's state",
            "the release's metadata",
            (
                _release_id(),
                Field("state", "string", "live, previous, good, bad, rolled-back", required=True),
            ),
        ),
        Op(
            "prune",
            "remove old releases, venvs, blobs",
            "{removed, venvs_removed, blobs_removed}",
            (Field("keep", "integer", "releases to keep", default=5),),
        ),
        Op(
            "lock",
            "take the deploy lock (bound to this session, or kept)",
            "the lock record (+ broke)",
            (
                Field(
                    "holder",
                    "object",
                    "{user, host, pid, command, started_at, reason?}",
                    required=True,
                ),
                Field("wait", "number", "seconds to wait for a held lock", default=0),
                Field(
                    "keep",
                    "boolean",
                    "held until unlock, by no process (shiplane lock)",
                    default=False,
                ),
            ),
        ),
        Op(
            "heartbeat",
            "whether this session still holds the lock",
            "the lock record",
            (Field("holder", "object|null", "the holder (default: this session's)"),),
        ),
        Op(
            "unlock",
            "release the deploy lock",
            "{released, holder}",
            (
                Field("force", "boolean", "anyone's lock", default=False),
                Field("holder", "object|null", "whose (default: this session's)"),
                Field("by", "object|null", "who forced it (recorded)"),
            ),
        ),
    )
}


def decode(op: object, args: object) -> dict[str, Any]:
    """``args`` checked against ``op``'s fields, defaults filled in; AgentError kind ``protocol``
    naming the op and field otherwise."""
    spec = OPS.get(op) if isinstance(op, str) else None
    if spec is None:
        raise AgentError(f"unknown op {op!r}", kind="protocol")
    if not isinstance(args, dict):
        raise AgentError(f"{spec.name}: args must be an object", kind="protocol")
    known = {f.name: f for f in spec.fields}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise AgentError(
            f"{spec.name}: unknown field(s) {', '.join(unknown)} (protocol {VERSION}: "
            f"{', '.join(known) or 'no fields'})",
            kind="protocol",
        )
    out: dict[str, Any] = {}
    for name, field in known.items():
        if name not in args:
            if field.required:
                raise AgentError(f"{spec.name}: field {name} is required", kind="protocol")
            default = field.default
            out[name] = (
                list(default)
                if isinstance(default, tuple)
                else dict(default)
                if isinstance(default, dict)
                else default
            )
            continue
        value = args[name]
        if not field.accepts(value):
            raise AgentError(
                f"{spec.name}: field {name} must be {field.type.replace('|', ' or ')}, "
                f"found {type(value).__name__}",
                kind="protocol",
            )
        out[name] = value
    return out


def markdown() -> str:
    """The op table of docs/DESIGN.md."""
    lines = [
        f"Protocol version {VERSION}. `*` marks a required field.",
        "",
        "| op | request fields | result | does |",
        "|---|---|---|---|",
    ]
    for op in OPS.values():
        fields = (
            ", ".join(
                f"`{f.name}`{'*' if f.required else ''}: {f.type.replace('|', ' or ')}"
                + (f" = {_json(f.default)}" if not f.required and f.default is not None else "")
                for f in op.fields
            )
            or "-"
        )
        if op.payload:
            fields += " + bytes"
        lines.append(f"| `{op.name}` | {fields} | `{op.result}` | {op.doc} |")
    return "\n".join(lines) + "\n"


def _json(value: Any) -> str:
    import json

    return json.dumps(list(value) if isinstance(value, tuple) else value)


if __name__ == "__main__":  # the op table of docs/DESIGN.md
    print(markdown(), end="")
