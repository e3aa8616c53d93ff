"""The fleet bench's report: the ``## Fleet over SSH`` section of BENCHMARKS.md, in Markdown.

``res`` holds the run's context (``sizes``, ``machine``, ``load``, ``runs``, ``pip_runs``,
``command``, ``bench_seconds``) and, per workload that ran (``scaffold``, ``minimal``), a dict
``{"cold"|"warm"|"cold_pip": {n: [Measured]}, "profile": {(kind, n): Measured}}``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from _benchlib import Series
from _fleet_apps import Measured

HEADING = "## Fleet over SSH"
RATIO_TARGET = 1.5
BYTES_TARGET = 1.2
HOST_PHASES = [
    "connect",
    "lock",
    "copy",
    "install",
    "release",
    "switch",
    "after_deploy",
    "finalize",
    "prune",
    "unlock",
]
MINIMAL = "minimal app: what the tool does per host"
SCENARIOS = {
    "scaffold": [
        ("cold", "(1) cold deploy (ships uv to each host)"),
        ("cold_pip", "(1′) cold deploy, `SHIPLANE_SHIP_UV=0` (hosts install with pip)"),
        ("warm", "(2) warm redeploy of a one-line change"),
    ],
    "minimal": [
        ("cold", "(3) minimal app, cold deploy (ships uv to each host)"),
        ("deps", "(3′) minimal app, a dependency change (new wheelhouse and venv)"),
        ("warm", "(4) minimal app, warm redeploy of a one-line change"),
    ],
}


def _series(runs: list[Measured], value: Any) -> Series:
    s = Series("")
    for m in runs:
        s.add(float(value(m)))
    return s


def _med(runs: list[Measured], value: Any) -> float:
    return _series(runs, value).median


def _fmt(s: Series) -> str:
    if not s.values:
        return "–"
    return f"{s.median:.2f} s ({s.low:.2f}–{s.high:.2f})"


def _kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def _hosts(n: int) -> str:
    return f"{n} host{'s' if n > 1 else ''}"


def _ran(res: dict[str, Any], workload: str, key: str = "warm") -> bool:
    """Whether ``workload`` has runs of ``key`` at the smallest and the largest size."""
    w = res.get(workload)
    sizes = res["sizes"]
    return bool(w and w[key].get(sizes[0]) and w[key].get(sizes[-1]))


def render(res: dict[str, Any]) -> str:
    """The ``## Fleet over SSH`` section (Markdown)."""
    m = res["machine"]
    lines = [
        HEADING,
        "",
        (
            f"A deploy to 1, 4 and 8 real OpenSSH hosts (`tests/sshhosts.py`: one `sshd` per "
            "network namespace, its own `/srv`, `/root` and `/tmp`, Debian's `/usr/bin/python3`) "
            "of two apps: the scaffolded app (Flask + SQLAlchemy + Alembic, gunicorn with 2 "
            "workers, `alembic upgrade head` on every host: the realistic one), and a minimal app "
            "(one stdlib WSGI module, gunicorn alone with 1 worker, no hooks) that leaves little "
            "but what shiplane itself does per host. Wall-clock medians (min–max) of "
            f"{res['runs']} round(s); each round runs every fleet size once, back to back."
        ),
        "",
        (
            f"- **Machine:** {m['cores']} cores ({m['cpu']}), {m['os']}; Python {m['python']}, "
            f"{m['uv']}, shiplane {m['shiplane']}"
        ),
        (
            f"- **Date:** {m['date']}; 1-minute load average during the rounds "
            f"{min(res['load']):.1f}–{max(res['load']):.1f}"
        ),
        (
            f"- **Reproduce** (as root, from the repository root, about "
            f"{res['bench_seconds'] / 60:.0f} min): `{res['command']}`"
        ),
        (
            "- **Caveat:** the test hosts are namespaces on this same machine: every host's "
            "work (venv install, byte-compiling, alembic, gunicorn boot) runs on the controller's "
            f"{m['cores']} cores. Real servers each bring their own CPU, so the CPU rows below "
            "say how much of the growth with the host count is this machine being saturated."
        ),
        "",
    ]
    if res.get("scaffold"):
        lines += [*_table(res, "scaffold"), ""]
    if res.get("minimal"):
        lines += [
            f"### The {MINIMAL}",
            "",
            (
                "The same fleets and steps with an app that costs its hosts almost nothing: "
                "`app.py` (a stdlib WSGI callable: `/up` answers 200, `/` its text and the "
                "`SHIPLANE_RELEASE` the agent set), `requirements.txt` = gunicorn with hashes "
                '(`uv pip compile --generate-hashes` at the bench\'s start), `source = "tree"`, '
                "`[services.web] workers = 1`, no hooks, no config files or secrets; stages "
                "`minN` (`/srv/bench-min-N`, port 8200+N). What is left per host is shiplane's "
                "own work (ssh, the agent, the blobs, the venv of one package, the release, "
                "supervisord, the front) plus one small gunicorn, so its 8 / 1 ratio is the "
                "tool's scaling on this machine."
            ),
            "",
            *_table(res, "minimal"),
            "",
        ]
    lines += [*_targets(res), ""]
    for workload, title in (
        ("scaffold", "### What grows with the host count"),
        ("minimal", "### What grows with the host count: the minimal app"),
    ):
        if res.get(workload):
            lines += [*_reading(res, workload, title), ""]
    for workload, title in (
        ("scaffold", "### The hosts' CPU by program"),
        ("minimal", "### The hosts' CPU by program: the minimal app"),
    ):
        if res.get(workload) and res[workload]["profile"]:
            lines += [*_programs(res[workload]["profile"], title), ""]
    lines += [*_bytes(res), ""]
    if res.get("uplink") is not None:
        lines += [*_upload(res), ""]
    for workload, app in (("scaffold", ""), ("minimal", " of the minimal app")):
        if res.get(workload):
            lines += [
                *_phases(res, res[workload]["warm"], f"a warm redeploy{app}"),
                "",
                *_phases(res, res[workload]["cold"], f"a cold deploy{app}"),
                "",
            ]
    lines += _method(res)
    return "\n".join(lines) + "\n"


def _table(res: dict[str, Any], workload: str) -> list[str]:
    """Wall medians and CPU rows of each scenario of ``workload``, with the largest / smallest."""
    sizes: list[int] = res["sizes"]
    lo, hi = sizes[0], sizes[-1]
    w = res[workload]
    lines = [
        "| scenario | " + " | ".join(_hosts(n) for n in sizes) + f" | {hi} / {lo} |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]

    def row(label: str, key: str, value: Any = lambda r: r.run.wall, unit: str = "s") -> None:
        cells = []
        meds = {}
        for n in sizes:
            s = _series(w[key][n], value)
            meds[n] = s.median
            cells.append(_fmt(s) if unit == "s" else (f"{s.median:.1f}" if s.values else "–"))
        ratio = meds[hi] / meds[lo] if w[key][lo] and w[key][hi] else float("nan")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f}× |")

    cpu = [
        ("hosts (all their processes)", lambda r: r.cpu_hosts),
        ("controller (`shiplane` + `ssh`)", lambda r: r.cpu_controller),
        ("whole machine (anything else running included)", lambda r: r.cpu_machine),
    ]
    for key, label in SCENARIOS[workload]:
        if not any(w[key][n] for n in sizes):
            continue
        row(label, key)
        for what, value in cpu:
            row(f"… CPU seconds used by the {what}", key, value, "cpu")
    return lines


def _ratio(w: dict[str, Any], key: str, lo: int, hi: int) -> str:
    ratio = _med(w[key][hi], lambda r: r.run.wall) / _med(w[key][lo], lambda r: r.run.wall)
    return f"{ratio:.2f}× | ≤ {RATIO_TARGET}× | {'yes' if ratio <= RATIO_TARGET else '**no**'} |"


def _targets(res: dict[str, Any]) -> list[str]:
    sizes = res["sizes"]
    lo, hi = sizes[0], sizes[-1]
    out = ["### Targets", "", "| figure | measured (medians) | target | met |", "|---|---|---|---|"]
    for workload, prefix in (("scaffold", ""), ("minimal", f"{MINIMAL}, ")):
        for key, label in (
            ("cold", "cold deploy"),
            ("cold_pip", "cold deploy without shipping uv"),
            ("warm", "warm redeploy"),
        ):
            if _ran(res, workload, key):
                out.append(
                    f"| {prefix}{label}, {_hosts(hi)} / {_hosts(lo)} | "
                    + _ratio(res[workload], key, lo, hi)
                )
    for workload, label in (
        ("scaffold", "bytes sent per host on a code-only redeploy / the app's wheel"),
        ("minimal", ("minimal app, bytes sent per host on a code-only redeploy / its `app.py`")),
    ):
        if _ran(res, workload):
            warm = res[workload]["warm"]
            worst = max(b / r.code_size for n in sizes for r in warm[n] for b in r.per_host_bytes())
            out.append(
                f"| {label} (worst host, "
                f"worst run) | {worst:.2f}× | ≤ {BYTES_TARGET}× | "
                f"{'yes' if worst <= BYTES_TARGET else '**no**'} |"
            )
    return out


def _reading(res: dict[str, Any], workload: str, title: str) -> list[str]:
    """What grows with the host count, from the figures: CPU per host against the cores."""
    sizes, cores = res["sizes"], res["machine"]["cores"]
    w = res[workload]
    lo, hi = sizes[0], sizes[-1]
    out = [title, ""]
    for key, what in (("cold", "cold deploy"), ("warm", "warm redeploy")):
        if not _ran(res, workload, key):
            continue
        per_host = {n: _med(w[key][n], lambda r, n=n: r.cpu_hosts / n) for n in (lo, hi)}
        wall = _med(w[key][hi], lambda r: r.run.wall)
        used = _med(w[key][hi], lambda r: r.cpu_hosts + r.cpu_controller)
        machine = _med(w[key][hi], lambda r: r.cpu_machine)
        ctl = {n: _med(w[key][n], lambda r: r.cpu_controller) for n in (lo, hi)}
        grew = sorted(
            (
                (
                    _med(w[key][hi], lambda r, p=p: r.phase_max().get(p, 0.0))
                    - _med(w[key][lo], lambda r, p=p: r.phase_max().get(p, 0.0)),
                    p,
                )
                for p in HOST_PHASES
            ),
            reverse=True,
        )[:3]
        lo_wall = _med(w[key][lo], lambda r: r.run.wall)
        same = per_host[hi] <= 1.25 * per_host[lo]
        out.append(
            f"- **{what}:** each host's own work costs "
            + ("about the same CPU at any fleet size" if same else "more CPU in a bigger fleet")
            + f" ({per_host[lo]:.1f} CPU-s per host with {lo}, {per_host[hi]:.1f} with {hi}), so "
            f"the {hi} hosts' work alone needs at least {per_host[hi] * hi / cores:.1f} s of wall "
            f"clock on {cores} cores ({per_host[hi] * hi / cores / lo_wall:.1f}× the {lo}-host "
            f"deploy). With {hi} hosts the hosts and the controller used {used:.1f} CPU-s in "
            f"{wall:.1f} s, {used / (cores * wall):.0%} of the cores (the whole machine, other "
            f"work included: {machine / (cores * wall):.0%}). The controller's own CPU: "
            f"{ctl[lo]:.1f} → {ctl[hi]:.1f} CPU-s "
            f"({(ctl[hi] - ctl[lo]) / max(hi - lo, 1):.2f} per added host). The phases that grew most: "
            + ", ".join(f"{p} ({d:+.2f} s)" for d, p in grew)
            + "."
        )
    if workload == "minimal":
        return out + [
            "",
            (
                "- Here `install` is the venv of gunicorn alone (uv from the host's wheelhouse), "
                "the release's files placed and byte-compiled; `switch` starts one gunicorn master "
                "and 1 worker that import only the stdlib, under supervisord. Whatever still grows "
                "with the host count is shiplane's own per-host work (ssh, the agent, the copy, "
                "supervisord, the front) sharing the cores, or the controller serialising hosts: "
                "compare its CPU row and the phases below."
            ),
        ]
    return out + [
        "",
        (
            "- `install`: on each host, the venv (uv from the host's wheelhouse, or pip), the "
            "release unpacked, byte-compiled, its config rendered, and the `after_install` "
            "hook (`alembic upgrade head`: a Python start + SQLAlchemy import); "
            "`switch`: the new gunicorn (a master + 2 workers importing Flask and SQLAlchemy) "
            "started under supervisord, health and smoke checks, the previous standby "
            "stopped and the old one kept as the new standby; `copy`: the missing blobs streamed through "
            "ssh, hashed and written by the agent; `connect`: ssh login, the agent's "
            "bootstrap and start (a Python process)."
        ),
        (
            "- Each of these is work every host does for itself, and here all hosts share the "
            "controller's cores, so their sum is what the wall clock follows. On servers with "
            "their own CPUs that work runs side by side; what the controller itself adds per "
            "host is its CPU row above."
        ),
    ]


def _programs(prof: dict[tuple[str, int], Measured], title: str) -> list[str]:
    """The hosts' CPU by program, per host, from the untimed profiled pass."""
    cols = sorted(prof, key=lambda k: (k[0] != "cold", k[1]))
    names = sorted(
        {p for m in prof.values() for p in m.programs},
        key=lambda p: -sum(m.programs.get(p, 0.0) / len(m.hosts) for m in prof.values()),
    )
    out = [
        title,
        "",
        (
            "CPU seconds **per host** (the hosts' total divided by their number), sampled every "
            "0.05 s by command line in one extra, untimed cold deploy and warm redeploy per size "
            "(a process's last 0.05 s is missed, so the rows add up to a little less than the "
            "hosts' total; sshd and the agent include the transfer; in the scaffolded app alembic "
            "runs as `after_install` on every host and as the release hook once more on the "
            "primary)."
        ),
        "",
        "| program | "
        + " | ".join(
            f"{'cold deploy' if k == 'cold' else 'warm redeploy'}, {_hosts(n)}" for k, n in cols
        )
        + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name in names:
        if all(prof[c].programs.get(name, 0.0) < 0.005 * len(prof[c].hosts) for c in cols):
            continue
        out.append(
            f"| {name} | "
            + " | ".join(
                f"{prof[c].programs.get(name, 0.0) / len(prof[c].hosts):.2f}" for c in cols
            )
            + " |"
        )
    out.append(
        "| **the hosts' total (per host)** | "
        + " | ".join(f"{prof[c].cpu_hosts / len(prof[c].hosts):.2f}" for c in cols)
        + " |"
    )
    out.append(
        "| wall clock of that deploy | "
        + " | ".join(f"{prof[c].run.wall:.2f} s" for c in cols)
        + " |"
    )
    return out


def _bytes(res: dict[str, Any]) -> list[str]:
    sizes = res["sizes"]
    out = [
        "### Bytes sent per host",
        "",
        (
            "`result.hosts.<h>.bytes` of `deploy --json` (what the controller streamed to the host: "
            "missing blobs, plus the uv binary where shipped), median over hosts and runs."
        ),
        "",
        "| deploy | " + " | ".join(_hosts(n) for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    notes = []
    for workload, app in (("scaffold", ""), ("minimal", "minimal app, ")):
        w = res.get(workload)
        if not w:
            continue
        for key, label in (
            ("cold", "cold (uv shipped)"),
            ("cold_pip", "cold, `SHIPLANE_SHIP_UV=0`"),
            ("warm", "warm, code-only"),
        ):
            cells = []
            for n in sizes:
                per = [b for r in w[key][n] for b in r.per_host_bytes()]
                cells.append(_kib(statistics.median(per)) if per else "–")
            if any(c != "–" for c in cells):
                out.append(f"| {app}{label} | " + " | ".join(cells) + " |")
        code = sorted({r.code_size for n in sizes for r in w["warm"][n]})
        what = (
            "The scaffolded app's wheel (`app_files`, kind `wheel`, of the artifact's manifest)"
            if workload == "scaffold"
            else "The minimal app's `app.py` (its one code file)"
        )
        if code:
            notes.append(f"{what}: " + ", ".join(f"{c} bytes" for c in code) + ".")
    return out + ["", " ".join(notes)] if notes else out


def _size(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


UPLOAD_BYTES_TARGET = 1.2  # a cold deploy's controller bytes, largest fleet / one host
UPLOAD_WALL_TARGET = 3.0


def _upload(res: dict[str, Any]) -> list[str]:
    """What the controller sent and each host received, per deploy and fleet size, with the
    targets for the largest fleet against one host (``--uplink``)."""
    sizes: list[int] = res["sizes"]
    lo, hi = sizes[0], sizes[-1]
    cores = res["machine"]["cores"]
    rate = res["uplink"]
    link = (
        f"one {rate:g} Mbit/s link shared by every host (`--uplink {rate:g}`)"
        if rate
        else "a link counted, not limited (`--uplink 0`)"
    )
    out = [
        "### The controller's upload",
        "",
        (
            f"Every byte the controller sent to the hosts went through {link}: an IFB device "
            "that the controller's packets to each host's veth are redirected through "
            "(`bench/_uplink.py`), as a laptop's upload would be. Traffic between hosts (a host "
            "fetching a blob from another) is neither limited nor counted. *Sent* is the IFB "
            "device's transmit counter (IP bytes: SSH and TCP overhead included), *received* "
            "each host's veth counter (from the controller and from other hosts), medians."
            + (
                " Blob transfer: `direct` (`--transfer direct`: the controller sends every host "
                "every blob, the fallback and the way before hosts fetched from each other)."
                if res.get("transfer") == "direct"
                else " Blob transfer: `auto` (hosts fetch large blobs from the host that got them)."
            )
        ),
        "",
        "| deploy | what | " + " | ".join(_hosts(n) for n in sizes) + f" | {hi} / {lo} |",
        "|---|---|" + "---|" * (len(sizes) + 1),
    ]
    checks: list[str] = []
    for workload, app in (("scaffold", ""), ("minimal", "minimal app, ")):
        w = res.get(workload)
        if not w:
            continue
        for key, label in (("cold", "cold"), ("deps", "dependency change"), ("warm", "code-only")):
            if not all(w[key][n] for n in sizes):
                continue
            rows = (
                ("controller sent", lambda r: r.sent, _size),
                ("each host received", lambda r: statistics.median(r.received.values()), _size),
                ("wall", lambda r: r.run.wall, "{:.2f} s".format),
                (
                    "controller CPU per host",
                    lambda r: r.cpu_controller / len(r.hosts),
                    "{:.3f} s".format,
                ),
            )
            meds: dict[str, dict[int, float]] = {}
            for what, value, form in rows:
                meds[what] = {n: _med(w[key][n], value) for n in sizes}
                cells = [form(meds[what][n]) for n in sizes]
                ratio = meds[what][hi] / meds[what][lo] if meds[what][lo] else float("nan")
                out.append(f"| {app}{label} | {what} | " + " | ".join(cells) + f" | {ratio:.2f}× |")
            if key == "cold" and hi > lo:
                sent = meds["controller sent"][hi] / meds["controller sent"][lo]
                wall = meds["wall"][hi] / meds["wall"][lo]
                floor = _med(w[key][hi], lambda r: r.cpu_machine) / cores
                checks.append(
                    f"- {app}cold deploy, {hi} hosts against 1: the controller sent {sent:.2f}× "
                    f"the bytes (target ≤ {UPLOAD_BYTES_TARGET}×: "
                    f"{'yes' if sent <= UPLOAD_BYTES_TARGET else '**no**'}), in {wall:.2f}× the "
                    f"time (target ≤ {UPLOAD_WALL_TARGET}×: "
                    f"{'yes' if wall <= UPLOAD_WALL_TARGET else '**no**'}). The CPU floor: the "
                    f"whole machine used {floor * cores:.1f} CPU-s for the {hi}-host deploy, "
                    f"{floor:.2f} s of wall time on its {cores} cores at best, against "
                    f"{meds['wall'][hi]:.2f} s measured."
                )
    return out + ["", *checks] if checks else out


def _phases(res: dict[str, Any], runs: dict[int, list[Measured]], what: str) -> list[str]:
    sizes = res["sizes"]
    if not any(runs[n] for n in sizes):
        return []
    names = [p for p in HOST_PHASES if any(p in r.phase_max() for n in sizes for r in runs[n])]
    out = [
        f"### Where {what} spends its time, by host count",
        "",
        (
            "Each host phase's slowest host (`result.hosts.<h>.phases`; the hosts run a phase in "
            "parallel and the next phase starts when all are done), median over runs; `build` is "
            "the controller's event; `rest` is the wall time outside these (interpreter start, "
            "config, ledger, output)."
        ),
        "",
        "| phase | " + " | ".join(_hosts(n) for n in sizes) + f" | {sizes[-1]} − {sizes[0]} |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]

    def line(label: str, value: Any) -> None:
        meds = [_med(runs[n], value) for n in sizes]
        out.append(
            f"| {label} | "
            + " | ".join(f"{v:.2f} s" for v in meds)
            + f" | {meds[-1] - meds[0]:+.2f} s |"
        )

    line("build (controller)", lambda r: r.run.controller_phases().get("build", 0.0))
    for p in names:
        line(p, lambda r, p=p: r.phase_max().get(p, 0.0))
    line(
        "rest",
        lambda r: (
            r.run.wall - r.run.controller_phases().get("build", 0.0) - sum(r.phase_max().values())
        ),
    )
    line("**wall**", lambda r: r.run.wall)
    return out


def _method(res: dict[str, Any]) -> list[str]:
    return [
        "### How it is measured",
        "",
        (
            '- One stage per size: `fleetN` = hosts `shl-h1..N`, `deploy_to = "/srv/bench-N"`, port '
            '8100+N, `bind = "0.0.0.0"`, the hosts\' `ssh_config`, a secrets file per stage, '
            '`after_install = ["alembic upgrade head"]` (each host migrates its own sqlite; the '
            "release hook runs once, on the primary). The minimal app, its own project, has the "
            "stages `minN` on the same hosts (`/srv/bench-min-N`, port 8200+N)."
        ),
        (
            "- (1) before each cold deploy the stage is stopped (`shiplane stop --all`) and "
            "`/srv/bench-N` is removed on its hosts: no agent, blob store, venv, shipped uv or uv "
            "cache is left (all live under the deploy root). Each timed deploy deploys a new commit "
            "(a one-line edit of `src/demo/views.py`), so it builds the app's wheel; the wheelhouse "
            "comes from `.shiplane/build`, filled by one untimed build first. (1′) is the same "
            f"with `SHIPLANE_SHIP_UV=0` in the controller's environment, in the first "
            f"{min(res['pip_runs'], res['runs'])} round(s) only (it is the slow one)."
        ),
        (
            "- (2) right after each cold deploy: edit, commit, `deploy --stage fleetN --skip-tests "
            "--json`; checked: no venv event, every host's `venvs/` unchanged, every host serves the "
            "edit on its public port. The stage is stopped after it."
        ),
        (
            "- (3) and (4) are (1) and (2) for the minimal app, in the same rounds after the "
            "scaffolded app's sizes (the edit is its `TEXT` line; checked as well: each host serves "
            "the release id the deploy reported for it)."
        ),
        (
            "- CPU seconds over each command: the hosts' = the change of user+system time, with "
            "reaped children, of every process in the hosts' network namespaces (sshd and its "
            "sessions, agents, uv/pip, hooks, supervisord, gunicorn); the controller's = "
            "`getrusage(RUSAGE_CHILDREN)` of `shiplane` and its `ssh` clients, plus the ssh control "
            "masters (`ControlPersist` puts them in the background; polled every 0.2 s); the whole "
            "machine's = busy time in `/proc/stat`, which counts any other work on the machine too."
        ),
    ]


def write_section(path: Path, section: str) -> None:
    """Replace this bench's section of ``path`` (to the next ``## `` heading), else append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    start = text.find("\n" + HEADING + "\n")
    if start < 0 and text.startswith(HEADING + "\n"):
        start = -1
        head, rest = "", text[len(HEADING) + 1 :]
    elif start < 0:
        path.write_text(text.rstrip("\n") + ("\n\n" if text else "") + section, encoding="utf-8")
        return
    else:
        head, rest = text[: start + 1], text[start + 1 + len(HEADING) + 1 :]
    following = rest.find("\n## ")
    tail = rest[following + 1 :] if following >= 0 else ""
    path.write_text(head + section + ("\n" + tail if tail else ""), encoding="utf-8")
