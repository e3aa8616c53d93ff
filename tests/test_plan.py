"""``shiplane.plan``: the pure decisions a deploy acts on (batches, failures allowed, who is primary,
what each host is sent and how services are run). No hosts, no I/O."""

from __future__ import annotations

import sys

import pytest

from shiplane.agent.runtime import valid_release_id
from shiplane.config import DeployFile
from shiplane.plan import (
    batches,
    manifest_blobs,
    max_failures,
    primary_host,
    release_id,
    role_hosts,
    services_spec,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HOSTS = ["deploy@web1", "deploy@web2:2222", "web3"]

BASE = """
[app]
name = "shop"
{target}

[services.web]
workers = 3
healthcheck = {{ path = "/health", timeout = 7 }}
smoke = [{{ path = "/", expect = "shop" }}]

[services.worker]
command = "python -m shop.worker"

[stages.local]
hosts = ["local"]
deploy_to = ".shiplane/local"
port = 5000

[stages.prod]
hosts = ["deploy@web1", "deploy@web2:2222", "web3"]
deploy_to = "/srv/shop"
port = 8000
roles = {{ primary = ["web2"], db = ["web3", "deploy@web1"] }}

[stages.edge]
hosts = ["web9"]
deploy_to = "/srv/shop"
bind = "10.0.0.9"
"""


def deploy_file(target: str = 'wsgi = "shop:create_app()"') -> DeployFile:
    return DeployFile.model_validate(tomllib.loads(BASE.format(target=target)))


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        (1, [["a"], ["b"], ["c"], ["d"], ["e"]]),
        (2, [["a", "b"], ["c", "d"], ["e"]]),
        (10, [["a", "b", "c", "d", "e"]]),
        ("40%", [["a", "b"], ["c", "d"], ["e"]]),
        ("100%", [["a", "b", "c", "d", "e"]]),
        (
            "10%",
            [["a"], ["b"], ["c"], ["d"], ["e"]],
        ),  # a percentage below one host still moves one at a time
    ],
)
def test_rolling_batches_by_count_or_percentage(
    batch: int | str, expected: list[list[str]]
) -> None:
    assert batches(["a", "b", "c", "d", "e"], batch) == expected


def test_batches_keep_every_host_once_in_order() -> None:
    hosts = [f"h{i}" for i in range(17)]
    assert [h for batch in batches(hosts, "25%") for h in batch] == hosts


@pytest.mark.parametrize(
    ("max_fail", "batch_size", "allowed"),
    [
        (0, 4, 0),
        (1, 4, 1),
        ("50%", 4, 2),
        ("10%", 3, 0),
        ("100%", 3, 3),
    ],
)
def test_failures_a_batch_may_have(max_fail: int | str, batch_size: int, allowed: int) -> None:
    assert max_failures(max_fail, batch_size) == allowed


def test_primary_is_the_role_member_matched_by_bare_host_name() -> None:
    assert primary_host(deploy_file(), "prod", HOSTS) == "deploy@web2:2222"


def test_primary_defaults_to_the_first_host() -> None:
    assert primary_host(deploy_file(), "edge", ["web9"]) == "web9"


def test_role_hosts_for_task_scopes() -> None:
    deploy = deploy_file()
    assert role_hosts(deploy, "prod", HOSTS, "all") == HOSTS
    assert role_hosts(deploy, "prod", HOSTS, "primary") == ["deploy@web2:2222"]
    assert role_hosts(deploy, "prod", HOSTS, "role:db") == ["deploy@web1", "web3"]
    assert role_hosts(deploy, "prod", HOSTS, "role:nobody") == []


def test_manifest_blobs_lists_each_blob_once_with_its_size() -> None:
    manifest = {
        "tools": [{"path": "supervisor.whl", "sha256": "t" * 64, "size": 10}],
        "dependencies": [
            {"path": "flask.whl", "sha256": "d" * 64, "size": "20"},
            {"path": "flask-copy.whl", "sha256": "d" * 64, "size": 20},
        ],
        "app_files": [
            {"path": "shop.whl", "sha256": "a" * 64, "size": 30, "kind": "wheel"},
            {"path": "alembic.ini", "sha256": "t" * 64, "size": 10, "kind": "file"},
        ],
    }
    assert manifest_blobs(manifest) == [("t" * 64, 10), ("d" * 64, 20), ("a" * 64, 30)]
    assert manifest_blobs({}) == []


def test_services_spec_for_a_wsgi_app() -> None:
    spec = services_spec(deploy_file(), "prod")
    web = spec["web"]
    assert (spec["app"], spec["stage"], spec["front"]) == ("shop", "prod", "builtin")
    assert (web["kind"], web["target"], web["workers"]) == ("wsgi", "shop:create_app()", 3)
    assert (web["bind"], web["port"]) == ("0.0.0.0", 8000)  # a server listens on its interfaces
    assert web["health"] == {"path": "/health", "timeout": 7, "host": "localhost"}
    assert web["smoke"][0]["path"] == "/" and web["smoke"][0]["expect"] == "shop"
    assert spec["workers"]["worker"]["command"] == "python -m shop.worker"
    assert web["standby"] is True  # rollback is instant unless the stage gives the memory back


def test_standby_can_be_turned_off_and_the_install_knows_the_process_manager() -> None:
    raw = tomllib.loads(BASE.format(target='wsgi = "shop:create_app()"'))
    raw["services"]["web"]["standby"] = False
    deploy = DeployFile.model_validate(raw)
    assert services_spec(deploy, "prod")["web"]["standby"] is False
    # the local stage runs under the daemon backend: the install starts supervisord early
    assert services_spec(deploy, "local")["backend"] == "daemon"


def test_services_spec_for_an_asgi_app_and_bind_defaults() -> None:
    deploy = deploy_file('asgi = "shop.asgi:app"')
    web = services_spec(deploy, "prod")["web"]
    assert (web["kind"], web["target"]) == ("asgi", "shop.asgi:app")
    assert (
        services_spec(deploy, "local")["web"]["bind"] == "127.0.0.1"
    )  # the developer's machine: loopback only
    assert services_spec(deploy, "local")["web"]["port"] == 5000
    assert services_spec(deploy, "edge")["web"]["bind"] == "10.0.0.9"


def test_release_ids_sort_by_time_and_name_the_artifact() -> None:
    digest = "1a2b3c4d" + "0" * 56
    first, later = release_id(digest, now=1_800_000_000), release_id(digest, now=1_800_000_061)
    assert first == "20270115T080000000Z-1a2b3c4d"
    assert sorted([later, first]) == [first, later]
    # two deploys in one second (a failed one, then its fix) still sort by time, not by digest
    failed, fix = (
        release_id("f" * 64, now=1_800_000_000.2),
        release_id("0" * 64, now=1_800_000_000.7),
    )
    assert sorted([fix, failed]) == [failed, fix]
    # ids of whole seconds, from older controllers, sort among them by time
    assert sorted([later, "20270115T080030Z-aaaaaaaa", first]) == [
        first,
        "20270115T080030Z-aaaaaaaa",
        later,
    ]
    assert all(valid_release_id(r) for r in (first, fix, "20270115T080030Z-aaaaaaaa"))
