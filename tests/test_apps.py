"""Real apps as they are (issue 10): a Django project, a FastAPI module, a Flask app factory
with an instance folder, and an app that is only a lock — each made by its framework's own
tooling, deployed to the local stage with the ``shiplane`` CLI, served by real gunicorn.

For each: the deploy serves a page proving its database and static files work; a one-line code
change sends only that file's bytes and builds no venv; rollback serves the previous code.
Locks are compiled with ``uv pip compile`` once and cached in ~/.cache/shiplane-tests.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from apps.common import App, Deployed, wait_for
from apps.django_app import LOGO, make_django
from apps.django_app import SECRET as DJANGO_SECRET
from apps.fastapi_app import STYLE as FASTAPI_STYLE
from apps.fastapi_app import make_fastapi
from apps.flask_app import SECRET as FLASK_SECRET
from apps.flask_app import STYLE as FLASK_STYLE
from apps.flask_app import make_flask
from apps.lockonly_app import make_lock_only
from shiplane.artifact import BuildSpec, compile_app

MakeApp = Callable[[Callable[[Path, Path], App], str], App]


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[MakeApp]:
    """``make_app(maker, name)``: the app in tmp_path/name with a short deploy_to of its own;
    at teardown everything its deploys started is stopped (``shiplane stop --all``)."""
    made: list[App] = []

    def make(maker: Callable[[Path, Path], App], name: str) -> App:
        # short: unix socket paths under deploy_to/run are limited to 107 bytes
        deploy_to = Path(tempfile.mkdtemp(prefix=f"shl-{name[:3]}-", dir="/tmp"))
        app = maker(tmp_path / name, deploy_to)
        made.append(app)
        return app

    yield make
    for app in made:
        try:
            app.stop()
        finally:
            shutil.rmtree(app.deploy_to, ignore_errors=True)


def venvs(app: App) -> list[str]:
    return sorted(p.name for p in (app.deploy_to / "venvs").iterdir() if p.is_dir())


def built_a_venv(deployed: Deployed) -> bool:
    return any(
        e.get("phase") == "venv" and e.get("status") in ("building", "built")
        for e in deployed.events
    )


def assert_code_only_redeploy(
    app: App, rel: str, deployed: Deployed, venvs_before: list[str]
) -> None:
    """A one-line change sends exactly the changed file and installs no dependencies."""
    size = (app.root / rel).stat().st_size
    assert deployed.bytes_sent == size, (deployed.bytes_sent, size, deployed.output[-2000:])
    assert not built_a_venv(deployed), deployed.output[-3000:]
    assert venvs(app) == venvs_before


def check_source(app: App) -> tuple[str, str]:
    report = app.json("check")
    return report["source"], report["source_reason"]


def static_url(page: str) -> str:
    found = re.search(r'(?:src|href)="(/static/[^"]+)"', page)
    assert found, page
    return found.group(1)


# --- which source shiplane picks, and why (fast, no deploy) -----------------------------------


@pytest.mark.parametrize(
    "files, source, why",
    [
        ({"manage.py": "", "mysite/settings.py": ""}, "tree", "manage.py"),
        ({"main.py": "app = None\n"}, "tree", "main.py"),
        (
            {"pyproject.toml": '[project]\nname = "x"\nversion = "1"\n', "x.py": ""},
            "package",
            "pyproject.toml",
        ),
        (
            {"pyproject.toml": "[tool.ruff]\nline-length = 99\n", "app.py": ""},
            "tree",
            "no [project]",
        ),
        ({}, "none", "only the locked dependencies"),
    ],
)
def test_check_names_the_source_and_why(
    tmp_path: Path, files: dict[str, str], source: str, why: str
) -> None:
    for rel, text in {
        **files,
        "requirements.txt": "gunicorn==23.0.0\n",
        "shiplane.toml": '[app]\nname = "x"\nwsgi = "x:app"\n[stages.local]\n'
        'hosts = ["local"]\ndeploy_to = ".shiplane/local"\n',
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    app = App(root=tmp_path, port=0, deploy_to=tmp_path / ".shiplane" / "local")
    found, reason = check_source(app)
    assert found == source and why in reason, (found, reason)
    assert f"app source: {source} (" in app.shiplane("check").stdout


def test_shared_paths_of_the_checkout_never_ship(tmp_path: Path) -> None:
    """A developer's database and uploads in the checkout live in [shared] on the hosts: the
    artifact leaves them out (they would be replaced by the shared link anyway)."""
    for rel in ("manage.py", "mysite/settings.py", "db.sqlite3", "media/u.png", "mediakit/a.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    spec = BuildSpec(tmp_path, "mysite", None, "", shared=("db.sqlite3", "media"))
    files = {f.path for f in compile_app(spec).files}
    assert files == {"manage.py", "mysite/settings.py", "mediakit/a.py"}


# --- the apps ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_django_project(make_app: MakeApp) -> None:
    app = make_app(make_django, "django")
    outputs: list[str] = []
    assert check_source(app)[0] == "tree" and "manage.py" in check_source(app)[1]

    first = app.deploy()
    outputs.append(first.output)
    page = app.text("/")
    assert "notes: 1" in page and "version: v1" in page  # migrate ran: the table exists
    status, body = app.get(static_url(page))  # collectstatic ran, whitenoise serves it
    assert (status, body) == (200, LOGO)
    assert (app.deploy_to / "shared" / "db.sqlite3").stat().st_size > 0
    # the developer's own db.sqlite3 (5 notes, untracked) is a shared file: it never ships
    manifest = json.loads(
        (
            app.root / ".shiplane" / "build" / "artifacts" / f"{first.result['artifact']}.json"
        ).read_text()
    )
    shipped = {f["path"] for f in manifest["app_files"]}
    assert "manage.py" in shipped and "notes/static/notes/logo.svg" in shipped
    assert "db.sqlite3" not in shipped and (app.root / "db.sqlite3").is_file()

    before = venvs(app)
    app.edit("notes/views.py", "version: v1", "version: v2")
    second = app.deploy()
    outputs.append(second.output)
    assert_code_only_redeploy(app, "notes/views.py", second, before)
    page = app.text("/")
    assert "version: v2" in page and "notes: 1" in page  # the database outlived the release
    assert app.get(static_url(page)) == (200, LOGO)

    # every deploy ran `migrate`: rolling back across it asks for a confirmation
    refused = app.shiplane("rollback", "--stage", "local")
    outputs.append(refused.stdout + refused.stderr)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert second.result["release"] in refused.stderr and "--yes" in refused.stderr
    assert "version: v2" in app.text("/")
    back = app.shiplane("rollback", "--stage", "local", "--yes")
    outputs.append(back.stdout + back.stderr)
    assert back.returncode == 0, back.stdout + back.stderr
    assert "version: v1" in app.text("/")
    assert app.current() == first.result["release"]

    for args in (
        ("history", "--stage", "local", "--json"),
        ("status", "--stage", "local"),
        ("logs", "--stage", "local", "--lines", "200"),
        ("config", "show", "--stage", "local"),
    ):
        done = app.shiplane(*args)
        outputs.append(done.stdout + done.stderr)
    stored = [
        p.read_text(errors="replace")
        for p in [
            *(app.deploy_to / "log").glob("*.log"),
            app.deploy_to / "history.jsonl",
            *(app.root / ".shiplane" / "history").glob("*.jsonl"),
        ]
    ]
    leaks = [
        text[max(0, text.find(DJANGO_SECRET) - 200) :][:400]
        for text in outputs + stored
        if DJANGO_SECRET in text
    ]
    assert not leaks, leaks


@pytest.mark.slow
def test_fastapi_module_app(make_app: MakeApp) -> None:
    app = make_app(make_fastapi, "fastapi")
    source, reason = check_source(app)
    assert source == "tree" and "main.py" in reason

    first = app.deploy()
    page = app.text("/")
    count = int(re.search(r"visits: (\d+)", page).group(1))  # type: ignore[union-attr]
    assert "version: v1" in page and count >= 1
    assert app.get(static_url(page)) == (200, FASTAPI_STYLE)
    assert (app.deploy_to / "shared" / "var" / "visits.sqlite3").is_file()

    before = venvs(app)
    app.edit("main.py", "version: v1", "version: v2")
    second = app.deploy()
    assert_code_only_redeploy(app, "main.py", second, before)
    page = app.text("/")
    assert "version: v2" in page
    assert int(re.search(r"visits: (\d+)", page).group(1)) > count  # type: ignore[union-attr]

    back = app.shiplane("rollback", "--stage", "local")
    assert back.returncode == 0, back.stdout + back.stderr
    assert "version: v1" in app.text("/") and app.current() == first.result["release"]


@pytest.mark.slow
def test_flask_app_with_instance_folder(make_app: MakeApp) -> None:
    app = make_app(make_flask, "flask")
    source, reason = check_source(app)
    assert source == "tree" and "app.py" in reason
    first = app.deploy()
    assert first.result["setup"] is True
    assert "initialised the database" in first.output
    page = app.text("/")
    assert "flask notes" in page and "notes: 1" in page  # setup (init-db) ran: one welcome note
    assert app.get(static_url(page)) == (200, FLASK_STYLE)
    config = app.deploy_to / "shared" / "instance" / "config.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600  # it holds the secret
    assert FLASK_SECRET in config.read_text()
    assert (app.deploy_to / "current" / "instance").resolve() == (
        app.deploy_to / "shared" / "instance"
    ).resolve()
    assert app.text("/add?text=kept") == "added"
    assert "notes: 2" in app.text("/")

    before = venvs(app)
    app.edit("app.py", "version: v1", "version: v2")
    second = app.deploy()
    assert_code_only_redeploy(app, "app.py", second, before)
    assert second.result["setup"] is False
    assert "init-db" not in second.output
    page = app.text("/")
    assert "version: v2" in page and "notes: 2" in page  # setup did not run again: the note is kept
    entries = app.json("history", "--stage", "local")["hosts"]["local"]["entries"]
    deploys = [e for e in entries if e.get("event") == "deploy"]
    assert [e["setup"] for e in deploys] == [True, False]

    back = app.shiplane("rollback", "--stage", "local")
    assert back.returncode == 0, back.stdout + back.stderr
    assert "version: v1" in app.text("/") and "notes: 2" in app.text("/")

    # a deliberate rerun of the destructive setup hook
    refused = app.shiplane("run", "setup", "--stage", "local")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--force" in refused.stderr
    assert "notes: 2" in app.text("/")
    rerun = app.shiplane("run", "setup", "--stage", "local", "--force")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "notes: 1" in app.text("/")
    entries = app.json("history", "--stage", "local")["hosts"]["local"]["entries"]
    assert entries[-1]["event"] == "setup" and entries[-1]["outcome"] == "ok"
    assert FLASK_SECRET not in rerun.stdout + rerun.stderr + first.output + second.output


@pytest.mark.slow
def test_app_that_is_only_a_lock(make_app: MakeApp) -> None:
    app = make_app(make_lock_only, "lockonly")
    source, reason = check_source(app)
    assert source == "none", (source, reason)
    deployed = app.deploy()
    assert "WSGI Information" in app.text("/")
    release = app.deploy_to / "releases" / deployed.result["release"]
    assert sorted(p.name for p in release.iterdir()) == ["release.json", "shiplane.env"]


@pytest.mark.slow
def test_failing_smoke_check_never_takes_traffic(make_app: MakeApp) -> None:
    """/up answers 200 but the page is broken (a query on a table that does not exist): the
    candidate fails its smoke check, the previous release serves every request throughout."""
    app = make_app(make_fastapi, "smoke")
    first = app.deploy()
    assert "version: v1" in app.text("/")
    app.edit("main.py", "FROM visits", "FROM visitz")

    seen: list[tuple[int, bytes]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                seen.append(app.get("/"))
            except OSError as exc:  # a refused or reset connection is a lost request too
                seen.append((0, repr(exc).encode()))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        wait_for(lambda: len(seen) >= 3, what="requests before the deploy")
        failed = app.deploy(check=False)
    finally:
        stop.set()
        thread.join()
    assert failed.exit == 1, failed.output[-3000:]
    error = failed.result["error"]
    assert "smoke check GET / expecting 'visits: '" in error, error
    assert "status 500" in error and "Internal Server Error" in error, error
    assert app.current() == first.result["release"]
    bad = [(s, b[:200]) for s, b in seen if s != 200 or b"version: v1" not in b]
    assert not bad and len(seen) > 3, (bad, len(seen))
    assert "version: v1" in app.text("/")
    releases = app.json("releases", "--stage", "local")["hosts"]["local"]["releases"]
    assert {r["release_id"]: r["state"] for r in releases}[failed.result["release"]] == "bad"
