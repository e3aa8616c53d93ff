"""The app wheel patched for a code-only change (artifact/_wheelpatch.py, docs/DESIGN.md "The app
wheel"): the wheel a user's hosts get must be the one the project's own backend makes, byte for
byte, and the backend must run whenever a patch could differ from it.

Marked slow: each backend's build environment is installed by uv from the package index.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from shiplane.artifact._backend import app_wheel
from shiplane.artifact._manifest import FileEntry
from shiplane.artifact._store import BlobStore, sha256_file

pytestmark = pytest.mark.slow

BACKENDS = {
    "hatchling": (
        '["hatchling"]',
        "hatchling.build",
        '[tool.hatch.build.targets.wheel]\npackages = ["src/shop"]\n',
    ),
    "flit-core": ('["flit_core>=3.9"]', "flit_core.buildapi", ""),
    "setuptools": (
        '["setuptools>=68"]',
        "setuptools.build_meta",
        '[tool.setuptools.packages.find]\nwhere = ["src"]\n',
    ),
    "pdm-backend": ('["pdm-backend"]', "pdm.backend", ""),
    "poetry-core": (
        '["poetry-core>=2"]',
        "poetry.core.masonry.api",
        '[tool.poetry]\npackages = [{include = "shop", from = "src"}]\n',
    ),
}


def make_project(
    root: Path, backend: str, *, project_extra: str = "", version: str = '"1.0.0"'
) -> Path:
    requires, name, tool = BACKENDS[backend]
    version_line = f"version = {version}\n" if version else 'dynamic = ["version"]\n'
    files = {
        "pyproject.toml": (
            f'[build-system]\nrequires = {requires}\nbuild-backend = "{name}"\n\n'
            f'[project]\nname = "shop"\n{version_line}description = "a shop"\n'
            f'requires-python = ">=3.10"\ndependencies = ["flask"]\n{project_extra}\n{tool}'
        ),
        "README.md": "# shop\n",
        "src/shop/__init__.py": '__version__ = "1.0.0"\n',
        "src/shop/views.py": "def index():\n    return 'old'\n",
        "src/shop/models/__init__.py": "",
        "src/shop/templates/index.html": "<p>old</p>\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


class Builder:
    """Builds ``root``'s app wheel into one store, as ``build`` does, keeping the events."""

    def __init__(self, root: Path, store_dir: Path) -> None:
        self.root, self.store = root, BlobStore(store_dir / "blobs")
        self.events: list[str] = []

    def build(self) -> FileEntry:
        sources = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())
        shas = {rel: sha256_file(self.root / rel)[0] for rel in sources}
        self.events.clear()
        return app_wheel(self.root, sources, shas, self.store, lambda _s, d: self.events.append(d))

    @property
    def patched(self) -> bool:
        return any("patched" in event for event in self.events)

    def member(self, entry: FileEntry, name: str) -> str:
        with zipfile.ZipFile(self.store.path(entry.sha256)) as zf:
            return zf.read(name).decode()


def backend_build(root: Path, tmp: Path) -> FileEntry:
    """The same project built by its backend alone, with no earlier wheel to patch."""
    copy = tmp / "by-backend"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(root, copy)
    return Builder(copy, tmp / "store-backend").build()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_changed_module_gives_the_backends_own_wheel_without_running_it(
    tmp_path: Path, backend: str
) -> None:
    root = make_project(tmp_path / "shop", backend)
    builder = Builder(root, tmp_path / "store")
    builder.build()
    (root / "src/shop/views.py").write_text("def index():\n    return 'new'\n")

    entry = builder.build()

    assert builder.patched, builder.events
    assert "return 'new'" in builder.member(entry, "shop/views.py")
    assert entry.sha256 == backend_build(root, tmp_path).sha256  # byte for byte


def test_metadata_files_new_files_and_dynamic_versions_run_the_backend(tmp_path: Path) -> None:
    root = make_project(tmp_path / "shop", "hatchling")
    builder = Builder(root, tmp_path / "store")
    builder.build()

    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "1.0.0"', 'version = "1.1.0"'))
    assert builder.build().path == "shop-1.1.0-py3-none-any.whl"
    assert not builder.patched, "a version bump is metadata: the backend must run"

    (root / "src/shop/api.py").write_text("X = 1\n")
    entry = builder.build()
    assert not builder.patched, "a new module changes the wheel's file list"
    assert builder.member(entry, "shop/api.py") == "X = 1\n"

    (root / "README.md").write_text("# shop, renamed\n")
    builder.build()
    assert not builder.patched, "the readme is the metadata's long description"

    (root / "src/shop/views.py").write_text("def index():\n    return 'patched'\n")
    (root / "src/shop/templates/index.html").write_text("<p>new</p>\n")  # hatchling ships it
    entry = builder.build()
    assert builder.patched, "after all that, a module's and a template's change is a patch again"
    assert builder.member(entry, "shop/templates/index.html") == "<p>new</p>\n"
    assert entry.sha256 == backend_build(root, tmp_path).sha256


def test_a_version_read_from_a_module_is_never_patched(tmp_path: Path) -> None:
    root = make_project(tmp_path / "shop", "hatchling", version="", project_extra="")
    pyproject = root / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text() + '\n[tool.hatch.version]\npath = "src/shop/__init__.py"\n'
    )
    builder = Builder(root, tmp_path / "store")
    assert builder.build().path == "shop-1.0.0-py3-none-any.whl"

    (root / "src/shop/__init__.py").write_text('__version__ = "2.0.0"\n')
    entry = builder.build()

    assert not builder.patched
    assert entry.path == "shop-2.0.0-py3-none-any.whl"


def test_a_build_hook_in_the_project_is_never_patched(tmp_path: Path) -> None:
    root = make_project(tmp_path / "shop", "hatchling")
    pyproject = root / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text() + "\n[tool.hatch.build.targets.wheel.hooks.custom]\n"
    )
    (root / "hatch_build.py").write_text(
        "from hatchling.builders.hooks.plugin.interface import BuildHookInterface\n\n"
        "class Hook(BuildHookInterface):\n"
        "    def initialize(self, version, build_data):\n"
        "        src = open('src/shop/views.py').read()\n"
        "        build_data['force_include_editable'] = {}\n"
        "        open('stamp.txt', 'w').write(str(len(src)))\n"
        "        build_data['force_include']['stamp.txt'] = 'shop/stamp.txt'\n"
    )
    builder = Builder(root, tmp_path / "store")
    builder.build()
    (root / "src/shop/views.py").write_text("def index():\n    return 'a longer answer'\n")

    entry = builder.build()

    assert not builder.patched
    assert builder.member(entry, "shop/stamp.txt") == str(
        len((root / "src/shop/views.py").read_text())
    )


def test_a_script_shipped_in_the_wheels_data_directory_is_never_patched(tmp_path: Path) -> None:
    root = make_project(tmp_path / "shop", "hatchling")
    pyproject = root / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text()
        + '\n[tool.hatch.build.targets.wheel.shared-scripts]\n"bin/shop-admin" = "shop-admin"\n'
    )
    (root / "bin").mkdir()
    (root / "bin/shop-admin").write_text("#!/usr/bin/env python3\nprint('old')\n")
    builder = Builder(root, tmp_path / "store")
    builder.build()
    (root / "bin/shop-admin").write_text("#!/usr/bin/env python3\nprint('new')\n")

    entry = builder.build()

    assert not builder.patched, "an installer or the backend may rewrite a script's first line"
    assert "print('new')" in builder.member(entry, "shop-1.0.0.data/scripts/shop-admin")
