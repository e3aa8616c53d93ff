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
from typing import TYPE_CHECKING, Any, TypedDict

from .errors import AgentError

if TYPE_CHECKING:  # the status op's answer (agent/services.py imports this module)
    from .services import ServicesStatus

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
    front: str  # the stage's front (ServicesSpec's): how the client's address reaches the app
    options: list[str]
    standby: bool
    preboot: bool
    health: HealthSpec
    smoke: list[SmokeSpec]


class WorkerSpec(TypedDict):
    command: str
    stop_signal: str
    stop_timeout: float


class JobSpec(TypedDict):
    """A scheduled job (``[jobs.NAME]``): run by the stage's primary host only (agent/jobs.py)."""

    schedule: str  # five cron fields (agent/cron.py)
    command: str
    timeout: float  # seconds a run may take before it is ended


class NginxSpec(TypedDict):
    server_name: str
    tls_cert: str | None
    tls_key: str | None
    static: dict[str, str]
    site_dir: str
    conf: str | None
    pid_file: str | None


class CaddySpec(TypedDict):
    """``front = "caddy"``: the stage's domains served over HTTPS by a private Caddy
    (agent/caddy.py) with certificates from an ACME CA."""

    domains: list[str]
    acme_ca: str
    acme_email: str | None
    acme_ca_root: str | None
    data_dir: str | None  # None: <root>/caddy
    http_port: int
    https_port: int
    issue_timeout: float
    renew_interval: float  # seconds between Caddy's checks for certificates due for renewal


class FrontRoute(TypedDict):
    """A site a shared front serves: the names it routes to one deploy root (``status``)."""

    domains: list[str]  # empty: nginx's catch-all server_name ``_``
    app: str
    stage: str
    root: str  # the deploy root whose ``run/web.sock`` the names go to


class FrontState(TypedDict):
    """The stage's front as ``status`` shows it: a Caddy or nginx several apps may share."""

    kind: str  # a name in agent/fronts.py's FRONTS
    config: str  # Caddy's dir, or nginx's site dir
    pid: int | None  # its process (Caddy; nginx's master), None when none runs
    routes: list[FrontRoute]  # every app it routes, this stage's among them


class ServicesSpec(TypedDict):
    """The services of a stage: what ``switch`` starts and the backend and front that run them."""

    app: str
    stage: str
    front: str
    web: WebSpec | None
    workers: dict[str, WorkerSpec]
    # the scheduled jobs this host runs: the stage's, on its primary host; {} on the others
    # (an older controller's spec has none: read with .get)
    jobs: dict[str, JobSpec]
    backend: str  # "auto", "systemd", "daemon"
    nginx: NginxSpec | None
    caddy: CaddySpec | None


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
    # the manifest's ``targets`` entry this host installs (a mixed stage); None: its top level
    target: int | None


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


class UvHint(TypedDict):
    """``inventory``'s ``uv``: the controller's uv the deploy ships (``install_uv``'s args),
    unpacked as soon as its blob is in the store."""

    sha256: str
    binary_sha256: str | None


class VenvHint(TypedDict, total=False):
    """``inventory``'s ``venv``: the venv a deploy will need, made while its blobs arrive."""

    digest: str
    python: str | None
    uv_cache: str | None


class PortSpec(TypedDict):
    """``inventory``'s ``port``: the stage's public port, checked for another program on it."""

    bind: str
    port: int


class BlobRef(TypedDict):
    """One blob of ``receive``, its bytes following the request line in this order."""

    sha256: str
    size: int


class HostOutcome(TypedDict, total=False):
    """One host of a deploy's ledger entry (the controller's view)."""

    outcome: str
    release: str | None
    bytes: int  # received from the controller
    peer_bytes: int  # fetched from other hosts of the stage
    error: str | None
    phases: dict[str, float]


# One line of a host's ledger (``history.jsonl``): what ``record`` appends. The controller's
# commands write them (commands/deploy.py, operate.py, ...), the agent a few (server.py).
# ``from`` is a keyword: the functional form, whose values Python evaluates (quoted: ``X | None``
# fails on the hosts' Python 3.9)
LedgerEntry = TypedDict(
    "LedgerEntry",
    {
        "event": str,  # deploy, rollback, setup, exec, unlock, switch, lock-broken, ...
        "stage": "str | None",
        "release": "str | None",
        "release_id": "str | None",
        "from": "str | None",  # the release live before (rollback, switch)
        "from_hosts": "dict[str, str | None]",  # per host, when they differ
        "previous": "str | None",
        "artifact": "str | None",
        "git_commit": "str | None",
        "outcome": str,
        "error": "str | None",
        "user": "str | None",
        "controller": "str | None",
        "holder": "HolderInfo",
        "command": str,
        "exit_code": int,
        "forced": bool,
        "setup": bool,
        "release_hook": bool,
        "skip_tests": bool,
        "release_inputs": object,
        "overrides": "dict[str, object] | None",
        "hosts": dict[str, HostOutcome],
        "started_at": str,
        "at": str,
        "duration": float,
        "note": str,
        "recorded_at": str,  # added by the agent when absent
    },
    total=False,
)


class LockRecord(TypedDict, total=False):
    """The deploy lock file ``<root>/.lock`` (agent/lock.py). Holder fields come from the
    controller unchecked, so may be missing (None); a record that does not parse is
    ``unreadable``."""

    user: str | None
    host: str | None
    pid: int | None
    command: str | None
    started_at: str | None
    acquired_at: str
    heartbeat: str
    agent_pid: int
    agent_host: str
    holder_lock: str  # "flock": bound to its session's flock
    kept: bool  # `shiplane lock`: held until unlock
    reason: str
    unreadable: bool


class LockInfo(LockRecord, total=False):
    """A lock record described: its age and state (lock.describe), ``message`` (lock.inspect)."""

    age: float | None
    state: str  # live, abandoned, kept, legacy, stale
    stale: bool
    stale_reason: str
    message: str


class HolderInfo(TypedDict, total=False):
    """Whose a lock is, in errors, ``broke`` and ``unlock``'s answer."""

    user: str | None
    host: str | None
    pid: int | None
    command: str | None
    started_at: str | None
    acquired_at: str
    agent_pid: int
    age: float | None
    state: str
    reason: str


class LockTaken(LockRecord, total=False):
    """``lock``'s answer: the record, and the abandoned lock broken on the way."""

    broke: HolderInfo


class ErrorObject(TypedDict, total=False):
    """The ``error`` of a failed op: ``message`` and ``kind``, plus what the kind tells."""

    message: str
    kind: str
    detail: str  # internal errors: the traceback
    holder: HolderInfo | None  # lock
    stale: bool
    state: str
    age: float | None
    blobs: list[str]  # integrity, missing
    exit_code: int  # hook
    output_tail: str
    seconds: float


class AppInfo(TypedDict, total=False):
    """The manifest's ``app``."""

    name: str
    version: str | None
    source: str  # "package" (a wheel unpacked into lib/) or "tree"


class ReleaseMeta(TypedDict, total=False):
    """A release's ``release.json``: written by install, its state updated by ``mark`` (each
    state stamped ``<state>_at``), answered by ``releases`` and ``inventory``. Releases of older
    agents may lack keys."""

    release_id: str
    artifact: str
    dependency_digest: str | None
    git_commit: str | None
    created_at: str
    stage: str | None
    state: str  # prepared, live, previous, good, bad, rolled-back
    source: str
    app: AppInfo | None
    blobs: list[str]
    prepared_at: str
    live_at: str
    previous_at: str
    good_at: str
    bad_at: str
    rolled_back_at: str


# --- results: what the agent answers ------------------------------------------------------------


class Hello(TypedDict):
    """The session's first line, ``{"hello": ...}``: facts the controller plans with."""

    agent: str
    python: str  # the full version, "3.11.2": the lock's markers are evaluated for it
    python_version: str  # "3.11"
    implementation: str  # sys.implementation.name: "cpython"
    abi: str  # the wheel ABI tag: "cp311"
    platform: str  # sysconfig's platform tag: "linux_x86_64"
    glibc: str | None  # "2.36"; None on musl and other OSes
    executable: str
    uv: str | None
    systemd: bool
    user: str
    hostname: str
    root: str
    pid: int


class ServicesUnknown(TypedDict, total=False):
    """``inventory``'s services when they cannot be told: ``{}`` (no services module), or why."""

    error: str


class _InventoryBase(TypedDict):
    missing: list[str]
    current: str | None
    previous: str | None
    releases: list[ReleaseMeta]  # release.json of each, oldest first
    venvs: list[str]
    lock: LockInfo | None
    setup_done: bool
    services: ServicesStatus | ServicesUnknown  # the status op's answer


class Inventory(_InventoryBase, total=False):
    port_taken: str | None  # with ``port``


class ReceiveResult(TypedDict):
    received: int
    bytes: int


class Serving(TypedDict):
    """``serve_blobs``: where this host serves the deploy's blobs to its peers (agent/peers.py)."""

    address: str
    port: int
    blobs: int  # how many of the named blobs it holds (and serves)


class ServingStopped(TypedDict):
    served: int  # blobs sent to peers
    bytes: int
    refused: int  # requests without the deploy's proof


class FetchResult(TypedDict):
    """``fetch_blobs``: what came from the peer, verified; what the controller must send instead."""

    received: int
    bytes: int
    failed: list[str]  # not had from the peer (``error`` says why)
    bad: list[str]  # arrived with bytes of another sha256: discarded
    error: str | None


class HookResult(TypedDict):
    exit_code: int
    output: str
    output_tail: str
    seconds: float


class VerifyResult(TypedDict):
    blobs: int
    bad: list[str]


class ReleasesResult(TypedDict):
    releases: list[ReleaseMeta]  # release.json of each, oldest first
    current: str | None
    previous: str | None


class HistoryResult(TypedDict):
    entries: list[LedgerEntry]


class _FileBase(TypedDict):
    exists: bool


class ReleaseFile(_FileBase, total=False):
    content: str  # when it exists


class PruneResult(TypedDict):
    removed: list[str]
    venvs_removed: list[str]
    blobs_removed: int
    agents_removed: list[str]


class UnlockResult(TypedDict):
    released: bool
    holder: HolderInfo | None


# --- the other requests (keys exactly the op's fields: REQUESTS below, tests/test_protocol.py) ---


class InventoryArgs(TypedDict):
    blobs: list[str]
    venv: VenvHint | None
    port: PortSpec | None
    uv: UvHint | None


class ReceiveArgs(TypedDict):
    blobs: list[BlobRef]


class HookArgs(TypedDict):
    release_id: str
    command: str
    timeout: float
    silence_timeout: float | None


class StartArgs(TypedDict):
    services: list[str] | None
    spec: ServicesSpec | None


class StopArgs(TypedDict):
    services: list[str] | None


class RestartArgs(TypedDict):
    services: list[str] | None
    spec: ServicesSpec | None


class ReloadArgs(TypedDict):
    services: list[str] | None


class StatusArgs(TypedDict):
    pass


class ShutdownArgs(TypedDict):
    pass


class VerifyArgs(TypedDict):
    pass


class ReleasesArgs(TypedDict):
    pass


class WithdrawArgs(TypedDict):
    release_id: str


class LogsArgs(TypedDict):
    service: str | None
    lines: int
    follow: bool | float


class HistoryArgs(TypedDict):
    limit: int | None


class ReadReleaseFileArgs(TypedDict):
    release_id: str
    path: str


class InstallUvArgs(TypedDict):
    sha256: str
    binary_sha256: str | None


class ServeBlobsArgs(TypedDict):
    blobs: list[str]
    token: str
    ttl: float
    port: int
    address: str | None


class FetchBlobsArgs(TypedDict):
    address: str
    port: int
    token: str
    blobs: list[BlobRef]
    connect_timeout: float


class StopServingArgs(TypedDict):
    pass


class RecordArgs(TypedDict):
    entry: LedgerEntry


class MarkArgs(TypedDict):
    release_id: str
    state: str


class PruneArgs(TypedDict):
    keep: int


class LockArgs(TypedDict):
    holder: Holder
    wait: float
    keep: bool


class HeartbeatArgs(TypedDict):
    holder: Holder | None


class UnlockArgs(TypedDict):
    force: bool
    holder: Holder | None
    by: Holder | None


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
                Field(
                    "uv",
                    "object|null",
                    "{sha256, binary_sha256}: the shipped uv, unpacked once its blob is stored",
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
                Field(
                    "target",
                    "integer|null",
                    "the manifest's targets entry for this host's Python (a mixed stage)",
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
            "services, live release, backend, scheduled jobs",
            "{live_release, current, backend, services, front?, jobs?}",
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
            "serve_blobs",
            "serve these stored blobs to peer hosts over HTTP for this deploy (docs/DESIGN.md)",
            "{address, port, blobs}",
            (
                Field("blobs", "array", "sha256 of the blobs peers may fetch", required=True),
                Field("token", "string", "the deploy's secret: requests prove it", required=True),
                Field("ttl", "number", "seconds before the server stops on its own", default=600),
                Field("port", "integer", "the port (0: any free one)", default=0),
                Field("address", "string|null", "where to listen (default: the SSH address)"),
            ),
        ),
        Op(
            "fetch_blobs",
            "fetch blobs from a peer's serve_blobs, each verified by its sha256",
            "{received, bytes, failed, bad, error}",
            (
                Field("address", "string", "the peer's address", required=True),
                Field("port", "integer", "the peer's port", required=True),
                Field("token", "string", "the deploy's secret", required=True),
                Field("blobs", "array", "[{sha256, size}]", required=True),
                Field("connect_timeout", "number", "seconds to reach the peer", default=3),
            ),
        ),
        Op("stop_serving", "stop serve_blobs", "{served, bytes, refused}"),
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


# Each op's request as its handler reads it (decoded: every field present, defaults filled in).
# tests/test_protocol.py checks that the keys are the op's fields, and optional ones may be None.
REQUESTS: dict[str, type] = {
    "inventory": InventoryArgs,
    "receive": ReceiveArgs,
    "install": InstallArgs,
    "hook": HookArgs,
    "switch": SwitchArgs,
    "start": StartArgs,
    "stop": StopArgs,
    "restart": RestartArgs,
    "reload": ReloadArgs,
    "status": StatusArgs,
    "shutdown": ShutdownArgs,
    "withdraw": WithdrawArgs,
    "verify": VerifyArgs,
    "logs": LogsArgs,
    "releases": ReleasesArgs,
    "history": HistoryArgs,
    "read_release_file": ReadReleaseFileArgs,
    "install_uv": InstallUvArgs,
    "serve_blobs": ServeBlobsArgs,
    "fetch_blobs": FetchBlobsArgs,
    "stop_serving": StopServingArgs,
    "record": RecordArgs,
    "mark": MarkArgs,
    "prune": PruneArgs,
    "lock": LockArgs,
    "heartbeat": HeartbeatArgs,
    "unlock": UnlockArgs,
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
