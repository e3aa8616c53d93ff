"""The task graph (SPEC §11): checks, hook placement, parallel runs, failures, the local runner."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shiplane.errors import ConfigError, OperationError
from shiplane.tasks import (
    PIPELINE,
    GraphError,
    Task,
    TaskGraph,
    run_graph,
    run_local_command,
)


def user(name: str, **kw: object) -> Task:
    kw.setdefault("run", f"echo {name}")
    return Task(name=name, **kw)  # type: ignore[arg-type]


def graph(*tasks: Task) -> TaskGraph:
    return TaskGraph.build({t.name: t for t in tasks})


def between(order: list[str], name: str, first: str, then: str) -> bool:
    return order.index(first) < order.index(name) < order.index(then)


# --- checks -----------------------------------------------------------------------------------


def test_unknown_name_is_a_config_error_with_did_you_mean() -> None:
    with pytest.raises(GraphError) as err:
        graph(user("reindex", needs=("relase",)), user("warm", after=("reindx",)))
    message = str(err.value)
    assert 'task "reindex": needs unknown task "relase"; did you mean "release"?' in message
    assert 'task "warm": after unknown task "reindx"; did you mean "reindex"?' in message
    assert isinstance(err.value, ConfigError) and err.value.exit_code == 2


def test_cycle_message_shows_the_exact_cycle_in_run_order() -> None:
    with pytest.raises(GraphError) as err:
        graph(
            user("a", needs=("b",)),
            user("b", needs=("c",)),
            user("c", needs=("a",)),
            user("unrelated"),
        )
    # c runs before b, b before a, a before c
    assert err.value.message == "tasks form a cycle: a -> c -> b -> a"


def test_hook_before_gate_that_needs_a_later_step_is_a_true_cycle() -> None:
    with pytest.raises(GraphError) as err:
        graph(user("pre", before=("gate",), needs=("release",)))
    assert err.value.message == (
        "tasks form a cycle: pre -> gate -> build -> lock -> copy -> install -> release -> pre"
    )


def test_hook_before_gate_alone_is_fine_and_runs_first() -> None:
    order = graph(user("pre", before=("gate",))).deploy_tasks()
    assert order == ["pre", *PIPELINE]


def test_self_dependency_is_a_cycle() -> None:
    with pytest.raises(GraphError, match=r"^tasks form a cycle: a -> a"):
        graph(user("a", after=("a",)))


def test_user_task_named_like_a_pipeline_step_and_bad_scope_are_refused() -> None:
    with pytest.raises(GraphError) as err:
        graph(user("switch"), user("x", on="roles:web"), user("y", on="role:web"))
    message = str(err.value)
    assert 'task "switch" has the name of a pipeline step' in message
    assert 'task "x": on = "roles:web" is not a scope' in message
    assert '"y"' not in message


# --- shape ------------------------------------------------------------------------------------


def test_hooked_tasks_land_between_the_right_steps() -> None:
    g = graph(
        user("migrate_search", needs=("release",), before=("switch",), on="primary"),
        user("warm", after=("release",)),
        user("warm_more", after=("warm",)),
        user("notify", before=("switch",)),
        user("ping", after=("finalize",)),
        user("backup", on="role:db"),
    )
    order = g.deploy_tasks()
    for hook in ("migrate_search", "warm", "warm_more", "notify"):
        assert between(order, hook, "release", "switch"), order
    assert order[-1] == "ping"
    assert "backup" not in order
    assert [n for n in order if n in PIPELINE] == list(PIPELINE)
    # switch waits for every hook of its slot; the hooks do not wait for each other
    layers = g.levels(order)
    layer_of = {n: i for i, layer in enumerate(layers) for n in layer}
    assert layer_of["migrate_search"] == layer_of["warm"] == layer_of["notify"]
    assert layer_of["switch"] > layer_of["warm_more"] > layer_of["warm"]


def test_hook_slot_that_would_close_a_cycle_is_dropped() -> None:
    # runs after release but needs switch: it cannot also run before switch, and that is fine
    order = graph(user("audit", after=("release",), needs=("switch",))).deploy_tasks()
    assert order.index("audit") > order.index("switch")


def test_dependencies_and_closure() -> None:
    g = graph(user("reindex", needs=("release",)), user("notify", before=("switch",)))
    assert g.dependencies("reindex") == ("release",)
    assert set(g.dependencies("switch")) == {"release", "notify"}
    assert g.closure(["reindex"]) == [*PIPELINE[: PIPELINE.index("release") + 1], "reindex"]
    # running a hook on its own does not start a deploy
    assert g.closure(["notify"]) == ["notify"]
    with pytest.raises(GraphError, match='did you mean "reindex"'):
        g.closure(["reindx"])


def test_render_and_json_show_pipeline_hooks_and_other_tasks() -> None:
    g = graph(
        user("warm", after=("release",), run="curl -s localhost/warm"),
        user("backup", on="role:db", run="pg_dump app"),
    )
    text = g.render()
    lines = text.splitlines()
    deploy_part = lines[: lines.index("")]
    names = [
        line.split()[1] if line.lstrip().startswith("*") else line.split()[0]
        for line in deploy_part[1:]
    ]
    assert names == [*PIPELINE[:6], "warm", *PIPELINE[6:]]
    assert any(line.startswith("  * release") and "primary" in line for line in lines)
    assert "curl -s localhost/warm" in text and "after release" in text
    other = lines[lines.index("") + 1 :]
    assert "shiplane run" in other[0] and "backup" in other[1] and "role:db" in other[1]
    data = g.to_json()
    assert data["deploy"] == [*PIPELINE[:6], "warm", *PIPELINE[6:]]
    backup = next(t for t in data["tasks"] if t["name"] == "backup")
    assert backup["in_deploy"] is False and backup["on"] == "role:db"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_levels_put_every_task_after_all_its_dependencies(data: st.DataObject) -> None:
    n = data.draw(st.integers(min_value=0, max_value=12))
    names = [f"t{i}" for i in range(n)]
    tasks = []
    for i, name in enumerate(names):
        # edges only point from later to earlier tasks (or onto the pipeline): a DAG by construction
        earlier = st.sampled_from([*names[:i], *PIPELINE])
        needs = data.draw(st.lists(earlier, max_size=3, unique=True))
        after = data.draw(st.lists(earlier, max_size=2, unique=True))
        before = data.draw(
            st.lists(st.sampled_from(names[i + 1 :]), max_size=2, unique=True)
            if i + 1 < n
            else st.just([])
        )
        tasks.append(user(name, needs=tuple(needs), after=tuple(after), before=tuple(before)))
    g = graph(*tasks)
    subset = data.draw(st.lists(st.sampled_from([*names, *PIPELINE]), unique=True))
    for chosen in (g.deploy_tasks(), g.closure(subset), [*names, *PIPELINE]):
        layers = g.levels(chosen)
        flat = [t for layer in layers for t in layer]
        assert sorted(flat) == sorted(chosen)
        layer_of = {t: i for i, layer in enumerate(layers) for t in layer}
        for t in flat:
            for dep in g.dependencies(t):
                if dep in layer_of:
                    assert layer_of[dep] < layer_of[t], (t, dep, layers)


# --- running ----------------------------------------------------------------------------------


def test_independent_tasks_really_run_in_parallel() -> None:
    g = graph(user("a"), user("b"), user("after_both", needs=("a", "b")))
    barrier = threading.Barrier(2, timeout=10)
    ran: list[str] = []

    def runner(task: Task) -> None:
        if task.name in ("a", "b"):
            barrier.wait()  # raises BrokenBarrierError unless both are running at once
        ran.append(task.name)

    result = run_graph(g, ["a", "b", "after_both"], runner, max_workers=2)
    assert result.ok, result.outcomes
    assert ran[-1] == "after_both"


def test_failure_skips_dependents_but_not_unrelated_tasks() -> None:
    g = graph(
        user("broken"),
        user("child", needs=("broken",)),
        user("grandchild", needs=("child",)),
        user("unrelated"),
        user("late", needs=("unrelated",)),
    )
    ran: list[str] = []
    events: list[tuple[str, str]] = []

    def runner(task: Task) -> None:
        ran.append(task.name)
        if task.name == "broken":
            raise OperationError("`reindex` failed with exit code 3")

    result = run_graph(
        g,
        g.closure(["grandchild", "late"]),
        runner,
        on_event=lambda name, status, seconds: events.append((name, status)),
    )
    assert not result.ok
    assert result.failed == ["broken"]
    assert result.outcomes["broken"].error == "`reindex` failed with exit code 3"
    assert result.outcomes["child"].status == "skipped"
    assert result.outcomes["grandchild"].status == "skipped"
    assert '"broken" failed' in (result.outcomes["grandchild"].error or "")
    assert sorted(ran) == ["broken", "late", "unrelated"]
    assert result.outcomes["late"].status == "ok"
    assert ("broken", "failed") in events and ("grandchild", "skipped") in events
    assert ("child", "start") not in events


def test_a_runner_bug_is_reported_not_raised() -> None:
    g = graph(user("a"))

    def runner(task: Task) -> None:
        raise KeyError("oops")

    result = run_graph(g, ["a"], runner)
    assert result.failed == ["a"] and "KeyError" in (result.outcomes["a"].error or "")


# --- the local runner -------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie waiting for its (new) parent to reap it is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_local_command_streams_output_and_reports_exit_code(tmp_path: Path) -> None:
    lines: list[str] = []
    env = {"PATH": os.environ["PATH"], "GREETING": "hello"}
    run_local_command(
        'echo "$GREETING from $(pwd)"; echo err >&2',
        cwd=tmp_path,
        env=env,
        timeout=10,
        output=lines.append,
    )
    assert lines == [f"hello from {tmp_path}", "err"]
    with pytest.raises(OperationError, match="exit code 3"):
        run_local_command(
            "echo partial; exit 3", cwd=tmp_path, env=env, timeout=10, output=lines.append
        )
    assert lines[-1] == "partial"


def test_local_command_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    lines: list[str] = []
    with pytest.raises(OperationError, match=r"timed out after 0\.5 s"):
        run_local_command(
            f"sleep 30 & echo $! > {pidfile}; echo started; wait",
            cwd=tmp_path,
            env={"PATH": os.environ["PATH"]},
            timeout=0.5,
            output=lines.append,
        )
    assert lines == ["started"]
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling with a deadline, not synchronisation
    assert _gone(child), f"background child {child} survived the timeout"
