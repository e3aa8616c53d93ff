"""What pre-warming and persisting the SSH connections save: the same commands in each mode,
interleaved.

    python bench/bench_prewarm.py [--runs N] [--out FILE]

Needs root (one host of ``tests/sshhosts.py``). For the scaffolded app and the minimal app of
``bench_fleet.py`` on one SSH host, it alternates three modes, ``N`` times each: a warm redeploy
of a one-line change (``deploy --json``, checked to serve the edit), then a ``status``:

- *connection open*: within ``ssh_persist`` (60 s) of the stage's last command, whose connection
  is still open (an untimed ``status`` first): the sessions multiplex over it;
- *pre-warmed*: no connection open (the bench closes them): the CLI starts the host's SSH master
  before its imports and config load (``SHIPLANE_PREWARM=1``, the default);
- *not pre-warmed*: no connection open, and ``SHIPLANE_PREWARM=0``: the session connects once the
  command has loaded everything.

It prints medians and writes them as a Markdown table with ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from _benchlib import clean_up, close_shiplane_connections
from _fleet_apps import make_fleet
from _onehost import one_host, publish

# mode -> (SHIPLANE_PREWARM, whether the last command's connection is still open)
MODES = {
    "connection open": ("1", True),
    "pre-warmed": ("1", False),
    "not pre-warmed": ("0", False),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per mode and command (default 7)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    started = one_host("bench_prewarm")
    if started is None:
        return 2
    work, hosts = started
    fleets = []
    lines = [
        (
            f"`python bench/bench_prewarm.py --runs {args.runs}`: medians of {args.runs} interleaved runs "
            "on one SSH host"
        ),
        "",
        "| app | command | " + " | ".join(MODES) + " |",
        "|---|---|---|---|---|",
    ]
    try:
        for workload in ("scaffold", "minimal"):
            fleet = make_fleet(workload, work, hosts, (1,))
            fleets.append(fleet)
            fleet.shiplane("build")
            fleet.wipe(1)
            fleet.commit_edit()
            fleet.deploy(1)
            times: dict[str, dict[str, list[float]]] = {
                cmd: {m: [] for m in MODES} for cmd in ("deploy", "status")
            }
            for _ in range(args.runs):
                for mode, (flag, open_) in MODES.items():
                    env = {**os.environ, "SHIPLANE_PREWARM": flag}
                    status = [sys.executable, "-m", "shiplane", "status", "--stage", fleet.stage(1)]
                    if open_:  # the stage's last command, a moment ago
                        subprocess.run(
                            status, cwd=fleet.root, capture_output=True, env=env, check=True
                        )
                    marker = fleet.commit_edit()
                    done = fleet.deploy(1, env={"SHIPLANE_PREWARM": flag}, reuse=open_)
                    fleet.check_serves(1, marker, done)
                    times["deploy"][mode].append(done.run.wall)
                    if not open_:
                        close_shiplane_connections()
                    t0 = time.perf_counter()
                    subprocess.run(
                        status,
                        cwd=fleet.root,
                        capture_output=True,
                        check=True,
                        timeout=120,
                        env=env,
                    )
                    times["status"][mode].append(time.perf_counter() - t0)
            for cmd, label in (("deploy", "warm redeploy"), ("status", "`status`")):
                cells = " | ".join(f"{statistics.median(times[cmd][m]):.2f} s" for m in MODES)
                lines.append(f"| {workload} | {label} | {cells} |")
    finally:
        clean_up([f.stop_all for f in fleets] + [hosts.stop], work, False, lambda msg: None)
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
