"""Benchmark a deploy to a fleet of real OpenSSH hosts: how it scales from 1 to 4 to 8 hosts.

    python bench/bench_fleet.py [--runs N] [--out BENCHMARKS.md] [--raw results.json]
                                [--sizes 1,4,8] [--pip-runs 1] [--wait-idle S] [--no-profile]
                                [--workload scaffold|minimal|both] [--keep]
                                [--uplink MBIT] [--deps]

Needs root (the hosts of ``tests/sshhosts.py``: one ``sshd`` per network namespace, its own
``/srv``). A scaffolded app (``shiplane init``, git commit) gets one stage per fleet size,
``fleetN`` = hosts ``shl-h1..N``, each with its own ``deploy_to`` (``/srv/bench-N``) and port, its
own secrets file, and ``after_install = ["alembic upgrade head"]`` (each host has its own sqlite).

A second workload (``--workload minimal``; both run by default) does the same rounds with a
minimal app: one stdlib WSGI module (``app.py``), a hashed lock of gunicorn alone (compiled with
``uv pip compile --generate-hashes`` at the start), ``source = "tree"``, one worker, no hooks,
stages ``minN`` (``/srv/bench-min-N``, port 8200 + N). The hosts' own work is then little more than
shiplane's, so its 8 / 1 ratio is the tool's scaling rather than the app's CPU on shared cores.
Setup is in ``_fleet_apps.py``, the CPU probes in ``_fleet_cpu.py``, the report in
``_fleet_report.py``.

Each round, for each workload and size, back to back: the stage's deploy root is removed on its
hosts (after ``shiplane stop --all``), so the hosts have nothing: no agent, store, venv, shipped uv
or uv cache; then (1) cold deploy of a new commit, (2) warm redeploy of a one-line code change
(checked: no venv built, every host serves the edit). In the first ``--pip-runs`` rounds, each size
of the scaffolded app once more cold with ``SHIPLANE_SHIP_UV=0`` (the hosts install with pip
instead of the controller's uv). Every timed deploy deploys a new commit, so each includes the
build of the app (the scaffold's wheel; the wheelhouse comes from the build cache, which one
untimed build fills first). Last, unless ``--no-profile``, one untimed cold and warm deploy per
workload at the smallest and largest size sample the hosts' CPU by program (gunicorn, alembic,
compileall, uv, the agent, sshd, ...).

With ``--uplink MBIT`` every byte the controller sends to the hosts goes through one link of that
rate, shared by all hosts, as a laptop's upload is (``_uplink.py``: an IFB device shaped with
``tbf``; traffic between hosts is neither limited nor counted), and each deploy records the bytes
the controller sent and each host received. ``--uplink 0`` counts without limiting. ``--deps``
adds, for the minimal app, a dependency change after the cold deploy (its lock swaps between
gunicorn alone and gunicorn with six: a new wheelhouse and venv on every host).

Per deploy it records the wall clock, ``result.hosts.<h>.phases`` and ``.bytes`` from
``deploy --json``, and the CPU time the whole machine and the controller (``shiplane`` and its
``ssh`` clients) used: the test hosts share this machine's cores, which matters when reading how
a figure grows with the host count. Everything started is stopped on the way out, on failure too.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

from _benchlib import BenchError, clean_up
from _fleet_apps import WORKLOADS, Fleet, Measured, MinimalFleet, make_fleet
from _fleet_report import HEADING, render, write_section
from _uplink import Uplink
from bench_local import load, machine, wait_idle

from sshhosts import TestHosts, ssh_available, start_hosts

SIZES = (1, 4, 8)


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so the `finally` blocks stop everything


def new_results(sizes: tuple[int, ...]) -> dict[str, Any]:
    """One workload's runs: per kind of deploy, per fleet size; the profiled pass by (kind, n)."""
    return {
        "cold": {n: [] for n in sizes},
        "warm": {n: [] for n in sizes},
        "cold_pip": {n: [] for n in sizes},
        "deps": {n: [] for n in sizes},
        "profile": {},
    }


def _sent(m: Measured) -> str:
    return f", controller sent {m.sent / 2**20:.1f} MiB" if m.sent else ""


def one_round(
    fleet: Fleet, res: dict[str, Any], load_log: list[float], pip: bool, deps: bool
) -> None:
    """Each size cold (then a dependency change) then warm, back to back (a drift in the
    machine's load hits all alike)."""
    for n in fleet.sizes:
        load_log.append(load())
        fleet.wipe(n)
        marker = fleet.commit_edit()
        cold = fleet.deploy(n)
        fleet.check_serves(n, marker, cold)
        res["cold"][n].append(cold)
        _say(f"  {fleet.workload}, {n} host(s): cold {cold.run.wall:.2f}s{_sent(cold)}")
        if deps and isinstance(fleet, MinimalFleet):
            marker = fleet.commit_deps()
            changed = fleet.deploy(n)
            fleet.check_serves(n, marker, changed)
            res["deps"][n].append(changed)
            _say(f"  {fleet.workload}, {n} host(s): deps {changed.run.wall:.2f}s{_sent(changed)}")
        before = fleet.venvs(n)
        marker = fleet.commit_edit()
        warm = fleet.deploy(n)
        fleet.check_serves(n, marker, warm)
        if warm.run.venv_builds() or fleet.venvs(n) != before:
            raise BenchError(
                f"{fleet.workload}: the code-only redeploy to {n} host(s) built a venv"
            )
        res["warm"][n].append(warm)
        _say(
            f"  {fleet.workload}, {n} host(s): warm {warm.run.wall:.2f}s, sent "
            f"{warm.per_host_bytes()} bytes (code {warm.code_size}){_sent(warm)}"
        )
        fleet.stop(n)
    if pip:
        for n in fleet.sizes:
            fleet.wipe(n)
            marker = fleet.commit_edit()
            cold = fleet.deploy(n, env={"SHIPLANE_SHIP_UV": "0"})
            fleet.check_serves(n, marker, cold)
            res["cold_pip"][n].append(cold)
            _say(f"  {fleet.workload}, {n} host(s): cold without shipping uv {cold.run.wall:.2f}s")
            fleet.stop(n)


def profile_pass(fleet: Fleet, res: dict[str, Any]) -> None:
    """Untimed: a cold deploy and a warm redeploy at the smallest and largest size, with the
    hosts' CPU sampled by program."""
    for n in (fleet.sizes[0], fleet.sizes[-1]):
        fleet.wipe(n)
        for kind in ("cold", "warm"):
            marker = fleet.commit_edit()
            res["profile"][(kind, n)] = done = fleet.deploy(n, by_program=True)
            fleet.check_serves(n, marker, done)
        fleet.stop(n)


def raw_results(res: dict[str, Any]) -> dict[str, Any]:
    """``res`` as JSON-able data (for ``--raw``)."""
    raw = {k: v for k, v in res.items() if k not in WORKLOADS}
    for workload in WORKLOADS:
        w = res.get(workload)
        if not w:
            continue
        raw[workload] = {
            k: {str(n): [r.as_dict() for r in v[n]] for n in v}
            for k, v in w.items()
            if k != "profile"
        }
        raw[workload]["profile"] = {
            f"{kind} {n}": {**m.as_dict(), "programs": m.programs}
            for (kind, n), m in w["profile"].items()
        }
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="fleet sizes, ascending (default 1,4,8)"
    )
    parser.add_argument(
        "--pip-runs",
        type=int,
        default=1,
        metavar="N",
        help="rounds (the first N) that also deploy cold with SHIPLANE_SHIP_UV=0, "
        "the hosts installing with pip (default 1; 0: none)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the 1-minute load average to drop "
        "below 1.0 (other work on the machine skews every figure)",
    )
    parser.add_argument(
        "--workload",
        choices=("scaffold", "minimal", "both"),
        default="both",
        help="the scaffolded app, the minimal app, or both (default)",
    )
    parser.add_argument(
        "--no-profile",
        action="store_true",
        help="skip the untimed pass that samples the hosts' CPU by program",
    )
    parser.add_argument("--out", type=Path, help=f"write the '{HEADING}' section into this file")
    parser.add_argument("--raw", type=Path, help="write every measurement as JSON to this file")
    parser.add_argument(
        "--uplink",
        type=float,
        metavar="MBIT",
        help="the controller's upload: one link of MBIT Mbit/s shared by every host "
        "(0: counted, not limited; unset: neither)",
    )
    parser.add_argument(
        "--deps",
        action="store_true",
        help="the minimal app also deploys a dependency change after each cold deploy",
    )
    parser.add_argument(
        "--transfer",
        choices=("auto", "direct"),
        default="auto",
        help="the stages' blob transfer: auto (hosts fetch from each other; the default) or "
        "direct (the controller sends every host every blob)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (for debugging)")
    args = parser.parse_args(argv)
    sizes = tuple(sorted({int(x) for x in args.sizes.split(",")}))
    if args.runs < 1 or not sizes or sizes[0] < 1:
        parser.error("--runs and every size must be at least 1")
    why = ssh_available()
    if why is not None:
        print(f"bench_fleet: cannot start test hosts: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    wait_idle(args.wait_idle)
    workloads = WORKLOADS if args.workload == "both" else (args.workload,)
    res: dict[str, Any] = {
        "sizes": list(sizes),
        "load": [],
        "workloads": list(workloads),
        **{w: new_results(sizes) for w in workloads},
    }
    res["machine"], res["runs"], res["pip_runs"] = machine(), args.runs, args.pip_runs
    res["uplink"], res["transfer"] = args.uplink, args.transfer
    res["command"] = (
        f"python bench/bench_fleet.py --runs {args.runs}"
        + (f" --sizes {args.sizes}" if sizes != SIZES else "")
        + (f" --pip-runs {args.pip_runs}" if args.pip_runs != 1 else "")
        + (f" --wait-idle {args.wait_idle:g}" if args.wait_idle else "")
        + (f" --workload {args.workload}" if args.workload != "both" else "")
        + (f" --uplink {args.uplink:g}" if args.uplink is not None else "")
        + (" --deps" if args.deps else "")
        + (f" --transfer {args.transfer}" if args.transfer != "auto" else "")
        + (f" --out {args.out}" if args.out else "")
    )
    work = Path(tempfile.mkdtemp(prefix="shiplane-fleet-bench-"))
    testhosts: TestHosts | None = None
    fleets: list[Fleet] = []
    uplink: Uplink | None = None
    t0 = time.perf_counter()
    failed: str | None = None
    try:
        _say(f"starting {sizes[-1]} test hosts")
        testhosts = start_hosts(sizes[-1], work / "hosts")
        if args.uplink is not None:
            uplink = Uplink(testhosts, args.uplink or None)
            uplink.start()
        for workload in workloads:
            fleets.append(make_fleet(workload, work, testhosts, sizes))
            _say(f"{workload} app in {fleets[-1].root}; untimed build (fills .shiplane/build)")
            fleets[-1].shiplane("build")
            if args.deps and isinstance(fleets[-1], MinimalFleet):
                fleets[-1].commit_deps()  # the other lock's wheelhouse too, untimed
                fleets[-1].shiplane("build")
            fleets[-1].uplink = uplink
            if args.transfer != "auto":
                fleets[-1].deploy_args = ("--set", f"transfer={args.transfer}")
        for i in range(args.runs):
            _say(f"round {i + 1}/{args.runs} (load {load():.2f})")
            for fleet in fleets:
                one_round(
                    fleet,
                    res[fleet.workload],
                    res["load"],
                    i < args.pip_runs and fleet.workload == "scaffold",
                    args.deps,
                )
        if not args.no_profile:
            _say("untimed: the hosts' CPU by program (cold and warm, smallest and largest size)")
            for fleet in fleets:
                profile_pass(fleet, res[fleet.workload])
    except (BenchError, KeyboardInterrupt) as exc:
        failed = str(exc) or type(exc).__name__
    finally:
        clean_up(
            [f.stop_all for f in fleets]
            + [uplink.stop if uplink else None]
            + [testhosts.stop if testhosts else None],
            work,
            args.keep,
            _say,
        )
    if failed:
        print(f"bench failed: {failed}", file=sys.stderr)
        return 1
    res["bench_seconds"] = time.perf_counter() - t0
    section = render(res)
    print(section)
    if args.out:
        write_section(args.out, section)
        _say(f"wrote the '{HEADING}' section of {args.out}")
    if args.raw:
        args.raw.write_text(json.dumps(raw_results(res), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
