"""Private indexes (issue 19): a requirements file's ``--extra-index-url`` names a private
index whose token is a build secret (``[build] secrets``, here from the stage's secrets file);
pip gets it in its environment alone, and it appears nowhere: not in the deploy's output, the
artifact, the build's files and caches, nor on the host."""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

import pytest

from deployhelp import edit, scaffold
from pkgindex import make_wheel, private_index
from shiplane.artifact._index import PackageAccess
from shiplane.artifact._wheelhouse import load_lock

GREETING = "hello from the private index"


def files_holding(root: Path, value: bytes) -> list[Path]:
    """Every file under ``root`` whose bytes contain ``value`` (symlinks not followed)."""
    return [
        p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and value in p.read_bytes()
    ]


@pytest.mark.slow
def test_a_private_index_with_its_token_as_a_build_secret(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    base = tmp_path_factory.mktemp("prividx")  # short: supervisord's socket path
    wheels = base / "index"
    wheels.mkdir()
    make_wheel(wheels, "privlib", "1.0", f"GREETING = {GREETING!r}\n")
    token = secrets.token_hex(16)
    cache = base / "cache"
    env = {"SHIPLANE_CACHE_DIR": str(cache)}
    assert "PYPI_TOKEN" not in os.environ
    app = scaffold(base)
    try:
        with private_index(wheels, "shiplane", token) as index:
            where = index.url.replace("http://", "http://shiplane:${PYPI_TOKEN}@")
            lock = app.root / "requirements.txt"
            lock.write_text(f"--extra-index-url {where}\n{lock.read_text()}privlib==1.0\n")
            edit(app, "shiplane.toml", "[build]\n", '[build]\nsecrets = ["PYPI_TOKEN"]\n')
            edit(
                app,
                "src/demo/views.py",
                'f"<p>stage',
                'f"<p>{__import__(\'privlib\').GREETING}</p>\\n"\n        f"<p>stage',
            )
            # the token is a secret of the stage, in its 0600 secrets file (not the environment)
            with (app.root / ".secrets" / "local.env").open("a") as f:
                f.write(f"PYPI_TOKEN={token}\n")

            # with the test gate: its venv (uv) gets the token as the build's pip does
            done = app.shiplane("deploy", "--stage", "local", "--json", env=env)
            result = {"output": done.stdout + done.stderr}
            assert done.returncode == 0, result["output"][-3000:]
            status, body = app.get("/")
            assert status == 200 and GREETING in body
            assert set(index.served) == {"privlib-1.0-py3-none-any.whl"}  # the gate's and pip's

            clear = token.encode()
            assert token not in result["output"]
            for root in (app.root / ".shiplane", cache):
                assert files_holding(root, clear) == [], f"the token is in a file under {root}"

            # a wrong token: the index answers 401, the build names privlib, shows no token
            edit(app, "requirements.txt", "privlib==1.0", "# again\nprivlib==1.0")
            wrong = "wrong" + secrets.token_hex(8)
            done = app.shiplane("build", env={**env, "PYPI_TOKEN": wrong})
            out = done.stdout + done.stderr
            assert done.returncode == 1, out
            assert index.refused > 0
            assert "privlib" in out and wrong not in out and token not in out

            # none at all: the build stops before anything runs, naming the secret
            done = app.shiplane("build", env=env)
            assert done.returncode == 2
            assert "missing build secret: PYPI_TOKEN" in done.stdout + done.stderr
            assert re.search(r"Looked in the environment\.", done.stdout + done.stderr)
    finally:
        app.stop()


def test_a_pipfile_lock_names_its_private_index_for_pip(tmp_path: Path) -> None:
    """Pipfile.lock's sources other than PyPI become --extra-index-url lines with their
    ${NAME} kept (pip expands it from a build secret); an editable library path is a
    dependency, the app's own path is not."""
    (tmp_path / "libs" / "mylib").mkdir(parents=True)
    private = "https://deploy:${PYPI_TOKEN}@pypi.example.com/simple"
    (tmp_path / "Pipfile.lock").write_text(
        json.dumps(
            {
                "_meta": {
                    "sources": [
                        {"name": "pypi", "url": "https://pypi.org/simple", "verify_ssl": True},
                        {"name": "corp", "url": private, "verify_ssl": True},
                    ]
                },
                "default": {
                    "ourlib": {"version": "==2.4.0", "index": "corp"},
                    "mylib": {"editable": True, "path": "./libs/mylib"},
                    "app": {"editable": True, "path": "."},
                },
            }
        )
    )
    lock = load_lock(tmp_path, "")
    assert lock.lines == [
        f"--extra-index-url {private}",
        str(tmp_path.resolve() / "libs" / "mylib"),
        "ourlib==2.4.0",
    ]
    assert PackageAccess.of(lock.lines).options == (f"--extra-index-url {private}",)
    assert b"${PYPI_TOKEN}" in lock.data
