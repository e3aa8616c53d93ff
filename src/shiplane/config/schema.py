"""The deploy file's schema: one validated model per section of ``shiplane.toml``.

Models only describe and check shapes; loading (with file:line errors) is in ``loader.py`` and the
layered app config in ``layers.py``. Unknown keys are errors everywhere (``extra="forbid"``).
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from shiplane.agent_bundle import INTERPRETER
from shiplane.config.paths import PLACEHOLDERS, deploy_root, project_path

NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# [user@]host[:port] as it reaches ssh's command line: user and host start with a letter, digit or
# "_" (never "-", which ssh would read as an option); transport/ssh.py parses the same shape
HOST = re.compile(
    r"^(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]{0,63})@)?"
    r"(?P<host>[A-Za-z0-9_][A-Za-z0-9._-]{0,252}|\[[0-9a-fA-F:.]+\])(?::(?P<port>[0-9]{1,5}))?$"
)
# an OpenSSH option as ssh_options takes it: Key=Value (given to ssh as -o Key=Value)
SSH_OPTION = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:=|\s+)[^\x00-\x1f\x7f]+$")
SSH_OPTIONS_FORBIDDEN = (
    "stricthostkeychecking",
    "userknownhostsfile=/dev/null",
    "globalknownhostsfile=/dev/null",
)
# an interpreter on the hosts: a command name or path, one word, not an option
PYTHON = INTERPRETER.pattern
# a Unix login name (deploy_user, setup_user): nothing a shell or ssh could read otherwise
LOGIN = r"^[a-z_][a-z0-9_-]{0,31}$"
SECONDS = 86400.0  # the longest timeout a deploy file may set (one day)
SCOPE = re.compile(r"^(local|all|primary|role:[A-Za-z0-9_-]+)$")


# gunicorn's long options (23 and 27, from its KNOWN_SETTINGS): [services.web] options are checked against them
GUNICORN_OPTIONS = frozenset(
    (
        "--access-logfile",
        "--access-logformat",
        "--asgi-disconnect-grace-period",
        "--asgi-lifespan",
        "--asgi-loop",
        "--backlog",
        "--bind",
        "--ca-certs",
        "--capture-output",
        "--casefold-http-method",
        "--cert-reqs",
        "--certfile",
        "--chdir",
        "--check-config",
        "--ciphers",
        "--config",
        "--control-socket",
        "--control-socket-mode",
        "--daemon",
        "--dirty-app",
        "--dirty-graceful-timeout",
        "--dirty-threads",
        "--dirty-timeout",
        "--dirty-workers",
        "--disable-redirect-access-to-syslog",
        "--do-handshake-on-connect",
        "--dogstatsd-tags",
        "--enable-backlog-metric",
        "--enable-stdio-inheritance",
        "--env",
        "--error-logfile",
        "--forwarded-allow-ips",
        "--forwarder-headers",
        "--graceful-timeout",
        "--group",
        "--header-map",
        "--http-parser",
        "--http-protocols",
        "--http2-cleartext",
        "--http2-initial-window-size",
        "--http2-max-concurrent-streams",
        "--http2-max-frame-size",
        "--http2-max-header-list-size",
        "--initgroups",
        "--keep-alive",
        "--keyfile",
        "--limit-request-field_size",
        "--limit-request-fields",
        "--limit-request-line",
        "--log-config",
        "--log-config-json",
        "--log-file",
        "--log-level",
        "--log-syslog",
        "--log-syslog-facility",
        "--log-syslog-prefix",
        "--log-syslog-to",
        "--logger-class",
        "--max-requests",
        "--max-requests-jitter",
        "--name",
        "--no-control-socket",
        "--no-sendfile",
        "--paste",
        "--paste-global",
        "--paster",
        "--permit-obsolete-folding",
        "--permit-unconventional-http-method",
        "--permit-unconventional-http-version",
        "--pid",
        "--preload",
        "--print-config",
        "--protocol",
        "--proxy-allow-from",
        "--proxy-protocol",
        "--pythonpath",
        "--reload",
        "--reload-engine",
        "--reload-extra-file",
        "--reuse-port",
        "--root-path",
        "--spew",
        "--ssl-version",
        "--statsd-host",
        "--statsd-prefix",
        "--strip-header-spaces",
        "--suppress-ragged-eofs",
        "--threads",
        "--timeout",
        "--umask",
        "--user",
        "--uwsgi-allow-from",
        "--websocket-max-message-size",
        "--worker-class",
        "--worker-connections",
        "--worker-tmp-dir",
        "--workers",
    )
)
# set by shiplane itself (agent/backend.py gunicorn_argv) or contrary to its switch
GUNICORN_OWNED = frozenset(
    {
        "--bind",
        "--workers",
        "--worker-class",
        "--threads",
        "--timeout",
        "--graceful-timeout",
        "--control-socket",
        "--daemon",
        "--pid",
        "--reload",
        "--chdir",
        "--max-requests",
        "--max-requests-jitter",
        "--keep-alive",
        "--access-logfile",
        "--forwarded-allow-ips",
        "--config",
        "--paste",
        "--check-config",
        "--print-config",
    }
)


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _relative_path(value: str, what: str) -> str:
    """Paths in the deploy file are relative to the project and may not climb out of it."""
    return project_path(value, what)


def _stage_path(value: str | None, what: str) -> str | None:
    """A project file per stage: relative, inside, ``{stage}`` the only placeholder."""
    return None if value is None else project_path(value, what, placeholders=PLACEHOLDERS)


def _local_file(value: str | None, what: str) -> str | None:
    """A file of the deploying machine given to ssh (``-F``, ``-i``): one plain word."""
    if value is not None and (
        not value.strip()
        or value.startswith("-")
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise ValueError(
            f"{what} must be a file path (not empty, no leading '-', no control characters), found {value!r}"
        )
    return value


class App(Model):
    """``[app]``: what the app is and which entry point serves it."""

    name: Annotated[
        str,
        Field(
            pattern=NAME,
            description="The app's name; it names the app's services, units and "
            "nginx site on the hosts.",
        ),
    ]
    wsgi: str | None = Field(
        default=None,
        description="The WSGI entry point gunicorn serves: ``module:variable`` or "
        "``module:factory()``.",
    )
    asgi: str | None = Field(
        default=None,
        description="The ASGI entry point (``module:app``), served by gunicorn "
        "with uvicorn workers; give ``wsgi`` or ``asgi``, not both.",
    )
    python: Annotated[
        str,
        Field(
            pattern=PYTHON,
            description="The hosts' Python (3.9 or later), which runs shiplane's "
            "agent and the app's venvs.",
        ),
    ] = "python3"
    keep_releases: Annotated[
        int,
        Field(
            ge=2,
            le=100,
            description="Releases kept on each host for rollback; older "
            "ones are pruned after a deploy.",
        ),
    ] = 5
    source: Literal["package", "tree", "none"] | None = Field(
        default=None,
        description="How the app ships: ``package`` (a wheel built from pyproject.toml or setup.py), "
        "``tree`` (the source files as they are), ``none`` (only the locked dependencies); "
        "unset: detected, and ``shiplane check`` says which and why.",
    )

    @model_validator(mode="after")
    def _one_entry_point(self) -> App:
        if self.wsgi and self.asgi:
            raise ValueError("give either wsgi or asgi, not both")
        return self


class Build(Model):
    """``[build]``: what goes into the artifact, and the test gate before it is built."""

    requirements: str = Field(
        default="",
        description="The lock the hosts install offline from the artifact's wheelhouse: a "
        "``requirements.txt`` (pinned, hashes optional), ``uv.lock``, ``poetry.lock``, "
        "``pdm.lock`` or ``Pipfile.lock`` (its file name says which), or ``pyproject.toml`` "
        "(resolved at each build: not reproducible). Unset: the first of these found in the "
        "project, in that order (docs/dependencies.md); ``shiplane check`` says which.",
    )
    test: str | None = Field(
        default=None,
        description="The test gate: a command run in a venv made from the lock "
        "before a deploy builds; a failure stops the deploy.",
    )
    test_requirements: list[str] = Field(
        default=["pytest"], description="Packages added to the test gate's venv beside the lock."
    )
    include: list[str] = Field(
        default=[],
        description="Globs of extra files shipped beside the app (e.g. "
        "``alembic.ini``); each must match a file.",
    )
    exclude: list[str] = Field(
        default=[],
        description="Globs of files left out of the artifact (a ``tree`` app's "
        "files and ``include``'s matches).",
    )
    python_version: Annotated[str, Field(pattern=r"^3\.[0-9]{1,2}$")] | None = Field(
        default=None,
        description="The hosts' Python version (``3.N``) the wheelhouse is resolved for; unset: this "
        "machine's.",
    )
    platform: str | None = Field(
        default=None,
        description="The hosts' platform tag (e.g. ``manylinux_2_28_x86_64``) "
        "the wheelhouse is resolved for; unset: this machine's.",
    )
    secrets: list[Annotated[str, Field(pattern=ENV_NAME)]] = Field(
        default=[],
        description="Secrets the build needs, such as a private index's token: looked for as "
        "``[config] secrets`` are, given to the build's pip alone (a requirements file writes "
        "``${NAME}`` in its ``--index-url``), never to a host nor into the artifact.",
    )

    @field_validator("requirements")
    @classmethod
    def _inside(cls, value: str) -> str:
        return _relative_path(value, "build.requirements")

    @field_validator("include", "exclude")
    @classmethod
    def _globs_inside(cls, values: list[str], info: ValidationInfo) -> list[str]:
        return [_relative_path(v, f"build.{info.field_name} pattern") for v in values]


class RenderedFile(Model):
    """``[[config.render]]``: one file written on each host from the stage's merged config."""

    path: str = Field(
        description="Where the file is written, relative to the release (or to ``shared/`` with "
        "``shared = true``)."
    )
    format: Literal["ini", "toml", "env", "json"] | None = Field(
        default=None,
        description="The file's format; unset: told by its name (``.ini``, ``.cfg``, ``.conf``, "
        "``.toml``, ``.env``, ``.json``).",
    )
    template: str | None = Field(
        default=None,
        description="A Jinja2 template in the project, rendered with "
        "``config``, ``env`` and ``stage``, instead of a plain "
        "dump.",
    )
    shared: bool = Field(
        default=False,
        description="Write the file into ``shared/`` (list its directory in "
        "``[shared] dirs``) rather than into the release.",
    )
    sections: list[str] | None = Field(
        default=None, description="Only these sections of the merged config; unset: all."
    )

    @field_validator("path")
    @classmethod
    def _inside(cls, value: str) -> str:
        return _relative_path(value, "config.render path")

    @field_validator("template")
    @classmethod
    def _template_inside(cls, value: str | None) -> str | None:
        return None if value is None else _relative_path(value, "config.render template")

    @model_validator(mode="after")
    def _format_known(self) -> RenderedFile:
        if self.format is None and not self.template and not _format_from_name(self.path):
            raise ValueError(
                f"cannot tell the format of {self.path!r} from its name: name it .ini, .toml, .env "
                'or .json, or give format = "ini" (or a template)'
            )
        return self


def _format_from_name(path: str) -> bool:
    """True when formats.format_of can tell a rendered file's format from its name."""
    name = path.rsplit("/", 1)[-1]
    return name == ".env" or name.endswith((".env", ".ini", ".cfg", ".conf", ".toml", ".json"))


class Config(Model):
    """``[config]``: the app's layered config, the files rendered from it, and its secrets."""

    files: list[str] = Field(
        default=[],
        description="Config files (ini, toml, .env, json) merged in order, later "
        "wins; ``{stage}`` is the stage's name, and such a file may be "
        "absent.",
    )
    render: str | list[RenderedFile] | None = Field(
        default=None,
        description="The merged config written on each host: a path (its format told by its name) or a "
        "list of tables (``[[config.render]]``).",
    )
    env_prefix: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = Field(
        default=None,
        description="A deploying environment's variable ``<env_prefix>SECTION__KEY`` overrides that "
        "config value.",
    )
    secrets: list[Annotated[str, Field(pattern=ENV_NAME)]] = Field(
        default=[],
        description="Names of the secrets every stage needs: given to the app as environment variables "
        "(and to rendered files), never put in the artifact, masked in every output.",
    )
    secrets_file: str | None = Field(
        default=None,
        description="A ``NAME=value`` file of secrets per stage "
        "(``{stage}`` placeholder), refused unless mode 0600; "
        "read for the secrets the environment lacks.",
    )
    secrets_command: str | None = Field(
        default=None,
        description="A shell command printing ``NAME=value`` lines (run "
        "with ``SHIPLANE_STAGE`` set) for secrets still "
        "missing.",
    )

    @field_validator("files")
    @classmethod
    def _files_inside(cls, values: list[str]) -> list[str]:
        return [project_path(v, "config.files entry", placeholders=PLACEHOLDERS) for v in values]

    @field_validator("render")
    @classmethod
    def _render_inside(
        cls, value: str | list[RenderedFile] | None
    ) -> str | list[RenderedFile] | None:
        return _relative_path(value, "config.render") if isinstance(value, str) else value

    @field_validator("secrets_file")
    @classmethod
    def _secrets_file_inside(cls, value: str | None) -> str | None:
        return _stage_path(value, "config.secrets_file")

    def rendered_files(self) -> list[RenderedFile]:
        if self.render is None:
            return []
        if isinstance(self.render, str):
            return [RenderedFile(path=self.render)]
        return list(self.render)

    @field_validator("render")
    @classmethod
    def _render_format(
        cls, value: str | list[RenderedFile] | None
    ) -> str | list[RenderedFile] | None:
        if isinstance(value, str) and not _format_from_name(value):
            raise ValueError(
                f"cannot tell the format of {value!r} from its name: name it .ini, .toml, .env or "
                '.json, or use render = [{ path = ..., format = "ini" }]'
            )
        return value


class HealthCheck(Model):
    """``healthcheck``: the request a new release's server must answer with a 2xx before it gets traffic."""

    path: Annotated[str, Field(pattern=r"^/", description="The path requested.")] = "/up"
    timeout: Annotated[
        float, Field(gt=0, le=600, description="Seconds the new server has to answer it.")
    ] = 15
    host: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z0-9.:\[\]-]+$",
            description="The Host header of health and smoke checks, for apps that check it "
            "(Django's ``ALLOWED_HOSTS``).",
        ),
    ] = "localhost"


class SmokeCheck(Model):
    """``smoke``: a request a new release must pass, after its health check, before it gets traffic."""

    path: Annotated[str, Field(pattern=r"^/", description="The path requested.")]
    expect: str | None = Field(default=None, description="Text the response body must contain.")
    status: Annotated[
        int, Field(ge=100, le=599, description="The status the response must have.")
    ] = 200


class Service(Model):
    """``[services.web]`` is the HTTP server; any other name is a long-running command."""

    @field_validator("options")
    @classmethod
    def _gunicorn_options(cls, values: list[str]) -> list[str]:
        for value in values:
            name = value.split("=", 1)[0]
            if not re.fullmatch(r"--[a-z][a-z0-9-]*", name) or name not in GUNICORN_OPTIONS:
                near = difflib.get_close_matches(name, sorted(GUNICORN_OPTIONS), n=1)
                raise ValueError(
                    f"{value!r} is not a gunicorn option"
                    + (f" (did you mean {near[0]}?)" if near else "")
                )
            if name in GUNICORN_OWNED:
                raise ValueError(
                    f"{name} is set by shiplane (bind, workers, timeouts, worker class have their "
                    "own keys, or are the switch's own)"
                )
            if any(c in value for c in "\n\r\x00"):
                raise ValueError(f"{value!r}: no line breaks or NUL in an option")
        return values

    server: Literal["gunicorn"] | None = Field(
        default=None,
        description="web: the HTTP server; gunicorn, the only one, is also the default.",
    )
    command: str | None = Field(
        default=None,
        description="Not web: the command the service runs from the live "
        "release, kept running by the hosts' supervisor.",
    )
    workers: Annotated[int, Field(ge=1, le=256)] | None = Field(
        default=None, description="web: gunicorn's worker processes; unset: 2."
    )
    worker_class: str | None = Field(
        default=None,
        description="web: gunicorn's worker class; unset: ``sync``, or "
        "``uvicorn.workers.UvicornWorker`` for ``app.asgi``.",
    )
    threads: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        default=None,
        description="web: gunicorn's ``--threads`` per worker (more than 1 with the sync class: gthread).",
    )
    max_requests: Annotated[int, Field(ge=0, le=10**9)] | None = Field(
        default=None,
        description="web: gunicorn's ``--max-requests``: a worker is restarted after this many requests.",
    )
    max_requests_jitter: Annotated[int, Field(ge=0, le=10**9)] | None = Field(
        default=None,
        description="web: gunicorn's ``--max-requests-jitter``, spreading those restarts.",
    )
    keepalive: Annotated[int, Field(ge=0, le=3600)] | None = Field(
        default=None,
        description="web: gunicorn's ``--keep-alive``, seconds an idle connection is kept.",
    )
    access_log: bool = Field(
        default=False,
        description="web: log every request to the service's log "
        "(gunicorn's ``--access-logfile -``).",
    )
    forwarded_allow_ips: str | None = Field(
        default=None,
        description="web: gunicorn's ``--forwarded-allow-ips``: front addresses whose "
        "X-Forwarded-* headers are trusted (uvicorn's workers; gunicorn trusts its unix "
        "socket's peers). Unset: ``*`` behind nginx and Caddy, uvicorn's default (nobody, "
        "on the unix socket) behind the builtin front; see docs/proxies.md.",
    )
    options: list[str] = Field(
        default=[],
        description="web: more gunicorn options, each ``--name`` or "
        "``--name=value`` (checked against gunicorn's option "
        "names; those shiplane sets itself are refused).",
    )
    port: Annotated[int, Field(ge=1, le=65535)] | None = Field(
        default=None, description="web: the public port when the stage sets none; unset: 8000."
    )
    timeout: Annotated[
        float,
        Field(
            gt=0,
            le=SECONDS,
            description="web: gunicorn's ``--timeout``, seconds a worker "
            "may be silent before it is restarted.",
        ),
    ] = 30
    graceful_timeout: Annotated[
        float,
        Field(
            gt=0,
            le=SECONDS,
            description="web: gunicorn's ``--graceful-timeout``, "
            "seconds workers get to finish requests "
            "when a server stops.",
        ),
    ] = 20
    # web: the previous release's server stays up, idle, so a rollback starts nothing
    standby: bool = Field(
        default=True,
        description="web: the previous release's server stays up, idle, so a rollback "
        "starts nothing; false: it is retired after a drain.",
    )
    # web: the next release's server starts during its install with its libraries imported, and
    # loads the app at the switch (daemon backend; off for apps whose libraries must not be
    # imported before the app sets its environment up)
    preboot: bool = Field(
        default=True,
        description="web: the next release's server starts during its install with "
        "its libraries imported, and loads the app at the switch (daemon "
        "backend).",
    )
    healthcheck: HealthCheck = Field(
        default=HealthCheck(), description="web: the health check of a new release."
    )
    smoke: list[SmokeCheck] = Field(
        default=[], description="web: smoke checks a new release must pass."
    )
    stop_signal: Literal["TERM", "INT", "QUIT", "HUP", "USR1", "USR2", "KILL"] = Field(
        default="TERM",
        description="Not web: the signal that stops the service gracefully (Celery and RQ: "
        "``TERM``, their warm shutdown; Dramatiq: ``TERM`` or ``INT``; docs/workers.md).",
    )
    stop_timeout: Annotated[
        float,
        Field(
            gt=0,
            le=3600,
            description="Not web: seconds the service has to exit after "
            "its stop signal before it is killed: longer than the longest job a worker "
            "may be running (a deploy waits for it).",
        ),
    ] = 10


class Shared(Model):
    """``[shared]``: paths that outlive releases, in ``<deploy_to>/shared`` and linked into each release."""

    dirs: list[str] = Field(
        default=[],
        description="Directories linked into each release; never shipped from the checkout.",
    )
    files: list[str] = Field(
        default=[],
        description="Files linked into each release (e.g. a SQLite database); never "
        "shipped from the checkout.",
    )

    @field_validator("dirs", "files")
    @classmethod
    def _inside(cls, values: list[str]) -> list[str]:
        return [_relative_path(v, "shared path").rstrip("/") for v in values]


class Hooks(Model):
    """``[hooks]``: commands run on the hosts during a deploy, in the release's directory, with its venv
    and environment."""

    setup: str | None = Field(
        default=None,
        description="Run on a stage's first deploy only (per host with ``run_on = "
        '"all"``), before the release hook; ``shiplane run setup '
        "--force`` reruns it.",
    )
    release: str | list[str] | None = Field(
        default=None,
        description="Run before any host switches (migrations): on "
        "the primary host, or on every host with "
        '``run_on = "all"``.',
    )
    # globs (relative to the project) the release hook depends on: unchanged, with the same
    # config, since the hook last ran on the primary -> the hook is skipped (release_inputs.py)
    release_if_changed: list[str] = Field(
        default=[],
        description="Globs the release hook depends on: when they, its "
        "commands and the stage's config are unchanged "
        "since it last ran, it is skipped.",
    )
    after_install: list[str] = Field(
        default=[],
        description="Run on every host once its release is installed, before "
        "any switch (e.g. ``collectstatic``).",
    )
    after_deploy: list[str] = Field(
        default=[], description="Run on every host after every host has switched."
    )
    timeout: Annotated[
        float, Field(gt=0, le=SECONDS, description="Seconds each hook may run before it is ended.")
    ] = 600
    # seconds a running hook may print nothing before it is ended (a hung hook must not hold the
    # deploy lock for the whole timeout); 0 turns the check off, for hooks quiet for long
    silence_timeout: Annotated[
        float,
        Field(
            ge=0,
            le=SECONDS,
            description="Seconds a running hook may print nothing "
            "before it is ended; 0 turns this off.",
        ),
    ] = 300
    # where the setup and release hooks run: once on the primary (a database every host shares)
    # or on every host (state each host keeps, e.g. its own SQLite); see README, "The deploy file"
    run_on: Literal["primary", "all"] = Field(
        default="primary",
        description="Where the setup and release hooks run: "
        "once on the primary (a database every "
        "host shares) or on every host (a "
        "database per host).",
    )

    @field_validator("release_if_changed")
    @classmethod
    def _patterns_inside(cls, values: list[str]) -> list[str]:
        return [_relative_path(v, "release_if_changed pattern") for v in values]

    def release_commands(self) -> list[str]:
        if self.release is None:
            return []
        return [self.release] if isinstance(self.release, str) else list(self.release)


class TaskSpec(Model):
    """``[tasks.NAME]``: a user task, run by ``shiplane run NAME`` or hooked into the deploy's steps."""

    run: str = Field(
        description="The shell command (on hosts: in the live release, with its environment)."
    )
    on: str = Field(
        default="local",
        description="Where it runs: ``local`` (this machine), ``all`` hosts, the "
        "``primary`` host, or ``role:NAME``'s hosts.",
    )
    needs: list[str] = Field(
        default=[], description="Tasks or pipeline steps run first whenever this one runs."
    )
    before: list[str] = Field(
        default=[], description="Tasks or pipeline steps (e.g. ``switch``) this one runs before."
    )
    after: list[str] = Field(
        default=[], description="Tasks or pipeline steps (e.g. ``release``) this one runs after."
    )
    timeout: Annotated[float, Field(gt=0, le=SECONDS)] | None = Field(
        default=None,
        description="Seconds it may run; unset: no limit on this machine, ``hooks.timeout`` on hosts.",
    )

    @field_validator("on")
    @classmethod
    def _scope(cls, value: str) -> str:
        if not SCOPE.match(value):
            raise ValueError(f"expected local, all, primary or role:NAME, found {value!r}")
        return value


class Job(Model):
    """``[jobs.NAME]``: a command run on a schedule, once per period, on the stage's primary host
    (docs/workers.md)."""

    schedule: str = Field(
        description="When it runs: five cron fields (minute hour day-of-month month "
        'day-of-week, the hosts\' local time), e.g. ``"*/5 * * * *"``, or ``@hourly``, '
        "``@daily``, ``@weekly``, ``@monthly``, ``@yearly``."
    )
    command: str = Field(
        description="The shell command, run in the live release with its environment "
        "(secrets included), as the app's user; its output goes to ``shiplane logs "
        "--service job.NAME``."
    )
    timeout: Annotated[float, Field(gt=0, le=SECONDS)] = Field(
        default=3600,
        description="Seconds a run may take before it is ended (TERM, then KILL 10 s later).",
    )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        from shiplane.agent.cron import CronError, parse

        try:
            parse(value)
        except CronError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("command")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if not value.strip() or "\x00" in value:
            raise ValueError("expected a shell command (not empty, no NUL)")
        return value


class Nginx(Model):
    """``[stages.X.nginx]`` with ``front = "nginx"``: the site shiplane writes (agent/nginx.py)."""

    server_name: str = Field(default="_", description="The site's ``server_name``.")
    tls_cert: str | None = Field(
        default=None, description="A certificate file on the hosts: the site listens with TLS."
    )
    tls_key: str | None = Field(
        default=None, description="The certificate's key file on the hosts (with ``tls_cert``)."
    )
    static: dict[Annotated[str, Field(pattern=r"^/")], str] = Field(
        default={},
        description='URL prefix -> directory of the release nginx serves it from (e.g. ``"/static" = '
        '"staticfiles"``).',
    )
    site_dir: str = Field(
        default="/etc/nginx/sites-enabled", description="Where the site file is written."
    )
    conf: str | None = Field(
        default=None,
        description="A private nginx's main conf (``nginx -c``), started if not "
        "running; unset: the host's nginx, reloaded.",
    )
    pid_file: str | None = Field(
        default=None, description="That nginx's pid file; unset: ``/run/nginx.pid``."
    )

    @field_validator("static")
    @classmethod
    def _static_inside(cls, values: dict[str, str]) -> dict[str, str]:
        return {k: _relative_path(v, "static dir") for k, v in values.items()}

    @model_validator(mode="after")
    def _tls_pair(self) -> Nginx:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        return self


# a domain Caddy gets a certificate for: lowercase DNS labels, at least two, not an IP address
DOMAIN = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"
)
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


class Caddy(Model):
    """``[stages.X.caddy]`` with ``domains``: the private Caddy that serves them over HTTPS
    (agent/caddy.py, docs/https.md)."""

    acme_ca: Annotated[str, Field(pattern=r"^https?://[^\s{}]+$")] = Field(
        default=LETS_ENCRYPT,
        description="The ACME CA's directory URL; unset: Let's Encrypt's production one.",
    )
    acme_email: Annotated[str, Field(pattern=r"^[^\s@{}]+@[^\s@{}]+$")] | None = Field(
        default=None, description="The contact address of the ACME account (expiry notices)."
    )
    acme_ca_root: str | None = Field(
        default=None,
        description="A file on the hosts: the CA's root certificate, to trust the ACME "
        "server's own TLS (private or test CAs).",
    )
    data_dir: str | None = Field(
        default=None,
        description="Where Caddy keeps its config, account and certificates (keys 0600, dirs "
        "0700) on the hosts; unset: ``<deploy_to>/caddy``. Stages (of any project) naming the "
        "same dir share one Caddy on a host, each app its own names and certificates.",
    )
    http_port: Annotated[int, Field(ge=1, le=65535)] = Field(
        default=80,
        description="HTTP: ACME HTTP-01 challenges and the redirect to HTTPS (the CA connects to "
        "80: change it only behind a port forward or for a test CA).",
    )
    https_port: Annotated[int, Field(ge=1, le=65535)] = Field(
        default=443, description="HTTPS: the app (and ACME TLS-ALPN-01 challenges)."
    )
    issue_timeout: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=120,
        description="Seconds a deploy waits for missing certificates before it fails naming "
        "the domains and the CA's reason.",
    )
    renew_interval: Annotated[float, Field(ge=1, le=86400)] = Field(
        default=600,
        description="Seconds between Caddy's checks for certificates due for renewal (Caddy's "
        "``renew_interval``; a certificate is renewed a third of its lifetime before it "
        "expires). The same for every stage sharing a ``data_dir``.",
    )

    @field_validator("acme_ca_root", "data_dir")
    @classmethod
    def _absolute(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"{info.field_name} is a path on the hosts: absolute, found {value!r}")
        if value is not None and any(ch in value for ch in "{}\n\r\0"):
            raise ValueError(f"{info.field_name}: braces and control characters are not allowed")
        return value

    @model_validator(mode="after")
    def _ports(self) -> Caddy:
        if self.http_port == self.https_port:
            raise ValueError("http_port and https_port must differ")
        return self


PERCENT = r"^(100|[1-9]?[0-9])%$"


class Rolling(Model):
    """``rolling``: the stage's hosts switch batch after batch."""

    batch: Annotated[int, Field(ge=1)] | Annotated[str, Field(pattern=PERCENT)] = Field(
        default="100%",
        description="Hosts per batch: a count, or a percentage of the stage's hosts.",
    )
    max_fail: Annotated[int, Field(ge=0)] | Annotated[str, Field(pattern=PERCENT)] = Field(
        default=0,
        description="Failures a batch may have (a count, or a percentage of the batch); more stop the "
        "rollout and return every host it switched.",
    )


class Stage(Model):
    """``[stages.NAME]``: one stage's hosts, where the app lives on them, and how they are reached."""

    hosts: Annotated[
        list[str],
        Field(
            min_length=1,
            description="``[user@]host[:port]`` as ssh reaches them "
            "(``~/.ssh/config`` applies), or ``local`` alone: "
            "this machine, without SSH. A host whose Python differs from the stage's is a "
            'table: ``{ host = "h2", python = "/opt/py312/bin/python3" }`` (docs/hosts.md).',
        ),
    ]
    deploy_to: str = Field(
        description="The app's directory on each host (releases, venvs, shared, logs): absolute, "
        "or relative to the project on the ``local`` stage."
    )
    port: Annotated[int, Field(ge=1, le=65535)] | None = Field(
        default=None, description="The public port; unset: ``services.web.port``, else 8000."
    )
    bind: str | None = Field(
        default=None,
        description="The address the public port listens on; unset: ``127.0.0.1`` "
        "on ``local``, ``0.0.0.0`` elsewhere.",
    )
    roles: dict[Annotated[str, Field(pattern=NAME)], list[str]] = Field(
        default={},
        description="Named groups of this stage's hosts; ``primary``'s first host runs once-only work "
        "(else the first host does).",
    )
    rolling: Rolling = Field(
        default=Rolling(), description="How the hosts switch, batch after batch."
    )
    promote_from: str | None = Field(
        default=None,
        description="A stage whose healthy deploys this one takes: only "
        "artifacts that went live there first (``shiplane "
        "promote``).",
    )
    python: Annotated[str, Field(pattern=PYTHON)] | None = Field(
        default=None, description="This stage's hosts' Python, over ``app.python``."
    )
    host_python: dict[str, Annotated[str, Field(pattern=PYTHON)]] = Field(
        default={},
        description="One host's Python, over ``python`` (host -> interpreter); usually written "
        'in ``hosts`` as ``{ host = "h2", python = "..." }``. Each host\'s wheels are resolved '
        "for the interpreter it runs.",
    )
    front: Literal["builtin", "nginx", "caddy"] = Field(
        default="builtin",
        description="What holds the public port: shiplane's "
        "own proxy, nginx "
        "(``[stages.NAME.nginx]``), or Caddy with HTTPS for ``domains`` (the default when "
        "``domains`` is set).",
    )
    backend: Literal["auto", "daemon", "systemd"] = Field(
        default="auto",
        description="The hosts' process supervisor: ``daemon`` (supervisord), ``systemd``, or "
        "``auto`` (systemd when it is PID 1; ``local`` uses daemon).",
    )
    nginx: Nginx = Field(default=Nginx(), description='The nginx site, with ``front = "nginx"``.')
    domains: list[str] = Field(
        default=[],
        description="Names served over HTTPS with certificates from an ACME CA (Caddy, "
        "``[stages.NAME.caddy]``; HTTP redirects to HTTPS); their DNS must point at the hosts. "
        "Unset: plain HTTP.",
    )
    caddy: Caddy = Field(default=Caddy(), description="The Caddy front, with ``domains``.")
    ssh_config: str | None = Field(
        default=None, description="An ssh config file, given to ssh as ``-F``."
    )
    ssh_options: list[str] = Field(
        default=[],
        description="OpenSSH options, each ``Key=Value``, given to ssh as ``-o "
        "Key=Value``; host key checking cannot be turned off.",
    )
    identity_file: str | None = Field(
        default=None, description="A private key, given to ssh as ``-i``."
    )
    connect_timeout: Annotated[
        float, Field(gt=0, le=600, description="Seconds to connect to a host.")
    ] = 10
    ssh_persist: Annotated[
        int,
        Field(
            ge=0,
            le=3600,
            description="Seconds a host's SSH connection stays open, idle, after a command, for "
            "the next command to reuse (OpenSSH ``ControlPersist``; its socket in a 0700 dir of "
            "the user's): a redeploy, ``status`` or ``logs`` within that time skips the "
            "handshake. ``0``: each command closes its connections.",
        ),
    ] = 60
    transfer: Literal["auto", "direct"] = Field(
        default="auto",
        description="How blobs reach the hosts: ``auto`` sends each blob the hosts lack once, to "
        "the first host that lacks it, and the others fetch it from that host over HTTP on the "
        "address ssh reached it at (a per-deploy token, every blob checked by its sha256; "
        "the controller sends directly what a host cannot fetch); ``direct``: the controller "
        "sends every host what it lacks. One host and ``local`` always use ``direct``.",
    )
    transfer_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=0,
        description="The TCP port a host serves blobs to the other hosts on during a deploy "
        '(``transfer = "auto"``); 0: a free port of its choosing. Set one to open in a '
        "firewall between the hosts.",
    )
    deploy_user: Annotated[str, Field(pattern=LOGIN)] | None = Field(
        default=None,
        description="The unprivileged user ``shiplane setup`` creates and every other verb logs in "
        "as, for a host that names no user; unset: ssh's own choice (``~/.ssh/config``, your "
        "login). Never ``root``.",
    )
    setup_user: Annotated[str, Field(pattern=LOGIN)] = Field(
        default="root",
        description="Who ``shiplane setup`` logs in as (root, or a user with sudo); "
        "``--as USER`` overrides it.",
    )
    command_timeout: Annotated[
        float,
        Field(
            gt=0,
            le=SECONDS,
            description="Seconds a host may stay silent (no event, "
            "no keep-alive) before it is an error.",
        ),
    ] = 60
    env: dict[Annotated[str, Field(pattern=ENV_NAME)], str] = Field(
        default={},
        description="Environment variables of this stage's services and hooks, over ``[env]``.",
    )
    config: dict[str, dict[str, str | int | float | bool]] = Field(
        default={}, description="Config values, section -> key -> value, over the config files."
    )
    secrets_file: str | None = Field(
        default=None, description="This stage's secrets file, over ``config.secrets_file``."
    )
    secrets_command: str | None = Field(
        default=None, description="This stage's secrets command, over ``config.secrets_command``."
    )

    @model_validator(mode="before")
    @classmethod
    def _host_tables(cls, data: Any) -> Any:
        """``hosts`` entries written as ``{ host = "...", python = "..." }`` (a host's own
        interpreter, as Ansible's ``ansible_python_interpreter`` is a host variable) become the
        host's name in ``hosts`` and its ``host_python``."""
        if not isinstance(data, dict) or not isinstance(data.get("hosts"), list):
            return data
        if not any(isinstance(h, dict) for h in data["hosts"]):
            return data
        names: list[Any] = []
        pythons = dict(data.get("host_python") or {})
        for entry in data["hosts"]:
            if not isinstance(entry, dict):
                names.append(entry)
                continue
            unknown = sorted(set(entry) - {"host", "python"})
            if unknown or not isinstance(entry.get("host"), str):
                raise ValueError(
                    'a host given as a table is { host = "[user@]host[:port]", python = '
                    f'"/path/to/python3" }}; found {entry!r}'
                )
            names.append(entry["host"])
            if "python" in entry:
                pythons[entry["host"]] = entry["python"]
        return {**data, "hosts": names, "host_python": pythons}

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            match = HOST.match(host)
            if host != "local" and not match:
                raise ValueError(
                    f"expected a host as [user@]host[:port] (letters, digits, '.', '_', '-'; "
                    f"not starting with '-') or 'local', found {host!r}"
                )
            if match and match["port"] and not 1 <= int(match["port"]) <= 65535:
                raise ValueError(f"host {host!r}: the port must be between 1 and 65535")
        if len(set(hosts)) != len(hosts):
            raise ValueError("a host is listed twice")
        if "local" in hosts and len(hosts) > 1:
            raise ValueError("'local' is a stage of its own: it cannot be listed with other hosts")
        return hosts

    @field_validator("deploy_to")
    @classmethod
    def _deploy_to(cls, value: str, info: ValidationInfo) -> str:
        hosts = info.data.get("hosts")  # absent when the hosts were invalid: they say so themselves
        return deploy_root(value, local=None if hosts is None else hosts == ["local"])

    @field_validator("secrets_file")
    @classmethod
    def _secrets_file_inside(cls, value: str | None) -> str | None:
        return _stage_path(value, "secrets_file")

    @field_validator("ssh_config", "identity_file")
    @classmethod
    def _ssh_files(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _local_file(value, str(info.field_name))

    @field_validator("deploy_user")
    @classmethod
    def _deploy_user(cls, value: str | None) -> str | None:
        if value == "root":
            raise ValueError(
                "deploy_user is the unprivileged user deploys run as; it cannot be root "
                "(leave it unset to log in as the hosts' ssh user)"
            )
        return value

    @field_validator("ssh_options")
    @classmethod
    def _ssh_options(cls, options: list[str]) -> list[str]:
        for option in options:
            if not SSH_OPTION.match(option):
                raise ValueError(
                    f"expected an OpenSSH option as Key=Value (shiplane passes it as -o Key=Value), "
                    f"e.g. 'KexAlgorithms=curve25519-sha256'; found {option!r}"
                )
            if any(bad in option.lower().replace(" ", "") for bad in SSH_OPTIONS_FORBIDDEN):
                raise ValueError(
                    f"{option!r}: host keys are always checked strictly by shiplane; trust a host by "
                    "adding its key to known_hosts (ssh-keyscan, after checking the fingerprint)"
                )
        return options

    @field_validator("domains")
    @classmethod
    def _domains(cls, values: list[str]) -> list[str]:
        names = [v.strip().lower().rstrip(".") for v in values]
        for name in names:
            if name.startswith("*."):
                raise ValueError(
                    f"{name!r}: wildcard certificates need the ACME DNS challenge, which "
                    "shiplane does not set up; list each name"
                )
            if not DOMAIN.match(name):
                raise ValueError(
                    f"expected a domain name such as 'example.com' (letters, digits, '-', at "
                    f"least one dot; not an IP address), found {name!r}"
                )
        if len(set(names)) != len(names):
            raise ValueError("a domain is listed twice")
        return names

    @model_validator(mode="before")
    @classmethod
    def _domains_mean_caddy(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("domains") and "front" not in data:
            return {**data, "front": "caddy"}
        return data

    @model_validator(mode="after")
    def _front_serves_domains(self) -> Stage:
        if self.domains and self.front != "caddy":
            raise ValueError(
                f'domains are served over HTTPS by the caddy front; front = "{self.front}" '
                'cannot: drop the front key (or set front = "caddy"), or drop domains'
            )
        if self.front == "caddy" and not self.domains:
            raise ValueError(
                'front = "caddy" serves the stage\'s domains over HTTPS: set domains = '
                '["example.com", ...] (their DNS pointing at the hosts)'
            )
        return self

    @model_validator(mode="after")
    def _roles_name_hosts(self) -> Stage:
        for role, members in self.roles.items():
            for member in members:
                if member not in self.hosts and not any(
                    h.split("@")[-1].split(":")[0] == member for h in self.hosts
                ):
                    raise ValueError(
                        f"role {role!r} names {member!r}, which is not one of this stage's hosts"
                    )
        return self

    @model_validator(mode="after")
    def _host_python_names_hosts(self) -> Stage:
        for host in self.host_python:
            if host not in self.hosts:
                raise ValueError(
                    f"host_python names {host!r}, which is not one of this stage's hosts"
                )
        return self

    def python_of(self, host: str, app_python: str) -> str:
        """The interpreter on ``host``: its own (``host_python``), the stage's, else the app's."""
        return self.host_python.get(host) or self.python or app_python

    @property
    def is_local(self) -> bool:
        return self.hosts == ["local"]


class DeployFile(Model):
    """The whole of ``shiplane.toml``."""

    app: App
    build: Build = Build()
    config: Config = Config()
    services: dict[Annotated[str, Field(pattern=NAME)], Service] = {}
    shared: Shared = Shared()
    env: dict[Annotated[str, Field(pattern=ENV_NAME)], str] = Field(
        default={}, description="Environment variables of every stage's services and hooks."
    )
    hooks: Hooks = Hooks()
    tasks: dict[Annotated[str, Field(pattern=NAME)], TaskSpec] = {}
    jobs: dict[Annotated[str, Field(pattern=NAME)], Job] = Field(
        default={}, description="Scheduled jobs, by name (``[jobs.NAME]``)."
    )
    stages: Annotated[dict[Annotated[str, Field(pattern=NAME)], Stage], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> DeployFile:
        web = self.services.get("web")
        if web is not None and web.command:
            raise ValueError(
                "services.web is served by gunicorn from app.wsgi/app.asgi; it takes no command"
            )
        for name, service in self.services.items():
            if name != "web" and not service.command:
                raise ValueError(f"services.{name} needs a command")
            # the agent's own programs (agent/backend.py RESERVED) and web servers' names
            if name in ("front", "supervisord", "shiplane-jobs") or name.startswith("web-"):
                raise ValueError(
                    f"services.{name}: the name is shiplane's own (the front, the process "
                    "manager, the jobs' scheduler, the web servers): pick another"
                )
        if web is not None and not (self.app.wsgi or self.app.asgi):
            raise ValueError("services.web needs app.wsgi or app.asgi to serve")
        for name, stage in self.stages.items():
            if stage.promote_from is not None and stage.promote_from not in self.stages:
                raise ValueError(
                    f"stages.{name}.promote_from names unknown stage {stage.promote_from!r}"
                )
        return self

    def web_port(self, stage: str) -> int | None:
        web = self.services.get("web")
        if web is None:
            return None
        return self.stages[stage].port or web.port or 8000
