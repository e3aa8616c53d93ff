"""Workers on a real Redis (issue 19 item 6, docs/workers.md): a Flask app that enqueues RQ
jobs and an RQ worker as ``[services.worker]``, deployed to the local stage with the
``shiplane`` CLI; Debian's ``redis-server`` started by the test on a free port of 127.0.0.1.

- the worker runs a job the web app enqueued, in the live release;
- a redeploy while a long job runs lets it finish on the old release (RQ's warm shutdown on
  TERM, which reaches the worker itself: its command is exec-ed), then the new release's worker
  takes the next job, and no second worker ran beside the draining one.

Scheduled jobs run end to end in tests/test_jobs_ssh.py (a minute's wait is paid once).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apps.common import App, compiled_lock, free_port, http_get, new_app, wait_for, write

pytestmark = pytest.mark.slow

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"

APP = """import os

from flask import Flask, request
from redis import Redis
from rq import Queue

import tasks

app = Flask(__name__)
conn = Redis.from_url(os.environ["REDIS_URL"])
queue = Queue("default", connection=conn)


@app.get("/up")
def up():
    return "ok"


@app.get("/enqueue")
def enqueue():
    key = request.args["key"]
    if request.args.get("gate"):
        queue.enqueue(tasks.wait_then_record, key, request.args["gate"], job_timeout=300)
    else:
        queue.enqueue(tasks.record, key)
    return "queued"
"""

TASKS = """import os

from redis import Redis


def _conn():
    # longer than the gate's wait: redis-py's own read timeout would fail a blocked BLPOP
    return Redis.from_url(os.environ["REDIS_URL"], socket_timeout=300)


def record(key):
    _conn().set("result:" + key, os.environ["SHIPLANE_RELEASE"])


def wait_then_record(key, gate):
    conn = _conn()
    conn.set("started:" + key, os.environ["SHIPLANE_RELEASE"])
    # blocks until the test pushes to the gate, bounded: it does so long before
    how = "gate" if conn.blpop([gate], timeout=240) else "deadline"
    conn.set("result:" + key, os.environ["SHIPLANE_RELEASE"] + " " + how)
"""

TOML = """[app]
name = "rqapp"
wsgi = "app:app"

[build]
requirements = "requirements.txt"

[env]
REDIS_URL = "redis://127.0.0.1:{redis_port}/0"

[services.web]
workers = 1
healthcheck = {{ path = "/up", timeout = 30 }}

[services.worker]
command = "rq worker --url $REDIS_URL default"
stop_signal = "TERM"
stop_timeout = 180

[stages.local]
hosts = ["local"]
deploy_to = "{deploy_to}"
port = {port}
# below the time the old worker takes to finish its job (over 15 s): the agent keeps the
# switch alive while the worker drains
command_timeout = 12
"""


def redis(port: int, *args: str, host: str = "127.0.0.1") -> object:
    """One command over RESP (the test has no Redis client library): its reply, decoded."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(
            f"*{len(args)}\r\n".encode()
            + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
        )
        reader = sock.makefile("rb")
        return _reply(reader)


def _reply(reader: object) -> object:
    line = reader.readline().rstrip(b"\r\n")  # type: ignore[attr-defined]
    kind, rest = line[:1], line[1:]
    if kind in (b"+", b"-"):
        return rest.decode()
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)[:-2]  # type: ignore[attr-defined]
        return data.decode()
    if kind == b"*":
        return [_reply(reader) for _ in range(int(rest))]
    raise AssertionError(f"unexpected Redis reply {line!r}")


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if not Path(REDIS).exists():
        pytest.skip("needs redis-server (Debian's redis-server package)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def pong() -> bool:
            try:
                return redis(port, "PING") == "PONG"
            except OSError:
                return False

        wait_for(pong, deadline=20, what="redis-server answering PING")
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def rq_app(tmp_path: Path, redis_port: int) -> Iterator[App]:
    deploy_to = Path(tempfile.mkdtemp(prefix="shl-rq-", dir="/tmp"))
    app = new_app(tmp_path / "rqapp", deploy_to)
    write(app.root, "app.py", APP)
    write(app.root, "tasks.py", TASKS)
    write(app.root, "requirements.txt", compiled_lock(["flask>=3.0", "rq>=2"]))
    write(app.root, ".gitignore", "__pycache__/\n")
    write(
        app.root,
        "shiplane.toml",
        TOML.format(redis_port=redis_port, deploy_to=deploy_to, port=app.port),
    )
    app.commit("rq app")
    try:
        yield app
    finally:
        try:
            app.stop()
        finally:
            shutil.rmtree(deploy_to, ignore_errors=True)


def test_an_rq_worker_finishes_its_job_across_a_deploy(rq_app: App, redis_port: int) -> None:
    app = rq_app
    app.deploy()
    first = app.current()

    def result(key: str) -> object:
        return redis(redis_port, "GET", f"result:{key}")

    # a job the web app enqueued, run by the worker on the live release
    assert http_get(f"http://127.0.0.1:{app.port}/enqueue?key=a")[0] == 200
    assert wait_for(lambda: result("a"), deadline=60, what="the worker's first job") == first

    # a long job, then a deploy: the old worker finishes it (TERM is RQ's warm shutdown)
    assert http_get(f"http://127.0.0.1:{app.port}/enqueue?key=long&gate=go")[0] == 200
    wait_for(lambda: redis(redis_port, "GET", "started:long"), deadline=60, what="the long job")
    app.edit("app.py", "app = Flask(__name__)", "app = Flask(__name__)  # v2")
    outcome: dict[str, object] = {}
    deploying = threading.Thread(target=lambda: outcome.update(d=app.deploy(check=False)))
    deploying.start()
    try:
        # the web switch comes first; the worker's stop waits for its job
        wait_for(lambda: app.current() != first, deadline=180, what="the new release live")
        assert result("long") is None, "the long job ended before its gate opened"

        def moved_on() -> bool:
            """The deploy ended, or a second worker runs beside the one finishing its job."""
            workers = redis(redis_port, "SMEMBERS", "rq:workers")
            return not deploying.is_alive() or len(workers) > 1  # type: ignore[arg-type]

        # the old worker drains while the deploy waits for it: neither happens (15 s is far
        # beyond the deploy's own few seconds after the flip)
        end = time.monotonic() + 15
        while time.monotonic() < end and not moved_on():
            deploying.join(timeout=0.2)
        assert not moved_on(), (
            "the deploy went on while the old worker still ran its job: "
            f"{redis(redis_port, 'SMEMBERS', 'rq:workers')}, {result('long')}, {outcome}"
        )
    finally:
        redis(redis_port, "RPUSH", "go", "1")
        deploying.join(timeout=240)
    deployed = outcome["d"]
    assert getattr(deployed, "exit", 1) == 0, getattr(deployed, "output", "")[-4000:]
    second = app.current()
    assert result("long") == f"{first} gate"  # finished on its release, not killed
    assert "killed" not in str(getattr(deployed, "result", {}))

    # the next job is the new release's worker's
    assert http_get(f"http://127.0.0.1:{app.port}/enqueue?key=b")[0] == 200
    assert wait_for(lambda: result("b"), deadline=60, what="the new worker's job") == second
