"""A newcomer following docs/django.md gets a served admin page.

The files the recipe writes (``requirements.in``, the lines appended to ``settings.py`` and
``urls.py``, ``shiplane.toml``) are read from the guide's marked code blocks, so the page and
this test cannot drift apart: ``django-admin startproject mysite``, the recipe's edits, its lock,
a 0600 secrets file, ``shiplane check``, ``shiplane deploy --stage local``, then
``GET /admin/login/``.
"""

from __future__ import annotations

import re
import secrets
import sys
from pathlib import Path

import pytest

from apps.common import App, compiled_lock, free_port, run, tool_venv
from shiplane.config.schema import DeployFile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the controller's floor is 3.10
    import tomli as tomllib

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "django.md"
# <!-- recipe-file: PATH --> or <!-- recipe-append: PATH --> right above a fenced block
BLOCK = re.compile(r"<!-- recipe-(file|append): (\S+) -->\n```[\w-]*\n(.*?)```", re.DOTALL)


def recipe() -> list[tuple[str, str, str]]:
    """(kind, path, text) of each marked block of the guide, in order."""
    return BLOCK.findall(GUIDE.read_text())


def test_the_recipe_names_its_files_and_its_deploy_file_is_valid() -> None:
    steps = recipe()
    assert [(kind, path) for kind, path, _ in steps] == [
        ("file", "requirements.in"),
        ("append", "mysite/settings.py"),
        ("append", "mysite/urls.py"),
        ("file", "shiplane.toml"),
    ]
    toml = {path: text for _, path, text in steps}["shiplane.toml"]
    deploy = DeployFile.model_validate(tomllib.loads(toml))
    assert deploy.stages["local"].is_local and deploy.hooks.release


@pytest.mark.slow
def test_django_recipe_serves_the_admin(tmp_path_factory: pytest.TempPathFactory) -> None:
    # short: unix socket paths under .shiplane/local/run are limited to 107 bytes
    base = tmp_path_factory.mktemp("dj")
    steps = recipe()
    requirements = {path: text for _, path, text in steps}["requirements.in"]
    lock = compiled_lock(requirements.splitlines())  # `uv pip compile requirements.in`, cached
    venv = tool_venv(lock)
    run([str(venv / "bin" / "django-admin"), "startproject", "mysite"], base)
    root = base / "mysite"
    for kind, rel, text in steps:
        path = root / rel
        path.write_text(path.read_text() + "\n" + text if kind == "append" else text)
    (root / "requirements.txt").write_text(lock)
    secret = secrets.token_urlsafe(50)
    (root / ".secrets").mkdir()
    (root / ".secrets" / "local.env").write_text(f"DJANGO_SECRET_KEY={secret}\n")
    (root / ".secrets" / "local.env").chmod(0o600)

    app = App(root=root, port=free_port(), deploy_to=root / ".shiplane" / "local")
    try:
        check = app.shiplane("check")
        assert check.returncode == 0, check.stdout + check.stderr
        deployed = app.deploy("--set", f"port={app.port}")
        status, body = app.get("/admin/login/")
        assert status == 200 and b"Django" in body, (status, body[:300])
        status, css = app.get(
            "/static/admin/css/base.css"
        )  # collectstatic ran; whitenoise serves it
        assert status == 200 and css, status
        assert (app.deploy_to / "shared" / "db.sqlite3").stat().st_size > 0  # migrate ran there
        assert secret not in deployed.output
    finally:
        app.stop()
