"""The fleet logic of deploy, rollback and promote, fast: the real commands against fake hosts.

``run_deploy``, ``run_rollback`` and ``run_promote`` run as the CLI runs them (config, artifact,
plan, sessions, batches, undo, ledger) with each host an in-memory fake agent (tests/fakehosts.py)
instead of SSH: rolling batches, ``max_fail``, undo and withdraw, ``--retry-failed``, promote,
lock contention and Ctrl-C, each in a fraction of a second. ``test_fleet_ssh.py`` deploys the
same way to real OpenSSH hosts (slow, root); this module covers the decisions, that one the wire.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployhelp import scaffold
from fakehosts import FakeError, FakeHost, FakeHosts, Gate
from shiplane.agent import protocol
from shiplane.commands.build import build_for_deploy
from shiplane.commands.deploy import run_deploy
from shiplane.commands.deployment import DeployOptions, DeployResult
from shiplane.commands.operate import run_rollback
from shiplane.commands.promote import run_promote
from shiplane.config import load_project
from shiplane.errors import UsageError
from shiplane.events import Event
from shiplane.secret import Masker
from shiplane.ui import deploy_lines, promote_lines, rollback_lines

FLEET = ["h1", "h2", "h3", "h4"]
STAGES = """[stages.fleet]
hosts = ["h1", "h2", "h3", "h4"]
deploy_to = "/srv/demo"
port = 8000

[stages.staging]
hosts = ["s1"]
deploy_to = "/srv/demo"
port = 8000

[stages.prod]
hosts = ["p1", "p2"]
deploy_to = "/srv/demo"
port = 8000
promote_from = "staging"
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The scaffold app with stages of fake hosts, its artifact built once for the module."""
    project = scaffold(tmp_path_factory.mktemp("fast"))
    toml = project.root / "shiplane.toml"
    text = toml.read_text()
    toml.write_text(text[: text.index("[stages.staging]")] + STAGES)
    for stage in ("fleet", "staging", "prod"):
        secrets = project.root / ".secrets" / f"{stage}.env"
        secrets.write_text("SECRET_KEY=fast-test-secret\n")
        secrets.chmod(0o600)
    project.commit("stages of fake hosts")
    result = build_for_deploy(load_project(toml), lambda event: None)
    return project.root, result.digest


@pytest.fixture
def app(built: tuple[Path, str], tmp_path: Path) -> Path:
    """A test's own copy of the built project (its own local ledger); blobs are hard links."""
    root = tmp_path / "demo"
    shutil.copytree(built[0], root, symlinks=True, copy_function=_link_or_copy)
    return root


def _link_or_copy(src: str, dst: str) -> None:
    if "/.shiplane/build/" in src:
        Path(dst).hardlink_to(src)  # content-addressed, never written again
    else:
        shutil.copy2(src, dst)


@pytest.fixture
def artifact(built: tuple[Path, str]) -> str:
    return built[1]


@pytest.fixture
def hosts() -> Iterator[FakeHosts]:
    fakes = FakeHosts(FLEET + ["s1", "p1", "p2"])
    yield fakes
    for host in fakes:  # every session a command opened, it closed
        assert all(s.poll() is not None for s in host.sessions), f"{host.name}: a session left open"


def deploy(
    root: Path, hosts: FakeHosts, *sets: str, stage: str = "fleet", **options: Any
) -> dict[str, Any]:
    """``shiplane deploy --stage STAGE --skip-tests --set ...`` on the fake hosts: its summary."""
    opts = DeployOptions(stage=stage, skip_tests=True, sets=sets, as_json=True, **options)
    return as_printed(run_deploy(root / "shiplane.toml", opts, Masker(), transports=hosts))


def as_printed(result: DeployResult) -> dict[str, Any]:
    """A deploy's result as ``deploy --json`` prints it: its data and the ``lines`` drawn."""
    return {**result.to_json(), "lines": deploy_lines(result)}


def outcomes(result: dict[str, Any]) -> dict[str, str]:
    return {host: info["outcome"] for host, info in result["hosts"].items()}


def local_ledger(root: Path, stage: str = "fleet") -> list[dict[str, Any]]:
    path = root / ".shiplane" / "history" / f"{stage}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def switch_log(hosts: FakeHosts, names: list[str]) -> list[tuple[str, str]]:
    """Record, in order, when each host's switch starts and ends."""
    log: list[tuple[str, str]] = []
    mutex = threading.Lock()

    def logged(host: str) -> Any:
        def switch(op: str, args: dict[str, Any], payload: bytes) -> Any:
            with mutex:
                log.append(("start", host))
            try:
                return hosts[host].default(op, args, payload)
            finally:
                with mutex:
                    log.append(("end", host))

        return switch

    for name in names:
        hosts[name].on("switch", logged(name))
    return log


def test_the_fake_hosts_answer_every_op_of_the_protocol() -> None:
    assert [op for op in protocol.OPS if not hasattr(FakeHost, f"_op_{op}")] == []


# --- a plain deploy, and rolling batches ------------------------------------------------------------


def test_deploy_builds_then_every_host_serves_the_release_and_records_it(
    app: Path, hosts: FakeHosts
) -> None:
    result = deploy(app, hosts)  # no artifact given: the build runs (and reuses the module's)
    assert result["ok"] and result["outcome"] == "ok"
    release = result["release"]
    assert {hosts[h].current for h in FLEET} == {release}
    for name in FLEET:
        host = hosts[name]
        assert (
            host.state(release) == "live"
            and host.release(release)["artifact"] == result["artifact"]
        )
        assert host.lock is None
        assert [e["outcome"] for e in host.ledger if e.get("event") == "deploy"] == ["ok"]
        assert (
            release,
            "alembic upgrade head",
        ) in host.hooks  # run_on = "all": every host migrates
    assert outcomes(result) == {h: "ok" for h in FLEET}
    assert local_ledger(app)[-1]["release"] == release
    assert not any(hosts[h].ops for h in ("s1", "p1", "p2"))  # other stages' hosts untouched


def test_batch_of_one_switches_one_host_after_another(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    log = switch_log(hosts, FLEET)
    result = deploy(app, hosts, "rolling.batch=1", artifact=artifact)
    assert result["ok"]
    assert log == [(step, h) for h in FLEET for step in ("start", "end")]


def test_half_the_hosts_switch_together_then_the_other_half(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    log = switch_log(hosts, FLEET)
    # h1's switch ends only once h2's has started: the two are one batch, switched together
    together = Gate()
    hosts["h2"].on("switch", _opening(together, hosts["h2"].handler("switch")))
    hosts["h1"].on("switch", _waiting(together, hosts["h1"], hosts["h1"].handler("switch")))
    result = deploy(app, hosts, 'rolling.batch="50%"', "command_timeout=10", artifact=artifact)
    assert result["ok"], result["lines"]
    first, second = log[:4], log[4:]
    assert {h for _, h in first} == {"h1", "h2"} and {h for _, h in second} == {"h3", "h4"}
    assert {hosts[h].current for h in FLEET} == {result["release"]}


def _opening(gate: Gate, then: Any) -> Any:
    def switch(op: str, args: dict[str, Any], payload: bytes) -> Any:
        gate.open()
        return then(op, args, payload)

    return switch


def _waiting(gate: Gate, host: Any, then: Any) -> Any:
    def switch(op: str, args: dict[str, Any], payload: bytes) -> Any:
        result = then(op, args, payload)
        gate.wait(host)
        return result

    return switch


def test_no_host_switches_while_another_is_still_installing(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    installing = Gate()
    hosts["h2"].block("install", installing)
    seen: list[list[str]] = []

    def look_then_release() -> None:
        if installing.reached.wait(30):
            seen.append([h for h in FLEET if "switch" in hosts[h].ops])
        installing.open()

    watcher = threading.Thread(target=look_then_release)
    watcher.start()
    try:
        result = deploy(app, hosts, artifact=artifact)
    finally:
        installing.open()
        watcher.join()
    assert seen == [[]]  # while h2 installed, nobody had switched
    assert result["ok"] and {hosts[h].current for h in FLEET} == {result["release"]}


# --- max_fail ------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_fail", ["1", '"50%"'])
def test_failures_up_to_max_fail_let_the_rollout_go_on(
    app: Path, hosts: FakeHosts, artifact: str, max_fail: str
) -> None:
    old = deploy(app, hosts, artifact=artifact)["release"]
    hosts["h3"].fail("switch", "health", "GET /up answered 500")
    result = deploy(
        app, hosts, 'rolling.batch="50%"', f"rolling.max_fail={max_fail}", artifact=artifact
    )
    new = result["release"]
    assert result["ok"], result["lines"]
    assert hosts.serving() == {
        "h1": new,
        "h2": new,
        "h3": old,
        "h4": new,
        "s1": None,
        "p1": None,
        "p2": None,
    }
    assert result["hosts"]["h3"]["release"] is None  # it never switched
    assert all(host.lock is None for host in hosts)


def test_a_host_that_failed_within_max_fail_is_reported_failed(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    old = deploy(app, hosts, artifact=artifact)["release"]
    hosts["h3"].fail("switch", "health", "GET /up answered 500")
    result = deploy(app, hosts, 'rolling.batch="50%"', "rolling.max_fail=1", artifact=artifact)
    assert hosts["h3"].current == old
    assert outcomes(result)["h3"] == "failed"
    assert hosts["h3"].ledger[-1]["hosts"]["h3"]["outcome"] == "failed"


@pytest.mark.parametrize("max_fail", ["1", '"50%"'])
def test_failures_beyond_max_fail_abort_and_return_every_switched_host(
    app: Path, hosts: FakeHosts, artifact: str, max_fail: str
) -> None:
    old = deploy(app, hosts, artifact=artifact)["release"]
    for name in ("h3", "h4"):
        hosts[name].fail("switch", "health", "GET /up answered 500")
    result = deploy(
        app, hosts, 'rolling.batch="50%"', f"rolling.max_fail={max_fail}", artifact=artifact
    )
    assert not result["ok"] and result["outcome"] == "failed"
    assert "switch failed on 2 host(s)" in result["error"]
    assert {hosts[h].current for h in FLEET} == {old}
    assert outcomes(result) == {"h1": "undone", "h2": "undone", "h3": "failed", "h4": "failed"}
    for name in FLEET:
        assert hosts[name].state(result["release"]) == "bad"  # a later rollback never picks it
        assert hosts[name].lock is None


# --- undo ------------------------------------------------------------------------------------------


def test_a_failed_switch_returns_switched_hosts_to_their_previous_release(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    old = deploy(app, hosts, artifact=artifact)["release"]
    hosts["h2"].fail("switch", "health", "GET /up answered 500")
    result = deploy(app, hosts, "rolling.batch=1", artifact=artifact)
    assert not result["ok"]
    assert {hosts[h].current for h in FLEET} == {old}
    assert outcomes(result) == {
        "h1": "undone",
        "h2": "failed",
        "h3": "not switched",
        "h4": "not switched",
    }
    assert (
        "h2: GET /up answered 500" in result["error"]
        and "h1 back on the release served before" in result["error"]
    )
    summary = "\n".join(result["lines"])
    for host, state in outcomes(result).items():
        assert any(
            host in line and state in line and f"serves {old}" in line for line in result["lines"]
        ), summary
    # each host's ledger and the local one record the failed deploy
    assert all(hosts[h].ledger[-1]["outcome"] == "failed" for h in FLEET)
    assert local_ledger(app)[-1]["outcome"] == "failed"
    assert [o for o in hosts["h3"].ops if o == "switch"] == [
        "switch"
    ]  # its first deploy's switch only


def test_a_failed_first_deploy_withdraws_the_hosts_it_switched(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    hosts["h3"].fail("switch", "health", "GET /up answered 500")
    result = deploy(app, hosts, "rolling.batch=1", artifact=artifact)
    assert not result["ok"]
    assert {hosts[h].current for h in FLEET} == {None}  # no host serves the rejected release
    assert outcomes(result) == {
        "h1": "withdrawn",
        "h2": "withdrawn",
        "h3": "failed",
        "h4": "not switched",
    }
    assert "h1, h2 serve nothing again" in result["error"]
    assert all(hosts[h].state(result["release"]) == "bad" for h in FLEET)


# --- --retry-failed --------------------------------------------------------------------------------


def test_retry_failed_finishes_the_same_release_doing_only_the_failed_hosts(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    hosts["h3"].unreachable = True  # down during the stage's first deploy
    failed = deploy(app, hosts, artifact=artifact)
    assert (
        not failed["ok"]
        and "nothing was switched" in failed["error"]
        and "cannot reach h3" in failed["error"]
    )
    assert {hosts[h].current for h in FLEET} == {None}
    assert outcomes(failed)["h3"] == "failed"
    hosts["h3"].unreachable = False
    done = {name: len(hosts[name].ops) for name in FLEET}
    retried = deploy(app, hosts, retry_failed=True)
    assert retried["ok"], retried["lines"]
    assert (retried["release"], retried["artifact"]) == (failed["release"], failed["artifact"])
    assert {hosts[h].current for h in FLEET} == {failed["release"]}
    for name in ("h1", "h2", "h4"):  # prepared already: nothing sent again
        assert retried["hosts"][name]["bytes"] == 0
        assert "receive" not in hosts[name].ops[done[name] :]
    assert retried["hosts"]["h3"]["bytes"] > 0 and "receive" in hosts["h3"].ops[done["h3"] :]


def test_retry_failed_after_a_success_is_refused_touching_no_host(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    deploy(app, hosts, artifact=artifact)
    done = {name: len(hosts[name].ops) for name in FLEET}
    with pytest.raises(UsageError, match="did not fail; nothing to retry"):
        deploy(app, hosts, retry_failed=True)
    # the hosts' ledgers were read (that is where the last deploy is), nothing else was asked
    assert {
        name: [op for op in hosts[name].ops[done[name] :] if op != "history"] for name in FLEET
    } == {name: [] for name in FLEET}


def second_clone(app: Path, tmp_path: Path) -> Path:
    """Another checkout of the project, as a teammate or a CI job has it: the same commit, its
    own secrets, no build store and no local ledger."""
    other = tmp_path / "other"
    subprocess.run(["git", "clone", "-q", str(app), str(other)], check=True)
    shutil.copytree(app / ".secrets", other / ".secrets")
    assert not (other / ".shiplane").exists()
    return other


def test_retry_failed_from_another_clone_finishes_the_deploy_the_hosts_record(
    app: Path, hosts: FakeHosts, artifact: str, tmp_path: Path
) -> None:
    interrupt_in(hosts, "h2", "alembic upgrade head")
    stopped = deploy(app, hosts, artifact=artifact)
    assert stopped["outcome"] == "interrupted" and {hosts[h].current for h in FLEET} == {None}
    del hosts["h2"].overrides["hook"]  # the hook would pass now
    other = second_clone(app, tmp_path)
    events: list[Event] = []
    opts = DeployOptions(stage="fleet", skip_tests=True, as_json=True, retry_failed=True)
    retried = as_printed(
        run_deploy(other / "shiplane.toml", opts, Masker(), events.append, transports=hosts)
    )
    assert retried["ok"], retried["lines"]
    assert (retried["release"], retried["artifact"]) == (stopped["release"], stopped["artifact"])
    assert {hosts[h].current for h in FLEET} == {stopped["release"]}
    said = [e.detail for e in events if e.phase == "deploy" and e.status == "info"]
    assert any("was interrupted (Ctrl-C or a signal), not failed" in d for d in said), said


def test_retry_failed_from_a_clone_that_builds_another_artifact_is_refused(
    app: Path, hosts: FakeHosts, artifact: str, tmp_path: Path
) -> None:
    hosts["h3"].unreachable = True
    failed = deploy(app, hosts, artifact=artifact)
    hosts["h3"].unreachable = False
    other = second_clone(app, tmp_path)
    (other / "src" / "demo" / "changed.py").write_text("CHANGED = True\n")
    subprocess.run(["git", "-C", str(other), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(other), "commit", "-qm", "another change"], check=True)
    done = {name: len(hosts[name].ops) for name in FLEET}
    with pytest.raises(UsageError, match="this checkout builds another one") as refused:
        deploy(other, hosts, retry_failed=True)
    assert failed["artifact"][:12] in refused.value.message
    assert {
        name: [op for op in hosts[name].ops[done[name] :] if op != "history"] for name in FLEET
    } == {name: [] for name in FLEET}


# --- promote ---------------------------------------------------------------------------------------


def test_promote_moves_the_exact_artifact_live_on_the_source_stage(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    with pytest.raises(
        UsageError, match="takes only artifacts deployed healthy on 'staging' first"
    ):
        deploy(app, hosts, stage="prod", artifact=artifact)
    assert hosts["p1"].ops == [] and hosts["p2"].ops == []  # refused before any host was touched
    staged = deploy(app, hosts, stage="staging", artifact=artifact)
    assert staged["ok"]
    promoted = run_promote(
        app / "shiplane.toml",
        "staging",
        DeployOptions(stage="prod", as_json=True),
        Masker(),
        transports=hosts,
    )
    assert promoted.deploy.to_json()["ok"] and promoted.promoted_from == "staging"
    assert promoted.deploy.to_json()["artifact"] == promoted.artifact == staged["artifact"]
    assert promote_lines(promoted)[0].startswith(f"promoting artifact {promoted.artifact[:12]}")
    for name in ("p1", "p2"):
        live = hosts[name].current
        assert live is not None and hosts[name].release(live)["artifact"] == staged["artifact"]
    assert not any(e.get("event") == "deploy" for e in hosts["s1"].ledger[1:])  # staging only read


def test_promote_refuses_a_source_stage_whose_hosts_serve_nothing(
    app: Path, hosts: FakeHosts
) -> None:
    with pytest.raises(Exception, match="s1 has no live release"):
        run_promote(
            app / "shiplane.toml",
            "staging",
            DeployOptions(stage="prod"),
            Masker(),
            transports=hosts,
        )
    assert hosts["p1"].ops == []


# --- rollback --------------------------------------------------------------------------------------


def test_rollback_returns_every_host_to_the_release_before_and_marks_the_one_left(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    first = deploy(app, hosts, artifact=artifact)["release"]
    second = deploy(app, hosts, artifact=artifact)["release"]

    def rollback(yes: bool) -> dict[str, Any]:
        result = run_rollback(
            app / "shiplane.toml",
            "fleet",
            None,
            yes,
            Masker(),
            hosts=None,
            sets=(),
            transports=hosts,
        )
        return {**result.to_json(), "lines": rollback_lines(result)}

    with pytest.raises(UsageError, match="crosses release"):  # the release hook (migrations) ran
        rollback(False)
    assert {hosts[h].current for h in FLEET} == {second}
    result = rollback(True)
    assert result["ok"] and result["release"] == first
    assert result["lines"][0].startswith(f"rolled back stage fleet to {first} in ")
    for name in FLEET:
        host = hosts[name]
        assert host.current == first and host.state(second) == "rolled-back" and host.lock is None
        assert host.ledger[-1]["event"] == "rollback" and host.ledger[-1]["from"] == second
    assert local_ledger(app)[-1]["event"] == "rollback"


# --- the deploy lock -------------------------------------------------------------------------------


def test_a_host_locked_by_another_deploy_gets_nothing_and_nothing_switches(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    old = deploy(app, hosts, artifact=artifact)["release"]
    hosts["h2"].hold_lock(user="alice", host="laptop")
    done = len(hosts["h2"].ops)
    result = deploy(app, hosts, artifact=artifact)
    assert not result["ok"] and result["outcome"] == "failed"
    assert (
        "deploy lock held by alice@laptop" in result["error"] and "--lock-wait" in result["error"]
    )
    assert outcomes(result)["h2"] == "failed"
    assert {hosts[h].current for h in FLEET} == {old}
    # h2 was sent nothing and installed nothing; the others prepared (a --retry-failed then only has h2 to do)
    assert hosts["h2"].ops[done:][:1] == ["lock"] and not {"receive", "install", "switch"} & set(
        hosts["h2"].ops[done:]
    )
    assert all("install" in hosts[h].ops[done:] for h in ("h1", "h3", "h4"))
    assert hosts["h2"].lock is not None and hosts["h2"].lock["user"] == "alice"  # still alice's
    assert all(hosts[h].lock is None for h in ("h1", "h3", "h4"))  # ours, given back


def test_lock_wait_takes_the_lock_once_its_holder_gives_it_back(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    hosts["h4"].hold_lock(user="alice", host="laptop")

    def alice_finishes() -> None:
        if hosts["h4"].lock_waiting.wait(30):
            hosts["h4"].drop_lock()

    finisher = threading.Thread(target=alice_finishes)
    finisher.start()
    try:
        result = deploy(app, hosts, artifact=artifact, lock_wait=30)
    finally:
        hosts["h4"].drop_lock()
        finisher.join()
    assert result["ok"], result["lines"]
    assert {hosts[h].current for h in FLEET} == {result["release"]}
    assert all(hosts[h].lock is None for h in FLEET)


def test_a_lock_left_by_a_dead_deploy_is_broken_and_said(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    hosts["h1"].hold_lock(user="bob", host="ci", alive=False)
    result = deploy(app, hosts, artifact=artifact)
    assert result["ok"]
    assert [e["holder"]["user"] for e in hosts["h1"].ledger if e["event"] == "lock-broken"] == [
        "bob"
    ]
    assert hosts["h1"].lock is None


def test_a_maintenance_lock_refuses_the_deploy_naming_why(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    for name in FLEET:
        hosts[name].hold_lock(user="carol", kept=True, reason="db migration")
    result = deploy(app, hosts, artifact=artifact)
    assert not result["ok"] and "for: db migration" in result["error"]
    assert all(hosts[h].lock is not None and hosts[h].lock["user"] == "carol" for h in FLEET)
    assert all("receive" not in hosts[h].ops for h in FLEET) and all(
        hosts[h].current is None for h in FLEET
    )


# --- Ctrl-C ----------------------------------------------------------------------------------------


def interrupt_in(hosts: FakeHosts, host: str, command: str, *, to_main: bool = True) -> Gate:
    """Ctrl-C while ``command`` (a hook) runs on ``host``: SIGINT reaches the controller's main
    thread, the hook waits at a gate nobody opens (only the controller's cancel ends it).

    Pressed again every 2 s (10 times at most) until the cancel comes, as a user would: a
    signal that lands while the interpreter runs a finalizer raises its KeyboardInterrupt there,
    where Python reports it as ignored (once in a full CI run the deploy then waited forever).
    ``to_main=False``: pressed once, and taken by the thread running the hook, as Linux does
    when the main thread already has a signal pending; the hook then waits 10 s at most."""
    gate = Gate()

    def hook(op: str, args: dict[str, Any], payload: bytes) -> Any:
        if args.get("command") == command:
            if not to_main:
                waiting_for_hosts(threading.main_thread())
                signal.pthread_kill(threading.get_ident(), signal.SIGINT)
                gate.late = not gate.wait(hosts[host], timeout=5.0)  # not cancelled in time
                return hosts[host].default(op, args, payload)
            main = threading.main_thread().ident
            assert main is not None
            for _ in range(10):
                signal.pthread_kill(main, signal.SIGINT)
                if gate.wait(hosts[host], timeout=2.0):
                    break
        return hosts[host].default(op, args, payload)

    hosts[host].on("hook", hook)
    return gate


def waiting_for_hosts(main: threading.Thread, deadline: float = 10.0) -> None:
    """Return once ``main`` waits for the hosts' answers in ``Fleet._map`` (not still starting
    its pool's threads): where an untimed wait would not see a signal taken by another thread."""
    ident = main.ident
    assert ident is not None
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        names = [f.f_code.co_name for f, _ in traceback.walk_stack(sys._current_frames()[ident])]
        if "_map" in names and not {"submit", "start"} & set(names):
            return
        time.sleep(0.01)  # polling another thread's stack, bounded by the deadline
    raise AssertionError("the controller's main thread never waited for the hosts")


def deploy_with_an_after_deploy_hook(app: Path, hosts: FakeHosts, artifact: str) -> str:
    """A first deploy, then ``after_deploy = ["notify-chat"]`` in the deploy file; the release."""
    old = deploy(app, hosts, artifact=artifact)["release"]
    toml = app / "shiplane.toml"
    toml.write_text(
        toml.read_text().replace("[hooks]\n", '[hooks]\nafter_deploy = ["notify-chat"]\n', 1)
    )
    return str(old)


def test_ctrl_c_during_an_after_deploy_hook_returns_every_host_and_frees_the_locks(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    old = deploy_with_an_after_deploy_hook(app, hosts, artifact)
    gate = interrupt_in(hosts, "h3", "notify-chat")
    result = deploy(app, hosts, artifact=artifact)
    assert gate.reached.is_set() and not gate.opened
    assert result["outcome"] == "interrupted" and not result["ok"]
    assert {hosts[h].current for h in FLEET} == {old}  # every host had switched: all went back
    assert outcomes(result) == {h: "undone" for h in FLEET}
    assert all(hosts[h].lock is None for h in FLEET)
    assert all(hosts[h].state(result["release"]) == "bad" for h in FLEET)
    assert all(hosts[h].ledger[-1]["outcome"] == "interrupted" for h in FLEET)
    assert local_ledger(app)[-1]["outcome"] == "interrupted"


def test_a_ctrl_c_taken_by_another_thread_than_the_main_one_still_interrupts_the_deploy(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    old = deploy_with_an_after_deploy_hook(app, hosts, artifact)
    gate = interrupt_in(hosts, "h2", "notify-chat", to_main=False)
    result = deploy(app, hosts, artifact=artifact)
    assert gate.reached.is_set() and not gate.late, "the hook waited 5 s: nobody cancelled it"
    assert result["outcome"] == "interrupted"
    assert {hosts[h].current for h in FLEET} == {old}
    assert all(hosts[h].lock is None for h in FLEET)


def test_ctrl_c_during_the_release_hook_of_a_first_deploy_leaves_every_host_serving_nothing(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    interrupt_in(hosts, "h2", "alembic upgrade head")
    result = deploy(app, hosts, artifact=artifact)
    assert result["outcome"] == "interrupted"
    assert {hosts[h].current for h in FLEET} == {None}
    assert not any("switch" in hosts[h].ops for h in FLEET)
    assert all(hosts[h].lock is None and hosts[h].state(result["release"]) == "bad" for h in FLEET)


# --- a host that fails before the switch -----------------------------------------------------------


def test_an_install_that_fails_on_one_host_switches_nothing_anywhere(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    old = deploy(app, hosts, artifact=artifact)["release"]

    def broken(op: str, args: dict[str, Any], payload: bytes) -> Any:
        raise FakeError("install", "uv: no space left on device")

    hosts["h4"].on("install", broken)
    result = deploy(app, hosts, artifact=artifact)
    assert (
        not result["ok"]
        and "failed on 1 of 4 host(s), nothing was switched: h4: install: uv: no space left"
        in result["error"]
    )
    assert {hosts[h].current for h in FLEET} == {old}
    assert outcomes(result)["h4"] == "failed"
    assert not any("switch" in hosts[h].ops[-8:] for h in FLEET)
    assert all(hosts[h].lock is None for h in FLEET)


def test_ctrl_c_during_a_copy_starts_no_install_there(
    app: Path, hosts: FakeHosts, artifact: str
) -> None:
    # h2 waits for alice's lock (a cancellable op): its cancel tells h1 that the controller took the Ctrl-C
    hosts["h2"].hold_lock(user="alice", host="laptop")
    cancelled = threading.Event()

    def lock(op: str, args: dict[str, Any], payload: bytes) -> Any:
        try:
            return hosts["h2"].default(op, args, payload)
        except FakeError as exc:
            if exc.kind == "interrupted":
                cancelled.set()
            raise

    def receive(op: str, args: dict[str, Any], payload: bytes) -> Any:
        assert hosts["h2"].lock_waiting.wait(30) and threading.main_thread().ident is not None
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        assert cancelled.wait(30), "the controller never cancelled h2's lock wait"
        return hosts["h1"].default(op, args, payload)

    hosts["h2"].on("lock", lock)
    hosts["h1"].on("receive", receive)
    result = deploy(app, hosts, artifact=artifact, lock_wait=60)
    assert result["outcome"] == "interrupted"
    assert hosts["h2"].lock is not None and hosts["h2"].lock["user"] == "alice"
    assert all(hosts[h].lock is None for h in ("h1", "h3", "h4")) and {
        hosts[h].current for h in FLEET
    } == {None}
    assert "install" not in hosts["h1"].ops


# --- preflight -------------------------------------------------------------------------------------


def test_a_host_that_cannot_be_reached_stops_the_deploy_before_the_test_gate(
    app: Path, hosts: FakeHosts
) -> None:
    hosts["h3"].unreachable = True
    events: list[Event] = []
    opts = DeployOptions(stage="fleet", as_json=True)  # the scaffold's gate: its pytest suite
    result = as_printed(
        run_deploy(app / "shiplane.toml", opts, Masker(), events.append, transports=hosts)
    )
    assert (
        not result["ok"] and "so the test gate did not run and nothing was sent" in result["error"]
    )
    assert "h3" in result["error"]
    assert not [e for e in events if e.phase in ("gate", "build")], "the gate or the build ran"
    assert not any(set(hosts[h].ops) & {"lock", "receive", "install"} for h in FLEET)
