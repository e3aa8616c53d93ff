"""A front several apps share on one host (agent/frontshare.py, docs/https.md "Several apps on
one host"): one site file per deploy root, changed under the front's lock, and what one app may
not do to another's (take its name, change the shared Caddy's ports). Nothing here starts a
server: every refusal comes before one would (the served cases: tests/test_shared_front.py and
tests/test_nginx_front.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from shiplane.agent import caddy, caddyfile, frontshare
from shiplane.agent.errors import AgentError
from shiplane.agent.paths import Layout
from shiplane.agent.protocol import ServicesSpec


def caddy_spec(app: str, domains: list[str], data: Path, **keys: Any) -> ServicesSpec:
    return {
        "app": app,
        "stage": "prod",
        "front": "caddy",
        "web": None,
        "workers": {},
        "backend": "daemon",
        "nginx": None,
        "caddy": {
            "domains": domains,
            "acme_ca": caddyfile.LETS_ENCRYPT,
            "acme_email": None,
            "acme_ca_root": None,
            "data_dir": str(data),
            "http_port": 80,
            "https_port": 443,
            "issue_timeout": 120,
            "renew_interval": 600,
            **keys,
        },
    }


def test_each_deploy_root_has_its_own_site_file_with_its_route(tmp_path: Path) -> None:
    data = tmp_path / "front"
    spec = caddy_spec("shop", ["shop.example.com"], data)
    one, two = Layout(tmp_path / "a" / "shop"), Layout(tmp_path / "b" / "shop")
    # the same app and stage names in two deploy roots: two files
    assert caddyfile.site_path(one, spec) != caddyfile.site_path(two, spec)
    path = caddyfile.site_path(one, spec)
    path.parent.mkdir(parents=True)
    path.write_text(caddyfile.site_text(one, spec))
    assert frontshare.routes(path.parent, "*.caddy") == {
        path: {
            "app": "shop",
            "stage": "prod",
            "root": str(one.root),
            "domains": ["shop.example.com"],
        }
    }
    # a file without the route line (an older shiplane's, someone's own) is not a route
    (path.parent / "by-hand.caddy").write_text("example.org {\n\trespond 200\n}\n")
    assert list(frontshare.routes(path.parent, "*.caddy")) == [path]


def test_the_front_lock_makes_another_apps_change_wait(tmp_path: Path) -> None:
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with frontshare.locked(tmp_path, lambda e: None):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        events: list[Any] = []
        with (
            pytest.raises(AgentError, match="stayed locked") as err,
            frontshare.locked(tmp_path, events.append, timeout=0.3),
        ):
            pass
        assert err.value.kind == "front"
        assert "waiting for another app's change" in events[0]["detail"]
    finally:
        release.set()
        thread.join(10)
    with frontshare.locked(tmp_path, lambda e: None, timeout=1):
        pass  # free again once the holder is done


def _other_app(tmp_path: Path, data: Path) -> None:
    """The shop's site and main Caddyfile already in the shared dir."""
    shop = Layout(tmp_path / "shop")
    spec = caddy_spec("shop", ["shop.example.com"], data)
    site = caddyfile.site_path(shop, spec)
    site.parent.mkdir(parents=True)
    site.write_text(caddyfile.site_text(shop, spec))
    (data / "Caddyfile").write_text(caddyfile.main_text(data, caddyfile.settings(spec)))


def test_a_name_another_app_routes_is_refused_naming_that_app(tmp_path: Path) -> None:
    data = tmp_path / "front"
    _other_app(tmp_path, data)
    blog = Layout(tmp_path / "blog")
    spec = caddy_spec("blog", ["blog.example.com", "SHOP.example.com"], data)
    with pytest.raises(AgentError) as err:
        caddy.ensure(blog, spec, lambda e: None)
    assert err.value.kind == "usage"
    assert "shop.example.com is already routed" in err.value.message
    assert "'shop'" in err.value.message and str(tmp_path / "shop") in err.value.message
    assert not caddyfile.site_path(blog, spec).exists()


def test_the_shared_caddys_ports_are_every_apps(tmp_path: Path) -> None:
    data = tmp_path / "front"
    _other_app(tmp_path, data)
    main = (data / "Caddyfile").read_text()
    blog = Layout(tmp_path / "blog")
    spec = caddy_spec("blog", ["blog.example.com"], data, https_port=8443)
    with pytest.raises(AgentError) as err:
        caddy.ensure(blog, spec, lambda e: None)
    assert err.value.kind == "usage"
    assert "serves shop with" in err.value.message and "https_port 443" in err.value.message
    assert "asks for" in err.value.message and "https_port 8443" in err.value.message
    assert (data / "Caddyfile").read_text() == main  # untouched
    assert not caddyfile.site_path(blog, spec).exists()


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
    reason="runs the agent as another user (needs root and the hosts' /usr/bin/python3)",
)
def test_a_caddy_dir_the_deploy_user_cannot_make_names_setup() -> None:
    """The deploy user (here: nobody) deploying with a caddy.data_dir in a dir only root may
    write: the front's error says who makes it, before any Caddy starts."""
    base = Path(tempfile.mkdtemp(prefix="shl-frontdir-", dir="/tmp"))  # pytest's tmp is 0700
    os.chmod(base, 0o755)
    try:
        _refused_as_nobody(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _refused_as_nobody(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from shiplane.agent import caddy\n"
        "from shiplane.agent.errors import AgentError\n"
        "from shiplane.agent.paths import Layout\n"
        "spec = json.loads(sys.argv[1])\n"
        "try:\n"
        "    caddy.ensure(Layout(Path(sys.argv[2])), spec, lambda e: None)\n"
        "except AgentError as exc:\n"
        "    print(exc.kind, exc.message)\n"
    )
    spec = caddy_spec("blog", ["blog.example.com"], tmp_path / "caddy")
    # the hosts' Python (the agent is stdlib-only), which nobody may run, unlike pyenv's in /root
    src = str(Path(caddy.__file__).parents[2])
    done = subprocess.run(
        ["/usr/bin/python3", "-c", code, json.dumps(spec), "/nonexistent/blog"],
        capture_output=True,
        text=True,
        user="nobody",
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
        cwd="/",
        timeout=60,
        check=False,
    )
    assert done.stdout.startswith("front cannot make the Caddy dir"), done.stdout + done.stderr
    assert "shiplane setup makes it" in done.stdout
    assert not (tmp_path / "caddy").exists()
