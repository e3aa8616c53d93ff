"""pyinfra rollback: ``current`` back to the release before it (that one removed), restart."""

import os

from pyinfra.operations import server

ROOT, PORT = os.environ["PEER_ROOT"], os.environ["PEER_PORT"]
ENV = "SHIPLANE_STAGE=prod SECRET_KEY=bench-peer-secret"

server.shell(
    name="Point current at the previous release",
    commands=[
        (
            f"cd {ROOT} && cur=$(basename $(readlink current))"
            ' && prev=$(ls -1 releases | sort | grep -B1 -x "$cur" | head -n 1)'
            ' && [ "$prev" != "$cur" ]'
            f' && ln -sfn {ROOT}/releases/$prev current && rm -rf "releases/$cur"'
        )
    ],
)
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
