"""The core deploy on the `local` stage, as a user runs it: real supervisord, gunicorn, front."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployhelp import Project, edit, scaffold, wait_for

pytestmark = pytest.mark.slow

VIEWS = "src/demo/views.py"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    project = scaffold(tmp_path_factory.mktemp("core"))
    try:
        yield project
    finally:
        project.stop()


def test_deploy_serves_the_release_and_stage(app: Project) -> None:
    result = app.deploy()
    status, body = app.get("/")
    assert status == 200
    assert f"release {result['release']}" in body
    assert "stage local" in body
    assert app.current() == result["release"]
    assert (
        f"serving at http://127.0.0.1:{app.port}/"
        in app.shiplane("deploy", "--stage", "local", "--skip-tests").stdout
    )
    # supervisord, started early by the install while the venv builds, exists once per root
    conf = str(app.deploy_root / "run" / "supervisord.conf")
    named = {pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(pid).count(conf)}
    # a child supervisord has forked but not yet exec'd (the spare starting) carries its name too
    managers = [pid for pid in named if _parent(pid) not in named]
    assert managers == [(app.deploy_root / "run" / "supervisord.pid").read_text().strip()]


PROBE = """\
import json, os, time

release, root = os.environ["SHIPLANE_RELEASE"], os.environ["SHIPLANE_ROOT"]
found, deadline = [], time.monotonic() + 20
while not any(s["markupsafe"] for s in found) and time.monotonic() < deadline:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\\0")
            maps = open(f"/proc/{pid}/maps").read()
        except OSError:
            continue
        if any(a.endswith("preboot.py") for a in argv) and release in argv:
            found.append({"pid": int(pid), "markupsafe": "markupsafe" in maps})
    time.sleep(0.05)  # polling the preboot's imports, bounded by the deadline
socket = os.path.exists(os.path.join(root, "run", f"web-{release}.sock"))
with open(os.path.join(root, "probe.json"), "w") as out:
    json.dump({"servers": found, "socket": socket}, out)
"""


def test_the_next_server_loads_its_libraries_during_the_install_and_the_app_at_the_switch(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    project = scaffold(tmp_path_factory.mktemp("pb"))  # short: unix socket paths are limited
    try:
        (project.root / "src" / "demo" / "probe.py").write_text(PROBE)
        edit(
            project,
            "shiplane.toml",
            'release = "alembic upgrade head"',
            'release = "alembic upgrade head && python -m demo.probe"',
        )
        result = project.deploy()
        probe = json.loads((project.deploy_root / "probe.json").read_text())
        # while the release hook ran: one server of the release, flask's C speedups loaded...
        assert [s["markupsafe"] for s in probe["servers"]] == [True]
        # ...and the app not loaded: nothing listened before the migration was done
        assert probe["socket"] is False
        live = [s for s in _web_servers(project) if s["live"]]
        assert [s["pid"] for s in live] == [probe["servers"][0]["pid"]]  # that very process serves
        assert f"release {result['release']}" in project.get("/")[1]
    finally:
        project.stop()


def test_a_warm_redeploy_is_served_by_the_spare_that_had_its_libraries_loaded(app: Project) -> None:
    app.deploy()

    def idle_spare() -> dict[str, Any] | None:
        return next(
            (
                s
                for s in _web_servers(app)
                if s.get("preboot") and not s["release"] and s["state"] == "RUNNING"
            ),
            None,
        )

    spare = wait_for(idle_spare, 20, "a spare web server after the deploy")
    edit(app, VIEWS, "<footer>", "<footer>from-the-spare ")
    result = app.deploy()
    assert "becomes web-" in result["output"]  # the install adopted it
    live = [s for s in _web_servers(app) if s["live"]]
    assert [(s["pid"], s["release"]) for s in live] == [(spare["pid"], result["release"])]
    assert "from-the-spare" in app.get("/")[1]

    # afterwards: the live server, one standby and a new spare; the old standby is gone
    def three_with_a_spare() -> list[dict[str, Any]] | None:
        servers = _web_servers(app)
        return servers if len(servers) == 3 and idle_spare() else None

    servers = wait_for(three_with_a_spare, 20, "the old standby to go and a new spare to start")
    assert sorted((s["live"], s["standby"]) for s in servers) == [
        (False, False),
        (False, True),
        (True, False),
    ]


SPARE_PROBE = """\
import json, os, time

def spares(root):
    \"\"\"This deploy root's spares (another project's, on the same machine, may run): pid -> whether
    its libraries are imported.\"\"\"
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\\0")
            maps = open(f"/proc/{pid}/maps").read()
        except OSError:
            continue
        if "--spare" in argv and os.path.realpath(argv[argv.index("--spare") - 1]) == root:
            found[int(pid)] = "markupsafe" in maps
    return found

if __name__ == "__main__":  # the after_deploy hook: watch for 2 s whether a spare starts
    root, seen, end = os.path.realpath(os.environ["SHIPLANE_ROOT"]), {}, time.monotonic() + 2
    while time.monotonic() < end:
        seen.update(spares(root))
        time.sleep(0.05)  # polling /proc, bounded by the 2 s window
    with open(os.path.join(root, "spare-probe.json"), "w") as out:
        json.dump(seen, out)
"""


def test_the_spare_starts_only_once_the_deploy_is_over(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The next release's spare server (its libraries imported ahead) takes no CPU from the
    deploy that switched: it starts when the deploy's session ends."""
    project = scaffold(tmp_path_factory.mktemp("sp"))
    try:
        (project.root / "src" / "demo" / "spareprobe.py").write_text(SPARE_PROBE)
        edit(
            project,
            "shiplane.toml",
            "[hooks]\n",
            '[hooks]\nafter_deploy = ["python -m demo.spareprobe"]\n',
        )
        project.deploy()
        # for 2 s after the switch, while the deploy ran its after_deploy hook: no spare
        assert json.loads((project.deploy_root / "spare-probe.json").read_text()) == {}
        # the deploy over, one starts and imports its libraries
        probe: dict[str, Any] = {"__name__": "probe"}
        exec(SPARE_PROBE, probe)  # its spares(), without the hook's watch  # noqa: S102
        root = os.path.realpath(project.deploy_root)
        wait_for(
            lambda: any(probe["spares"](root).values()), 20, "a spare with its libraries imported"
        )
    finally:
        project.stop()


def test_a_first_deploy_to_a_port_someone_holds_fails_and_leaves_nothing_running(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    project = scaffold(tmp_path_factory.mktemp("port"))
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", project.port))
    squatter.listen()
    try:
        failed = project.deploy(check=False)
        assert failed["exit"] == 1 and "address already in use" in failed["output"].lower()
        status = json.loads(
            project.shiplane("status", "--stage", "local", "--json", check=True).stdout
        )["result"]
        # neither its server nor a front that supervisord would retry until it takes the port
        live = {
            s["name"]: s["state"]
            for s in status["hosts"]["local"]["services"]
            if s["state"] in ("RUNNING", "STARTING", "BACKOFF")
        }
        assert live == {}
    finally:
        squatter.close()
        project.stop()


def _web_servers(project: Project) -> list[dict[str, Any]]:
    done = project.shiplane("status", "--stage", "local", "--json", check=True)
    return [
        s
        for s in json.loads(done.stdout)["result"]["hosts"]["local"]["services"]
        if s["name"] == "web"
    ]


def _parent(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return ""


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_code_change_redeploys_without_installing_dependencies(app: Project) -> None:
    before = app.deploy()
    venvs_before = set(os.listdir(app.deploy_root / "venvs"))
    edit(app, VIEWS, "visit number", "visitor number")
    after = app.deploy()
    assert after["release"] != before["release"]
    assert "visitor number" in app.get("/")[1]
    assert set(os.listdir(app.deploy_root / "venvs")) == venvs_before
    sent = after["hosts"]["local"]["bytes"]
    wheel = next(
        f
        for f in json.loads(_manifest(app, after["artifact"]))["app_files"]
        if f["path"].endswith(".whl")
    )
    assert sent <= 1.2 * wheel["size"], (sent, wheel["size"])


def _manifest(project: Project, digest: str) -> str:
    return (project.root / ".shiplane/build/artifacts" / f"{digest}.json").read_text()


def test_dependency_change_builds_a_new_venv(app: Project, tmp_path: Path) -> None:
    app.deploy()
    venvs_before = {v for v in os.listdir(app.deploy_root / "venvs") if not v.startswith(".")}
    requirements = app.root / "requirements.txt"
    requirements.write_text(requirements.read_text() + "six==1.16.0\n")
    app.commit("add six")
    user_cache = tmp_path / "uv-cache"
    result = app.deploy(env={"UV_CACHE_DIR": str(user_cache)})
    # the local stage installs through the user's own uv cache (where the gate's venv put the
    # wheels already), not a second cache in the deploy root
    assert list(user_cache.glob("**/six.py"))
    assert not list((app.deploy_root / ".cache").glob("**/six.py"))
    venvs_after = {v for v in os.listdir(app.deploy_root / "venvs") if not v.startswith(".")}
    new = venvs_after - venvs_before
    assert len(new) == 1
    assert list((app.deploy_root / "venvs" / new.pop()).glob("lib/python*/site-packages/six.py"))
    assert app.get("/up")[0] == 200
    release = json.loads(
        (app.deploy_root / "releases" / result["release"] / "release.json").read_text()
    )
    assert release["dependency_digest"] in venvs_after


def test_rollback_serves_the_previous_code_without_reinstalling(app: Project) -> None:
    edit(app, VIEWS, "<footer>", "<footer>version-A ")
    first = app.deploy()
    edit(app, VIEWS, "version-A", "version-B")
    app.deploy()
    assert "version-B" in app.get("/")[1]
    done = app.shiplane("rollback", "--stage", "local", "--yes")  # every release ran its migration
    assert done.returncode == 0, done.stdout + done.stderr
    assert "version-A" in app.get("/")[1]
    assert app.current() == first["release"]


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (
            ("src/demo/views.py", 'return Response("ok\\n", 200', 'return Response("sick\\n", 500'),
            "500",
        ),
        (
            (
                "src/demo/views.py",
                "from __future__ import annotations",
                "from __future__ import annotations\nimport no_such_module",
            ),
            "no_such_module",
        ),
        (
            (
                "shiplane.toml",
                'release = "alembic upgrade head"',
                'release = "alembic upgrade head && exit 7"',
            ),
            "exit code 7",
        ),
    ],
    ids=["health-fails", "import-error", "hook-fails"],
)
def test_broken_release_leaves_the_previous_one_serving(
    app: Project, breakage: tuple[str, str, str], expected: str
) -> None:
    good = app.deploy()
    edit(app, *breakage)
    try:
        bad = app.deploy(check=False)
        assert bad["exit"] == 1
        assert expected in bad["output"]
        if (
            expected == "no_such_module"
        ):  # a server that cannot boot fails the switch before the 15 s timeout
            assert bad["duration"] < 15
        assert app.current() == good["release"]
        status, body = app.get("/")
        assert status == 200 and f"release {good['release']}" in body
        releases = app.shiplane("releases", "--stage", "local", "--json", check=True)
        states = {
            r["release_id"]: r["state"]
            for r in json.loads(releases.stdout)["result"]["hosts"]["local"]["releases"]
        }
        assert states[bad["release"]] == "bad"
        # its server, started during the install (preboot), is gone with the failed deploy
        assert bad["release"] not in {s["release"] for s in _web_servers(app)}
    finally:
        edit(app, breakage[0], breakage[2], breakage[1])


def test_a_killed_server_is_restarted(app: Project) -> None:
    app.deploy()
    # the live one (a standby, a spare and an old standby on its way out may run beside it)
    web = next(s for s in _web_servers(app) if s["live"])
    os.kill(web["pid"], signal.SIGKILL)

    def restarted() -> bool:
        pids = [s["pid"] for s in _web_servers(app) if s["live"] and s["state"] == "RUNNING"]
        return bool(pids) and pids[0] != web["pid"] and app.get("/up")[0] == 200

    wait_for(restarted, 30, "supervisord to restart the killed gunicorn")


def test_a_held_lock_refuses_a_second_deploy_naming_its_holder(app: Project) -> None:
    app.shiplane("lock", "--stage", "local", check=True)
    try:
        refused = app.deploy(check=False)
        assert refused["exit"] == 1
        assert "deploy lock held by" in refused["output"]
        assert "shiplane lock --stage local" in refused["output"]
    finally:
        app.shiplane("unlock", "--stage", "local", "--force", check=True)
    assert app.deploy()["exit"] == 0


def test_a_tampered_blob_is_rejected_and_nothing_switches(app: Project, tmp_path: Path) -> None:
    good = app.deploy()
    edit(app, VIEWS, "<footer>", "<footer>tamper-test ")
    built = json.loads(app.shiplane("build", "--json", check=True).stdout.splitlines()[-1])[
        "result"
    ]
    manifest = json.loads(_manifest(app, built["digest"]))
    wheel = next(f for f in manifest["app_files"] if f["path"].endswith(".whl"))
    blob = app.root / ".shiplane/build/blobs" / wheel["sha256"]
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")
    try:
        bad = app.deploy("--artifact", built["digest"], check=False)
        assert bad["exit"] == 1
        assert wheel["sha256"][:12] in bad["output"]
        assert app.current() == good["release"]
        assert not (app.deploy_root / "store" / wheel["sha256"]).exists()
    finally:
        blob.unlink()
        app.shiplane("clean")


def test_prune_keeps_the_live_and_previous_releases(app: Project) -> None:
    toml = app.root / "shiplane.toml"
    toml.write_text(toml.read_text().replace("keep_releases = 5", "keep_releases = 2"))
    app.commit("keep 2")
    ids = []
    for n in range(3):
        edit(app, VIEWS, "<footer>", f"<footer>prune-{n} ")
        ids.append(app.deploy()["release"])
    left = sorted(
        p.name for p in (app.deploy_root / "releases").iterdir() if not p.name.startswith(".")
    )
    assert ids[-1] in left and ids[-2] in left
    assert len(left) == 2


def test_release_hook_runs_only_when_what_it_depends_on_changed(app: Project) -> None:
    app.deploy()
    edit(app, VIEWS, "<footer>", "<footer>hook-skip ")
    assert _plan(app)["release_hook"] == "skip"  # plan says it first, read-only
    code_only = app.deploy()
    assert code_only["release_hook"] is False and "release_inputs" in code_only
    assert "nothing the release hook depends on" in code_only["output"]
    # nothing was migrated since: a rollback needs no --yes
    done = app.shiplane("rollback", "--stage", "local")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hook-skip" not in app.get("/")[1]
    edit(app, "alembic.ini", "[alembic]", "[alembic]\n# touched")
    assert _plan(app)["release_hook"] == "run"
    migrated = app.deploy()
    assert migrated["release_hook"] is True
    assert migrated["release_inputs"] != code_only["release_inputs"]


def _plan(project: Project) -> dict[str, Any]:
    done = project.shiplane("plan", "--stage", "local", "--json", check=True)
    return dict(json.loads(done.stdout)["result"])
