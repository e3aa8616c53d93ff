"""An app with no code of its own: only a lock and a deploy file, serving a WSGI app that an
installed package provides (Werkzeug's WSGI information page)."""

from __future__ import annotations

from pathlib import Path

from .common import App, compiled_lock, new_app, write

REQUIREMENTS = ["werkzeug>=3.0", "gunicorn>=22"]

TOML = """[app]
name = "wsgiinfo"
wsgi = "werkzeug.testapp:test_app"

[services.web]
workers = 1
healthcheck = {{ path = "/", timeout = 20 }}
smoke = [{{ path = "/", expect = "WSGI Information" }}]

[stages.local]
hosts = ["local"]
deploy_to = "{deploy_to}"
port = {port}
"""


def make_lock_only(root: Path, deploy_to: Path) -> App:
    """A project of two files, requirements.txt and shiplane.toml, committed to git."""
    app = new_app(root, deploy_to)
    write(root, "requirements.txt", compiled_lock(REQUIREMENTS))
    write(root, "shiplane.toml", TOML.format(deploy_to=deploy_to, port=app.port))
    app.commit("lock only")
    return app
