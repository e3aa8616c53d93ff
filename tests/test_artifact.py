"""`shiplane build`: the content-addressed artifact (SPEC §5) and the test gate.

Tests that run pip or uv are marked slow. They share one built package project (module
fixture); tests that change a project work on a copy of it, whose `.shiplane/build` caches come
along, so only the change itself costs a build step.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from shiplane.artifact import (
    BlobStore,
    BuildSpec,
    FileEntry,
    Manifest,
    build,
    canonical_json,
    clean,
    compile_app,
    dependency_digest,
    detect_source,
    load_manifest,
    run_gate,
)
from shiplane.artifact._wheelhouse import pinned, read_lock
from shiplane.errors import ConfigError, OperationError, UsageError

LOCK = "itsdangerous==2.2.0\n"


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def git(root: Path, *args: str) -> str:
    env_args = ["-c", "user.email=dev@example.com", "-c", "user.name=dev"]
    out = subprocess.run(
        ["git", *env_args, *args], cwd=root, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def commit_all(root: Path, message: str = "change") -> None:
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)


def make_package(root: Path) -> Path:
    write(
        root,
        "pyproject.toml",
        """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "0.1.0"
dependencies = ["itsdangerous"]
""",
    )
    write(root, "src/tinyapp/__init__.py", 'def create_app():\n    return "tiny"\n')
    write(root, "src/tinyapp/views.py", 'GREETING = "hello"\n')
    write(root, "tests/test_app.py", "def test_ok():\n    assert True\n")
    write(root, "requirements.txt", LOCK)
    write(root, "alembic.ini", "[alembic]\nscript_location = db\n")
    write(root, "db/001_init.sql", "create table t (x int);\n")
    write(root, "config/base.ini", "[app]\nname = tiny\n")
    write(root, "config/staging.ini", "[app]\ndebug = false\n")
    write(root, "config/prod.ini", "[app]\ndebug = false\n")
    write(root, ".secrets/staging.env", "SECRET_KEY=hunter2\n")
    write(root, ".gitignore", ".shiplane/\n")
    return root


def make_tree(root: Path) -> Path:
    write(root, "manage.py", "import mysite.settings\n")
    write(root, "mysite/__init__.py", "")
    write(root, "mysite/settings.py", "DEBUG = False\n")
    write(root, "mysite/views.py", 'def index():\n    return "tree"\n')
    write(root, "mysite/__pycache__/views.cpython-311.pyc", "bytecode")
    write(root, "docs/notes.md", "internal notes\n")
    write(root, "requirements.txt", LOCK)
    write(root, ".env", "SECRET_KEY=hunter2\n")
    write(root, ".secrets/db_url", "postgres://user:pw@db/app\n")
    return root


def package_spec(root: Path) -> BuildSpec:
    return BuildSpec(
        root,
        "tinyapp",
        None,
        "requirements.txt",
        include=("alembic.ini", "db/**"),
        config_files=("config/base.ini", "config/{stage}.ini"),
    )


def events_into(seen: list[tuple[str, str]]) -> Callable[[str, str], None]:
    """A build's ``on_event`` that records (step, detail) pairs into ``seen``."""
    return lambda step, detail: seen.append((step, detail))


def blob_set(manifest: Manifest) -> set[str]:
    return {sha for sha, _, _ in manifest.blobs()}


def all_paths(manifest: Manifest) -> list[str]:
    d = manifest.to_dict()
    return [
        e["path"] for key in ("app_files", "dependencies", "tools", "config_files") for e in d[key]
    ]


def seed_caches(src_project: Path, dest_project: Path) -> None:
    """Give another project the project-local wheelhouse cache: it is keyed by content alone
    (tools and fully pinned wheelhouses are cached per user anyway)."""
    for part in ("wheelhouse",):
        if (src_project / ".shiplane/build" / part).is_dir():
            shutil.copytree(
                src_project / ".shiplane/build" / part, dest_project / ".shiplane/build" / part
            )


# --------------------------------------------------------------------------- fast tests


@pytest.mark.parametrize(
    ("files", "source", "reason_has"),
    [
        ({"pyproject.toml": "[project]\nname='a'\nversion='1'\n"}, "package", "pyproject.toml"),
        ({"setup.py": "from setuptools import setup\nsetup()\n"}, "package", "setup.py"),
        (
            {"pyproject.toml": "[tool.ruff]\nline-length = 99\n", "manage.py": ""},
            "tree",
            "manage.py",
        ),
        ({"app.py": "app = None\n", "requirements.txt": LOCK}, "tree", "app.py"),
        ({"requirements.txt": LOCK, "shiplane.toml": "[app]\n"}, "none", "only the locked"),
    ],
)
def test_detect_source_says_how_the_app_ships_and_why(
    tmp_path: Path, files: dict[str, str], source: str, reason_has: str
) -> None:
    for rel, text in files.items():
        write(tmp_path, rel, text)
    found, reason = detect_source(tmp_path)
    assert found == source
    assert reason_has in reason


def test_a_pyproject_without_a_project_table_is_explained(tmp_path: Path) -> None:
    write(tmp_path, "pyproject.toml", "[tool.black]\n")
    write(tmp_path, "manage.py", "")
    _, reason = detect_source(tmp_path)
    assert "no [project]" in reason


def _manifest(n: int = 0) -> Manifest:
    deps = [FileEntry(f"dep{n}-1.0-py3-none-any.whl", hashlib.sha256(b"d%d" % n).hexdigest(), 9)]
    return Manifest(
        app_name="tinyapp",
        app_version="0.1.0",
        source="package",
        app_files=(FileEntry("tinyapp-0.1.0-py3-none-any.whl", "a" * 64, 5, "wheel"),),
        dependencies=tuple(deps),
        dependency_digest=dependency_digest(deps),
        tools=(),
        config_files=(FileEntry("config/base.ini", "a" * 64, 5),),
        git_commit=None,
        built_at="2026-11-25T10:00:00Z",
        target={"python_version": "3.11", "platform": "linux_x86_64"},
    )


def test_manifest_digest_is_the_sha256_of_its_canonical_json() -> None:
    m = _manifest()
    text = m.to_json()
    assert text == canonical_json(json.loads(text))
    assert m.digest == hashlib.sha256(text.encode()).hexdigest()
    again = Manifest.from_json(json.dumps(json.loads(text), indent=2))
    assert again == m and again.digest == m.digest
    # The same bytes serve the wheel and the config template: they are sent once.
    assert [sha for sha, _, _ in m.blobs()].count("a" * 64) == 1


def test_blob_store_names_blobs_by_content(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    a = write(tmp_path, "a.txt", "same bytes")
    b = write(tmp_path, "b.txt", "same bytes")
    sha, size = store.put_file(a)
    assert (sha, size) == (hashlib.sha256(b"same bytes").hexdigest(), 10)
    assert store.put_file(b) == (sha, size)
    assert store.has(sha) and store.path(sha).parent == tmp_path / "blobs"
    with store.open(sha) as f:
        assert f.read() == b"same bytes"
    a.write_text("changed")  # a blob never changes with its source
    assert store.path(sha).read_bytes() == b"same bytes"
    assert not store.has("0" * 64)
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")


def test_load_manifest_by_unique_prefix(tmp_path: Path) -> None:
    artifacts = tmp_path / ".shiplane/build/artifacts"
    artifacts.mkdir(parents=True)
    digests = []
    for n in range(17):  # 17 digests: two must share their first hex digit
        m = _manifest(n)
        (artifacts / f"{m.digest}.json").write_text(m.to_json())
        digests.append(m.digest)
    d = digests[0]
    assert load_manifest(tmp_path, d[:10]).digest == d
    assert load_manifest(tmp_path, d).digest == d
    firsts = [x[0] for x in digests]
    shared = next(c for c in firsts if firsts.count(c) > 1)
    with pytest.raises(UsageError, match="ambiguous"):
        load_manifest(tmp_path, shared)
    with pytest.raises(UsageError, match="no artifact 'beef0000'"):
        load_manifest(tmp_path, "beef0000")
    # A manifest edited after the build no longer matches its name.
    (artifacts / f"{d}.json").write_text(_manifest(99).to_json())
    with pytest.raises(OperationError, match="does not match its digest"):
        load_manifest(tmp_path, d)


def test_clean_removes_build_output_only(tmp_path: Path) -> None:
    write(tmp_path, ".shiplane/build/blobs/x", "x")
    write(tmp_path, ".shiplane/local/keep", "a local stage's host")
    write(tmp_path, "app.py", "")
    assert clean(tmp_path) == [tmp_path / ".shiplane/build"]
    assert not (tmp_path / ".shiplane/build").exists()
    assert (tmp_path / ".shiplane/local/keep").exists() and (tmp_path / "app.py").exists()
    assert clean(tmp_path) == []


def test_clean_cache_empties_the_per_user_cache_and_only_it(tmp_path: Path) -> None:
    cache = tmp_path / "user-cache"
    write(cache, "wheelhouse/k/flask-3.1.3-py3-none-any.whl", "x" * 1000)
    write(cache, "bytecode/b.zip", "pyc")
    project = tmp_path / "app"
    subprocess.run(
        [sys.executable, "-m", "shiplane", "init", str(project)], check=True, capture_output=True
    )
    write(project, ".shiplane/build/blobs/x", "x")
    write(project, ".shiplane/local/keep", "a local stage's host")
    env = {**os.environ, "SHIPLANE_CACHE_DIR": str(cache)}
    plain = subprocess.run(
        [sys.executable, "-m", "shiplane", "clean"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert plain.returncode == 0 and cache.is_dir()  # without --cache the shared cache stays
    write(project, ".shiplane/build/blobs/x", "x")
    done = subprocess.run(
        [sys.executable, "-m", "shiplane", "clean", "--cache"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert not cache.exists() and not (project / ".shiplane/build").exists()
    assert (project / ".shiplane/local/keep").exists()
    assert str(cache) in done.stdout and str(project / ".shiplane/build") in done.stdout
    # outside any project, --cache still works (there is nothing else to clean)
    write(cache, "tools/t.whl", "t")
    away = subprocess.run(
        [sys.executable, "-m", "shiplane", "clean", "--cache"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert away.returncode == 0 and not cache.exists()


def test_a_missing_lock_or_include_is_an_error_naming_it(tmp_path: Path) -> None:
    write(tmp_path, "app.py", "")
    with pytest.raises(ConfigError, match="requirements.txt, which is not in"):  # exit 2
        build(BuildSpec(tmp_path, "a", "tree", "requirements.txt"))
    write(tmp_path, "requirements.txt", LOCK)
    with pytest.raises(OperationError, match="'static/\\*\\*' matches no file"):
        build(BuildSpec(tmp_path, "a", "tree", "requirements.txt", include=("static/**",)))
    with pytest.raises(OperationError, match="config/missing.ini"):
        build(
            BuildSpec(
                tmp_path, "a", "tree", "requirements.txt", config_files=("config/missing.ini",)
            )
        )


@pytest.mark.parametrize(
    ("lock", "servers", "shared"),
    [
        ("flask==3.1.3\ngunicorn==27.0.1\n", ("gunicorn",), True),
        ("flask==3.1.3\n", ("gunicorn",), False),  # gunicorn resolves to whatever is newest
        ("flask>=3\ngunicorn==27.0.1\n", ("gunicorn",), False),
        ("flask==3.1.3 --hash=sha256:" + "0" * 64 + "\n", (), True),
        ("", (), False),
    ],
)
def test_only_a_wheelhouse_the_lock_decides_is_cached_beyond_the_project(
    tmp_path: Path, lock: str, servers: tuple[str, ...], shared: bool
) -> None:
    """`shiplane clean` must still re-resolve a loose lock; a pinned one need not."""
    assert pinned(read_lock(write(tmp_path, "requirements.txt", lock)), servers) is shared


# --------------------------------------------------------------------------- builds (slow)


@pytest.fixture(scope="module")
def built_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    root = make_package(tmp_path_factory.mktemp("pkg") / "tinyapp")
    git(root, "init", "-q")
    commit_all(root, "first")
    events: list[tuple[str, str]] = []
    result = build(package_spec(root), on_event=lambda step, detail: events.append((step, detail)))
    assert not result.reused
    assert {"wheel", "wheelhouse", "tools", "manifest"} <= {step for step, _ in events}
    return root, result.manifest


@pytest.fixture
def package_copy(built_package: tuple[Path, Manifest], tmp_path: Path) -> tuple[Path, Manifest]:
    root, manifest = built_package
    copy = tmp_path / "tinyapp"
    shutil.copytree(root, copy, symlinks=True)
    return copy, manifest


@pytest.mark.slow
def test_same_inputs_reuse_the_artifact_in_milliseconds(
    built_package: tuple[Path, Manifest],
) -> None:
    root, manifest = built_package
    again = build(package_spec(root))
    assert again.reused
    assert again.digest == manifest.digest
    assert again.seconds < 0.5


@pytest.mark.slow
def test_manifest_lists_every_file_as_stored(built_package: tuple[Path, Manifest]) -> None:
    root, m = built_package
    store = BlobStore(root / ".shiplane/build/blobs")
    for sha, size, path in m.blobs():
        data = store.path(sha).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha and len(data) == size, path
    assert (root / ".shiplane/build/artifacts" / f"{m.digest}.json").read_text() == m.to_json()

    assert m.app_name == "tinyapp" and m.app_version == "0.1.0" and m.source == "package"
    kinds = {e.path: e.kind for e in m.app_files}
    wheel = next(p for p, k in kinds.items() if k == "wheel")
    assert wheel.startswith("tinyapp-0.1.0-")
    assert kinds == {wheel: "wheel", "alembic.ini": "file", "db/001_init.sql": "file"}
    deps = {e.path.split("-")[0].lower() for e in m.dependencies if e.kind is None}
    assert {"itsdangerous", "gunicorn"} <= deps
    assert m.dependency_digest == dependency_digest(list(m.dependencies))
    # The wheels' bytecode ships beside them, compiled here once; it does not name the venv.
    (bundle,) = [e for e in m.dependencies if e.kind == "bytecode"]
    assert m.dependency_digest == dependency_digest([e for e in m.dependencies if e.kind is None])
    with zipfile.ZipFile(store.path(bundle.sha256)) as zf:
        pyc = zf.read(f"itsdangerous/__pycache__/__init__.{sys.implementation.cache_tag}.pyc")
    assert pyc[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(pyc[4:8], "little") == 3  # checked against the source on import
    assert [e.path.split("-")[:2] for e in m.tools] == [["supervisor", "4.3.0"]]
    assert sorted(e.path for e in m.config_files) == [
        "config/base.ini",
        "config/prod.ini",
        "config/staging.ini",
    ]
    assert m.git_commit == git(root, "rev-parse", "HEAD")
    assert m.target["python_version"].startswith("3.")
    assert not any(".secrets" in p or "hunter2" in p for p in all_paths(m))
    # The wheel holds no secret either.
    assert (
        b"hunter2"
        not in store.path(next(e.sha256 for e in m.app_files if e.kind == "wheel")).read_bytes()
    )
    assert load_manifest(root, m.digest[:8]) == m


@pytest.mark.slow
def test_one_line_code_change_changes_exactly_the_wheel(
    package_copy: tuple[Path, Manifest],
) -> None:
    root, before = package_copy
    write(root, "src/tinyapp/views.py", 'GREETING = "hello, world"\n')
    after = build(package_spec(root)).manifest
    assert after.digest != before.digest
    assert after.dependency_digest == before.dependency_digest
    added = blob_set(after) - blob_set(before)
    removed = blob_set(before) - blob_set(after)
    assert len(added) == len(removed) == 1
    (changed,) = [e for e in after.app_files if e.sha256 in added]
    assert changed.kind == "wheel"
    # Uncommitted changes are recorded as such.
    assert after.git_commit == git(root, "rev-parse", "HEAD") + "-dirty"


@pytest.mark.slow
def test_rebuilding_unchanged_code_gives_the_same_wheel_bytes(
    package_copy: tuple[Path, Manifest],
) -> None:
    root, before = package_copy
    write(root, "tests/test_app.py", "def test_ok():\n    assert 1 == 1\n")
    commit_all(root, "only a test changed")
    app = compile_app(package_spec(root))
    assert [e for e in app.files if e.kind == "wheel"] == [
        e for e in before.app_files if e.kind == "wheel"
    ]


@pytest.mark.slow
def test_the_cached_build_backend_makes_the_wheel_uv_build_makes(
    package_copy: tuple[Path, Manifest], tmp_path: Path
) -> None:
    root, before = package_copy
    (wheel,) = [e for e in before.app_files if e.kind == "wheel"]
    out = tmp_path / "uv-dist"
    subprocess.run(
        [
            "uv",
            "build",
            "--wheel",
            "--quiet",
            "--out-dir",
            str(out),
            "--python",
            sys.executable,
            str(root),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"},
    )
    (built,) = out.glob("*.whl")
    assert (built.name, hashlib.sha256(built.read_bytes()).hexdigest()) == (
        wheel.path,
        wheel.sha256,
    )


@pytest.mark.slow
def test_committing_what_was_built_dirty_builds_no_wheel(
    package_copy: tuple[Path, Manifest],
) -> None:
    root, _ = package_copy
    write(root, "src/tinyapp/views.py", 'GREETING = "committed later"\n')
    dirty = build(package_spec(root)).manifest
    commit_all(root, "the change deployed dirty")
    events: list[tuple[str, str]] = []
    clean_one = build(
        package_spec(root), on_event=lambda step, detail: events.append((step, detail))
    )
    assert clean_one.manifest.git_commit == git(root, "rev-parse", "HEAD")
    assert clean_one.manifest.app_files == dirty.app_files
    assert any(step == "wheel" and "reused" in detail for step, detail in events)


@pytest.mark.slow
def test_a_pinned_wheelhouse_outlives_clean_and_serves_other_projects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHIPLANE_CACHE_DIR", str(tmp_path / "user-cache"))
    lock = "itsdangerous==2.2.0\ngunicorn==27.0.1\n"
    manifests = []
    for name in ("one", "two"):
        write(tmp_path / name, "requirements.txt", lock)
        events: list[tuple[str, str]] = []  # the last project's: `again` adds to them
        spec = BuildSpec(tmp_path / name, name, "none", "requirements.txt")
        manifests.append(build(spec, on_event=events_into(events)))
        clean(tmp_path / name)
    again = build(spec, on_event=events_into(events)).manifest
    assert not any("pip" in detail for _, detail in events)  # the second project ran no pip
    assert {step: detail for step, detail in events}["wheelhouse"] == "2 wheels"
    assert any(step == "wheelhouse" and detail.startswith("reused") for step, detail in events)
    assert again.dependency_digest == manifests[0].manifest.dependency_digest
    assert again.dependencies == manifests[0].manifest.dependencies  # the same bytecode bundle too


def test_a_cached_wheel_rewritten_in_place_is_noticed_and_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the cache remembers its files' hashes by their stat; a rewrite must not slip through
    monkeypatch.setenv("SHIPLANE_CACHE_DIR", str(tmp_path / "user-cache"))
    write(tmp_path / "app", "requirements.txt", "itsdangerous==2.2.0\ngunicorn==27.0.1\n")
    spec = BuildSpec(tmp_path / "app", "app", "none", "requirements.txt")
    first = build(spec).manifest
    wheel = next((tmp_path / "user-cache" / "wheelhouse").glob("*/itsdangerous-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    os.chmod(wheel, 0o644)
    wheel.write_bytes(bytes(data))
    clean(tmp_path / "app")
    events: list[tuple[str, str]] = []
    again = build(spec, on_event=events_into(events)).manifest
    assert any(step == "wheelhouse" and detail.startswith("pip") for step, detail in events)
    assert again.dependencies == first.dependencies


@pytest.mark.slow
def test_dependency_change_changes_the_dependency_digest(
    package_copy: tuple[Path, Manifest],
) -> None:
    root, before = package_copy
    write(root, "requirements.txt", LOCK + "markupsafe==2.1.5\n")
    after = build(package_spec(root)).manifest
    assert after.dependency_digest != before.dependency_digest
    assert any(e.path.lower().startswith("markupsafe-2.1.5") for e in after.dependencies)
    assert [e.sha256 for e in after.app_files] == [e.sha256 for e in before.app_files]


@pytest.mark.slow
def test_an_unresolvable_pin_fails_naming_the_package(tmp_path: Path) -> None:
    write(tmp_path, "requirements.txt", LOCK + "nonexistent-pkg-zzz==1.0\n")
    with pytest.raises(OperationError) as err:
        build(BuildSpec(tmp_path, "app", None, "requirements.txt"))
    assert "nonexistent-pkg-zzz" in err.value.message
    assert err.value.exit_code == 1
    assert not (tmp_path / ".shiplane/build/artifacts").exists()


@pytest.mark.slow
def test_tree_app_ships_its_files_and_a_change_sends_one_blob(
    built_package: tuple[Path, Manifest], tmp_path: Path
) -> None:
    root = make_tree(tmp_path / "mysite")  # not a git repo: the files come from a walk
    seed_caches(built_package[0], root)
    spec = BuildSpec(root, "mysite", None, "requirements.txt", exclude=("docs",))
    before = build(spec).manifest
    assert before.source == "tree" and before.app_version is None
    assert sorted(e.path for e in before.app_files) == [
        "manage.py",
        "mysite/__init__.py",
        "mysite/settings.py",
        "mysite/views.py",
        "requirements.txt",
    ]
    assert {e.kind for e in before.app_files} == {"file"}
    assert before.git_commit is None
    assert not any(p.startswith((".secrets", ".env", ".shiplane")) for p in all_paths(before))

    write(root, "mysite/views.py", 'def index():\n    return "tree v2"\n')
    after = build(spec).manifest
    assert after.digest != before.digest
    assert after.dependency_digest == before.dependency_digest
    assert len(blob_set(after) - blob_set(before)) == 1
    old, new = ({e.path: e.sha256 for e in m.app_files} for m in (before, after))
    assert old.keys() == new.keys()
    assert [p for p in new if new[p] != old[p]] == ["mysite/views.py"]


@pytest.mark.slow
def test_lock_only_app_ships_dependencies_only(
    built_package: tuple[Path, Manifest], tmp_path: Path
) -> None:
    write(tmp_path, "requirements.txt", LOCK)
    seed_caches(built_package[0], tmp_path)
    m = build(BuildSpec(tmp_path, "served", None, "requirements.txt")).manifest
    assert m.source == "none" and m.app_files == ()
    assert m.dependency_digest == built_package[1].dependency_digest


@pytest.mark.slow
def test_wheelhouse_for_another_python_uses_wheels_for_that_target(tmp_path: Path) -> None:
    write(tmp_path, "requirements.txt", "markupsafe==2.1.5\n")
    m = build(
        BuildSpec(
            tmp_path,
            "served",
            "none",
            "requirements.txt",
            server_packages=(),
            python_version="3.12",
            platform="linux_x86_64",
        )
    ).manifest
    assert m.target == {"python_version": "3.12", "platform": "linux_x86_64"}
    (dep,) = m.dependencies
    assert "-cp312-" in dep.path and "x86_64" in dep.path


# --------------------------------------------------------------------------- the test gate


@pytest.fixture(scope="module")
def gated_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gate")
    write(root, "requirements.txt", LOCK)
    write(root, "src/gated/__init__.py", "from itsdangerous import Signer\nVALUE = 42\n")
    write(
        root,
        "tests/test_pass.py",
        "import gated\n\ndef test_value():\n    assert gated.VALUE == 42\n",
    )
    write(root, "tests/test_fail.py", "def test_red():\n    assert 1 == 2, 'the build is red'\n")
    return root


@pytest.mark.slow
def test_gate_passes_with_the_lock_installed_and_src_importable(gated_project: Path) -> None:
    lines: list[str] = []
    run_gate(gated_project, "pytest -q tests/test_pass.py", "requirements.txt", output=lines.append)
    assert any("1 passed" in line for line in lines)
    assert list((gated_project / ".shiplane/build").glob("testenv-*/.complete"))


@pytest.mark.slow
def test_gate_failure_reports_exit_code_and_output_tail(gated_project: Path) -> None:
    lines: list[str] = []
    with pytest.raises(OperationError) as err:
        run_gate(
            gated_project, "pytest -q tests/test_fail.py", "requirements.txt", output=lines.append
        )
    assert err.value.message.startswith("test gate failed (exit 1)")
    assert "the build is red" in err.value.message
    assert any("1 failed" in line for line in lines)


@pytest.mark.slow
def test_gate_timeout_stops_the_command(gated_project: Path) -> None:
    with pytest.raises(OperationError, match="timed out"):
        run_gate(
            gated_project,
            "python -c 'import time; time.sleep(60)'",
            "requirements.txt",
            timeout=1,
            output=lambda line: None,
        )


@pytest.mark.slow
def test_hashes_in_the_lock_are_enforced(
    built_package: tuple[Path, Manifest], tmp_path: Path
) -> None:
    seed_caches(built_package[0], tmp_path)
    (good,) = [e for e in built_package[1].dependencies if e.path.startswith("itsdangerous")]
    write(
        tmp_path, "requirements.txt", f"itsdangerous==2.2.0 \\\n    --hash=sha256:{good.sha256}\n"
    )
    m = build(BuildSpec(tmp_path, "served", "none", "requirements.txt")).manifest
    # gunicorn is not in the hashed lock: it is added, resolved against the lock's pins.
    assert {e.path.split("-")[0] for e in m.dependencies} >= {"itsdangerous", "gunicorn"}

    write(tmp_path, "requirements.txt", f"itsdangerous==2.2.0 --hash=sha256:{'0' * 64}\n")
    with pytest.raises(OperationError) as err:
        build(BuildSpec(tmp_path, "served", "none", "requirements.txt"))
    assert "itsdangerous" in err.value.message and "hash" in err.value.message.lower()


@pytest.mark.slow
def test_wheelhouse_for_another_python_follows_the_targets_markers(tmp_path: Path) -> None:
    """A lock compiled for several Pythons: a 3.10 target gets the 3.10 lines and cp310 wheels,
    although the controller runs another Python (pip alone would judge markers by the controller)."""
    project = tmp_path / "app"
    project.mkdir()
    (project / "app.py").write_text("def app(environ, start_response):\n    return []\n")
    (project / "requirements.txt").write_text(
        "markupsafe==3.0.2\n"
        'tomli==2.0.1 ; python_version < "3.11"\n'
        'six==1.16.0 ; python_version >= "3.11"\n'
    )
    spec = BuildSpec(
        project=project,
        app_name="app",
        source="tree",
        requirements="requirements.txt",
        server_packages=(),
        python_version="3.10",
        platform="linux_x86_64",
    )
    names = [d["path"] for d in build(spec).manifest.to_dict()["dependencies"]]
    assert any(n.startswith("tomli-2.0.1") for n in names)
    assert not any(n.startswith("six-") for n in names)
    assert any(n.lower().startswith("markupsafe-3.0.2-cp310-cp310") for n in names), names


PLATFORM_BACKEND = """\
import base64, hashlib, os, sys, zipfile

TAG = "cp%d%d-cp%d%d-linux_x86_64" % (sys.version_info[:2] * 2)
NAME = "platapp-0.1.0-%s.whl" % TAG
FILES = {
    "platapp/__init__.py": b"",
    "platapp-0.1.0.dist-info/METADATA": b"Metadata-Version: 2.1\\nName: platapp\\nVersion: 0.1.0\\n",
    "platapp-0.1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\\nRoot-Is-Purelib: false\\n"
    + ("Tag: %s\\n" % TAG).encode(),
}


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    record = []
    with zipfile.ZipFile(os.path.join(wheel_directory, NAME), "w") as zf:
        for name, data in FILES.items():
            zf.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{name},sha256={digest.decode()},{len(data)}")
        record.append("platapp-0.1.0.dist-info/RECORD,,")
        zf.writestr("platapp-0.1.0.dist-info/RECORD", "\\n".join(record) + "\\n")
    return NAME
"""


def test_a_platform_specific_app_wheel_is_refused_for_hosts_of_another_python(
    tmp_path: Path,
) -> None:
    """The app wheel is built while the hosts still answer, before their target is known: the
    check that it can run there comes once it is (a wheel for this CPython, hosts on another)."""
    root = tmp_path / "platapp"
    write(
        root,
        "pyproject.toml",
        '[build-system]\nrequires = []\nbuild-backend = "platbackend"\nbackend-path = ["_build"]\n'
        '\n[project]\nname = "platapp"\nversion = "0.1.0"\n',
    )
    write(root, "_build/platbackend.py", PLATFORM_BACKEND)
    write(root, "platapp/__init__.py", "")
    write(root, "requirements.txt", "")
    tag = "cp{0}{1}-cp{0}{1}-linux_x86_64".format(*sys.version_info[:2])
    wheel = f"platapp-0.1.0-{tag}.whl"
    other = "3.12" if sys.version_info[:2] != (3, 12) else "3.13"
    spec = BuildSpec(root, "platapp", "package", "requirements.txt", python_version=other)
    with pytest.raises(OperationError, match="platform-specific") as refused:
        build(spec, build_dir=tmp_path / "build")
    assert wheel in str(refused.value) and other in str(refused.value)
    # the same wheel for this very interpreter is fine
    native = BuildSpec(root, "platapp", "package", "requirements.txt")
    manifest = build(native, build_dir=tmp_path / "build").manifest
    assert [f.path for f in manifest.app_files] == [wheel]
