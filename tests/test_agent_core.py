"""The host agent's core, driven through real agent sessions (bootstrap + zipapp + JSON lines)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from deployhelp import wait_for
from shiplane import agent_bundle
from shiplane.agent import ledger
from shiplane.agent.paths import Layout
from shiplane.agent_bundle import BOOTSTRAP, agent_zip, bootstrap_argv

APP_DIGEST = "ab12cd34" + "0" * 56


# --- helpers ------------------------------------------------------------------------------------


class Reply:
    def __init__(self, final: dict[str, Any], events: list[dict[str, Any]]) -> None:
        self.ok: bool = final["ok"]
        self.result: dict[str, Any] = final.get("result") or {}
        self.error: dict[str, Any] = final.get("error") or {}
        self.events = events


class AgentClient:
    """Speaks the agent protocol to a real bootstrap subprocess."""

    def __init__(
        self, root: Path, env: dict[str, str] | None = None, python: str = sys.executable
    ) -> None:
        data, sha = agent_zip()
        self.proc = subprocess.Popen(
            bootstrap_argv(python, str(root), sha),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdin and self.proc.stdout
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        first = self.stdout.readline()
        self.needed = first == b"NEED\n"
        if self.needed:
            self.stdin.write(b"%d\n" % len(data) + data)
            self.stdin.flush()
            first = self.stdout.readline()
        self.hello = json.loads(first)["hello"]
        self.next_id = 0

    def request(self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"") -> Reply:
        self.next_id += 1
        line = json.dumps({"id": self.next_id, "op": op, "args": args or {}}).encode() + b"\n"
        self.stdin.write(line + payload)
        self.stdin.flush()
        events = []
        while True:
            raw = self.stdout.readline()
            assert raw, f"agent ended the session during {op}"
            msg = json.loads(raw)
            assert msg["id"] == self.next_id
            if "event" in msg:
                events.append(msg["event"])
            else:
                return Reply(msg, events)

    def send_blobs(self, blobs: list[bytes]) -> Reply:
        listing = [{"sha256": sha(b), "size": len(b)} for b in blobs]
        return self.request("receive", {"blobs": listing}, b"".join(blobs))

    def close(self) -> int:
        self.stdin.close()
        return self.proc.wait(timeout=30)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(
    name: str, version: str, files: dict[str, str], extra_members: dict[str, str] | None = None
) -> bytes:
    """A minimal valid wheel (what `uv build` makes for a pure-python package)."""
    dist_info = f"{name}-{version}.dist-info"
    members = dict(files)
    members[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    members[f"{dist_info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    members.update(extra_members or {})
    record = "".join(f"{path},,\n" for path in members) + f"{dist_info}/RECORD,,\n"
    members[f"{dist_info}/RECORD"] = record
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path, text in members.items():
            zf.writestr(path, text)
    return buf.getvalue()


def release_id(n: int) -> str:
    return f"2026010{n}T000000Z-{APP_DIGEST[:8]}"


def tree_manifest(
    files: dict[str, bytes], deps: list[tuple[str, bytes]] | None = None
) -> dict[str, Any]:
    deps = deps or []
    dep_entries = [{"path": p, "sha256": sha(b), "size": len(b)} for p, b in deps]
    digest = (
        sha("".join(f"{d['path']} {d['sha256']}\n" for d in dep_entries).encode()) if deps else None
    )
    return {
        "schema": 1,
        "app": {"name": "demo", "version": "1", "source": "tree"},
        "app_files": [
            {"path": p, "sha256": sha(b), "size": len(b), "kind": "file"} for p, b in files.items()
        ],
        "dependencies": dep_entries,
        "dependency_digest": digest,
        "git_commit": "abc123",
    }


def install_tree(
    client: AgentClient, n: int, files: dict[str, bytes] | None = None, **args: Any
) -> Reply:
    """Send a small tree app (no dependencies, so no venv) and install it as release n."""
    files = files or {"app.py": b"print('hi')\n"}
    assert client.send_blobs(list(files.values())).ok
    return client.request(
        "install",
        {"release_id": release_id(n), "manifest": tree_manifest(files), "stage": "test", **args},
    )


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "deploy"


@pytest.fixture
def client(root: Path) -> Any:
    c = AgentClient(root)
    yield c
    c.close()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, bytes]]:
    """A hand-made app wheel and a real dependency wheel from PyPI."""
    dl = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(dl),
            "itsdangerous==2.2.0",
        ],
        check=True,
    )
    dep = dl / "itsdangerous-2.2.0-py3-none-any.whl"
    app = make_wheel("myapp", "0.1.0", {"myapp/__init__.py": "GREETING = 'hello from myapp'\n"})
    return {"app": ("myapp-0.1.0-py3-none-any.whl", app), "dep": (dep.name, dep.read_bytes())}


def package_manifest(wheels: dict[str, tuple[str, bytes]]) -> dict[str, Any]:
    app_name, app = wheels["app"]
    dep_name, dep = wheels["dep"]
    manifest = tree_manifest({}, [(dep_name, dep)])
    manifest["app"]["source"] = "package"
    manifest["app_files"] = [
        {"path": app_name, "sha256": sha(app), "size": len(app), "kind": "wheel"},
        {"path": "alembic.ini", "sha256": sha(b"[alembic]\n"), "size": 10, "kind": "file"},
    ]
    return manifest


# --- bootstrap ----------------------------------------------------------------------------------


def test_bootstrap_sends_the_agent_once(root: Path) -> None:
    first = AgentClient(root)
    assert first.needed
    assert first.hello["root"] == str(root)
    assert first.hello["python_version"] == "{}.{}".format(*sys.version_info[:2])
    first.close()
    _, agent_sha = agent_zip()
    shipped = root / ".shiplane" / f"agent-{agent_sha}"
    # unpacked and byte-compiled by the host's Python, so agent processes do not compile it
    assert list(shipped.glob("shiplane_agent/__pycache__/releases.*.pyc"))
    assert [p.name for p in (root / ".shiplane").iterdir()] == [shipped.name]
    second = AgentClient(root)
    assert not second.needed
    assert second.request("inventory").ok
    second.close()


def test_bootstrap_refuses_a_corrupted_agent(root: Path) -> None:
    data, agent_sha = agent_zip()
    proc = subprocess.run(
        [sys.executable, "-c", BOOTSTRAP, str(root), agent_sha],
        check=False,
        input=b"%d\n" % len(data) + data[:-1] + b"X",
        capture_output=True,
    )
    assert proc.stdout == b"NEED\n"
    assert proc.returncode == 3
    assert b"sha256 mismatch" in proc.stderr
    assert list((root / ".shiplane").iterdir()) == []


def test_bootstrap_can_be_single_quoted_for_a_remote_shell() -> None:
    assert "'" not in BOOTSTRAP
    compile(BOOTSTRAP, "<bootstrap>", "exec")


def test_agent_zip_is_deterministic_and_made_once_for_every_thread() -> None:
    first = agent_zip()
    agent_bundle._agent_zip.cache_clear()
    assert agent_zip() == first
    agent_bundle._agent_zip.cache_clear()
    with ThreadPoolExecutor(max_workers=8) as pool:  # every host's session asks at once
        made = list(pool.map(lambda _: agent_zip(), range(8)))
    assert all(m is made[0] for m in made) and made[0] == first
    assert agent_bundle._agent_zip.cache_info().misses == 1
    names = zipfile.ZipFile(io.BytesIO(first[0])).namelist()
    assert names == sorted(names)
    assert "__main__.py" in names and "shiplane_agent/server.py" in names


# --- receive ------------------------------------------------------------------------------------


def test_receive_keeps_good_blobs_rejects_a_tampered_one_and_stays_in_sync(
    client: AgentClient, root: Path
) -> None:
    good1, good2, claimed = b"first blob\n" * 1000, b"second", b"what the controller meant"
    tampered = b"what arrived instead!!!!"[: len(claimed)].ljust(len(claimed), b"!")
    listing = [
        {"sha256": sha(good1), "size": len(good1)},
        {"sha256": sha(claimed), "size": len(claimed)},
        {"sha256": sha(good2), "size": len(good2)},
    ]
    reply = client.request("receive", {"blobs": listing}, good1 + tampered + good2)
    assert not reply.ok
    assert reply.error["kind"] == "integrity"
    assert sha(claimed) in reply.error["message"]
    assert any(e.get("bytes") == len(good1 + tampered + good2) for e in reply.events)
    assert (root / "store" / sha(good1)).read_bytes() == good1
    assert (root / "store" / sha(good2)).read_bytes() == good2
    assert sorted(p.name for p in (root / "store").iterdir()) == sorted([sha(good1), sha(good2)])
    # The session read every byte: the next request works and sees what is missing.
    inv = client.request("inventory", {"blobs": [sha(good1), sha(claimed)]})
    assert inv.ok and inv.result["missing"] == [sha(claimed)]


def test_receive_refuses_a_path_as_sha(client: AgentClient, root: Path) -> None:
    data = b"evil"
    reply = client.request("receive", {"blobs": [{"sha256": "../../evil", "size": 4}]}, data)
    assert not reply.ok and reply.error["kind"] == "integrity"
    assert not (root.parent / "evil").exists()
    assert client.request("inventory").ok


def test_unexpected_errors_are_reported_and_the_session_survives(client: AgentClient) -> None:
    # the manifest's inside is the install's to read: a wrong shape there is a bug, reported whole
    reply = client.request(
        "install", {"release_id": "20260101T000000Z-abcdef12", "manifest": {"app": 5}}
    )
    assert not reply.ok and reply.error["kind"] == "internal"
    assert "Traceback" in reply.error["detail"]
    assert client.request("releases").ok


def test_requests_outside_the_protocol_are_refused_naming_the_field(client: AgentClient) -> None:
    reply = client.request("prune", {"keep": "many"})
    assert not reply.ok and reply.error["kind"] == "protocol"
    assert "prune: field keep must be integer, found str" in reply.error["message"]
    misspelt = client.request("hook", {"release_id": "20260101T000000Z-abcdef12", "comand": "true"})
    assert not misspelt.ok and "unknown field(s) comand" in misspelt.error["message"]
    missing = client.request("switch", {"release_id": "20260101T000000Z-abcdef12"})
    assert not missing.ok and "field services is required" in missing.error["message"]
    assert client.request("releases").ok


# --- install ------------------------------------------------------------------------------------


def test_install_tree_release_with_rendered_files_env_and_shared_links(
    client: AgentClient, root: Path
) -> None:
    files = {"manage.py": b"print('manage')\n", "mysite/settings.py": b"X = 1\n", "logs/.keep": b""}
    reply = install_tree(
        client,
        1,
        files,
        rendered=[
            {"path": "config/app.ini", "content": "[app]\nsecret = s3cret\n", "mode": "0600"},
            {"path": "config/public.ini", "content": "[app]\n", "mode": 0o644},
            {
                "path": "instance/local.cfg",
                "content": "DEBUG = False\n",
                "mode": "0600",
                "shared": True,
            },
        ],
        env={"SECRET_KEY": 'a b "c"', "DATABASE_URL": "sqlite:///x.db"},
        shared={"dirs": ["logs", "public/uploads"], "files": ["db.sqlite3"]},
        hooks=['echo "$SECRET_KEY" > hook-saw.txt; pwd >> hook-saw.txt'],
    )
    assert reply.ok, reply.error
    rel = root / "releases" / release_id(1)
    assert (rel / "manage.py").read_bytes() == files["manage.py"]
    assert (rel / "mysite/settings.py").read_bytes() == files["mysite/settings.py"]
    assert (rel / "config/app.ini").stat().st_mode & 0o777 == 0o600
    assert (rel / "config/public.ini").stat().st_mode & 0o777 == 0o644
    assert (rel / "shiplane.env").stat().st_mode & 0o777 == 0o600
    assert 'SECRET_KEY="a b \\"c\\""' in (rel / "shiplane.env").read_text()
    # Shared dirs/files are relative links into shared/; the artifact's logs/ yielded to them.
    assert os.readlink(rel / "logs") == "../../shared/logs"
    assert os.readlink(rel / "public/uploads") == "../../../shared/public/uploads"
    assert (root / "shared/public/uploads").is_dir()
    assert os.readlink(rel / "db.sqlite3") == "../../shared/db.sqlite3"
    assert not (root / "shared/db.sqlite3").exists()  # left for the app to create
    shared_cfg = root / "shared/instance/local.cfg"
    assert shared_cfg.stat().st_mode & 0o777 == 0o600
    assert (rel / "instance/local.cfg").read_text() == "DEBUG = False\n"
    # The after_install hook ran in the release dir with the env file loaded.
    assert (rel / "hook-saw.txt").read_text().splitlines() == ['a b "c"', str(rel)]
    meta = json.loads((rel / "release.json").read_text())
    assert meta["state"] == "prepared" and meta["stage"] == "test"
    assert meta["git_commit"] == "abc123" and meta["source"] == "tree"
    assert not (root / "current").exists()
    assert [p.name for p in (root / "releases").iterdir()] == [release_id(1)]
    # The same install again is recognised as done.
    again = install_tree(client, 1, files)
    assert again.ok and again.result["reused"]


@pytest.mark.slow
def test_install_package_release_builds_and_then_reuses_the_venv(
    client: AgentClient, root: Path, wheels: dict[str, tuple[str, bytes]]
) -> None:
    manifest = package_manifest(wheels)
    assert client.send_blobs([wheels["app"][1], wheels["dep"][1], b"[alembic]\n"]).ok
    first = client.request(
        "install",
        {
            "release_id": release_id(1),
            "manifest": manifest,
            "stage": "test",
            "env": {"GREETING_SUFFIX": "!"},
        },
    )
    assert first.ok, first.error
    assert first.result["venv_reused"] is False
    rel = root / "releases" / release_id(1)
    assert (rel / "lib/myapp/__init__.py").is_file()
    assert (rel / "alembic.ini").read_text() == "[alembic]\n"
    assert (root / "venvs" / manifest["dependency_digest"] / ".complete").is_file()
    # Hooks see the venv first on PATH, the app on PYTHONPATH and the env file.
    hook = client.request(
        "hook",
        {
            "release_id": release_id(1),
            "timeout": 60,
            "command": "python -c 'import itsdangerous, myapp, os; "
            "print(itsdangerous.__file__); "
            'print(myapp.GREETING + os.environ["GREETING_SUFFIX"])\'',
        },
    )
    assert hook.ok, hook.error
    venv = str(root / "venvs" / manifest["dependency_digest"])
    assert hook.result["output"].splitlines()[0].startswith(venv)
    assert "hello from myapp!" in [e.get("detail") for e in hook.events]
    # exec-env (what supervisord programs run) gives the same environment.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shiplane.agent",
            "exec-env",
            str(root),
            release_id(1),
            "--",
            "python",
            "-c",
            "import myapp, os; print(myapp.GREETING, os.getcwd())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"hello from myapp {rel}"
    # A new release with the same dependencies reuses the venv.
    started = time.monotonic()
    second = client.request(
        "install", {"release_id": release_id(2), "manifest": manifest, "stage": "test"}
    )
    assert second.ok and second.result["venv_reused"] is True
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_a_venv_made_while_the_blobs_arrive_is_the_one_the_install_fills(
    client: AgentClient, root: Path, wheels: dict[str, tuple[str, bytes]]
) -> None:
    assert client.hello["uv"], "uv is a test dependency"  # only uv makes the venv early
    manifest = package_manifest(wheels)
    digest = manifest["dependency_digest"]
    hinted = client.request(
        "inventory", {"blobs": [], "venv": {"digest": digest, "python": sys.executable}}
    )
    assert hinted.ok
    venv = root / "venvs" / digest
    python = wait_for(
        lambda: (venv / "bin" / "python").exists() and (venv / ".shell").exists(),
        30,
        "the empty venv",
    )
    made = (venv / "pyvenv.cfg").stat().st_ino
    assert client.send_blobs([wheels["app"][1], wheels["dep"][1], b"[alembic]\n"]).ok
    done = client.request(
        "install", {"release_id": release_id(1), "manifest": manifest, "stage": "test"}
    )
    assert done.ok, done.error
    assert python and (venv / "pyvenv.cfg").stat().st_ino == made  # filled, not made again
    assert not any(e.get("status") == "cleanup" for e in done.events)
    run = subprocess.run([str(venv / "bin" / "python"), "-c", "import itsdangerous"], check=False)
    assert run.returncode == 0 and (venv / ".complete").is_file()


@pytest.mark.slow
def test_install_with_pip_when_uv_is_absent(
    root: Path, wheels: dict[str, tuple[str, bytes]]
) -> None:
    client = AgentClient(root, env={**os.environ, "SHIPLANE_INSTALLER": "pip"})
    try:
        assert client.hello["uv"] is None
        manifest = package_manifest(wheels)
        assert client.send_blobs([wheels["app"][1], wheels["dep"][1], b"[alembic]\n"]).ok
        reply = client.request("install", {"release_id": release_id(1), "manifest": manifest})
        assert reply.ok, reply.error
        venv_python = root / "venvs" / manifest["dependency_digest"] / "bin/python"
        subprocess.run([str(venv_python), "-c", "import itsdangerous"], check=True)
    finally:
        client.close()


@pytest.mark.slow
def test_a_gzipped_uv_is_unpacked_checked_and_run(client: AgentClient, root: Path) -> None:
    """The controller ships its uv gzipped (about half the bytes); the host unpacks it and runs
    only the exact binary the controller named."""
    import gzip

    fake_uv = b"#!/bin/sh\necho 'uv 0.0.0 (fake)'\n"
    packed = gzip.compress(fake_uv, mtime=0)
    assert client.send_blobs([packed]).ok
    wrong = client.request("install_uv", {"sha256": sha(packed), "binary_sha256": sha(b"other")})
    assert not wrong.ok and wrong.error["kind"] == "install"
    assert not list((root / "tools").glob("uv-*/uv"))
    done = client.request("install_uv", {"sha256": sha(packed), "binary_sha256": sha(fake_uv)})
    assert done.ok, done.error
    binary = Path(done.result["path"])
    assert binary.read_bytes() == fake_uv and os.access(binary, os.X_OK)


@pytest.mark.slow
def test_a_shipped_uv_named_at_inventory_is_unpacked_as_soon_as_its_blob_is_stored(
    client: AgentClient, root: Path
) -> None:
    """inventory's uv hint: the host unpacks uv while the deploy's other blobs still arrive, and
    install_uv answers with that work; a wrong binary is still refused."""
    import gzip

    fake_uv = b"#!/bin/sh\necho 'uv 0.0.0 (fake)'\n"
    packed = gzip.compress(fake_uv, mtime=0)
    hint = {"sha256": sha(packed), "binary_sha256": sha(fake_uv)}
    assert client.request("inventory", {"blobs": [sha(packed)], "uv": hint}).ok
    assert client.send_blobs([packed]).ok
    binary = wait_for(
        lambda: next(iter((root / "tools").glob("uv-*/uv")), None),
        30,
        "uv unpacked before install_uv is asked",
    )
    done = client.request("install_uv", hint)
    assert done.ok, done.error
    assert Path(done.result["path"]) == binary and binary.read_bytes() == fake_uv

    other = gzip.compress(b"#!/bin/sh\nexit 0\n", mtime=0)
    wrong = {"sha256": sha(other), "binary_sha256": sha(b"not what is inside")}
    assert client.request("inventory", {"blobs": [sha(other)], "uv": wrong}).ok
    assert client.send_blobs([other]).ok
    refused = client.request("install_uv", wrong)
    assert not refused.ok and refused.error["kind"] == "install"


def test_a_broken_dependency_fails_the_install_with_the_installers_words(
    client: AgentClient, root: Path
) -> None:
    garbage = b"this is not a zip file"
    manifest = tree_manifest({"app.py": b"x\n"}, [("broken-1.0-py3-none-any.whl", garbage)])
    assert client.send_blobs([garbage, b"x\n"]).ok
    reply = client.request("install", {"release_id": release_id(1), "manifest": manifest})
    assert not reply.ok and reply.error["kind"] == "install"
    assert "broken" in reply.error["output_tail"]
    assert list((root / "releases").iterdir()) == []
    assert list((root / "venvs").iterdir()) == []


# --- the dependencies' bytecode, compiled by the controller -------------------------------------


def pyc_flags(venv: Path, module: str) -> int:
    """PEP 552 flags of a module's pyc in the venv: 0 timestamp-based, 3 checked hash."""
    (pyc,) = venv.glob(f"lib/python3.*/site-packages/{module}/__pycache__/__init__.*.pyc")
    return int.from_bytes(pyc.read_bytes()[4:8], "little")


def bundled_manifest(wheels: dict[str, tuple[str, bytes]], bundle: bytes) -> dict[str, Any]:
    manifest = package_manifest(wheels)
    manifest["dependencies"].append(
        {
            "path": "bytecode-cpython-311.zip",
            "sha256": sha(bundle),
            "size": len(bundle),
            "kind": "bytecode",
        }
    )
    return manifest


def controller_bundle(
    wheels: dict[str, tuple[str, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> bytes:
    """The bytecode bundle `shiplane build` makes for the dependency wheel."""
    from shiplane.artifact._bytecode import bytecode_bundle

    monkeypatch.setenv("SHIPLANE_CACHE_DIR", str(tmp_path / "cache"))
    name, data = wheels["dep"]
    (tmp_path / name).write_bytes(data)
    return bytecode_bundle([(tmp_path / name, sha(data))], lambda step, detail: None).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_the_controllers_bytecode_is_placed_in_the_venv_instead_of_compiling_there(
    root: Path,
    tmp_path: Path,
    wheels: dict[str, tuple[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
    installer: str,
) -> None:
    bundle = controller_bundle(wheels, tmp_path, monkeypatch)
    env = {**os.environ, "SHIPLANE_INSTALLER": installer}
    client = AgentClient(root, env=env)
    try:
        manifest = bundled_manifest(wheels, bundle)
        assert client.send_blobs([wheels["app"][1], wheels["dep"][1], b"[alembic]\n", bundle]).ok
        reply = client.request("install", {"release_id": release_id(1), "manifest": manifest})
        assert reply.ok, reply.error
    finally:
        client.close()
    venv = root / "venvs" / manifest["dependency_digest"]
    assert pyc_flags(venv, "itsdangerous") == 3  # the shipped, hash-checked pyc
    out = subprocess.run(
        [str(venv / "bin/python"), "-c", "import itsdangerous; print(itsdangerous.Signer)"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.defpath},
    )
    assert "itsdangerous.signer.Signer" in out.stdout


@pytest.mark.slow
def test_bytecode_for_another_python_or_not_matching_the_source_never_runs(
    client: AgentClient, root: Path, wheels: dict[str, tuple[str, bytes]]
) -> None:
    """A pyc that does not belong to the installed source (hash mismatch) is recompiled by
    Python; a bundle for another Python version is ignored and the host compiles; entries
    outside site-packages' __pycache__ dirs are never written."""
    import importlib.util
    import marshal

    lying = compile("Signer = 'from a stale pyc'\n", "itsdangerous/__init__.py", "exec")
    pyc = (
        importlib.util.MAGIC_NUMBER
        + (3).to_bytes(4, "little")
        + importlib.util.source_hash(b"not the installed source")
        + marshal.dumps(lying)
    )
    tag = sys.implementation.cache_tag
    py = f"{sys.version_info.major}.{sys.version_info.minor}"

    def bundle(python_version: str, cache_tag: str) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(
                "SHIPLANE-BYTECODE.json",
                json.dumps(
                    {
                        "magic": importlib.util.MAGIC_NUMBER.hex(),
                        "cache_tag": cache_tag,
                        "python_version": python_version,
                    }
                ),
            )
            zf.writestr(f"itsdangerous/__pycache__/__init__.{cache_tag}.pyc", pyc)
            zf.writestr(f"../../../escaped/__pycache__/x.{cache_tag}.pyc", pyc)
        return buf.getvalue()

    stale, foreign = bundle(py, tag), bundle("2.7", "cpython-27")
    for n, blob in ((1, stale), (2, foreign)):
        manifest = bundled_manifest(wheels, blob)
        manifest["dependency_digest"] = f"{n}" * 64  # one venv per case
        assert client.send_blobs([wheels["app"][1], wheels["dep"][1], b"[alembic]\n", blob]).ok
        reply = client.request("install", {"release_id": release_id(n), "manifest": manifest})
        assert reply.ok, reply.error
        venv = root / "venvs" / manifest["dependency_digest"]
        out = subprocess.run(
            [str(venv / "bin/python"), "-c", "import itsdangerous; print(itsdangerous.Signer)"],
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": os.defpath},
        )
        assert "stale" not in out.stdout and "itsdangerous.signer.Signer" in out.stdout
    assert pyc_flags(root / "venvs" / ("2" * 64), "itsdangerous") == 0  # compiled on the host
    assert not list(root.parent.rglob("escaped"))


def test_install_refuses_path_traversal_and_writes_nothing_outside(
    client: AgentClient, root: Path, tmp_path: Path
) -> None:
    before = files_under(tmp_path)
    bad_render = install_tree(client, 1, rendered=[{"path": "../evil", "content": "x"}])
    assert not bad_render.ok and bad_render.error["kind"] == "usage"
    bad_file = install_tree(client, 2, {"../../evil.py": b"x"})
    assert not bad_file.ok and bad_file.error["kind"] == "usage"
    bad_shared = install_tree(client, 3, shared={"dirs": ["../../outside"]})
    assert not bad_shared.ok
    evil_wheel = make_wheel(
        "evil", "1.0", {"evil/__init__.py": ""}, {"../../../evil_member.py": "import os\n"}
    )
    assert client.send_blobs([evil_wheel]).ok
    manifest = tree_manifest({})
    manifest["app"]["source"] = "package"
    manifest["app_files"] = [
        {
            "path": "evil-1.0-py3-none-any.whl",
            "sha256": sha(evil_wheel),
            "size": len(evil_wheel),
            "kind": "wheel",
        }
    ]
    bad_wheel = client.request("install", {"release_id": release_id(4), "manifest": manifest})
    assert not bad_wheel.ok and "evil_member" in bad_wheel.error["message"]
    outside = {p for p in files_under(tmp_path) - before if not p.startswith("deploy")}
    assert outside == set()
    assert list((root / "releases").iterdir()) == []


def test_failing_after_install_hook_leaves_no_release(client: AgentClient, root: Path) -> None:
    assert install_tree(client, 1).ok
    (root / "current").symlink_to(f"releases/{release_id(1)}")
    reply = install_tree(
        client, 2, {"app.py": b"v2\n"}, hooks=["echo migrating; echo 'boom: no table' >&2; exit 3"]
    )
    assert not reply.ok
    assert reply.error["kind"] == "hook" and reply.error["exit_code"] == 3
    assert "boom: no table" in reply.error["output_tail"]
    assert [p.name for p in (root / "releases").iterdir()] == [release_id(1)]
    assert os.readlink(root / "current") == f"releases/{release_id(1)}"


def test_hook_timeout_kills_the_whole_process_group(client: AgentClient, root: Path) -> None:
    assert install_tree(client, 1).ok
    started = time.monotonic()
    reply = client.request(
        "hook",
        {
            "release_id": release_id(1),
            "timeout": 1,
            "command": "sleep 300 & echo $! > bg.pid; echo started; wait",
        },
    )
    assert not reply.ok and reply.error["kind"] == "timeout"
    assert time.monotonic() - started < 10
    assert "started" in [e.get("detail") for e in reply.events]
    bg_pid = int((root / "releases" / release_id(1) / "bg.pid").read_text())

    def gone() -> bool:
        try:
            os.kill(bg_pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{bg_pid}/stat").read_text().split()[2] == "Z"

    wait_for(gone, 10, "the process to be gone")


# --- lock ---------------------------------------------------------------------------------------


def holder(pid: int, host: str = "laptop") -> dict[str, Any]:
    return {
        "user": "alice",
        "host": host,
        "pid": pid,
        "command": "shiplane deploy prod",
        "started_at": "2026-01-01T10:00:00Z",
    }


def test_lock_is_exclusive_names_its_holder_and_can_be_forced(root: Path) -> None:
    first, second = AgentClient(root), AgentClient(root)
    try:
        assert first.request("lock", {"holder": holder(111)}).ok
        refused = second.request("lock", {"holder": holder(222, "ci")})
        assert not refused.ok and refused.error["kind"] == "lock"
        assert "alice@laptop (pid 111, `shiplane deploy prod`)" in refused.error["message"]
        assert refused.error["stale"] is False
        assert not second.request("unlock", {}).ok  # not its lock
        assert second.request("unlock", {"force": True}).result["released"] is True
        assert second.request("lock", {"holder": holder(222, "ci")}).ok
        assert first.request("heartbeat").error["kind"] == "lock"  # lost it to the forced unlock
    finally:
        first.close()
        second.close()


def test_stale_lock_is_reported_as_stale(client: AgentClient, root: Path) -> None:
    crashed = {
        **holder(333),
        "acquired_at": "2026-01-01T10:00:00Z",
        "heartbeat": "2026-01-01T10:00:00Z",
    }
    (root / ".lock").write_text(json.dumps(crashed))
    reply = client.request("lock", {"holder": holder(444)})
    assert not reply.ok and reply.error["stale"] is True
    assert "stale" in reply.error["message"]
    assert client.request("inventory").result["lock"]["stale"] is True


def test_lock_wait_takes_the_lock_once_it_is_released(root: Path) -> None:
    first, second = AgentClient(root), AgentClient(root)
    try:
        assert first.request("lock", {"holder": holder(111)}).ok
        line = json.dumps({"id": 99, "op": "lock", "args": {"holder": holder(222), "wait": 20}})
        second.stdin.write(line.encode() + b"\n")
        second.stdin.flush()
        waiting = json.loads(second.stdout.readline())
        assert waiting["event"]["status"] == "waiting"
        assert first.request("unlock").result["released"]
        done = json.loads(second.stdout.readline())
        assert done["ok"] and done["result"]["pid"] == 222
    finally:
        first.close()
        second.close()


def test_sigterm_releases_the_sessions_lock(root: Path) -> None:
    client = AgentClient(root)
    assert client.request("lock", {"holder": holder(111)}).ok
    assert (root / ".lock").exists()
    client.proc.send_signal(signal.SIGTERM)
    assert client.proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert not (root / ".lock").exists()


# --- ledger -------------------------------------------------------------------------------------


def test_ledger_round_trip_survives_a_torn_line(client: AgentClient, root: Path) -> None:
    assert client.request(
        "record", {"entry": {"release_id": "r1", "outcome": "ok", "setup": True}}
    ).ok
    with open(root / "history.jsonl", "a") as f:
        f.write('{"release_id": "torn", "outc')  # a crash mid-append
    history = client.request("history", {"limit": 10}).result["entries"]
    assert [e["release_id"] for e in history] == ["r1"]
    assert client.request("record", {"entry": {"release_id": "r2", "outcome": "failed"}}).ok
    entries = ledger.read(Layout(root))
    assert [e["release_id"] for e in entries] == ["r1", "r2"]
    assert ledger.read(Layout(root), limit=1)[0]["release_id"] == "r2"
    assert client.request("inventory").result["setup_done"] is True


def test_setup_not_done_until_a_successful_setup(root: Path) -> None:
    layout = Layout(root)
    assert not ledger.setup_done(layout)
    ledger.append(layout, {"setup": True, "outcome": "failed"})
    assert not ledger.setup_done(layout)
    ledger.append(layout, {"setup": True, "outcome": "ok"})
    assert ledger.setup_done(layout)


# --- releases: states, previous, prune ----------------------------------------------------------


def test_prune_never_removes_live_previous_or_newest_good(client: AgentClient, root: Path) -> None:
    for n in range(1, 7):
        assert install_tree(client, n, {"app.py": f"v{n}\n".encode()}).ok
    # History: 2 went live (good afterwards), then 3, then 4 was live and 5 is live now; 6 is new.
    for n in (2, 3, 4, 5):
        assert client.request("mark", {"release_id": release_id(n), "state": "live"}).ok
    (root / "current").symlink_to(f"releases/{release_id(5)}")
    assert client.request("mark", {"release_id": release_id(1), "state": "bad"}).ok
    listing = client.request("releases").result
    states = {m["release_id"]: m["state"] for m in listing["releases"]}
    assert states[release_id(4)] == "previous" and states[release_id(3)] == "good"
    assert listing["current"] == release_id(5) and listing["previous"] == release_id(4)
    reply = client.request("prune", {"keep": 1})
    assert reply.ok
    # keep=1 still keeps two: the live one and the previous one (the newest known-good)
    assert reply.result["removed"] == [release_id(n) for n in (1, 2, 3, 6)]
    left = sorted(p.name for p in (root / "releases").iterdir())
    assert left == [release_id(n) for n in (4, 5)]
    # the store keeps exactly the blobs the remaining releases list: a host's disk stays bounded
    kept = {
        sha
        for n in (4, 5)
        for sha in json.loads((root / "releases" / release_id(n) / "release.json").read_text())[
            "blobs"
        ]
    }
    assert {p.name for p in (root / "store").iterdir() if len(p.name) == 64} == kept
    assert reply.result["blobs_removed"] >= 4


def test_prune_empties_uvs_cache_once_a_venv_goes(client: AgentClient, root: Path) -> None:
    assert install_tree(client, 1, {"app.py": b"v1\n"}).ok
    cached = root / ".cache" / "uv" / "wheels-v5" / "flask.whl"  # what uv unpacked here so far
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"unpacked")
    assert client.request("prune", {"keep": 5}).result["venvs_removed"] == []
    assert cached.exists()  # no venv went: the cache stays warm for the next install
    old = root / "venvs" / ("ab" * 32)  # a dependency set no release uses any more
    old.mkdir(parents=True)
    (old / ".complete").write_text("flask.whl\n")
    reply = client.request("prune", {"keep": 5})
    assert reply.result["venvs_removed"] == ["ab" * 32] and not old.exists()
    # uv's cache would otherwise keep every dependency set's wheels, growing with each change
    assert not (root / ".cache" / "uv").exists()


@pytest.mark.slow
def test_a_log_follower_whose_controller_is_gone_ends(root: Path) -> None:
    client = AgentClient(root)
    (root / "log").mkdir(parents=True)
    (root / "log" / "web.log").write_text("one line\n")
    request = {"id": 1, "op": "logs", "args": {"service": "web", "lines": 1, "follow": True}}
    client.stdin.write(json.dumps(request).encode() + b"\n")
    client.stdin.flush()
    assert b"one line" in client.stdout.readline()  # following, the log quiet from now on
    # the controller dies (a kill -9, a dropped connection): nobody reads what the agent writes
    client.stdout.close()
    client.stdin.close()
    wait_for(lambda: client.proc.poll() is not None, 20, "the orphaned follower to exit")


def test_prune_removes_agent_versions_that_nothing_runs(client: AgentClient, root: Path) -> None:
    agents = root / ".shiplane"
    running = sorted(p.name for p in agents.iterdir())  # this session's version
    unused = agents / ("agent-" + "0" * 64)  # an earlier shiplane's, nothing uses it any more
    (unused / "shiplane_agent").mkdir(parents=True)
    old_zip = agents / ("agent-" + "2" * 64 + ".pyz")  # older still: agents shipped as zipapps
    old_zip.write_bytes(b"PK")
    configured = agents / ("agent-" + "1" * 64)  # a supervised program is started through it
    configured.mkdir()
    (root / "run" / "programs").mkdir(parents=True)
    (root / "run" / "programs" / "worker.conf").write_text(
        f"command = python3 -S {configured} exec-env x\n"
    )
    busy = agents / ("agent-" + "3" * 64)  # a process still runs from it (a detached after-switch)
    busy.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", str(busy)], stdin=subprocess.PIPE
    )
    try:
        reply = client.request("prune", {"keep": 5})
    finally:
        proc.communicate(timeout=30)
    assert reply.ok
    assert sorted(reply.result["agents_removed"]) == sorted([unused.name, old_zip.name])
    assert sorted(p.name for p in agents.iterdir()) == sorted(
        [*running, configured.name, busy.name]
    )


def test_previous_comes_from_the_ledger_when_recorded(client: AgentClient, root: Path) -> None:
    for n in (1, 2, 3):
        assert install_tree(client, n, {"app.py": f"v{n}\n".encode()}).ok
    (root / "current").symlink_to(f"releases/{release_id(3)}")
    assert client.request(
        "record",
        {"entry": {"release_id": release_id(3), "previous": release_id(1), "outcome": "ok"}},
    ).ok
    assert client.request("inventory").result["previous"] == release_id(1)
