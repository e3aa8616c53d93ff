"""The app deployed with Fabric 3, as its docs recommend: a ``ThreadingGroup`` of the hosts (each
host's commands run in its own thread), ``put`` for the files, ``run`` for the rest.

The typical Fabric recipe (Capistrano's layout, by hand): ``git archive`` the commit, upload it and
the wheel folder, unpack into ``releases/<id>``, ``pip install -r`` into one venv the releases
share (made once), migrate, point ``current`` at the release, restart gunicorn (TERM the pid from
its pid file, wait for the exit, start it again with ``--daemon``), keep the last five releases.
``rollback`` points ``current`` at the release before it and restarts.

    PEER_HOSTS=shl-h1,shl-h2 PEER_ROOT=/srv/peer-fabric PEER_PORT=8302 PEER_APP=<checkout> \\
    PEER_WHEELS=<wheel folder> fab -r bench/peers -S <ssh_config> deploy|rollback

Host keys are checked strictly against the ``UserKnownHostsFile`` the ssh_config names (Fabric
alone would accept unknown ones: paramiko's ``AutoAddPolicy``).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from fabric import ThreadingGroup, task
from invoke import Context
from paramiko import RejectPolicy

ENV = "SHIPLANE_STAGE=prod SECRET_KEY=bench-peer-secret"
KEEP = 5


def _group(c: Context) -> ThreadingGroup:
    group = ThreadingGroup(*os.environ["PEER_HOSTS"].split(","), config=c.config)
    for conn in group:
        conn.client.set_missing_host_key_policy(RejectPolicy())
        conn.client.load_host_keys(conn.ssh_config["userknownhostsfile"].split()[0])
    return group


def _restart(root: str, port: str) -> str:
    """Stop the running gunicorn by its pid file (bounded wait), start the new one detached."""
    return (
        f"cd {root} && if [ -f gunicorn.pid ]; then pid=$(cat gunicorn.pid); "
        'kill -TERM "$pid" 2>/dev/null || true; '
        'for i in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done; fi && '
        f"env {ENV} venv/bin/gunicorn --daemon --pid {root}/gunicorn.pid "
        f"--bind 0.0.0.0:{port} --workers 2 --chdir {root}/current --pythonpath src "
        f"--error-logfile {root}/gunicorn.log 'demo:create_app()'"
    )


@task
def deploy(c: Context) -> None:
    root, port = os.environ["PEER_ROOT"], os.environ["PEER_PORT"]
    app, wheels = Path(os.environ["PEER_APP"]), Path(os.environ["PEER_WHEELS"])
    sha = c.run(f"git -C {app} rev-parse --short HEAD", hide=True).stdout.strip()
    release = f"{time.strftime('%Y%m%d%H%M%S')}-{sha}"
    group = _group(c)
    with tempfile.TemporaryDirectory() as tmp:
        tarball = f"{tmp}/{release}.tar.gz"
        c.run(f"git -C {app} archive --format=tar.gz -o {tarball} HEAD")
        group.run(f"mkdir -p {root}/releases/{release} {root}/shared/var {root}/wheels", hide=True)
        group.put(tarball, f"{root}/{release}.tar.gz")
    for wheel in sorted(wheels.glob("*.whl")):
        group.put(str(wheel), f"{root}/wheels/{wheel.name}")
    group.run(
        f"cd {root} && tar -xzf {release}.tar.gz -C releases/{release} && rm {release}.tar.gz"
        f" && ln -s {root}/shared/var releases/{release}/var"
        " && { [ -x venv/bin/python ] || python3 -m venv venv; }"
        f" && venv/bin/pip install -q --no-index --find-links wheels"
        f" -r releases/{release}/requirements.txt"
        f" && cd releases/{release} && env {ENV} {root}/venv/bin/alembic upgrade head",
        hide=True,
    )
    group.run(f"ln -sfn {root}/releases/{release} {root}/current", hide=True)
    group.run(_restart(root, port), hide=True)
    group.run(
        f"cd {root}/releases && ls -1 | sort | head -n -{KEEP} | xargs -r rm -rf",
        hide=True,
    )


@task
def rollback(c: Context) -> None:
    root, port = os.environ["PEER_ROOT"], os.environ["PEER_PORT"]
    group = _group(c)
    group.run(
        f"cd {root} && cur=$(basename $(readlink current))"
        ' && prev=$(ls -1 releases | sort | grep -B1 -x "$cur" | head -n 1)'
        ' && [ "$prev" != "$cur" ]'
        f' && ln -sfn {root}/releases/$prev current && rm -rf "releases/$cur"',
        hide=True,
    )
    group.run(_restart(root, port), hide=True)
