"""A failed deploy is explained once, cause first: the app's own exception before any log tail,
only what this release's server wrote, and no transport noise when the cause is known."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deployhelp import Project, scaffold

pytestmark = pytest.mark.slow


@pytest.fixture
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    project = scaffold(tmp_path_factory.mktemp("fb"))  # short: unix socket paths are limited
    try:
        project.deploy()
        yield project
    finally:
        project.stop()


def crash_at_import(project: Project, why: str) -> None:
    init = project.root / "src" / "demo" / "__init__.py"
    text = init.read_text()
    if "raise RuntimeError(" in text:
        text = (
            "\n".join(
                line for line in text.splitlines() if not line.startswith("raise RuntimeError(")
            )
            + "\n"
        )
    init.write_text(
        text.replace("def create_app(", f"raise RuntimeError({why!r})\n\n\ndef create_app(", 1)
    )
    project.commit(why)


def test_a_crash_at_boot_is_explained_once_cause_first(app: Project) -> None:
    crash_at_import(app, "first-boom")
    assert app.deploy(check=False)["exit"] == 1
    crash_at_import(app, "second-boom")
    done = app.shiplane("deploy", "--stage", "local", "--skip-tests")  # as a person reads it
    assert done.returncode == 1
    text = done.stdout + done.stderr
    cause = "the server's log says: RuntimeError: second-boom"
    assert text.count(cause) == 1, text
    assert text.index(cause) < text.index("last lines of")
    assert "first-boom" not in text  # the earlier release's lines in the shared log stay out
    assert "cannot connect" not in text  # the server did not run: that it did not answer is no news
    assert (
        "serves " in done.stdout.splitlines()[-1]
    )  # and the summary says what the host serves now
