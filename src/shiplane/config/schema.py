"""The deploy file's schema: one validated model per section of ``shiplane.toml``.

Models only describe and check shapes; loading (with file:line errors) is in ``loader.py`` and the
layered app config in ``layers.py``. Unknown keys are errors everywhere (``extra="forbid"``).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from shiplane.config.paths import PLACEHOLDERS, deploy_root, project_path

NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# [user@]host[:port] as it reaches ssh's command line: user and host start with a letter, digit or
# "_" (never "-", which ssh would read as an option); transport/ssh.py parses the same shape
HOST = re.compile(r"^(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]{0,63})@)?"
                  r"(?P<host>[A-Za-z0-9_][A-Za-z0-9._-]{0,252}|\[[0-9a-fA-F:.]+\])(?::(?P<port>[0-9]{1,5}))?$")
# an OpenSSH option as ssh_options takes it: Key=Value (given to ssh as -o Key=Value)
SSH_OPTION = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:=|\s+)[^\x00-\x1f\x7f]+$")
SSH_OPTIONS_FORBIDDEN = ("stricthostkeychecking", "userknownhostsfile=/dev/null", "globalknownhostsfile=/dev/null")
# an interpreter on the hosts: a command name or path, one word, not an option
PYTHON = r"^[A-Za-z0-9_./~+][A-Za-z0-9_./~+-]*$"
SECONDS = 86400.0  # the longest timeout a deploy file may set (one day)
SCOPE = re.compile(r"^(local|all|primary|role:[A-Za-z0-9_-]+)$")


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
    if value is not None and (not value.strip() or value.startswith("-") or any(ord(c) < 32 or ord(c) == 127 for c in value)):
        raise ValueError(f"{what} must be a file path (not empty, no leading '-', no control characters), found {value!r}")
    return value


class App(Model):
    name: Annotated[str, Field(pattern=NAME)]
    wsgi: str | None = None
    asgi: str | None = None
    python: Annotated[str, Field(pattern=PYTHON)] = "python3"
    keep_releases: Annotated[int, Field(ge=2, le=100)] = 5
    source: Literal["package", "tree", "none"] | None = None

    @model_validator(mode="after")
    def _one_entry_point(self) -> App:
        if self.wsgi and self.asgi:
            raise ValueError("give either wsgi or asgi, not both")
        return self


class Build(Model):
    requirements: str = "requirements.txt"
    test: str | None = None
    test_requirements: list[str] = ["pytest"]
    include: list[str] = []
    exclude: list[str] = []
    python_version: Annotated[str, Field(pattern=r"^3\.[0-9]{1,2}$")] | None = None
    platform: str | None = None

    @field_validator("requirements")
    @classmethod
    def _inside(cls, value: str) -> str:
        return _relative_path(value, "build.requirements")

    @field_validator("include", "exclude")
    @classmethod
    def _globs_inside(cls, values: list[str], info: ValidationInfo) -> list[str]:
        return [_relative_path(v, f"build.{info.field_name} pattern") for v in values]


class RenderedFile(Model):
    path: str
    format: Literal["ini", "toml", "env", "json"] | None = None
    template: str | None = None
    shared: bool = False
    sections: list[str] | None = None

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
            raise ValueError(f"cannot tell the format of {self.path!r} from its name: name it .ini, .toml, .env "
                             "or .json, or give format = \"ini\" (or a template)")
        return self


def _format_from_name(path: str) -> bool:
    """True when formats.format_of can tell a rendered file's format from its name."""
    name = path.rsplit("/", 1)[-1]
    return name == ".env" or name.endswith((".env", ".ini", ".cfg", ".conf", ".toml", ".json"))


class Config(Model):
    files: list[str] = []
    render: str | list[RenderedFile] | None = None
    env_prefix: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    secrets: list[Annotated[str, Field(pattern=ENV_NAME)]] = []
    secrets_file: str | None = None
    secrets_command: str | None = None

    @field_validator("files")
    @classmethod
    def _files_inside(cls, values: list[str]) -> list[str]:
        return [project_path(v, "config.files entry", placeholders=PLACEHOLDERS) for v in values]

    @field_validator("render")
    @classmethod
    def _render_inside(cls, value: str | list[RenderedFile] | None) -> str | list[RenderedFile] | None:
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
    def _render_format(cls, value: str | list[RenderedFile] | None) -> str | list[RenderedFile] | None:
        if isinstance(value, str) and not _format_from_name(value):
            raise ValueError(f"cannot tell the format of {value!r} from its name: name it .ini, .toml, .env or "
                             ".json, or use render = [{ path = ..., format = \"ini\" }]")
        return value


class HealthCheck(Model):
    path: Annotated[str, Field(pattern=r"^/")] = "/up"
    timeout: Annotated[float, Field(gt=0, le=600)] = 15
    host: Annotated[str, Field(pattern=r"^[A-Za-z0-9.:\[\]-]+$")] = "localhost"  # Host header of health and smoke checks


class SmokeCheck(Model):
    path: Annotated[str, Field(pattern=r"^/")]
    expect: str | None = None
    status: Annotated[int, Field(ge=100, le=599)] = 200


class Service(Model):
    """``[services.web]`` is the HTTP server; any other name is a long-running command."""

    server: Literal["gunicorn"] | None = None
    command: str | None = None
    workers: Annotated[int, Field(ge=1, le=256)] | None = None
    worker_class: str | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    timeout: Annotated[float, Field(gt=0, le=SECONDS)] = 30
    graceful_timeout: Annotated[float, Field(gt=0, le=SECONDS)] = 20
    # web: the previous release's server stays up, idle, so a rollback starts nothing
    standby: bool = True
    # web: the next release's server starts during its install with its libraries imported, and
    # loads the app at the switch (daemon backend; off for apps whose libraries must not be
    # imported before the app sets its environment up)
    preboot: bool = True
    healthcheck: HealthCheck = HealthCheck()
    smoke: list[SmokeCheck] = []
    stop_signal: Literal["TERM", "INT", "QUIT", "HUP", "USR1", "USR2", "KILL"] = "TERM"
    stop_timeout: Annotated[float, Field(gt=0, le=3600)] = 10


class Shared(Model):
    dirs: list[str] = []
    files: list[str] = []

    @field_validator("dirs", "files")
    @classmethod
    def _inside(cls, values: list[str]) -> list[str]:
        return [_relative_path(v, "shared path").rstrip("/") for v in values]


class Hooks(Model):
    setup: str | None = None
    release: str | list[str] | None = None
    # globs (relative to the project) the release hook depends on: unchanged, with the same
    # config, since the hook last ran on the primary -> the hook is skipped (release_inputs.py)
    release_if_changed: list[str] = []
    after_install: list[str] = []
    after_deploy: list[str] = []
    timeout: Annotated[float, Field(gt=0, le=SECONDS)] = 600
    # seconds a running hook may print nothing before it is ended (a hung hook must not hold the
    # deploy lock for the whole timeout); 0 turns the check off, for hooks quiet for long
    silence_timeout: Annotated[float, Field(ge=0, le=SECONDS)] = 300
    # where the setup and release hooks run: once on the primary (a database every host shares)
    # or on every host (state each host keeps, e.g. its own SQLite); see README, "The deploy file"
    run_on: Literal["primary", "all"] = "primary"

    @field_validator("release_if_changed")
    @classmethod
    def _patterns_inside(cls, values: list[str]) -> list[str]:
        return [_relative_path(v, "release_if_changed pattern") for v in values]

    def release_commands(self) -> list[str]:
        if self.release is None:
            return []
        return [self.release] if isinstance(self.release, str) else list(self.release)


class TaskSpec(Model):
    run: str
    on: str = "local"
    needs: list[str] = []
    before: list[str] = []
    after: list[str] = []
    timeout: Annotated[float, Field(gt=0, le=SECONDS)] | None = None

    @field_validator("on")
    @classmethod
    def _scope(cls, value: str) -> str:
        if not SCOPE.match(value):
            raise ValueError(f"expected local, all, primary or role:NAME, found {value!r}")
        return value


class Nginx(Model):
    """``[stages.X.nginx]`` with ``front = "nginx"``: the site shiplane writes (agent/nginx.py)."""

    server_name: str = "_"
    tls_cert: str | None = None
    tls_key: str | None = None
    static: dict[Annotated[str, Field(pattern=r"^/")], str] = {}  # URL prefix -> release dir
    site_dir: str = "/etc/nginx/sites-enabled"
    conf: str | None = None  # a private nginx's main conf (nginx -c), started if not running
    pid_file: str | None = None

    @field_validator("static")
    @classmethod
    def _static_inside(cls, values: dict[str, str]) -> dict[str, str]:
        return {k: _relative_path(v, "static dir") for k, v in values.items()}

    @model_validator(mode="after")
    def _tls_pair(self) -> Nginx:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        return self


PERCENT = r"^(100|[1-9]?[0-9])%$"


class Rolling(Model):
    batch: Annotated[int, Field(ge=1)] | Annotated[str, Field(pattern=PERCENT)] = "100%"
    max_fail: Annotated[int, Field(ge=0)] | Annotated[str, Field(pattern=PERCENT)] = 0


class Stage(Model):
    hosts: Annotated[list[str], Field(min_length=1)]
    deploy_to: str
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    bind: str | None = None
    roles: dict[Annotated[str, Field(pattern=NAME)], list[str]] = {}
    rolling: Rolling = Rolling()
    promote_from: str | None = None
    python: Annotated[str, Field(pattern=PYTHON)] | None = None
    front: Literal["builtin", "nginx"] = "builtin"
    backend: Literal["auto", "daemon", "systemd"] = "auto"
    nginx: Nginx = Nginx()
    ssh_config: str | None = None
    ssh_options: list[str] = []
    identity_file: str | None = None
    connect_timeout: Annotated[float, Field(gt=0, le=600)] = 10
    command_timeout: Annotated[float, Field(gt=0, le=SECONDS)] = 60  # silence (no event, no "alive") that makes a host an error
    env: dict[Annotated[str, Field(pattern=ENV_NAME)], str] = {}
    config: dict[str, dict[str, str | int | float | bool]] = {}
    secrets_file: str | None = None
    secrets_command: str | None = None

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            match = HOST.match(host)
            if host != "local" and not match:
                raise ValueError(f"expected a host as [user@]host[:port] (letters, digits, '.', '_', '-'; "
                                 f"not starting with '-') or 'local', found {host!r}")
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

    @field_validator("ssh_options")
    @classmethod
    def _ssh_options(cls, options: list[str]) -> list[str]:
        for option in options:
            if not SSH_OPTION.match(option):
                raise ValueError(f"expected an OpenSSH option as Key=Value (shiplane passes it as -o Key=Value), "
                                 f"e.g. 'KexAlgorithms=curve25519-sha256'; found {option!r}")
            if any(bad in option.lower().replace(" ", "") for bad in SSH_OPTIONS_FORBIDDEN):
                raise ValueError(f"{option!r}: host keys are always checked strictly by shiplane; trust a host by "
                                 "adding its key to known_hosts (ssh-keyscan, after checking the fingerprint)")
        return options

    @model_validator(mode="after")
    def _roles_name_hosts(self) -> Stage:
        for role, members in self.roles.items():
            for member in members:
                if member not in self.hosts and not any(h.split("@")[-1].split(":")[0] == member for h in self.hosts):
                    raise ValueError(f"role {role!r} names {member!r}, which is not one of this stage's hosts")
        return self

    @property
    def is_local(self) -> bool:
        return self.hosts == ["local"]


class DeployFile(Model):
    app: App
    build: Build = Build()
    config: Config = Config()
    services: dict[Annotated[str, Field(pattern=NAME)], Service] = {}
    shared: Shared = Shared()
    env: dict[Annotated[str, Field(pattern=ENV_NAME)], str] = {}
    hooks: Hooks = Hooks()
    tasks: dict[Annotated[str, Field(pattern=NAME)], TaskSpec] = {}
    stages: Annotated[dict[Annotated[str, Field(pattern=NAME)], Stage], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> DeployFile:
        web = self.services.get("web")
        if web is not None and web.command:
            raise ValueError("services.web is served by gunicorn from app.wsgi/app.asgi; it takes no command")
        for name, service in self.services.items():
            if name != "web" and not service.command:
                raise ValueError(f"services.{name} needs a command")
        if web is not None and not (self.app.wsgi or self.app.asgi):
            raise ValueError("services.web needs app.wsgi or app.asgi to serve")
        for name, stage in self.stages.items():
            if stage.promote_from is not None and stage.promote_from not in self.stages:
                raise ValueError(f"stages.{name}.promote_from names unknown stage {stage.promote_from!r}")
        return self

    def web_port(self, stage: str) -> int | None:
        web = self.services.get("web")
        if web is None:
            return None
        return self.stages[stage].port or web.port or 8000
