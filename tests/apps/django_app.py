"""A Django project as ``django-admin startproject`` and ``manage.py startapp`` make it, changed
the way people change it for production: secret key from the environment at import time, DEBUG
off, hosts from the environment, static files collected and served by whitenoise, a model with
its migration. No pyproject: it ships as a source tree."""

from __future__ import annotations

from pathlib import Path

from .common import App, compiled_lock, new_app, run, tool_venv, write

REQUIREMENTS = ["django>=5.1,<5.3", "whitenoise>=6.6", "gunicorn>=22"]
SECRET = "dj-s3cret-NEVER-PRINTED-9f8e7d"
LOGO = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>\n'

DEV_NOTES = "from notes.models import Note\nfor i in range(5): Note.objects.create(text='dev')"

VIEWS = """from django.http import HttpResponse
from django.templatetags.static import static

from .models import Note


def index(request):
    if not Note.objects.exists():
        Note.objects.create(text="first note")
    count = Note.objects.count()
    logo = static("notes/logo.svg")
    return HttpResponse(
        f"<h1>mysite notes</h1><p>notes: {count}</p>"
        f'<p>version: v1</p><img src="{logo}" alt="logo"> <a href="{logo}">logo</a>'
    )


def up(request):
    return HttpResponse("ok")
"""

MODELS = """from django.db import models


class Note(models.Model):
    text = models.CharField(max_length=200)
"""

URLS = """from django.urls import path

from notes import views

urlpatterns = [
    path("", views.index),
    path("up", views.up),
]
"""

TOML = """[app]
name = "mysite"
wsgi = "mysite.wsgi:application"

[build]
requirements = "requirements.txt"

[config]
secrets = ["DJANGO_SECRET_KEY"]

[services.web]
workers = 2
healthcheck = {{ path = "/up", timeout = 20 }}
smoke = [{{ path = "/", expect = "notes: " }}]

[shared]
files = ["db.sqlite3"]

[env]
DJANGO_ALLOWED_HOSTS = "127.0.0.1,localhost"

[hooks]
after_install = ["python manage.py collectstatic --noinput"]
release = "python manage.py migrate --noinput"

[stages.local]
hosts = ["local"]
deploy_to = "{deploy_to}"
port = {port}
"""


def _settings(text: str) -> str:
    """The production edits to the generated settings.py."""
    lines = []
    for line in text.splitlines():
        if line.startswith("SECRET_KEY ="):
            line = 'SECRET_KEY = os.environ["DJANGO_SECRET_KEY"]'
        elif line.startswith("DEBUG ="):
            line = "DEBUG = False"
        elif line.startswith("ALLOWED_HOSTS ="):
            line = 'ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "").split(",")'
        elif "django.middleware.security.SecurityMiddleware" in line:
            line += "\n    'whitenoise.middleware.WhiteNoiseMiddleware',"
        elif line.startswith("INSTALLED_APPS = ["):
            line += "\n    'notes',"
        lines.append(line)
    out = "import os\n" + "\n".join(lines) + "\n"
    assert 'os.environ["DJANGO_SECRET_KEY"]' in out and "WhiteNoiseMiddleware" in out
    return out + 'STATIC_ROOT = BASE_DIR / "staticfiles"\n'


def make_django(root: Path, deploy_to: Path) -> App:
    """The project at ``root`` (committed to git), its lock compiled, stage ``local`` on a free port."""
    app = new_app(root, deploy_to)
    lock = compiled_lock(REQUIREMENTS)
    venv = tool_venv(lock)
    py = str(venv / "bin" / "python")
    run([str(venv / "bin" / "django-admin"), "startproject", "mysite", "."], root)
    run([py, "manage.py", "startapp", "notes"], root)
    settings = root / "mysite" / "settings.py"
    settings.write_text(_settings(settings.read_text()))
    write(root, "notes/models.py", MODELS)
    write(root, "notes/views.py", VIEWS)
    write(root, "mysite/urls.py", URLS)
    (root / "notes" / "static" / "notes").mkdir(parents=True)
    (root / "notes" / "static" / "notes" / "logo.svg").write_bytes(LOGO)
    dev = {"DJANGO_SECRET_KEY": "dev-only"}
    run([py, "manage.py", "makemigrations", "notes"], root, dev)
    assert (root / "notes" / "migrations" / "0001_initial.py").is_file()
    write(root, "requirements.txt", lock)
    write(root, "shiplane.toml", TOML.format(deploy_to=deploy_to, port=app.port))
    app.commit("startproject")
    # the developer's own database: untracked, not ignored (startproject writes no .gitignore)
    run([py, "manage.py", "migrate", "-v0"], root, dev)
    run([py, "manage.py", "shell", "-c", DEV_NOTES], root, dev)
    app.env = {"DJANGO_SECRET_KEY": SECRET}
    return app
