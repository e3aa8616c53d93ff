"""What a release's early-started server imports, and when it is used (agent/preboot.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from shiplane.agent import preboot
from shiplane.agent.daemon import web_conf
from shiplane.agent.paths import Layout

RID = "20261125T101500Z-1a2b3c4d"
DIGEST = "ab" * 32
WEB = {"kind": "wsgi", "target": "demo:app", "workers": 2}


def _dist(site: Path, name: str, files: list[str]) -> None:
    info = site / f"{name}.dist-info"
    info.mkdir(parents=True)
    (info / "RECORD").write_text(
        "".join(f"{f},sha256=x,1\n" for f in [*files, f"{info.name}/RECORD"])
    )


def test_a_new_venv_preloads_the_top_level_modules_of_the_apps_own_requirements(
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    meta = release / "lib" / "demo-1.0.dist-info" / "METADATA"
    meta.parent.mkdir(parents=True)
    meta.write_text(
        "Name: demo\nRequires-Dist: Flask>=3.0\nRequires-Dist: SQLAlchemy[asyncio]; "
        "python_version >= '3.8'\nRequires-Dist: pytest>=8; extra == 'test'\n"
    )
    site = tmp_path / "site"
    _dist(site, "flask-3.1.3", ["flask/__init__.py", "flask/app.py", "../../../bin/flask"])
    _dist(site, "sqlalchemy-2.1.9", ["sqlalchemy/__init__.py"])
    _dist(site, "typing_extensions-4.16.0", ["typing_extensions.py"])  # not asked for by the app
    _dist(site, "pytest-8.0.0", ["pytest/__init__.py", "py.py"])  # only an extra
    assert sorted(preboot.required_modules(str(release), [str(site)])) == ["flask", "sqlalchemy"]


def test_a_dependency_change_preloads_what_another_venvs_server_imported(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    older, newer = run / "preload-aaaaaaaaaaaaaaaa.txt", run / "preload-bbbbbbbbbbbbbbbb.txt"
    older.write_text("old\n")
    newer.write_text("flask\nflask.app\n")
    os.utime(older, (1, 1))
    mine = run / "preload-cccccccccccccccc.txt"
    assert preboot.preload_names(str(mine), str(tmp_path / "release")) == ["flask", "flask.app"]
    mine.write_text("werkzeug\n")
    assert preboot.preload_names(str(mine), str(tmp_path / "release")) == ["werkzeug"]


def test_the_server_runs_through_preboot_unless_it_is_turned_off(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    release = layout.release(RID)
    release.mkdir(parents=True)
    (release / "release.json").write_text(
        json.dumps({"release_id": RID, "dependency_digest": DIGEST})
    )
    python = layout.venv(DIGEST) / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch()
    on = web_conf(layout, RID, WEB)
    assert f"command = {python} " in on and "preboot.py" in on and '"preboot": true' in on
    off = web_conf(layout, RID, {**WEB, "preboot": False})
    assert "preboot.py" not in off and " exec-env " in off
