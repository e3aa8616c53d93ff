"""The deploy file's schema: one validated model per section of ``shiplane.toml``.

Models only describe and check shapes; loading (with file:line errors) is in ``loader.py`` and the
layered app config in ``layers.py``. Unknown keys are errors everywhere (``extra="forbid"``).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
HOST = re.compile(r"^(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>[A-Za-z0-9._-]+|\[[0-9a-fA-F:]+\])(?::(?P<port>[0-9]{1,5}))?$")
SCOPE = re.compile(r"^(local|all|primary|role:[A-Za-z0-9_-]+)$")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _relative_path(value: str, what: str) -> str:
    """Paths in the deploy file are relative to the project and may not climb out of it."""
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"{what} must be a relative path inside the project, found {value!r}")
    return value


class App(Model):
    name: Annotated[str, Field(pattern=NAME)]
    wsgi: str | None = None
    asgi: str | None = None
    python: str = "python3"
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


class Config(Model):
    files: list[str] = []
    render: str | list[RenderedFile] | None = None
    env_prefix: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    secrets: list[Annotated[str, Field(pattern=ENV_NAME)]] = []
    secrets_file: str | None = None
    secrets_command: str | None = None

    def rendered_files(self) -> list[RenderedFile]:
        if self.render is None:
            return []
        if isinstance(self.render, str):
            return [RenderedFile(path=_relative_path(self.render, "config.render"))]
        return list(self.render)


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
    timeout: Annotated[float, Field(gt=0)] = 30
    graceful_timeout: Annotated[float, Field(gt=0)] = 20
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
    timeout: Annotated[float, Field(gt=0)] = 600
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
    timeout: Annotated[float, Field(gt=0)] | None = None

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


class Rolling(Model):
    batch: int | Annotated[str, Field(pattern=r"^[0-9]{1,3}%$")] = "100%"
    max_fail: int | Annotated[str, Field(pattern=r"^[0-9]{1,3}%$")] = 0


class Stage(Model):
    hosts: Annotated[list[str], Field(min_length=1)]
    deploy_to: str
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    bind: str | None = None
    roles: dict[Annotated[str, Field(pattern=NAME)], list[str]] = {}
    rolling: Rolling = Rolling()
    promote_from: str | None = None
    python: str | None = None
    front: Literal["builtin", "nginx"] = "builtin"
    backend: Literal["auto", "daemon", "systemd"] = "auto"
    nginx: Nginx = Nginx()
    ssh_config: str | None = None
    ssh_options: list[str] = []
    identity_file: str | None = None
    connect_timeout: Annotated[float, Field(gt=0)] = 10
    command_timeout: Annotated[float, Field(gt=0)] = 60  # silence (no event, no "alive") that makes a host an error
    env: dict[Annotated[str, Field(pattern=ENV_NAME)], str] = {}
    config: dict[str, dict[str, str | int | float | bool]] = {}
    secrets_file: str | None = None
    secrets_command: str | None = None

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if host != "local" and not HOST.match(host):
                raise ValueError(f"expected a host as [user@]host[:port] or 'local', found {host!r}")
        if len(set(hosts)) != len(hosts):
            raise ValueError("a host is listed twice")
        return hosts

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
