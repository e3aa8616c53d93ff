"""The texts of a Caddy front's config (agent/caddy.py runs it): one main ``Caddyfile`` per Caddy
dir and one site file per deploy root under ``sites/``.

The main file holds what is Caddy's own, shared by every app in the dir: the admin API on a unix
socket (``admin.sock``, so that stages and the host's own Caddy never share ``localhost:2019``),
the state (``data/``: ACME accounts and certificates), the ports, how often certificates are
checked for renewal, the log; then ``import sites/*.caddy``. A site file holds one stage's part:
its route line (agent/frontshare.py), its names, its CA (``tls`` with ``ca`` and ``ca_root``, so
apps sharing a Caddy may use different CAs) and the proxy to its ``run/web.sock``.
"""

from __future__ import annotations

from pathlib import Path

from . import frontshare
from .errors import AgentError
from .paths import Layout
from .protocol import CaddySpec, ServicesSpec

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
SITES = "sites"


def settings(spec: ServicesSpec) -> CaddySpec:
    """The stage's ``caddy`` settings; a spec without them is a usage error."""
    cfg = spec.get("caddy")
    if not isinstance(cfg, dict) or not cfg.get("domains"):
        raise AgentError('front "caddy" needs the stage\'s domains', kind="usage")
    return cfg


def data_dir(layout: Layout, spec: ServicesSpec) -> Path:
    """Where the stage's Caddy keeps its config, state, socket and log."""
    given = settings(spec).get("data_dir")
    return Path(given) if given else layout.root / "caddy"


def site_path(layout: Layout, spec: ServicesSpec) -> Path:
    """This deploy root's site file in the Caddy dir."""
    return data_dir(layout, spec) / SITES / (frontshare.site_stem(layout, spec) + ".caddy")


def q(value: object) -> str:
    """A double-quoted Caddyfile token (no placeholders: ``{`` cannot start one here)."""
    text = str(value)
    if any(ch in text for ch in "\n\r\0{}"):
        raise AgentError(f"value not allowed in a Caddyfile: {text!r}", kind="usage")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def listen_host(spec: ServicesSpec) -> str | None:
    """The address the site binds (None: every address)."""
    web = spec.get("web")
    bind = str((web and web.get("bind")) or "")
    return None if bind in ("", "0.0.0.0", "::", "[::]") else bind.strip("[]")


def main_text(data: Path, cfg: CaddySpec) -> str:
    """The main Caddyfile of the dir ``data``: Caddy's global options, then every site file."""
    renew = float(cfg.get("renew_interval") or 600)
    lines = [
        "# written by shiplane: the Caddy of the apps in sites/ (one file per deploy root)",
        "{",
        f"\tadmin {q('unix/' + str(data / 'admin.sock'))}",
        "\tstorage file_system {",
        f"\t\troot {q(data / 'data')}",
        "\t}",
        f"\thttp_port {int(cfg['http_port'])}",
        f"\thttps_port {int(cfg['https_port'])}",
        f"\trenew_interval {renew:g}s",
        "\tlog {",
        f"\t\toutput file {q(data / 'caddy.log')} {{",
        "\t\t\troll_size 10MiB",
        "\t\t\troll_keep 3",
        "\t\t}",
        "\t\tformat json",
        "\t}",
        "}",
        "",
        f"import {q(data / SITES / '*.caddy')}",
    ]
    return "\n".join(lines) + "\n"


def site_text(layout: Layout, spec: ServicesSpec) -> str:
    """The stage's site file: its names, its CA, the proxy to its switched socket."""
    cfg = settings(spec)
    tls = "\ttls" + (f" {q(cfg['acme_email'])}" if cfg.get("acme_email") else "") + " {"
    lines = [
        frontshare.route_line(layout, spec, list(cfg["domains"])),
        f"# written by shiplane for {spec.get('app')} ({spec.get('stage')}); replaced at deploys",
        ", ".join(cfg["domains"]) + " {",
        tls,
        f"\t\tca {q(cfg.get('acme_ca') or LETS_ENCRYPT)}",
    ]
    if cfg.get("acme_ca_root"):
        lines.append(f"\t\tca_root {q(cfg['acme_ca_root'])}")
    lines.append("\t}")
    host = listen_host(spec)
    if host:
        lines.append(f"\tbind {q(host)}")
    lines += [
        f"\treverse_proxy {q('unix/' + str(layout.web_socket))} {{",
        "\t\t# the socket is a symlink a switch renames: a new connection per request, and a",
        "\t\t# refused or reset one (a server closing its listener) is tried again",
        "\t\tlb_try_duration 5s",
        "\t\tlb_try_interval 50ms",
        "\t\ttransport http {",
        "\t\t\tkeepalive off",
        "\t\t}",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def main_settings(text: str) -> dict[str, str]:
    """The global options of a main Caddyfile shiplane wrote that must agree between the apps
    sharing it (ports, renewal checks), by name."""
    found = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key in ("http_port", "https_port", "renew_interval"):
            found[key] = value
    return found
