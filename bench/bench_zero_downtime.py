"""Proof under load: no request is lost while shiplane deploys and rolls back, again and again.

    python bench/bench_zero_downtime.py [--front builtin|nginx|both] [--switches 10]
                                        [--requests 20000] [--threads 4] [--rate 90]
                                        [--out BENCHMARKS.md] [--raw results.json]

A scaffolded app (``shiplane init``; its page names the release serving it) is deployed to the
``local`` stage with the real CLI. Then a load generator on loopback -- a few threads, each with
an ``http.client`` keep-alive connection, paced to ``--rate`` requests/s -- keeps requesting
``/`` on the public port while the CLI alternates ``shiplane deploy --stage local --skip-tests``
and ``shiplane rollback --stage local --yes``, until both ``--switches`` switches and
``--requests`` requests are done (bounded in time). Every request is counted: 2xx, other status,
connection refused, reset / closed without an answer, timeout, anything else. Latency: p50/p99
while no CLI command runs ("at rest") and while one does ("during switches").

With ``--front nginx`` the stage uses ``front = "nginx"``: a private nginx master (its own
``-c`` conf in the temp dir, on the same free loopback port) that shiplane writes the site for,
checks, and starts. Everything started here is stopped by pid on the way out, on failure too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RELEASE_RE = re.compile(r"release (\d{8}T\d{6}(?:\d{3})?Z-[0-9a-f]{8})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


# --- the load generator ------------------------------------------------------------------------


@dataclass
class Counts:
    ok: int = 0
    status: dict[int, int] = field(default_factory=dict)  # non-2xx answers by status
    refused: int = 0
    reset: int = 0  # reset, broken pipe, or closed without an answer
    timeout: int = 0
    other: int = 0
    errors: list[str] = field(default_factory=list)  # the first few, for the report
    releases: dict[str, int] = field(default_factory=dict)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (started, seconds)

    @property
    def failed(self) -> int:
        return sum(self.status.values()) + self.refused + self.reset + self.timeout + self.other

    @property
    def total(self) -> int:
        return self.ok + self.failed


class Load:
    """``threads`` keep-alive clients requesting ``path`` at ``rate`` requests/s each."""

    def __init__(
        self,
        port: int,
        threads: int = 4,
        rate: float = 90.0,
        path: str = "/",
        timeout: float = 10.0,
    ) -> None:
        self.port, self.path, self.timeout, self.rate = port, path, timeout, rate
        self.counts = Counts()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> Counts:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(self.timeout + 5)
        return self.counts

    def _record(
        self, kind: str, started: float, detail: str = "", status: int = 0, body: str = ""
    ) -> None:
        seconds = time.monotonic() - started
        with self.lock:
            c = self.counts
            if kind == "ok":
                c.ok += 1
                match = RELEASE_RE.search(body)
                if match:
                    c.releases[match.group(1)] = c.releases.get(match.group(1), 0) + 1
            elif kind == "status":
                c.status[status] = c.status.get(status, 0) + 1
            else:
                setattr(c, kind, getattr(c, kind) + 1)
            if kind != "ok" and len(c.errors) < 20:
                c.errors.append(f"{time.strftime('%H:%M:%S')} {kind} {status or ''} {detail}")
            c.samples.append((started, seconds))

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    self.stop_event.wait(delay)  # pacing, not synchronisation
                else:
                    next_at = time.monotonic()  # behind: do not burst to catch up
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            started = time.monotonic()
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read().decode("utf-8", "replace")
            except ConnectionRefusedError as exc:
                self._record("refused", started, repr(exc))
                conn.close()
                conn = None
                continue
            except (
                ConnectionResetError,
                BrokenPipeError,
                http.client.RemoteDisconnected,
                http.client.IncompleteRead,
            ) as exc:
                self._record("reset", started, repr(exc))
                conn.close()
                conn = None
                continue
            except TimeoutError as exc:
                self._record("timeout", started, repr(exc))
                conn.close()
                conn = None
                continue
            except (OSError, http.client.HTTPException) as exc:
                self._record("other", started, repr(exc))
                conn.close()
                conn = None
                continue
            if 200 <= resp.status < 300:
                self._record("ok", started, body=body)
            else:
                self._record("status", started, body[:200], status=resp.status)
            if resp.will_close:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


# --- the project and the CLI -------------------------------------------------------------------

NGINX_MAIN = """\
# a private nginx for the zero-downtime bench; shiplane writes the site into {sites}
{user}worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    include {sites}/*.conf;
}}
"""


class App:
    """A scaffolded app in ``base``, deployed to its ``local`` stage through the real CLI."""

    def __init__(self, base: Path, front: str = "builtin") -> None:
        self.base = base
        self.root = base / "demo"
        self.port = free_port()
        self.front = front
        self.nginx_dir = base / "nginx"
        self.env = {**os.environ, "NO_COLOR": "1"}

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "shiplane", *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"shiplane {' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def create(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "shiplane", "init", str(self.root)],
            check=True,
            capture_output=True,
            env=self.env,
        )
        toml = self.root / "shiplane.toml"
        text = toml.read_text().replace("port = 5000", f"port = {self.port}")
        if self.front == "nginx":
            sites = self.nginx_dir / "sites"
            for sub in ("sites", "tmp"):
                (self.nginx_dir / sub).mkdir(parents=True, exist_ok=True)
            user = "user root;\n" if os.geteuid() == 0 else ""
            (self.nginx_dir / "nginx.conf").write_text(
                NGINX_MAIN.format(dir=self.nginx_dir, sites=sites, user=user)
            )
            text = text.replace(
                f"port = {self.port}\n",
                f'port = {self.port}\nfront = "nginx"\n'
                f'nginx = {{ conf = "{self.nginx_dir}/nginx.conf", '
                f'pid_file = "{self.nginx_dir}/nginx.pid", '
                f'site_dir = "{sites}" }}\n',
                1,
            )
        toml.write_text(text)
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
        subprocess.run(["git", "init", "-q"], cwd=self.root, check=True)
        subprocess.run(["git", "add", "-A"], cwd=self.root, check=True)
        subprocess.run([*git, "commit", "-qm", "init"], cwd=self.root, check=True)

    def deploy(self) -> None:
        self.cli("deploy", "--stage", "local", "--skip-tests")

    def rollback(self) -> None:
        self.cli("rollback", "--stage", "local", "--yes")

    def status(self) -> str:
        return self.cli("status", "--stage", "local").stdout

    def nginx_pid(self) -> int | None:
        try:
            return int((self.nginx_dir / "nginx.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def teardown(self) -> None:
        """Stop the services and the private nginx, by pid only."""
        try:
            subprocess.run(
                [sys.executable, "-m", "shiplane", "stop", "--all", "--stage", "local"],
                cwd=self.root,
                capture_output=True,
                timeout=120,
                env=self.env,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            pass
        pid = self.nginx_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGQUIT)  # graceful: workers finish, master exits
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def wait_serving(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing serves on port {port} after {timeout}s")
        time.sleep(0.1)


# --- the scenario ------------------------------------------------------------------------------


def run(
    front: str,
    switches: int,
    requests: int,
    threads: int,
    rate: float,
    rest_seconds: float = 5.0,
    max_seconds: float = 900.0,
    base: Path | None = None,
    say: Any = None,
) -> dict[str, Any]:
    """Deploy, then switch ``switches`` times (deploy/rollback alternating) under load until
    ``requests`` requests are done too; returns the counts and latencies."""
    say = say or (lambda msg: None)
    owned = base is None
    base = base or Path(tempfile.mkdtemp(prefix="shl-zd-"))
    app = App(base, front)
    windows: list[tuple[float, float, str]] = []
    load: Load | None = None
    try:
        app.create()
        say(f"{front}: first deploy")
        app.deploy()
        app.deploy()  # a second release, so the first rollback has somewhere to go
        wait_serving(app.port)
        load = Load(app.port, threads, rate).start()
        time.sleep(rest_seconds)  # load at rest first: the latency baseline
        deadline = time.monotonic() + max_seconds
        done = 0
        while done < switches or load.counts.total < requests:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{front}: not done within {max_seconds}s: {done} switches, "
                    f"{load.counts.total} requests"
                )
            verb = "deploy" if done % 2 == 0 else "rollback"
            started = time.monotonic()
            app.deploy() if verb == "deploy" else app.rollback()
            windows.append((started, time.monotonic(), verb))
            done += 1
            say(
                f"{front}: {verb} {done} done in {time.monotonic() - started:.1f}s, "
                f"{load.counts.total} requests, {load.counts.failed} failed"
            )
            time.sleep(0.5)  # a little rest between switches
        counts = load.stop()
        load = None
        status = app.status()
    finally:
        if load is not None:
            load.stop()
        app.teardown()
        if owned:
            subprocess.run(["rm", "-rf", str(base)], check=False)

    def during(t: float) -> bool:
        return any(a <= t <= b for a, b, _ in windows)

    busy = [s for t, s in counts.samples if during(t)]
    rest = [s for t, s in counts.samples if not during(t)]
    return {
        "front": front,
        "backend": "daemon",
        "switches": len(windows),
        "deploys": sum(1 for w in windows if w[2] == "deploy"),
        "rollbacks": sum(1 for w in windows if w[2] == "rollback"),
        "requests": counts.total,
        "ok": counts.ok,
        "failed": counts.failed,
        "non_2xx": counts.status,
        "refused": counts.refused,
        "reset": counts.reset,
        "timeouts": counts.timeout,
        "other": counts.other,
        "errors": counts.errors,
        "releases_seen": len(counts.releases),
        "seconds": round(sum(b - a for a, b, _ in windows), 1),
        "switch_seconds": [round(b - a, 2) for a, b, _ in windows],
        "p50_rest_ms": round(percentile(rest, 50) * 1000, 2),
        "p99_rest_ms": round(percentile(rest, 99) * 1000, 2),
        "p50_switch_ms": round(percentile(busy, 50) * 1000, 2),
        "p99_switch_ms": round(percentile(busy, 99) * 1000, 2),
        "requests_rest": len(rest),
        "requests_switch": len(busy),
        "status_after": status,
    }


def render(results: list[dict[str, Any]], command: str) -> str:
    """The ``## Zero-downtime switches`` section of BENCHMARKS.md."""
    lines = [
        "## Zero-downtime switches",
        "",
        (
            f"Measured {time.strftime('%Y-%m-%d')} on this machine ({os.cpu_count()} cores), "
            f"with `{command}`."
        ),
        "",
        (
            "| backend / front | switches (deploy+rollback) | requests | failed | refused | "
            "reset | timeouts | non-2xx | p50 / p99 at rest | p50 / p99 during switches | "
            "p99 ratio |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r["p99_switch_ms"] / r["p99_rest_ms"] if r["p99_rest_ms"] else 0.0
        lines.append(
            f"| {r['backend']} / {r['front']} | {r['switches']} ({r['deploys']}+{r['rollbacks']}) "
            f"| {r['requests']} | {r['failed']} | {r['refused']} | {r['reset']} | "
            f"{r['timeouts']} | {sum(r['non_2xx'].values())} | {r['p50_rest_ms']} / "
            f"{r['p99_rest_ms']} ms | {r['p50_switch_ms']} / {r['p99_switch_ms']} ms | "
            f"{ratio:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _on_sigterm(signum: int, _frame: Any) -> None:
    # an exception, so the `finally` blocks stop what the bench started
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--front", choices=["builtin", "nginx", "both"], default="both")
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rate", type=float, default=90.0, help="requests/s per thread")
    parser.add_argument("--out", help="append the markdown section to this file")
    parser.add_argument("--raw", help="write the raw results (JSON) here")
    args = parser.parse_args(argv)
    fronts = ["builtin", "nginx"] if args.front == "both" else [args.front]

    def say(msg: str) -> None:
        print(f"[zd {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _on_sigterm)
    results = [
        run(f, args.switches, args.requests, args.threads, args.rate, say=say) for f in fronts
    ]
    command = "python bench/bench_zero_downtime.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    text = render(results, command.strip())
    print(text)
    for r in results:
        if r["errors"]:
            print(f"{r['front']} errors: " + "; ".join(r["errors"]), file=sys.stderr)
    if args.raw:
        Path(args.raw).write_text(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    return 0 if all(r["failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
