"""Turns the bench's measurements into BENCHMARKS.md (and the same text on stdout)."""

from __future__ import annotations

from typing import Any

from _benchlib import Series

ROWS = [
    ("cold", "(a) cold deploy `deploy --stage local --skip-tests`"),
    ("warm", "(b) warm redeploy of a one-line change (edit, commit, deploy)"),
    ("warm_live", "(b) … of which: until the new release takes new connections"),
    ("rollback", "(c) `rollback --stage local`"),
    ("rollback_live", "(c) … of which: until the old release takes new connections"),
    ("manual", "(d) the article's manual flow (wheel, cp, venv + pip, stop, start, `/up` 200)"),
    ("manual_downtime", "(d) … of which: downtime (old gunicorn stopped until `/up` 200)"),
    ("floor", "(e) floor: gunicorn from an existing venv until `/up` 200"),
]
PHASE_ORDER = [
    "gate",
    "test",
    "build",
    "connect",
    "lock",
    "copy",
    "install",
    "release",
    "switch",
    "switch ▸ until live",
    "switch ▸ after live",
    "finalize",
    "prune",
    "unlock",
    "controller (rest)",
]


def _s(x: float) -> str:
    return f"{x:.2f} s"


def _row(series: Series, label: str) -> str:
    if not series.values:
        return f"| {label} | – | – | – | 0 |"
    return (
        f"| {label} | {_s(series.median)} | {_s(series.low)} | {_s(series.high)} | "
        f"{len(series.values)} |"
    )


def _targets(res: dict[str, Any]) -> list[str]:
    s = res["series"]
    warm_floor = s["warm"].median / s["floor"].median
    manual_cold = s["manual"].median / s["cold"].median
    rollback = s["rollback"].median
    live_floor = s["warm_live"].median / s["floor"].median
    rollback_live = s["rollback_live"].median
    rows = [
        ("warm redeploy / floor (b)/(e)", f"{warm_floor:.1f}×", "≤ 2×", warm_floor <= 2),
        (
            "… counting only until the new release takes traffic",
            f"{live_floor:.1f}×",
            "≤ 2×",
            live_floor <= 2,
        ),
        ("manual flow / cold deploy (d)/(a)", f"{manual_cold:.1f}×", "≥ 5×", manual_cold >= 5),
        ("rollback (c), whole command", _s(rollback), "≤ 1 s", rollback <= 1),
        (
            "… counting only until the old release takes traffic",
            _s(rollback_live),
            "≤ 1 s",
            rollback_live <= 1,
        ),
    ]
    out = ["| ratio or figure | measured (medians) | target | met |", "|---|---|---|---|"]
    out += [
        f"| {name} | {value} | {target} | {'yes' if ok else '**no**'} |"
        for name, value, target, ok in rows
    ]
    return out


def _phase_table(
    phases: dict[str, Series], title: str, total: float, ordered: bool = True
) -> list[str]:
    names = list(phases)
    if ordered:
        names.sort(key=lambda n: (PHASE_ORDER.index(n) if n in PHASE_ORDER else 50, n))
    out = [f"| {title} | median | min | max | share of the median total |", "|---|---|---|---|---|"]
    for name in names:
        series = phases[name]
        share = f"{100 * series.median / total:.0f} %" if total > 0 else "–"
        out.append(
            f"| {name} | {_s(series.median)} | {_s(series.low)} | {_s(series.high)} | {share} |"
        )
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def render_markdown(res: dict[str, Any]) -> str:
    """The whole BENCHMARKS.md."""
    m, s, runs = res["machine"], res["series"], res["runs"]
    gate = res.get("cold_gate") or {}
    lines = [
        "# Benchmarks",
        "",
        "How fast shiplane's core deploy is on one machine, against the manual flow it replaces",
        "(the article in `docs/origin-article.zh.md`: build a wheel, copy it, make a venv, pip",
        "install, restart gunicorn). Everything runs on the `local` stage of the app",
        "`shiplane init` scaffolds (Flask + SQLAlchemy + Alembic, 12 locked wheels, gunicorn with",
        "2 workers), so there is no network hop: these are the costs of the tool itself and of",
        "the app's processes. Figures are wall-clock medians (min and max beside them) of",
        f"{runs} runs per scenario, all measured in one session, in rounds that run each",
        "scenario once (so a change in the machine's load hits all of them alike).",
        "",
        f"- **Machine:** {m['cores']} cores ({m['cpu']}), {m['os']}",
        f"- **Python:** {m['python']} (`{m['python_path']}`), {m['uv']}, shiplane {m['shiplane']}",
        (
            f"- **Date:** {m['date']}; 1-minute load average during the rounds "
            f"{min(res['load']):.1f}–{max(res['load']):.1f} (other work shared the cores)"
        ),
        (
            f"- **Reproduce** (from the repository root, about {res['bench_seconds'] / 60:.0f} min): "
            f"`{res['command']}`"
        ),
        "",
        "| scenario | median | min | max | runs |",
        "|---|---|---|---|---|",
        *[_row(s[key], label) for key, label in ROWS],
    ]
    first = res.get("cold_first") or {}
    if first:
        lines.append(
            f"| (a) cold deploy with an empty per-user cache (the controller's first deploy: "
            f"wheelhouse and bytecode made), once | {_s(first['wall'])} | | | 1 |"
        )
    if gate:
        ctrl = ", ".join(f"{k} {v:.2f} s" for k, v in gate.get("controller", {}).items())
        lines.append(
            f"| (a) cold deploy with the test gate (`deploy --stage local`), once | "
            f"{_s(gate['wall'])} | | | 1 |"
        )
        lines += ["", f"The gated cold deploy's controller phases: {ctrl}."]
    lines += ["", "## Targets", "", *_targets(res), ""]
    warm_total = s["warm"].median
    lines += [
        "## Where a warm redeploy spends its time",
        "",
        "Per-phase timings of the warm redeploys, from `deploy --json` (`build` from its",
        "event, the host phases from `result.hosts.local.phases`; `controller (rest)` is the",
        "wall time not inside any phase: interpreter start, config, gate check, output;",
        "the two `switch ▸` rows split `switch` at the moment the new release takes new",
        "connections; `connect` runs while `build` does, so the rows add up to more than",
        "the wall time and `controller (rest)` is a lower bound).",
        "",
        *_phase_table(res["warm_phases"], "phase", warm_total),
        "",
    ]
    cold: dict[str, Series] = {}
    for run in res["cold_runs"]:
        phases = {**run["controller"], **run["phases"]}
        phases["controller (rest)"] = run["wall"] - sum(phases.values())
        for name, secs in phases.items():
            cold.setdefault(name, Series(name)).add(secs)
    lines += [
        "## Where a cold deploy spends its time",
        "",
        *_phase_table(cold, "phase", s["cold"].median),
        "",
    ]
    lines += [
        "## The manual flow, step by step",
        "",
        *_phase_table(res["manual_steps"], "step", s["manual"].median, ordered=False),
        "",
    ]
    lines += [
        "## How it is measured",
        "",
        "- (a) before each run the stage's services are stopped (`shiplane stop --all`) and",
        "  `.shiplane/` is deleted: a fresh deploy root (host store, venvs) and a fresh",
        "  `.shiplane/build`. The per-user uv, pip and shiplane caches (`~/.cache`: wheels,",
        "  the build backend's env, the dependencies' bytecode) stay warm, as pip's does for",
        "  (d): one untimed gated deploy fills them first, so no figure includes a download;",
        "  the `local` stage's venv installs through that same uv cache (a remote host's",
        "  through its deploy root's own). One extra run with an empty shiplane cache shows a",
        "  controller's first deploy.",
        "- (b) each run edits a template string in `src/demo/views.py`, commits, deploys, and",
        "  checks that no venv was built, the host's `venvs/` is unchanged, under 256 KiB was",
        "  sent, and the public port serves the edited page. (c) follows each (b) and checks the",
        '  public port no longer serves it. "Until … takes new connections" is the `live`',
        "  event of `--json`, counted from the command's start; after it the old server stays",
        "  up as the standby and the worker services restart (the standby before it exits in",
        "  the background). Each deploy leaves a *spare* gunicorn with the venv's libraries",
        "  imported (`web spare` in `status`, `preboot = true`, the default): the next",
        "  redeploy's install adopts it, so its server loads only the app's own code at the",
        "  switch. The spare's imports (~0.4 CPU-s) run in the background after the previous",
        "  deploy, between two runs here as between any two deploys; they are not in (b).",
        "  Before each (b) the bench waits until `status` shows the spare running (median",
        (
            f"  {_median(res.get('settle') or [0.0]):.1f} s after the cold deploy, `status` calls "
            "included), as any pause of a second"
        ),
        "  or two between two deploys allows; a redeploy fired within about a second of the",
        "  previous one adopts a spare still importing and takes ~0.2 s longer.",
        "- Between scenarios the bench runs `sync` after deleting a deploy root or the manual",
        "  flow's old venv, so their writeback does not land inside the next timed run.",
        "- (d) runs the article's steps literally with this machine's pip configuration and",
        "  warm pip cache: `pip wheel --no-deps .` (isolated build, as `python -m build`),",
        "  `cp` of the wheel and `config/*.ini`, `python -m venv`, `pip install -r",
        "  requirements.txt`, `pip install <wheel>`, TERM to the running gunicorn's pid and",
        "  wait for its exit, start gunicorn (2 workers) from the new venv on the same port,",
        "  poll `/up` every 10 ms until 200. The database was migrated once beforehand (not",
        "  timed); the manual flow runs no migration, no tests, no health or smoke check",
        "  before traffic, and serves nothing while it restarts (the downtime row).",
        "- (e) starts the same gunicorn from an existing venv and polls `/up` every 10 ms:",
        "  the least any deploy that starts a new server can take on this machine.",
        (
            "- `PYTHONDONTWRITEBYTECODE` was set for every process (`--env-as-is`): Python wrote no"
            "\n  bytecode caches, so every start compiled the venv's modules again."
            if res.get("dont_write_bytecode")
            else "- Every process ran without `PYTHONDONTWRITEBYTECODE` (the bench unsets it: this"
            "\n  machine's environment sets it, a server's login environment rarely does), so"
            "\n  Python caches bytecode in the venvs as it goes."
        ),
        "",
    ]
    return "\n".join(lines)


def render_text(res: dict[str, Any]) -> str:
    """What the bench prints: the same Markdown, readable on a terminal."""
    return render_markdown(res)
