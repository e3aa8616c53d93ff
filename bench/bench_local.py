"""Benchmark shiplane's core deploy on the ``local`` stage against the article's manual flow.

    python bench/bench_local.py [--runs N] [--out BENCHMARKS.md] [--raw results.json] [--keep]

In one session, on a scaffolded app (``shiplane init`` into a temp dir, ``git init`` + commit):

(a) cold deploy: fresh deploy root and fresh ``.shiplane/build`` (uv's, pip's and shiplane's
    per-user caches stay warm, as pip's does for (d)), ``deploy --stage local --skip-tests``;
    plus one cold run with the test gate and one with an empty shiplane cache;
(b) warm redeploy of a one-line template change (edit, commit, deploy) — checked to install no
    dependency (no venv built, the host's venvs unchanged, only a few KiB sent);
(c) ``rollback --stage local`` right after each warm redeploy;
(d) the article's flow by hand: wheel, copy, fresh venv + ``pip install -r requirements.txt`` +
    the wheel, stop gunicorn by pid, start it from the new venv on the same port, poll ``/up``;
(e) the floor: gunicorn from an existing venv until ``/up`` answers 200.

Everything the bench starts is stopped on the way out, on failure too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import BenchError, Series, Started, clean_up, free_port
from _report import render_markdown, render_text
from _scenarios import DeployRun, Manual, Project

WARM_MAX_BYTES = 256 * 1024  # a code-only redeploy sends about one small wheel


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _on_signal(signum: int, _frame: Any) -> None:
    # Turn SIGTERM into an exception so the `finally` blocks stop what we started.
    raise KeyboardInterrupt(f"signal {signum}")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    uv = shutil.which("uv")
    uv_version = "not found"
    if uv:
        uv_version = subprocess.run(
            [uv, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    from importlib.metadata import version

    os_name = platform.platform()
    try:
        os_name = next(
            ln.split("=", 1)[1].strip('"')
            for ln in Path("/etc/os-release").read_text().splitlines()
            if ln.startswith("PRETTY_NAME=")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "python_path": sys.executable,
        "os": os_name,
        "shiplane": version("shiplane"),
        "uv": uv_version,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
    }


def check_warm(run: DeployRun, venvs_before: list[str], venvs_after: list[str]) -> None:
    """A code-only redeploy installs no dependency: no venv built, venvs unchanged, few bytes."""
    problems = []
    if run.venv_builds():
        problems.append(f"venv events {run.venv_builds()}")
    if venvs_before != venvs_after:
        problems.append(f"venvs changed {venvs_before} -> {venvs_after}")
    if run.bytes_sent() > WARM_MAX_BYTES:
        problems.append(f"sent {run.bytes_sent()} bytes")
    if problems:
        raise BenchError("the warm redeploy installed dependencies: " + "; ".join(problems))


def timeline(run: DeployRun) -> list[str]:
    """The run's events as ``+seconds phase status detail`` lines (for the raw results)."""
    return [
        f"+{float(ev['at']) - run.started_at:6.3f} {ev.get('phase')} {ev.get('status')} "
        f"{ev.get('detail') or ''}".rstrip()
        for ev in run.events
        if "at" in ev
    ]


def load() -> float:
    return os.getloadavg()[0]


def wait_idle(seconds: float) -> None:
    """Wait (bounded by ``seconds``) for the machine to be nearly idle."""
    deadline = time.monotonic() + seconds
    if seconds > 0:
        _say(f"waiting up to {seconds:g}s for the load average ({load():.2f}) to drop below 1")
    while seconds > 0 and load() >= 1.0 and time.monotonic() < deadline:
        time.sleep(2)  # the load average moves slowly; a coarse poll is enough


def warm_up(project: Project, manual: Manual, res: dict[str, Any]) -> None:
    """Untimed first runs that fill the global caches; then the one gated cold deploy."""
    _say("warm-up: one cold deploy with the gate (fills uv's global cache; not counted)")
    project.wipe()
    project.deploy(gate=True)
    _say("(a) cold deploy with the test gate, once")
    project.wipe()
    gated = project.deploy(gate=True)
    res["cold_gate"] = {
        "wall": gated.wall,
        "controller": gated.controller_phases(),
        "phases": gated.host_phases(),
    }
    _say("(a) cold deploy with an empty per-user cache (this controller's first deploy), once")
    project.wipe()
    saved = dict(project.env)
    project.env["SHIPLANE_CACHE_DIR"] = tempfile.mkdtemp(prefix="shl-bench-cache-")
    try:
        first = project.deploy()
    finally:
        shutil.rmtree(project.env["SHIPLANE_CACHE_DIR"], ignore_errors=True)
        project.env.clear()
        project.env.update(saved)
    res["cold_first"] = {"wall": first.wall, "controller": first.controller_phases()}
    _say("(d) manual flow: first install, migration, first start (not counted)")
    manual.setup()


def one_round(project: Project, manual: Manual, res: dict[str, Any]) -> None:
    """(a) cold, (b) warm, (c) rollback, (d) manual, (e) floor: once each, back to back.

    Interleaving the scenarios keeps their ratios fair when the machine's load drifts.
    """
    s = res["series"]
    res["load"].append(load())
    project.wipe()
    cold = project.deploy()
    s["cold"].add(cold.wall)
    res["cold_runs"].append(
        {
            "wall": cold.wall,
            "controller": cold.controller_phases(),
            "phases": cold.host_phases(),
            "bytes": cold.bytes_sent(),
            "timeline": timeline(cold),
        }
    )

    res["settle"].append(project.settle())
    marker = project.commit_edit()
    before = project.venvs()
    warm = project.deploy()
    check_warm(warm, before, project.venvs())
    if marker not in project.page():
        raise BenchError(f"after the redeploy the public port does not serve {marker!r}")
    s["warm"].add(warm.wall)
    live = warm.to_live()
    if live is not None:
        s["warm_live"].add(live)
    phases = {**warm.controller_phases(), **warm.host_phases()}
    phases["controller (rest)"] = warm.wall - sum(phases.values())
    phases.update(warm.switch_split())
    for name, secs in phases.items():
        res["warm_phases"].setdefault(name, Series(name)).add(secs)
    res["warm_runs"].append(
        {
            "wall": warm.wall,
            "bytes": warm.bytes_sent(),
            "phases": phases,
            "to_live": live,
            "timeline": timeline(warm),
        }
    )

    back = project.rollback()
    if marker in project.page():
        raise BenchError("after the rollback the public port still serves the new release")
    s["rollback"].add(back.wall)
    live = back.to_live()
    if live is not None:
        s["rollback_live"].add(live)
    res["rollback_runs"].append({"wall": back.wall, "to_live": live, "timeline": timeline(back)})

    steps = manual.steps()
    s["manual"].add(steps["total"])
    s["manual_downtime"].add(steps["downtime"])
    for name, secs in steps.items():
        res["manual_steps"].setdefault(name, Series(name)).add(secs)

    s["floor"].add(manual.floor())
    res["load"].append(load())


def new_results() -> dict[str, Any]:
    names = [
        "cold",
        "warm",
        "warm_live",
        "rollback",
        "rollback_live",
        "manual",
        "manual_downtime",
        "floor",
    ]
    return {
        "series": {n: Series(n) for n in names},
        "warm_phases": {},
        "manual_steps": {},
        "cold_runs": [],
        "warm_runs": [],
        "rollback_runs": [],
        "cold_gate": None,
        "load": [],
        "settle": [],
    }


def to_json(res: dict[str, Any]) -> dict[str, Any]:
    """The results as plain JSON data (each Series as its dict)."""

    def conv(obj: Any) -> Any:
        if isinstance(obj, Series):
            return obj.as_dict()
        if isinstance(obj, dict):
            return {k: conv(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [conv(v) for v in obj]
        return obj

    return {k: conv(v) for k, v in res.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per scenario (default 5)")
    parser.add_argument("--out", type=Path, help="write the figures as Markdown to this file")
    parser.add_argument("--raw", type=Path, help="write every measurement as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (for debugging)")
    parser.add_argument(
        "--env-as-is",
        action="store_true",
        help="keep PYTHONDONTWRITEBYTECODE if set (default: unset it, as on a "
        "typical server, so Python may write bytecode caches)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the 1-minute load average to drop "
        "below 1.0 (other work on the machine skews every figure)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    signal.signal(signal.SIGTERM, _on_signal)
    dont_write = os.environ.get("PYTHONDONTWRITEBYTECODE")
    if dont_write and not args.env_as_is:
        # Every process the bench starts inherits this environment (the local stage's agent,
        # supervisord, gunicorn, hooks): a server's login environment rarely sets it.
        del os.environ["PYTHONDONTWRITEBYTECODE"]
    wait_idle(args.wait_idle)

    command = (
        "python bench/bench_local.py --runs "
        + str(args.runs)
        + (f" --wait-idle {args.wait_idle:g}" if args.wait_idle else "")
        + (f" --out {args.out}" if args.out else "")
        + (" --env-as-is" if args.env_as_is else "")
    )
    res = new_results()
    res["machine"] = machine()
    res["runs"] = args.runs
    res["command"] = command
    res["dont_write_bytecode"] = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    work = Path(tempfile.mkdtemp(prefix="shiplane-bench-"))
    started = Started()
    project: Project | None = None
    manual: Manual | None = None
    t0 = time.perf_counter()
    try:
        project = Project.scaffold(work, free_port())
        _say(f"app scaffolded in {project.root}; local stage on port {project.port}")
        manual = Manual(project.root, work / "manual", free_port(), free_port(), started)
        warm_up(project, manual, res)
        for i in range(args.runs):
            _say(
                f"round {i + 1}/{args.runs}: cold, warm, rollback, manual, floor "
                f"(load {load():.2f})"
            )
            one_round(project, manual, res)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        clean_up(
            [
                manual.close if manual else None,
                project.stop_all if project else None,
                started.stop_all,
            ],
            work,
            args.keep,
            _say,
        )
    res["bench_seconds"] = time.perf_counter() - t0
    print(render_text(res))
    if args.out:
        args.out.write_text(render_markdown(res), encoding="utf-8")
        _say(f"wrote {args.out}")
    if args.raw:
        args.raw.write_text(json.dumps(to_json(res), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
