"""The task graph: pipeline steps and user tasks joined by needs/before/after, checked, run in parallel.

Edges come in two kinds. *Dependencies* are hard: `needs`, `after` (the task waits for its anchor),
`before` (the anchor waits for the task) and the pipeline chain; running a task runs them first.
*Hook slots* only order tasks that run anyway: a task hooked `after = ["release"]` also makes
`switch` wait for it, and one hooked `before = ["switch"]` also waits for `release`, so a hook
runs between the two steps it names rather than racing the pipeline. A slot that would close a
cycle is dropped (the hook then just keeps its hard edges); only hard edges can form a cycle error.
"""

from __future__ import annotations

import difflib
import heapq
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypedDict

from shiplane.errors import ConfigError, OperationError, ShiplaneError

Scope = str  # "local" | "all" | "primary" | "role:NAME"
Status = Literal["ok", "failed", "skipped"]

# The deploy's steps, in the order `shiplane deploy` runs them (commands/deploy.py, README "The
# deploy pipeline"); each candidate is verified (health, smoke) inside `switch`.
PIPELINE: tuple[str, ...] = (
    "gate",
    "build",
    "lock",
    "copy",
    "install",
    "release",
    "switch",
    "finalize",
)
# lock, copy and install run on each host as one chain (a slow host delays no other): user tasks
# hook around the chain as a whole, before `lock` or after `install`, never inside it.
CHAIN: tuple[str, ...] = ("lock", "copy", "install")
# Where each pipeline step acts: shown by `shiplane tasks`; the deploy code implements them.
PIPELINE_SCOPES: dict[str, Scope] = {
    "gate": "local",
    "build": "local",
    "release": "primary",
}
_SCOPE = re.compile(r"^(local|all|primary|role:[A-Za-z0-9][A-Za-z0-9_.-]*)$")


@dataclass(frozen=True)
class Task:
    """One node of the graph: a user task (`run` is its shell command) or a pipeline step."""

    name: str
    run: str | None  # None for pipeline steps (implemented by the deploy code)
    on: Scope = "local"
    needs: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    builtin: bool = False


class TaskJson(TypedDict):
    """One task of ``shiplane tasks --json``."""

    name: str
    run: str | None
    on: str
    builtin: bool
    needs: list[str]
    before: list[str]
    after: list[str]
    dependencies: list[str]
    in_deploy: bool


class GraphJson(TypedDict):
    """``shiplane tasks --json``: the pipeline, the tasks a deploy runs, every task."""

    pipeline: list[str]
    deploy: list[str]
    tasks: list[TaskJson]


class GraphError(ConfigError):
    """The task graph is invalid (unknown name, clash with a pipeline step, bad scope, cycle)."""


class TaskGraph:
    """A checked, acyclic graph of pipeline steps and user tasks. Build it with :meth:`build`."""

    def __init__(
        self,
        tasks: dict[str, Task],
        pipeline: tuple[str, ...],
        deps: dict[str, tuple[str, ...]],
        slots: dict[str, set[str]],
    ) -> None:
        self.tasks = tasks
        self.pipeline = pipeline
        self._deps = deps  # name -> names it waits for (hard)
        self._slots = slots  # name -> names it waits for only when both run (hook slots)
        self._rank = {name: i for i, name in enumerate(tasks)}

    @classmethod
    def build(cls, user_tasks: Mapping[str, Task], pipeline: Sequence[str] = PIPELINE) -> TaskGraph:
        """Check `user_tasks` against each other and the pipeline chain; raise GraphError listing
        every problem (unknown names with a suggestion, clashes, bad scopes) or the first cycle."""
        tasks = {s: Task(s, None, on=PIPELINE_SCOPES.get(s, "all"), builtin=True) for s in pipeline}
        problems: list[str] = []
        for key, task in user_tasks.items():
            if key != task.name:
                problems.append(f'task "{key}" is defined with the name "{task.name}"')
            elif key in tasks:
                problems.append(
                    f'task "{key}" has the name of a pipeline step; rename it '
                    f"(the pipeline steps are {', '.join(pipeline)})"
                )
            else:
                tasks[key] = task
        for task in user_tasks.values():
            if not _SCOPE.match(task.on):
                problems.append(
                    f'task "{task.name}": on = "{task.on}" is not a scope; use '
                    '"local", "all", "primary" or "role:NAME"'
                )
            for kind in ("needs", "before", "after"):
                for ref in getattr(task, kind):
                    if ref not in tasks:
                        problems.append(f'task "{task.name}": {kind} {_unknown(ref, tasks)}')
        if problems:
            raise GraphError("\n".join(problems))

        deps: dict[str, list[str]] = {name: [] for name in tasks}
        for prev, step in itertools.pairwise(pipeline):
            deps[step].append(prev)
        for task in tasks.values():
            deps[task.name] += [*task.needs, *task.after]
            for anchor in task.before:
                deps[anchor].append(task.name)
        hard = {name: tuple(dict.fromkeys(d)) for name, d in deps.items()}
        cycle = _find_cycle(list(tasks), hard, user_first=set(user_tasks))
        if cycle:
            raise GraphError(
                "tasks form a cycle: " + " -> ".join(cycle),
                hint="each task must run before the next one; remove one of their "
                "needs/before/after entries",
            )
        return cls(tasks, tuple(pipeline), hard, _hook_slots(tasks, tuple(pipeline), hard))

    def task(self, name: str) -> Task:
        """The task called `name`; GraphError (with a suggestion) if there is none."""
        if name not in self.tasks:
            raise GraphError(_unknown(name, self.tasks))
        return self.tasks[name]

    def dependencies(self, name: str) -> tuple[str, ...]:
        """Direct hard edges: what `name` waits for (needs, after, reversed before, the chain)."""
        self.task(name)
        return self._deps[name]

    def closure(self, targets: Iterable[str]) -> list[str]:
        """`targets` and everything they transitively depend on, in a topological order."""
        seen: set[str] = set()
        stack = [self.task(t).name for t in targets]
        while stack:
            name = stack.pop()
            if name not in seen:
                seen.add(name)
                stack.extend(self._deps[name])
        return self.order(seen)

    def deploy_tasks(self) -> list[str]:
        """What a deploy runs: the pipeline, user tasks hooked (before/after) onto anything it
        runs, and their dependencies, in a topological order with hooks between their steps."""
        selected = set(self.closure(self.pipeline))
        while True:
            hooked = [
                t.name
                for t in self.tasks.values()
                if t.name not in selected and selected.intersection((*t.before, *t.after))
            ]
            if not hooked:
                return self.order(selected)
            selected.update(self.closure(hooked))

    def deploy_points(self) -> dict[str, list[str]]:
        """The user tasks a deploy runs before each pipeline step (key: the step; ``""`` after the
        last), in order: the deploy runs them at those points. GraphError when one would have to
        run inside the lock/copy/install chain."""
        points: dict[str, list[str]] = {step: [] for step in (*self.pipeline, "")}
        pending: list[str] = []
        for name in self.deploy_tasks():
            if not self.tasks[name].builtin:
                pending.append(name)
                continue
            if pending and name in CHAIN[1:]:
                raise GraphError(
                    f"task {pending[0]!r} would run between {CHAIN[CHAIN.index(name) - 1]!r} and "
                    f"{name!r}, which run on each host as one chain",
                    hint='hook it before = ["lock"] or after = ["install"] instead',
                )
            points[name], pending = pending, []
        points[""] = pending
        return {step: tasks for step, tasks in points.items() if tasks}

    def order(self, names: Iterable[str]) -> list[str]:
        """`names` in a topological order (edges outside `names` ignored); ties keep the
        pipeline first, then user tasks as defined, so the order is stable."""
        chosen = {self.task(n).name for n in names}
        waits = {n: self._waits_within(n, chosen) for n in chosen}
        dependents: dict[str, list[str]] = {n: [] for n in chosen}
        for name, ws in waits.items():
            for w in ws:
                dependents[w].append(name)
        missing = {n: len(ws) for n, ws in waits.items()}
        ready = [(self._rank[n], n) for n, count in missing.items() if count == 0]
        heapq.heapify(ready)
        result: list[str] = []
        while ready:
            _, name = heapq.heappop(ready)
            result.append(name)
            for d in dependents[name]:
                missing[d] -= 1
                if missing[d] == 0:
                    heapq.heappush(ready, (self._rank[d], d))
        return result

    def levels(self, names: Iterable[str]) -> list[list[str]]:
        """Topological layers of `names`: every task comes in a later layer than all it waits
        for, and the tasks of one layer are independent of each other."""
        ordered = self.order(names)
        chosen = set(ordered)
        depth: dict[str, int] = {}
        for name in ordered:
            depth[name] = 1 + max((depth[w] for w in self._waits_within(name, chosen)), default=-1)
        layers: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
        for name in ordered:
            layers[depth[name]].append(name)
        return layers

    def render(self) -> str:
        """The text of `shiplane tasks`: the deploy in order (pipeline steps marked `*`, hooked
        user tasks where they run), then the tasks only `shiplane run NAME` runs."""
        deploy = self.deploy_tasks()
        others = [n for n in self.tasks if n not in set(deploy)]
        width = max(len(n) for n in self.tasks)
        lines = ["deploy (in order; * = pipeline step):"]
        lines += [self._line(n, width) for n in deploy]
        if others:
            lines += ["", "other tasks (shiplane run NAME):"]
            lines += [self._line(n, width) for n in self.order(others)]
        return "\n".join(lines)

    def to_json(self) -> GraphJson:
        """The graph as JSON-ready data (for `shiplane tasks --json`)."""
        deploy = self.deploy_tasks()
        return {
            "pipeline": list(self.pipeline),
            "deploy": deploy,
            "tasks": [
                {
                    "name": t.name,
                    "run": t.run,
                    "on": t.on,
                    "builtin": t.builtin,
                    "needs": list(t.needs),
                    "before": list(t.before),
                    "after": list(t.after),
                    "dependencies": list(self._deps[t.name]),
                    "in_deploy": t.name in deploy,
                }
                for t in self.tasks.values()
            ],
        }

    def _waits_within(self, name: str, chosen: set[str]) -> list[str]:
        waits = [*self._deps[name], *sorted(self._slots.get(name, ()), key=self._rank.__getitem__)]
        return [w for w in dict.fromkeys(waits) if w in chosen]

    def _line(self, name: str, width: int) -> str:
        task = self.tasks[name]
        mark = "*" if task.builtin else " "
        parts = [
            f"{kind} {', '.join(getattr(task, kind))}"
            for kind in ("needs", "before", "after")
            if getattr(task, kind)
        ]
        text = f"  {mark} {name:<{width}}  {task.on:<10}  {'; '.join(parts) or '-'}"
        return f"{text}  $ {task.run}" if task.run else text


def _unknown(name: str, known: Iterable[str]) -> str:
    """'unknown task "x"', with a did-you-mean suggestion when a known name is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f'unknown task "{name}"' + (f'; did you mean "{close[0]}"?' if close else "")


def _find_cycle(
    names: list[str], deps: Mapping[str, Sequence[str]], user_first: set[str]
) -> list[str] | None:
    """A cycle in run order (a -> b: a runs before b), closed (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the DFS path, 2 = done
    for root in names:
        if root in state:
            continue
        path, iters = [root], [iter(deps[root])]
        state[root] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                waits = path[path.index(nxt) :]  # each waits for the next, the last for nxt
                run_order = waits[::-1]
                # Start at a user task if one is involved: that is what the user can change.
                start = min(run_order, key=lambda n: (n not in user_first, n))
                i = run_order.index(start)
                cycle = run_order[i:] + run_order[:i]
                return [*cycle, cycle[0]]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(deps[nxt]))
    return None


def _hook_slots(
    tasks: Mapping[str, Task], pipeline: tuple[str, ...], deps: Mapping[str, Sequence[str]]
) -> dict[str, set[str]]:
    """Ordering edges that keep hooks between pipeline steps (see the module docstring).
    A hook of a hook inherits its slot: `after = ["warm"]` where warm runs after release also
    runs before switch. Edges that would close a cycle are left out."""
    nxt = dict(itertools.pairwise(pipeline))
    prev = {b: a for a, b in nxt.items()}
    succ: dict[str, set[str]] = {n: {nxt[n]} if n in nxt else set() for n in pipeline}
    pred: dict[str, set[str]] = {n: {prev[n]} if n in prev else set() for n in pipeline}
    user = [t for t in tasks.values() if not t.builtin]
    changed = True
    while changed:  # propagate slots through chains of hooks until nothing changes
        changed = False
        for t in user:
            s: set[str] = set().union(*(succ.get(a, set()) for a in t.after))
            p: set[str] = set().union(*(pred.get(a, set()) for a in t.before))
            if not s <= succ.get(t.name, set()) or not p <= pred.get(t.name, set()):
                succ[t.name] = succ.get(t.name, set()) | s
                pred[t.name] = pred.get(t.name, set()) | p
                changed = True
    slots: dict[str, set[str]] = {}

    def waits_for(a: str, b: str) -> bool:  # does a (transitively) wait for b?
        seen, stack = set(), [a]
        while stack:
            n = stack.pop()
            if n == b:
                return True
            if n not in seen:
                seen.add(n)
                stack += [*deps[n], *slots.get(n, ())]
        return False

    for t in user:
        edges = [(s, t.name) for s in sorted(succ.get(t.name, ()))]
        edges += [(t.name, p) for p in sorted(pred.get(t.name, ()))]
        for waiter, waited in edges:
            if not waits_for(waited, waiter):
                slots.setdefault(waiter, set()).add(waited)
    return slots


@dataclass
class TaskOutcome:
    """How one task of a run ended; `error` says why it failed or was skipped."""

    name: str
    status: Status
    seconds: float
    error: str | None = None


@dataclass
class RunResult:
    """The outcomes of :func:`run_graph`, in topological order."""

    outcomes: dict[str, TaskOutcome] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every task ran and succeeded."""
        return all(o.status == "ok" for o in self.outcomes.values())

    @property
    def failed(self) -> list[str]:
        """The tasks whose runner raised (not those skipped because of them)."""
        return [n for n, o in self.outcomes.items() if o.status == "failed"]


def run_graph(
    graph: TaskGraph,
    names: Sequence[str],
    runner: Callable[[Task], None],
    *,
    max_workers: int = 4,
    on_event: Callable[[str, str, float], None] | None = None,
) -> RunResult:
    """Runs `names` (already closed over dependencies; edges to tasks outside it are ignored)
    with independent tasks in parallel: a task starts as soon as everything it waits for
    succeeded. A runner that raises marks the task failed; its dependents (transitively) are
    'skipped' and never run; tasks not depending on it still run. on_event(name,
    'start'|'ok'|'failed'|'skipped', seconds) is called from the calling thread."""
    if max_workers < 1:
        raise ValueError("max_workers must be at least 1")
    run = _Run(graph, graph.order(names), on_event or (lambda name, status, seconds: None))
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="task") as pool:
        while run.pending or run.running:
            run.start_ready(pool, runner, max_workers)
            if not run.running:
                break  # cannot happen for an acyclic graph; never spin
            done, _ = wait(run.running, return_when=FIRST_COMPLETED)
            run.collect(done)
    return RunResult({n: run.outcomes[n] for n in run.order if n in run.outcomes})


class _Run:
    """The state of one :func:`run_graph`: what waits, what runs, how each task ended."""

    def __init__(
        self, graph: TaskGraph, order: list[str], emit: Callable[[str, str, float], None]
    ) -> None:
        self.graph, self.order, self.emit = graph, order, emit
        chosen = set(order)
        self.waits = {n: graph._waits_within(n, chosen) for n in order}
        self.dependents: dict[str, list[str]] = {n: [] for n in order}
        for name, ws in self.waits.items():
            for w in ws:
                self.dependents[w].append(name)
        self.outcomes: dict[str, TaskOutcome] = {}
        self.pending = list(order)
        self.running: dict[Future[None], tuple[str, float]] = {}

    def ready(self, name: str) -> bool:
        return all(w in self.outcomes and self.outcomes[w].status == "ok" for w in self.waits[name])

    def start_ready(
        self, pool: ThreadPoolExecutor, runner: Callable[[Task], None], max_workers: int
    ) -> None:
        """Submit every pending task whose dependencies all succeeded, while a worker is free."""
        for name in list(self.pending):
            if len(self.running) >= max_workers:
                break
            if self.ready(name):
                self.pending.remove(name)
                self.emit(name, "start", 0.0)
                self.running[pool.submit(runner, self.graph.tasks[name])] = (
                    name,
                    time.monotonic(),
                )

    def collect(self, done: set[Future[None]]) -> None:
        """Record the tasks that finished, in topological order; a failure skips its dependents."""
        for future in sorted(done, key=lambda f: self.order.index(self.running[f][0])):
            name, started = self.running.pop(future)
            seconds = time.monotonic() - started
            error = future.exception()
            if error is None:
                self.outcomes[name] = TaskOutcome(name, "ok", seconds)
                self.emit(name, "ok", seconds)
            else:
                self.outcomes[name] = TaskOutcome(name, "failed", seconds, _describe(error))
                self.emit(name, "failed", seconds)
                self.skip_dependents(name)

    def skip_dependents(self, failed: str) -> None:
        stack = list(self.dependents[failed])
        while stack:
            name = stack.pop()
            if name in self.pending:
                self.pending.remove(name)
                self.outcomes[name] = TaskOutcome(
                    name, "skipped", 0.0, f'not run: "{failed}" failed'
                )
                self.emit(name, "skipped", 0.0)
                stack += self.dependents[name]


def _describe(error: BaseException) -> str:
    if isinstance(error, ShiplaneError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def run_local_command(
    command: str,
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float | None,
    output: Callable[[str], None],
) -> None:
    """Runs `command` with /bin/sh -c in its own process group, streaming its output lines
    (stdout and stderr merged) to `output`. On timeout the whole group gets SIGTERM, then
    SIGKILL after a grace period. Raises OperationError naming the exit code or the timeout."""
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command],
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    stream = proc.stdout

    def pump() -> None:
        for raw in iter(stream.readline, b""):
            output(raw.decode("utf-8", "replace").rstrip("\r\n"))

    reader = threading.Thread(target=pump, name="task-output", daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        reader.join(timeout=2)
        raise OperationError(
            f"`{command}` timed out after {timeout:g} s; its processes were killed"
        ) from None
    # A background child may keep the pipe open after the shell exits: do not wait for it forever.
    reader.join(timeout=2)
    if code != 0:
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code < 0
            else f"failed with exit code {code}"
        )
        raise OperationError(f"`{command}` {how}")


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM the whole process group, then SIGKILL whatever is left of it after `grace`."""
    for sig, wait_for in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass  # the whole group is already gone
        try:
            proc.wait(timeout=wait_for)
        except subprocess.TimeoutExpired:
            pass
