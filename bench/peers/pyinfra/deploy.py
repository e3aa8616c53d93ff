"""The app deployed with pyinfra 3, as its docs recommend: operations (``files.put``/``sync``,
``pip.venv``, ``pip.packages``, ``files.link``, ``server.shell``), run on every host at once.

The typical recipe, as in the Fabric one: ``git archive`` the commit, put it and sync the wheel
folder, unpack into ``releases/<id>``, ``pip install -r`` into one venv the releases share (made
once), migrate, point ``current`` at the release, restart gunicorn by its pid file, keep five.

    PEER_HOSTS=... SSH_CONFIG=... KNOWN_HOSTS=... PEER_ROOT=/srv/peer-pyinfra PEER_PORT=8303 \\
    PEER_APP=<checkout> PEER_WHEELS=<wheel folder> pyinfra -y inventory.py deploy.py

pyinfra runs this file once per host, so the release id comes from the commit (its date and
hash), the same on every host; the tarball is made once per commit.
"""

import os
import subprocess
import tempfile

from pyinfra.operations import files, pip, server

ROOT, PORT = os.environ["PEER_ROOT"], os.environ["PEER_PORT"]
APP, WHEELS = os.environ["PEER_APP"], os.environ["PEER_WHEELS"]
ENV = "SHIPLANE_STAGE=prod SECRET_KEY=bench-peer-secret"
GIT_ID = ["git", "-C", APP, "log", "-1", "--date=format:%Y%m%d%H%M%S", "--format=%cd-%h"]
RELEASE = subprocess.run(GIT_ID, check=True, capture_output=True, text=True).stdout.strip()
TARBALL = os.path.join(tempfile.gettempdir(), f"pyinfra-app-{RELEASE}.tar.gz")
if not os.path.exists(TARBALL):
    subprocess.run(
        ["git", "-C", APP, "archive", "--format=tar.gz", "-o", TARBALL, "HEAD"], check=True
    )

files.directory(name="Release dir", path=f"{ROOT}/releases/{RELEASE}")
files.directory(name="Shared dir", path=f"{ROOT}/shared/var")
files.sync(name="Wheel folder", src=WHEELS, dest=f"{ROOT}/wheels")
files.put(name="Upload the app", src=TARBALL, dest=f"{ROOT}/app.tar.gz")
server.shell(
    name="Unpack the release",
    commands=[
        f"tar -xzf {ROOT}/app.tar.gz -C {ROOT}/releases/{RELEASE}",
        f"ln -sfn {ROOT}/shared/var {ROOT}/releases/{RELEASE}/var",
    ],
)
pip.venv(name="Venv", path=f"{ROOT}/venv", python="python3")
pip.packages(
    name="Install the locked requirements",
    requirements=f"{ROOT}/releases/{RELEASE}/requirements.txt",
    virtualenv=f"{ROOT}/venv",
    extra_install_args=f"-q --no-index --find-links {ROOT}/wheels",
)
server.shell(
    name="Migrate",
    commands=[f"cd {ROOT}/releases/{RELEASE} && env {ENV} {ROOT}/venv/bin/alembic upgrade head"],
)
files.link(name="Switch current", path=f"{ROOT}/current", target=f"{ROOT}/releases/{RELEASE}")
server.shell(
    name="Restart gunicorn",
    commands=[
        (
            f"cd {ROOT} && if [ -f gunicorn.pid ]; then pid=$(cat gunicorn.pid); "
            'kill -TERM "$pid" 2>/dev/null || true; '
            'for i in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done; fi'
        ),
        (
            f"cd {ROOT} && env {ENV} venv/bin/gunicorn --daemon --pid {ROOT}/gunicorn.pid "
            f"--bind 0.0.0.0:{PORT} --workers 2 --chdir {ROOT}/current --pythonpath src "
            f"--error-logfile {ROOT}/gunicorn.log 'demo:create_app()'"
        ),
    ],
)
server.shell(
    name="Keep five releases",
    commands=[f"cd {ROOT}/releases && ls -1 | sort | head -n -5 | xargs -r rm -rf"],
)
