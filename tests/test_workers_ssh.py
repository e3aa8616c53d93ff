"""RQ workers on two SSH hosts, rolling (issue 19 item 6, docs/workers.md): Debian's
``redis-server`` started on the first test host, the Flask app of tests/test_workers_redis.py on
both with an RQ worker each, deployed host after host (``rolling.batch = 1``).

A redeploy while one host's worker runs a long job switches the hosts before it, then waits
there for that job (RQ's warm shutdown), which finishes on the release it started on; once the
gate opens the rollout goes on, and every later job is taken by a worker of the new release.
"""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apps.common import App, compiled_lock, http_get, new_app, share_build_caches, wait_for, write
from sshhosts import TestHost, TestHosts
from test_workers_redis import APP, redis

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

PORT = 8420
REDIS_PORT = 6390
STAGE = "fleet"

# test_workers_redis's tasks, with the host that ran each job
TASKS = """import os
import socket

from redis import Redis


def _conn():
    # longer than the gate's wait: redis-py's own read timeout would fail a blocked BLPOP
    return Redis.from_url(os.environ["REDIS_URL"], socket_timeout=300)


def _who():
    return os.environ["SHIPLANE_RELEASE"] + " " + socket.gethostname()


def record(key):
    _conn().set("result:" + key, _who())


def wait_then_record(key, gate):
    conn = _conn()
    conn.set("started:" + key, _who())
    # blocks until the test pushes to the gate, bounded: it does so long before
    how = "gate" if conn.blpop([gate], timeout=240) else "deadline"
    conn.set("result:" + key, _who() + " " + how)
"""

TOML = """[app]
name = "rqfleet"
wsgi = "app:app"

[build]
requirements = "requirements.txt"
python_version = "3.11"
platform = "linux_x86_64"

[env]
REDIS_URL = "redis://{redis_host}:{redis_port}/0"

[services.web]
workers = 1
healthcheck = {{ path = "/up", timeout = 30 }}

[services.worker]
command = "rq worker --url $REDIS_URL default"
stop_timeout = 180

[stages.{stage}]
hosts = [{hosts}]
deploy_to = "/srv/rqfleet"
port = {port}
bind = "0.0.0.0"
ssh_config = "{ssh_config}"
rolling = {{ batch = 1 }}
"""


@pytest.fixture
def fleet(make_ssh_hosts: Any, tmp_path: Path) -> Iterator[tuple[App, TestHosts]]:
    hosts: TestHosts = make_ssh_hosts(2)
    server = hosts.hosts[0]
    started = server.ssh(
        "redis-server "
        + shlex.join(
            ["--port", str(REDIS_PORT), "--bind", "0.0.0.0", "--protected-mode", "no"]
            + ["--save", "", "--appendonly", "no", "--daemonize", "yes", "--dir", "/tmp"]
        )
    )
    assert started.returncode == 0, started.stdout + started.stderr

    def pong() -> bool:
        try:
            return redis(REDIS_PORT, "PING", host=server.address) == "PONG"
        except OSError:
            return False

    wait_for(pong, deadline=20, what="redis-server on the first host")
    app = new_app(tmp_path / "rqfleet", tmp_path / "unused")
    share_build_caches(app.root)
    write(app.root, "app.py", APP)
    write(app.root, "tasks.py", TASKS)
    write(app.root, "requirements.txt", compiled_lock(["flask>=3.0", "rq>=2"]))
    write(app.root, ".gitignore", "__pycache__/\n.shiplane/\n")
    names = ", ".join(f'"{h.name}"' for h in hosts.hosts)
    write(
        app.root,
        "shiplane.toml",
        TOML.format(
            redis_host=server.address,
            redis_port=REDIS_PORT,
            stage=STAGE,
            hosts=names,
            port=PORT,
            ssh_config=hosts.ssh_config,
        ),
    )
    app.commit("rq fleet")
    app.stage = STAGE
    try:
        yield app, hosts
    finally:
        app.shiplane("stop", "--all", "--stage", STAGE, timeout=120)
        try:  # redis-server closes the connection without a reply as it goes
            redis(REDIS_PORT, "SHUTDOWN", "NOSAVE", host=server.address)
        except (AssertionError, OSError):
            pass


def enqueue(host: TestHost, query: str) -> None:
    status, body = http_get(host.url(PORT, f"/enqueue?{query}"))
    assert status == 200, (host.name, status, body[:300])


def test_rq_workers_roll_host_by_host_and_a_long_job_finishes(
    fleet: tuple[App, TestHosts],
) -> None:
    app, hosts = fleet
    server = hosts.hosts[0].address
    first = app.deploy().result["release"]

    def result(key: str) -> str | None:
        value = redis(REDIS_PORT, "GET", f"result:{key}", host=server)
        return value if isinstance(value, str) else None

    enqueue(hosts.hosts[1], "key=a")
    assert str(wait_for(lambda: result("a"), deadline=60, what="a job")).startswith(first)

    enqueue(hosts.hosts[1], "key=long&gate=go")
    runner = str(
        wait_for(
            lambda: redis(REDIS_PORT, "GET", "started:long", host=server),
            deadline=60,
            what="the long job",
        )
    ).split()[1]
    order = [h.name for h in hosts.hosts]
    app.edit("app.py", "app = Flask(__name__)", "app = Flask(__name__)  # v2")
    outcome: dict[str, Any] = {}
    deploying = threading.Thread(target=lambda: outcome.update(d=app.deploy(check=False)))
    deploying.start()
    try:
        # the hosts before the job's one switch; the rollout then waits for its worker's job
        before = order[: order.index(runner)]
        for name in before:
            host = next(h for h in hosts.hosts if h.name == name)
            wait_for(
                lambda host=host: (
                    http_get(host.url(PORT, "/up"))[0] == 200
                    and (host.root / "rqfleet" / "current").resolve().name != first
                ),
                deadline=180,
                what=f"{name} on the new release",
            )
        end = time.monotonic() + 10  # the rollout's own pace is seconds per host
        while time.monotonic() < end and deploying.is_alive():
            deploying.join(timeout=0.2)
        assert deploying.is_alive(), "the rollout did not wait for the worker's job"
        assert result("long") is None
    finally:
        redis(REDIS_PORT, "RPUSH", "go", "1", host=server)
        deploying.join(timeout=300)
    deployed = outcome["d"]
    assert deployed.exit == 0, deployed.output[-4000:]
    second = deployed.result["release"]
    assert result("long") == f"{first} {runner} gate"  # finished where it began, not killed
    for index in range(6):
        enqueue(hosts.hosts[index % 2], f"key=b{index}")
    for index in range(6):
        done = wait_for(lambda i=index: result(f"b{i}"), deadline=60, what=f"job b{index}")
        assert str(done).startswith(second), done

    def workers() -> dict[str, dict[str, Any]]:
        status = app.json("status", "--stage", STAGE)
        return {
            host: next(s for s in found["services"] if s["name"] == "worker")
            for host, found in status["hosts"].items()
        }

    # a worker just restarted is STARTING until supervisord's startsecs have passed, though it
    # may take jobs meanwhile: each must come to RUNNING on the new release
    def all_running() -> dict[str, dict[str, Any]] | None:
        found = workers()
        ok = all(w["release"] == second and w["state"] == "RUNNING" for w in found.values())
        return found if ok else None

    settled = wait_for(all_running, deadline=60, what="both workers RUNNING on the new release")
    assert set(settled) == {h.name for h in hosts.hosts}
