"""What most verbs start with: the project, the stage, overrides, secrets and layered config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shiplane.config import Layered, Project, build_layers, load_project, resolve_secrets, stage_of
from shiplane.config.loader import with_overrides
from shiplane.events import Event
from shiplane.secret import Masker


def silent(event: Event) -> None:
    """An emit that drops every event: a command run without a reporter (tests, --json plan)."""


@dataclass(frozen=True)
class StageContext:
    project: Project
    stage: str
    layered: Layered


def open_stage(
    file: Path | None,
    stage: str | None,
    masker: Masker,
    *,
    hosts: str | None = None,
    sets: Sequence[str] = (),
    need_secrets: bool = True,
) -> StageContext:
    """Load, pick the stage, apply overrides, resolve secrets (registering them with the masker)."""
    project = load_project(file)
    name = stage_of(project, stage)
    project = with_overrides(project, name, hosts, sets)
    secrets = resolve_secrets(project.deploy, name, project.root) if need_secrets else {}
    for secret in secrets.values():
        masker.add(secret.reveal())
    return StageContext(project, name, build_layers(project, name, secrets))
