"""A FastAPI app as people write one: a single module ``main.py`` with ``app = FastAPI()`` (no
package), its SQLite file at a path taken from an environment variable, static files mounted,
served by gunicorn with uvicorn workers."""

from __future__ import annotations

from pathlib import Path

from .common import App, compiled_lock, new_app, write

REQUIREMENTS = ["fastapi>=0.110", "uvicorn>=0.29", "gunicorn>=22"]
STYLE = b"body { color: #123456; }\n"

MAIN = """import os
import sqlite3
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

DB = os.environ["VISITS_DB"]


def connect():
    return sqlite3.connect(DB)


@asynccontextmanager
async def lifespan(app):
    with connect() as db:
        db.execute("CREATE TABLE IF NOT EXISTS visits (id INTEGER PRIMARY KEY)")
    yield


app = FastAPI(lifespan=lifespan)
app.mount("/static", StaticFiles(directory="static"), name="static")


@app.get("/up", response_class=PlainTextResponse)
def up():
    return "ok"


@app.get("/", response_class=HTMLResponse)
def index():
    with connect() as db:
        db.execute("INSERT INTO visits DEFAULT VALUES")
        count = db.execute("SELECT COUNT(*) FROM visits").fetchone()[0]
    return f'<h1>fastapi visits: {count}</h1><p>version: v1</p><link rel="stylesheet" href="/static/style.css">'
"""

TOML = """[app]
name = "visits"
asgi = "main:app"

[build]
requirements = "requirements.txt"

[services.web]
workers = 1
healthcheck = {{ path = "/up", timeout = 20 }}
smoke = [{{ path = "/", expect = "visits: " }}, {{ path = "/static/style.css" }}]

[shared]
dirs = ["var"]

[env]
VISITS_DB = "var/visits.sqlite3"

[stages.local]
hosts = ["local"]
deploy_to = "{deploy_to}"
port = {port}
"""


def make_fastapi(root: Path, deploy_to: Path) -> App:
    """The app at ``root`` (committed to git), its lock compiled, stage ``local`` on a free port."""
    app = new_app(root, deploy_to)
    write(root, "main.py", MAIN)
    (root / "static").mkdir()
    (root / "static" / "style.css").write_bytes(STYLE)
    write(root, "requirements.txt", compiled_lock(REQUIREMENTS))
    write(root, ".gitignore", "var/\n__pycache__/\n")
    write(root, "shiplane.toml", TOML.format(deploy_to=deploy_to, port=app.port))
    app.commit("fastapi app")
    return app
