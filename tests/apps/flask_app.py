"""A Flask app with an app factory and an instance folder, as the Flask tutorial makes it:
``create_app()`` with ``instance_relative_config=True``; the instance folder (shared between
releases) holds the SQLite database and the config file shiplane renders, secret included; a
destructive ``flask init-db`` command for the first deploy only."""

from __future__ import annotations

from pathlib import Path

from .common import App, compiled_lock, new_app, write

# No gunicorn here: shiplane adds the web server to the wheelhouse itself.
REQUIREMENTS = ["flask>=3.0"]
SECRET = "flask-s3cret-NEVER-PRINTED-1a2b3c"
STYLE = b"h1 { color: #654321; }\n"

APP = '''import os
import sqlite3
import tomllib

import click
from flask import Flask, g, request


def _load(handle):
    """shiplane renders secrets into a [secrets] table: lift them to the top level."""
    data = tomllib.load(handle)
    return {**data, **data.pop("secrets", {})}


def db():
    if "db" not in g:
        from flask import current_app

        g.db = sqlite3.connect(os.path.join(current_app.instance_path, current_app.config["DATABASE"]))
    return g.db


def create_app():
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_file("config.toml", load=_load, text=False)
    assert app.config["SECRET_KEY"], "no secret key in the instance config"

    @app.teardown_appcontext
    def close(_exc):
        conn = g.pop("db", None)
        if conn is not None:
            conn.close()

    @app.cli.command("init-db")
    def init_db():
        """Create the tables, dropping what was there (first deploy only)."""
        conn = db()
        conn.executescript(
            "DROP TABLE IF EXISTS notes; CREATE TABLE notes (text TEXT);"
            "INSERT INTO notes VALUES ('welcome');"
        )
        conn.commit()
        click.echo("initialised the database")

    @app.get("/up")
    def up():
        return "ok"

    @app.get("/")
    def index():
        count = db().execute("SELECT COUNT(*) FROM notes").fetchone()[0]
        return (f"<h1>{app.config['GREETING']}</h1><p>notes: {count}</p><p>version: v1</p>"
                '<link rel="stylesheet" href="/static/style.css">')

    @app.get("/add")
    def add():
        conn = db()
        conn.execute("INSERT INTO notes VALUES (?)", (request.args.get("text", "note"),))
        conn.commit()
        return "added"

    return app
'''

BASE = """GREETING = "flask notes"
DATABASE = "notes.sqlite3"
"""

TOML = """[app]
name = "flasknotes"
wsgi = "app:create_app()"

[build]
requirements = "requirements.txt"

[config]
files = ["config/base.toml"]
render = [{{ path = "instance/config.toml", shared = true, format = "toml" }}]
secrets = ["SECRET_KEY"]

[services.web]
workers = 2
healthcheck = {{ path = "/up", timeout = 20 }}
smoke = [{{ path = "/", expect = "notes: " }}, {{ path = "/static/style.css" }}]

[shared]
dirs = ["instance"]

[hooks]
setup = "flask --app app init-db"

[stages.local]
hosts = ["local"]
deploy_to = "{deploy_to}"
port = {port}
"""


def make_flask(root: Path, deploy_to: Path) -> App:
    """The app at ``root`` (committed to git), its lock compiled, stage ``local`` on a free port."""
    app = new_app(root, deploy_to)
    write(root, "app.py", APP)
    write(root, "config/base.toml", BASE)
    (root / "static").mkdir()
    (root / "static" / "style.css").write_bytes(STYLE)
    write(root, "requirements.txt", compiled_lock(REQUIREMENTS))
    write(root, ".gitignore", "instance/\n__pycache__/\n")
    write(root, "shiplane.toml", TOML.format(deploy_to=deploy_to, port=app.port))
    app.commit("flask app")
    app.env = {"SECRET_KEY": SECRET}
    return app
