"""The deploy file and the app's layered config: load, validate, merge, render."""

from shiplane.config.layers import Layered, Rendered, build_layers, env_file_values, render_files
from shiplane.config.loader import DEPLOY_FILE, Project, load_project, stage_of
from shiplane.config.schema import DeployFile, Stage
from shiplane.config.secrets import resolve_secrets

__all__ = [
    "DEPLOY_FILE",
    "DeployFile",
    "Layered",
    "Project",
    "Rendered",
    "Stage",
    "build_layers",
    "env_file_values",
    "load_project",
    "render_files",
    "resolve_secrets",
    "stage_of",
]
