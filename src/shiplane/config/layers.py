"""Layered app config (README, "Config layers"), lowest first: the config files (base, then stage), the stage's
``config`` table in shiplane.toml, prefixed environment variables, secrets. Later wins; every
value remembers which layer set it and which ones it overrode (``config show --explain``).

The services' environment is layered the same way: ``[env]``, ``[stages.S.env]``, secrets.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shiplane.config.formats import Sections, Value, dump, format_of, read_sections, utf8_text
from shiplane.config.loader import Project
from shiplane.config.schema import RenderedFile
from shiplane.errors import ConfigError
from shiplane.secret import Secret


@dataclass(frozen=True)
class Origin:
    layer: str
    value: Value


@dataclass
class Layered:
    """Merged config and env of one stage, with each key's history of layers."""

    stage: str
    config: Sections = field(default_factory=dict)
    config_origins: dict[tuple[str, str], list[Origin]] = field(default_factory=dict)
    env: dict[str, Value] = field(default_factory=dict)
    env_origins: dict[str, list[Origin]] = field(default_factory=dict)
    secrets: dict[str, Secret] = field(default_factory=dict)

    def set(self, section: str, key: str, value: Value, layer: str) -> None:
        self.config.setdefault(section, {})[key] = value
        self.config_origins.setdefault((section, key), []).append(Origin(layer, value))

    def set_env(self, key: str, value: Value, layer: str) -> None:
        self.env[key] = value
        self.env_origins.setdefault(key, []).append(Origin(layer, value))

    def explain(self) -> list[dict[str, object]]:
        """Rows for ``--explain``: key, winning value and layer, overridden layers (masked)."""
        rows: list[dict[str, object]] = []
        for (section, key), history in self.config_origins.items():
            rows.append(_row("config", f"{section}.{key}" if section else key, history))
        for key, history in self.env_origins.items():
            rows.append(_row("env", key, history))
        return rows

    def to_json(self) -> dict[str, object]:
        """Masked: secrets print as ``***`` (``str`` of a Secret)."""
        return {
            "stage": self.stage,
            "config": {
                s: {k: _shown(v) for k, v in items.items()} for s, items in self.config.items()
            },
            "env": {k: _shown(v) for k, v in self.env.items()},
        }


def _shown(value: Value) -> object:
    return str(value) if isinstance(value, Secret) else value


def _row(kind: str, key: str, history: list[Origin]) -> dict[str, object]:
    return {
        "kind": kind,
        "key": key,
        "value": _shown(history[-1].value),
        "layer": history[-1].layer,
        "overrides": [{"layer": o.layer, "value": _shown(o.value)} for o in reversed(history[:-1])],
    }


def layer_files(project: Project, stage: str) -> list[Path]:
    """The config files of a stage, in order; a ``{stage}`` file may be absent, others may not."""
    files = []
    for pattern in project.deploy.config.files:
        path = project.root / pattern.replace(
            "{stage}", stage
        )  # the schema allows no other placeholder
        if not path.exists():
            if "{stage}" in pattern:
                continue
            raise ConfigError(
                f"{project.path}: config.files names {pattern!r}, which does not exist"
            )
        files.append(path)
    return files


def build_layers(
    project: Project,
    stage: str,
    secrets: Mapping[str, Secret],
    environ: Mapping[str, str] | None = None,
) -> Layered:
    """Merge every layer of one stage. Pure apart from reading the config files."""
    environ = os.environ if environ is None else environ
    deploy = project.deploy
    out = Layered(stage=stage, secrets=dict(secrets))
    for path in layer_files(project, stage):
        name = str(path.relative_to(project.root))
        for section, items in read_sections(path).items():
            for key, value in items.items():
                out.set(section, key, value, name)
    for section, table in deploy.stages[stage].config.items():
        for key, value in table.items():
            out.set(section, key, value, f"shiplane.toml [stages.{stage}.config]")
    prefix = deploy.config.env_prefix
    if prefix:
        for name in sorted(environ):
            target = _prefixed_key(name, prefix)
            if target and name not in secrets:
                out.set(*target, environ[name], f"environment ${name}")
    for name, secret in secrets.items():
        target = _prefixed_key(name, prefix) if prefix else None
        section, key = target or ("secrets", name)
        out.set(section, key, secret, f"secret {name}")
    for key, value in deploy.env.items():
        out.set_env(key, value, "shiplane.toml [env]")
    for key, value in deploy.stages[stage].env.items():
        out.set_env(key, value, f"shiplane.toml [stages.{stage}.env]")
    for name, secret in secrets.items():
        out.set_env(name, secret, f"secret {name}")
    return out


def _prefixed_key(name: str, prefix: str) -> tuple[str, str] | None:
    """``MYAPP_DATABASE__URL`` -> ("database", "url"); names without ``__`` are not config keys."""
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix) :]
    section, sep, key = rest.partition("__")
    if not sep or not section or not key:
        return None
    return section.lower(), key.lower()


@dataclass(frozen=True)
class Rendered:
    path: str
    content: str
    mode: int
    shared: bool


def render_files(project: Project, layered: Layered) -> list[Rendered]:
    """Every file ``config.render`` asks for, with secrets revealed and mode 0600 when it holds one."""
    out = []
    for spec in project.deploy.config.rendered_files():
        sections = _select(layered.config, spec)
        if spec.template:
            content, has_secret = _from_template(project, spec, layered, sections)
        else:
            content = dump(sections, format_of(spec.path, spec.format), reveal=True)
            has_secret = any(
                isinstance(v, Secret) for items in sections.values() for v in items.values()
            )
        out.append(Rendered(spec.path, content, 0o600 if has_secret else 0o644, spec.shared))
    return out


def _select(config: Sections, spec: RenderedFile) -> Sections:
    if spec.sections is None:
        return config
    return {name: items for name, items in config.items() if name in spec.sections}


def _from_template(
    project: Project, spec: RenderedFile, layered: Layered, sections: Sections
) -> tuple[str, bool]:
    import jinja2

    assert spec.template is not None
    path = project.root / spec.template
    try:
        source = utf8_text(path.read_bytes(), path, "config.render template")
    except OSError as exc:
        raise ConfigError(
            f"{project.path}: config.render template {spec.template!r}: {exc.strerror}"
        ) from None
    revealed = {
        s: {k: (v.reveal() if isinstance(v, Secret) else v) for k, v in items.items()}
        for s, items in sections.items()
    }
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    try:
        content = env.from_string(source).render(
            config=revealed,
            stage=layered.stage,
            env={k: (v.reveal() if isinstance(v, Secret) else v) for k, v in layered.env.items()},
        )
    except jinja2.TemplateError as exc:
        line = getattr(exc, "lineno", None)
        raise ConfigError(
            f"{path}{':' + str(line) if line else ''}: template error: {exc}"
        ) from None
    except RecursionError:
        raise ConfigError(f"{path}: template error: nested too deeply") from None
    has_secret = any(s.reveal() in content for s in layered.secrets.values())
    return content, has_secret


def env_file_values(layered: Layered) -> dict[str, str]:
    """The host env file's content (secrets revealed: it is written 0600 on the host only)."""
    values = {k: (v.reveal() if isinstance(v, Secret) else str(v)) for k, v in layered.env.items()}
    values["SHIPLANE_STAGE"] = layered.stage
    return values
