"""A deploy file cannot hurt the machine: hostile values end in exit 2 at `shiplane check` (and at
the start of a deploy, before any host or ssh is reached), with a message naming file, line and
key; never in a traceback, whatever the loader is fed."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shiplane.cli import main
from shiplane.config import build_layers, load_project, render_files
from shiplane.config.loader import with_overrides
from shiplane.errors import UsageError
from shiplane.transport import prewarm
from shiplane.transport.ssh import SSHTransport, remove_control_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BASE = """\
[app]
name = "demo"
wsgi = "demo:app"

[build]
include = ["static/**"]

[config]
files = ["config/base.ini", "config/{stage}.ini"]
render = [{ path = "config/app.ini", template = "templates/app.ini.j2" }]
secrets_file = ".secrets/{stage}.env"

[services.web]
workers = 2

[hooks]
release = "true"

[stages.local]
hosts = ["local"]
deploy_to = ".shiplane/local"
port = 5000

[stages.prod]
hosts = ["deploy@web1", "web2:2222"]
deploy_to = "/srv/demo"
port = 8000
command_timeout = 60
connect_timeout = 10
"""
LINE = {
    key: number
    for number, key in enumerate(
        [
            "",
            "[app]",
            "name",
            "wsgi",
            "",
            "[build]",
            "include",
            "",
            "[config]",
            "files",
            "render",
            "secrets_file",
            "",
            "[services.web]",
            "workers",
            "",
            "[hooks]",
            "release",
            "",
            "[stages.local]",
            "local.hosts",
            "local.deploy_to",
            "local.port",
            "",
            "[stages.prod]",
            "prod.hosts",
            "prod.deploy_to",
            "prod.port",
            "command_timeout",
            "connect_timeout",
        ]
    )
    if key
}


def make_project(root: Path, toml: str | bytes = BASE) -> Path:
    for rel, text in {
        "config/base.ini": "[app]\ntitle = Base\n",
        "config/local.ini": "[app]\ndebug = true\n",
        "templates/app.ini.j2": "[app]\ntitle = {{ config.app.title }}\nstage = {{ stage }}\n",
        "demo.py": "app = None\n",
        "static/site.css": "body {}\n",
        "requirements.txt": "flask==3.0.3\n",  # check names the lock
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    data = toml if isinstance(toml, bytes) else toml.encode()
    (root / "shiplane.toml").write_bytes(data)
    return root


def check(root: Path) -> tuple[int, str]:
    result = CliRunner().invoke(
        main, ["--file", str(root / "shiplane.toml"), "check"], catch_exceptions=False
    )
    return result.exit_code, result.output


def test_the_base_file_is_valid(tmp_path: Path) -> None:
    code, out = check(make_project(tmp_path))
    assert code == 0, out


Edit = Callable[[str], str]


def sub(old: str, new: str) -> Edit:
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)

    return edit


PROD_DEPLOY_TO = 'deploy_to = "/srv/demo"'
LOCAL_DEPLOY_TO = 'deploy_to = ".shiplane/local"'
TEMPLATE = 'template = "templates/app.ini.j2"'

DANGEROUS: list[tuple[str, Edit, str, str, str]] = [
    # (id, edit, key in the message, line key, words the message has)
    (
        "deploy_to-root",
        sub(PROD_DEPLOY_TO, 'deploy_to = "/"'),
        "stages.prod.deploy_to",
        "prod.deploy_to",
        "system directory",
    ),
    (
        "deploy_to-etc",
        sub(PROD_DEPLOY_TO, 'deploy_to = "/etc"'),
        "stages.prod.deploy_to",
        "prod.deploy_to",
        "system directory",
    ),
    (
        "deploy_to-in-etc",
        sub(PROD_DEPLOY_TO, 'deploy_to = "/etc/demo"'),
        "stages.prod.deploy_to",
        "prod.deploy_to",
        "inside /etc",
    ),
    (
        "deploy_to-in-usr",
        sub(PROD_DEPLOY_TO, 'deploy_to = "//usr/./local/demo/"'),
        "stages.prod.deploy_to",
        "prod.deploy_to",
        "inside /usr",
    ),
    (
        "deploy_to-run",
        sub(PROD_DEPLOY_TO, 'deploy_to = "/run/demo"'),
        "stages.prod.deploy_to",
        "prod.deploy_to",
        "inside /run",
    ),
    (
        "deploy_to-tmp",
        sub(PROD_DEPLOY_TO, 'deploy_to = "/tmp/"'),
        "stages.prod.deploy_to",
        "prod.deploy_to",
        "system directory",
    ),
    (
        "deploy_to-home",
        sub(PROD_DEPLOY_TO, 'deploy_to = "/home"'),
        "stages.prod.deploy_to",
        "prod.deploy_to",
        "system directory",
    ),
    (
        "deploy_to-dotdot",
        sub(PROD_DEPLOY_TO, 'deploy_to = "/srv/../etc"'),
        "stages.prod.deploy_to",
        "prod.deploy_to",
        "'..'",
    ),
    (
        "deploy_to-remote-relative",
        sub(PROD_DEPLOY_TO, 'deploy_to = "srv/demo"'),
        "stages.prod.deploy_to",
        "prod.deploy_to",
        "absolute path",
    ),
    (
        "deploy_to-remote-home",
        sub(PROD_DEPLOY_TO, 'deploy_to = "~/demo"'),
        "stages.prod.deploy_to",
        "prod.deploy_to",
        "absolute path",
    ),
    (
        "deploy_to-empty",
        sub(LOCAL_DEPLOY_TO, 'deploy_to = ""'),
        "stages.local.deploy_to",
        "local.deploy_to",
        "found ''",
    ),
    (
        "deploy_to-project",
        sub(LOCAL_DEPLOY_TO, 'deploy_to = "./"'),
        "stages.local.deploy_to",
        "local.deploy_to",
        "the project itself",
    ),
    (
        "deploy_to-escapes",
        sub(LOCAL_DEPLOY_TO, 'deploy_to = "../elsewhere"'),
        "stages.local.deploy_to",
        "local.deploy_to",
        "'..'",
    ),
    (
        "deploy_to-local-home",
        sub(LOCAL_DEPLOY_TO, 'deploy_to = "~/"'),
        "stages.local.deploy_to",
        "local.deploy_to",
        "home directory",
    ),
    (
        "template-absolute",
        sub(TEMPLATE, 'template = "/etc/shadow"'),
        "config.render[0].template",
        "render",
        "'/etc/shadow'",
    ),
    (
        "template-dotdot",
        sub(TEMPLATE, 'template = "../../etc/shadow"'),
        "config.render[0].template",
        "render",
        "inside the project",
    ),
    (
        "render-dotdot",
        sub(
            'render = [{ path = "config/app.ini", template = "templates/app.ini.j2" }]',
            'render = "../x.ini"',
        ),
        "config.render",
        "render",
        "inside the project",
    ),
    (
        "config-file-absolute",
        sub('"config/base.ini",', '"/etc/passwd",'),
        "config.files",
        "files",
        "'/etc/passwd'",
    ),
    (
        "config-file-placeholder",
        sub('"config/{stage}.ini"', '"config/{env}.ini"'),
        "config.files",
        "files",
        "unknown placeholder {env}",
    ),
    (
        "config-file-brace",
        sub('"config/{stage}.ini"', '"config/{stage.ini"'),
        "config.files",
        "files",
        "brace",
    ),
    (
        "secrets-file-placeholder",
        sub('".secrets/{stage}.env"', '".secrets/{env}.env"'),
        "config.secrets_file",
        "secrets_file",
        "{env}",
    ),
    (
        "secrets-file-absolute",
        sub('".secrets/{stage}.env"', '"/root/.secrets/{stage}.env"'),
        "config.secrets_file",
        "secrets_file",
        "relative",
    ),
    ("include-absolute", sub('"static/**"', '"/etc/*"'), "build.include", "include", "'/etc/*'"),
    (
        "include-dotdot",
        sub('"static/**"', '"../**"'),
        "build.include",
        "include",
        "inside the project",
    ),
    (
        "host-option",
        sub('"deploy@web1"', '"-oProxyCommand=touch /tmp/shl-pwned"'),
        "stages.prod.hosts",
        "prod.hosts",
        "not starting with '-'",
    ),
    (
        "host-user-option",
        sub('"deploy@web1"', '"-oProxyCommand=x@web1"'),
        "stages.prod.hosts",
        "prod.hosts",
        "-oProxyCommand",
    ),
    (
        "host-spaces",
        sub('"deploy@web1"', '"web1 -p 22"'),
        "stages.prod.hosts",
        "prod.hosts",
        "'web1 -p 22'",
    ),
    (
        "host-newline",
        sub('"deploy@web1"', '"web1\\nweb3"'),
        "stages.prod.hosts",
        "prod.hosts",
        "web3",
    ),
    (
        "host-port",
        sub('"web2:2222"', '"web2:99999"'),
        "stages.prod.hosts",
        "prod.hosts",
        "between 1 and 65535",
    ),
    (
        "command_timeout-inf",
        sub("command_timeout = 60", "command_timeout = inf"),
        "stages.prod.command_timeout",
        "command_timeout",
        "finite",
    ),
    (
        "command_timeout-nan",
        sub("command_timeout = 60", "command_timeout = nan"),
        "stages.prod.command_timeout",
        "command_timeout",
        "finite",
    ),
    (
        "command_timeout-huge",
        sub("command_timeout = 60", "command_timeout = 1e300"),
        "stages.prod.command_timeout",
        "command_timeout",
        "86400",
    ),
    (
        "connect_timeout-inf",
        sub("connect_timeout = 10", "connect_timeout = -inf"),
        "stages.prod.connect_timeout",
        "connect_timeout",
        "finite",
    ),
    (
        "hooks-timeout-inf",
        sub('release = "true"', 'release = "true"\ntimeout = inf'),
        "hooks.timeout",
        "release+1",
        "finite",
    ),
    (
        "ssh-persist-negative",
        sub("connect_timeout = 10", "connect_timeout = 10\nssh_persist = -1"),
        "stages.prod.ssh_persist",
        "connect_timeout+1",
        "0",
    ),
    (
        "ssh-option-flag",
        sub("connect_timeout = 10", 'ssh_options = ["-oProxyCommand=touch /tmp/shl-pwned"]'),
        "stages.prod.ssh_options",
        "connect_timeout",
        "Key=Value",
    ),
    (
        "ssh-option-no-host-keys",
        sub("connect_timeout = 10", 'ssh_options = ["StrictHostKeyChecking=no"]'),
        "stages.prod.ssh_options",
        "connect_timeout",
        "strictly",
    ),
    (
        "identity-file-option",
        sub("connect_timeout = 10", 'identity_file = "-oProxyCommand=x"'),
        "stages.prod.identity_file",
        "connect_timeout",
        "leading '-'",
    ),
    (
        "python-option",
        sub('wsgi = "demo:app"', 'wsgi = "demo:app"\npython = "-c"'),
        "app.python",
        "wsgi+1",
        "pattern",
    ),
    (
        "template-missing",
        sub(TEMPLATE, 'template = "templates/nosuch.j2"'),
        "config.render[0].template",
        "render",
        "not a file",
    ),
    (
        "render-format-unknown",
        sub(
            'render = [{ path = "config/app.ini", template = "templates/app.ini.j2" }]',
            'render = "config/app.xyz"',
        ),
        "config.render",
        "render",
        "cannot tell the format",
    ),
    (
        "rolling-negative",
        sub("connect_timeout = 10", "rolling = { batch = -1 }"),
        "stages.prod.rolling.batch",
        "connect_timeout",
        "greater than or equal to 1",
    ),
    (
        "rolling-percent",
        sub("connect_timeout = 10", 'rolling = { max_fail = "500%" }'),
        "stages.prod.rolling.max_fail",
        "connect_timeout",
        "pattern",
    ),
    (
        "nul",
        sub('release = "true"', 'release = "true\\u0000rm"'),
        "hooks.release",
        "release",
        "NUL",
    ),
    (
        "nested-arrays",
        sub('release = "true"', "release = " + "[" * 3000 + "]" * 3000),
        "not valid TOML",
        "release",
        "nested",
    ),
    (
        "nested-within-limit",
        sub('release = "true"', "release = " + "[" * 40 + "]" * 40),
        "hooks.release",
        "release",
        "nested",
    ),
    ("huge-integer", sub("port = 8000", "port = " + "9" * 5000), "not valid TOML", "", "digits"),
]


@pytest.mark.parametrize(
    ("edit", "key", "line", "words"),
    [case[1:] for case in DANGEROUS],
    ids=[case[0] for case in DANGEROUS],
)
def test_a_dangerous_value_is_refused_by_check_naming_key_and_line(
    tmp_path: Path, edit: Edit, key: str, line: str, words: str
) -> None:
    root = make_project(tmp_path, edit(BASE))
    code, out = check(root)
    assert code == 2, out
    assert "Traceback" not in out
    key_line, _, below = line.partition("+")
    number = f":{LINE[key_line] + int(below or 0)}" if line else ""
    assert f"{root / 'shiplane.toml'}{number}: " in out, out
    assert key in out and words in out, out


def test_a_deploy_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    root = make_project(tmp_path, BASE.encode().replace(b'"demo:app"', b'"d\xe9mo:app"'))
    code, out = check(root)
    assert code == 2 and f"shiplane.toml:{LINE['wsgi']}: the deploy file is not UTF-8" in out, out
    assert "byte 0xe9" in out


def test_a_config_layer_that_is_not_utf8_is_a_clean_error(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    (root / "config/local.ini").write_bytes(b"[app]\ntitle = \xff\n")
    code, out = check(root)
    assert code == 2 and "config/local.ini:2: config file is not UTF-8" in out, out


def test_a_local_stage_never_deploys_into_the_project_or_a_folder_holding_it(
    tmp_path: Path,
) -> None:
    root = make_project(tmp_path / "app")
    for target, words in (
        (root, "is the project itself"),
        (tmp_path, "a folder holding the project"),
    ):
        (root / "shiplane.toml").write_text(
            BASE.replace(LOCAL_DEPLOY_TO, f'deploy_to = "{target}"')
        )
        code, out = check(root)
        assert (
            code == 2 and f"shiplane.toml:{LINE['local.deploy_to']}: stages.local.deploy_to" in out
        ), out
        assert words in out, out


def test_a_remote_stage_never_deploys_into_the_checkout(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    (root / "shiplane.toml").write_text(
        BASE.replace(PROD_DEPLOY_TO, f'deploy_to = "{root}/deploy"')
    )
    code, out = check(root)
    assert code == 2 and f"shiplane.toml:{LINE['prod.deploy_to']}: stages.prod.deploy_to" in out, (
        out
    )
    assert "inside this checkout" in out


def test_a_local_deploy_to_that_is_a_symlink_out_of_the_project_is_refused(tmp_path: Path) -> None:
    root = make_project(tmp_path / "app")
    (root / ".shiplane").mkdir()
    (root / ".shiplane/local").symlink_to(tmp_path)  # leads out, to a folder holding the project
    code, out = check(root)
    assert code == 2 and "stages.local.deploy_to" in out and str(tmp_path) in out, out


def test_a_template_symlinked_out_of_the_project_is_refused_unread(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("root:SECRET-HASH:19000:0:99999:7:::\n")
    root = make_project(tmp_path / "app")
    (root / "templates/app.ini.j2").unlink()
    (root / "templates/app.ini.j2").symlink_to(outside)
    code, out = check(root)
    assert code == 2, out
    assert (
        f"shiplane.toml:{LINE['render']}: config.render[0].template" in out
        and "leads out of the project" in out
    )
    assert "SECRET-HASH" not in out


def test_a_config_folder_symlinked_out_of_the_project_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "base.ini").write_text("[app]\ntitle = x\n")
    root = make_project(tmp_path / "app")
    for name in ("base.ini", "local.ini"):
        (root / "config" / name).unlink()
    (root / "config").rmdir()
    (root / "config").symlink_to(elsewhere)
    code, out = check(root)
    assert (
        code == 2
        and f"shiplane.toml:{LINE['files']}: config.files" in out
        and str(elsewhere) in out
    ), out


def test_an_override_is_held_to_the_same_rules(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    for args, words in (
        (["--set", "deploy_to=/etc"], "system directory"),
        (["--set", "command_timeout=inf"], "finite"),
        (["--hosts", "-oProxyCommand=x"], "not starting with '-'"),
    ):
        result = CliRunner().invoke(
            main,
            ["--file", str(root / "shiplane.toml"), "plan", "--stage", "prod", *args],
            catch_exceptions=False,
        )
        assert result.exit_code == 2 and words in result.output, (args, result.output)


def test_a_project_in_a_folder_git_ignores_says_so(tmp_path: Path) -> None:
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("apps/\n")
    root = make_project(tmp_path / "apps" / "demo")
    (root / "pyproject.toml").write_text('[project]\nname = "demo"\nversion = "1"\n')
    for verb in ("check", "build"):
        result = CliRunner().invoke(
            main, ["--file", str(root / "shiplane.toml"), verb], catch_exceptions=False
        )
        assert result.exit_code == 2, result.output
        assert f"{root}: git tracks none of this project's files" in result.output
        assert (
            f"{tmp_path}/.gitignore" in result.output
            and "'apps/'" in result.output
            and "git add" in result.output
        )


# -- the bad host never reaches ssh --------------------------------------------------------------


@pytest.mark.slow  # starts the CLI as a process (~0.4 s): the pre-warm runs only in its entry point
@pytest.mark.parametrize("case", ["file", "hosts-option", "ssh-option"])
def test_a_deploy_with_a_hostile_host_exits_2_and_never_runs_ssh(tmp_path: Path, case: str) -> None:
    """The real CLI (pre-warm included) with an ``ssh`` on PATH that records any call."""
    pwned, called = tmp_path / "pwned", tmp_path / "ssh-called"
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {called}\nexit 255\n')
    fake.chmod(0o755)
    hostile = f"-oProxyCommand=touch {pwned}"
    toml, args = BASE, []
    if case == "file":
        toml = BASE.replace('"deploy@web1"', f'"{hostile}"')
    elif case == "hosts-option":
        args = [f"--hosts={hostile}"]
    else:
        toml = BASE.replace("connect_timeout = 10", f'ssh_options = ["{hostile}"]')
    root = make_project(tmp_path / "app", toml)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "SHIPLANE_PREWARM": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "shiplane", "deploy", "--stage", "prod", "--skip-tests", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "-oProxyCommand" in done.stderr
    assert not called.exists(), called.read_text()
    assert not pwned.exists()
    assert not (root / ".shiplane").exists()  # nothing built, nothing deployed


def test_ssh_reads_the_destination_after_double_dash_and_options_as_dash_o(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []

    class Recorder:
        def __init__(self, argv: list[str], **kwargs: Any) -> None:
            seen.append(argv)

    monkeypatch.setattr(subprocess, "Popen", Recorder)
    transport = SSHTransport("deploy@web1:2222", options=["KexAlgorithms=curve25519-sha256"])
    try:
        transport.spawn(["python3", "-c", "print(1)"])
        with open(os.devnull, "wb") as sink:
            transport.prewarm(sink)
    finally:
        remove_control_dir()
    for argv in seen:
        assert argv[argv.index("deploy@web1") - 1] == "--", argv
        assert argv[argv.index("KexAlgorithms=curve25519-sha256") - 1] == "-o"
    with pytest.raises(UsageError):
        SSHTransport("-oProxyCommand=x")
    with pytest.raises(UsageError):
        SSHTransport("web1", connect_timeout=math.inf)


def test_prewarm_skips_a_file_with_a_hostile_host(tmp_path: Path) -> None:
    make_project(tmp_path, BASE.replace('"deploy@web1"', '"-oProxyCommand=x"'))
    assert prewarm.targets(["deploy", "--stage", "prod"], {}, tmp_path) == {}
    make_project(tmp_path)
    assert (
        prewarm.targets(["deploy", "--stage", "prod", "--hosts", "web1,-oX=y"], {}, tmp_path) == {}
    )
    remove_control_dir()


# -- the loader never raises anything but a UsageError ------------------------------------------


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            ("-" if value < 0 else "") + "inf"
            if math.isinf(value)
            else ("nan" if math.isnan(value) else repr(value))
        )
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    return str(value)  # a date or time: TOML writes them bare, as isoformat does


def dumps(doc: dict[str, Any]) -> str:
    """TOML as people write it: a header per section (and per stage/service), inline below that."""
    lines = []
    for key, value in doc.items():
        if not isinstance(value, dict):
            lines.append(f"{_toml_string(key)} = {_toml_value(value)}")
    for key, value in doc.items():
        if not isinstance(value, dict):
            continue
        if value and all(isinstance(v, dict) for v in value.values()):
            for name, table in value.items():
                lines.append(f"\n[{_toml_string(key)}.{_toml_string(name)}]")
                lines += [f"{_toml_string(k)} = {_toml_value(v)}" for k, v in table.items()]
        else:
            lines.append(f"\n[{_toml_string(key)}]")
            lines += [f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of ``node``, down to 6 levels (values nested deeper are mutated as a whole)."""
    out = [prefix] if prefix else []
    if len(prefix) >= 6:
        return out
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


HOSTILE_STRINGS = [
    "",
    " ",
    "/",
    "/etc",
    "/etc/shadow",
    "/etc/demo",
    "//usr//lib",
    "/tmp",
    "/root",
    "/home",
    "/srv/demo",
    "../x",
    "a/../../b",
    "..",
    ".",
    "./",
    "~",
    "~/x",
    "~root",
    "{stage}",
    "{env}",
    "config/{env}.ini",
    "config/{stage}.ini",
    "{stage",
    "stage}",
    "{}",
    "{0}",
    "{stage.x}",
    "{stage!r}",
    "{{stage}}",
    "-oProxyCommand=touch /tmp/shl-hyp",
    "-x",
    "web1 -p 22",
    "a\nb",
    "a\x00b",
    "\x7f",
    "é/ü",
    "\u202e",
    "\ud800",
    "x" * 3000,
    "local",
    "deploy@web1",
    "web1:0",
    "web1:70000",
    "[::1]:22",
    "user@",
    "@host",
    "KexAlgorithms=curve25519-sha256",
    "StrictHostKeyChecking=no",
    "python3",
    "inf",
    "nan",
    "0600",
    "static/**",
    "**",
    "[",
    "*.ini",
    "config/base.ini",
    "templates/app.ini.j2",
    "shiplane.toml",
]
SCALARS = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=20),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 65535, 65536, 10**19, 10**300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.dates(),
)


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


PLAUSIBLE = st.sampled_from(
    [
        "/srv/other",
        "/opt/demo/releases",
        "/tmp/shl-fuzz",
        ".shiplane/dev",
        "~/apps/demo",
        "config/{stage}.ini",
        "config/base.ini",
        "templates/app.ini.j2",
        "web3",
        "deploy@web3:22",
        "[::1]:2200",
        "python3.11",
        "demo:app",
        "true",
        "static/**",
        ".secrets/{stage}.env",
        5000,
        8001,
        2,
        30.5,
        0.5,
        True,
        False,
        ["web4"],
        ["local"],
        {"path": "config/other.ini"},
        {"path": "a.json", "format": "json"},
        {"app": {"x": "1"}},
    ]
)
VALUES = st.one_of(
    PLAUSIBLE,
    PLAUSIBLE,
    PLAUSIBLE,
    SCALARS,
    st.lists(SCALARS, max_size=4),
    st.dictionaries(
        st.sampled_from(HOSTILE_STRINGS[:40] + ["path", "template", "hosts", "x"]),
        SCALARS,
        max_size=3,
    ),
    st.integers(min_value=1, max_value=300).map(_nested),
)
MUTATION = st.tuples(
    st.sampled_from(["replace"] * 4 + ["delete", "add", "nest"]),
    st.integers(min_value=0, max_value=10**6),
    VALUES,
    st.sampled_from(["x", "path", "template", "deploy_to", "hosts", "timeout", "{stage}", ""]),
)
ENCODING = st.sampled_from(["utf-8"] * 12 + ["utf-16", "latin-1", "bytes"])
BASE_DOC: dict[str, Any] = tomllib.loads(BASE)


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def _mutate(doc: dict[str, Any], action: str, index: int, value: Any, name: str) -> None:
    value = copy.deepcopy(value)  # strategies share their objects: never link one into two places
    paths = _paths(doc)
    leaves = [path for path in paths if not isinstance(_at(doc, path), dict)]
    if leaves and index % 5:  # mostly a value, sometimes a whole table
        paths = leaves
    path = paths[
        (index * 2654435761 + 7) % len(paths)
    ]  # spread: generated integers are mostly small
    parent: Any = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent, dict):
        parent[name] = value
    elif action == "add":
        parent.append(value)
    else:
        parent[last] = _nested(5) + [parent[last]]


def _encode(text: str, encoding: str, index: int) -> bytes:
    if encoding == "bytes":
        raw = text.encode("utf-8", "surrogatepass")
        at = index % (len(raw) + 1)
        return raw[:at] + bytes([0x80 + index % 128, index % 256]) + raw[at:]
    return text.encode(encoding, "surrogatepass" if encoding.startswith("utf") else "replace")


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("fuzz"))


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    mutations=st.lists(MUTATION, min_size=1, max_size=3),
    encoding=ENCODING,
    override=st.one_of(
        st.none(),
        st.tuples(
            st.sampled_from(HOSTILE_STRINGS),
            st.sampled_from(
                [
                    "deploy_to",
                    "port",
                    "command_timeout",
                    "connect_timeout",
                    "hosts",
                    "ssh_options",
                    "secrets_file",
                    "x.y",
                ]
            ),
        ),
    ),
)
def test_the_loader_ends_in_success_or_a_usage_error_whatever_it_is_fed(
    fuzz_root: Path,
    mutations: list[tuple[str, int, Any, str]],
    encoding: str,
    override: tuple[str, str] | None,
) -> None:
    doc = copy.deepcopy(BASE_DOC)
    for action, index, value, name in mutations:
        if doc:
            _mutate(doc, action, index, value, name)
    (fuzz_root / "shiplane.toml").write_bytes(_encode(dumps(doc), encoding, mutations[0][1]))
    try:
        project = load_project(fuzz_root / "shiplane.toml")
        for stage in project.deploy.stages:
            render_files(project, build_layers(project, stage, {}, environ={}))
        if override is not None:
            raw, key = override
            stage = next(iter(project.deploy.stages))
            hosts = raw if key == "hosts" else None
            sets = [] if key == "hosts" else [f"{key}={_toml_value(raw)}", f"{key}={raw}"]
            with_overrides(project, stage, hosts, sets)
        event("loaded")
    except UsageError as exc:
        assert exc.message.strip(), "an error says what went wrong"
        event(
            "refused: "
            + (
                "not UTF-8"
                if "UTF-8" in exc.message
                else "TOML"
                if "TOML" in exc.message
                else "override"
                if "--set" in exc.message
                else "value"
            )
        )


def test_the_toml_writer_of_the_fuzz_test_round_trips_the_base_file() -> None:
    assert tomllib.loads(dumps(BASE_DOC)) == BASE_DOC
    assert textwrap.dedent(BASE) == BASE


def test_a_file_name_longer_than_any_file_system_takes_is_refused_by_check(tmp_path: Path) -> None:
    long_name = "x" * 300  # hypothesis found it: a stat() of it raised ENAMETOOLONG
    root = make_project(tmp_path, BASE.replace('"config/base.ini"', f'"config/{long_name}"'))
    code, out = check(root)
    assert code == 2, out
    assert "config.files entry has a name longer than 255 bytes" in out and "Traceback" not in out
