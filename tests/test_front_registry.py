"""The fronts are found by name in one place (agent/fronts.py's FRONTS), like the backends
(agent/services.py's BACKENDS): the deploy file's choices are exactly those names, and every
decision about the front (does the backend run the builtin proxy, what a shutdown stops) asks it."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from shiplane.agent import caddy, fronts, nginx, services
from shiplane.agent.backend import builtin_front
from shiplane.agent.errors import AgentError
from shiplane.agent.paths import Layout
from shiplane.agent.protocol import ServicesSpec
from shiplane.config.schema import Stage


def spec(front: str, tmp_path: Path) -> ServicesSpec:
    return {
        "app": "demo",
        "stage": "test",
        "front": front,
        "web": None,
        "workers": {},
        "backend": "daemon",
        "nginx": {
            "server_name": "_",
            "tls_cert": None,
            "tls_key": None,
            "static": {},
            "site_dir": str(tmp_path / "sites"),
            "conf": None,
            "pid_file": str(tmp_path / "nginx.pid"),
        }
        if front == "nginx"
        else None,
        "caddy": {
            "domains": ["app.example.com"],
            "acme_ca": "https://acme.example.com/dir",
            "acme_email": None,
            "acme_ca_root": None,
            "data_dir": None,
            "http_port": 80,
            "https_port": 443,
            "issue_timeout": 120,
            "renew_interval": 600,
        }
        if front == "caddy"
        else None,
    }


def test_the_deploy_file_offers_exactly_the_registered_fronts_and_backends() -> None:
    fields = Stage.model_fields
    assert set(typing.get_args(fields["front"].annotation)) == set(fronts.FRONTS)
    assert set(typing.get_args(fields["backend"].annotation)) == {"auto", *services.BACKENDS}
    assert fields["front"].default == fronts.DEFAULT


def test_each_front_is_registered_under_its_own_name() -> None:
    for name, front in fronts.FRONTS.items():
        assert front.name == name
    assert isinstance(fronts.FRONTS["nginx"], nginx.NginxFront)
    assert isinstance(fronts.FRONTS["caddy"], caddy.CaddyFront)


def test_the_builtin_proxy_is_the_front_without_a_spec_or_a_name(tmp_path: Path) -> None:
    assert fronts.front_for(None).name == "builtin"
    assert fronts.front_for({**spec("builtin", tmp_path), "front": ""}).name == "builtin"
    assert builtin_front(None) and builtin_front(spec("builtin", tmp_path))


def test_only_the_builtin_front_runs_under_the_backend(tmp_path: Path) -> None:
    for name in fronts.FRONTS:
        assert builtin_front(spec(name, tmp_path)) is (name == "builtin")


def test_an_unknown_front_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(AgentError) as err:
        fronts.front_for(spec("apache", tmp_path))
    assert err.value.kind == "usage"
    assert "'apache'" in err.value.message and "builtin, nginx, caddy" in err.value.message


def test_stopping_a_front_stops_only_what_the_stage_started(tmp_path: Path) -> None:
    events: list[object] = []
    layout = Layout(tmp_path / "root")
    # the builtin proxy is one of the backend's services: its shutdown stopped it
    assert fronts.FRONTS["builtin"].stop(layout, spec("builtin", tmp_path), events.append) == []
    # nginx without a private conf is the host's own: never stopped
    assert fronts.FRONTS["nginx"].stop(layout, spec("nginx", tmp_path), events.append) == []
    # a Caddy is stopped by the dir its switch recorded: none recorded, none started
    assert fronts.FRONTS["caddy"].stop(layout, spec("caddy", tmp_path), events.append) == []
    assert events == []
