"""The CLI's pure parts: flags, list parsing, config, and the status layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from telepresence.cli import render, settings
from telepresence.cli.main import parser


def test_connect_flags_parse() -> None:
    args = parser().parse_args(
        [
            "connect",
            "--context",
            "c",
            "-n",
            "ns",
            "--mapped-namespaces",
            "a,b",
            "--also-proxy",
            "10.0.0.0/8",
            "--never-proxy",
            "10.0.5.0/24",
            "--allow-conflicting-subnets",
            "10.96.0.0/16",
            "--manager-image",
            "img:1",
        ]
    )
    assert (args.context, args.namespace, args.mapped_namespaces) == ("c", "ns", "a,b")
    assert (args.also_proxy, args.never_proxy) == ("10.0.0.0/8", "10.0.5.0/24")
    assert args.allow_conflicting_subnets == "10.96.0.0/16"


def test_intercept_requires_local_only() -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["intercept", "x", "--namespace", "ns"])
    args = parser().parse_args(["intercept", "x", "--namespace", "ns", "--local-only"])
    assert (args.name, args.namespace, args.local_only) == ("x", "ns", True)


def test_cidr_lists_and_their_errors() -> None:
    assert settings.cidrs("10.0.0.0/8, 192.168.1.5", "--also-proxy") == [
        "10.0.0.0/8",
        "192.168.1.5/32",
    ]
    assert settings.cidrs("", "--also-proxy") == []
    with pytest.raises(settings.SettingsError, match=r"--also-proxy: '10\.0\.0\.300/8'"):
        settings.cidrs("10.0.0.300/8", "--also-proxy")
    with pytest.raises(settings.SettingsError, match="CIDR"):
        settings.cidrs("10.0.0.5/8", "--never-proxy")  # host bits set


def test_mapped_namespaces() -> None:
    assert settings.parse_mapped_namespaces(None) is None
    assert settings.parse_mapped_namespaces("all") is None
    assert settings.parse_mapped_namespaces("a, b-2") == ["a", "b-2"]
    with pytest.raises(settings.SettingsError, match="Bad_NS"):
        settings.parse_mapped_namespaces("Bad_NS")


def test_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert settings.load() == settings.Config()
    path = tmp_path / "telepresence" / "config.yml"
    path.parent.mkdir()
    path.write_text("manager:\n  image: img:2\nrouting:\n  neverProxy: [10.0.5.0/24]\n")
    config = settings.load()
    assert config.manager_image == "img:2" and config.never_proxy == ["10.0.5.0/24"]
    path.write_text("manager:\n  baseImage: mirror.example/python:3.11-slim\n")
    assert settings.load().manager_base_image == "mirror.example/python:3.11-slim"
    path.write_text("routing:\n  alsoProxy: [nonsense]\n")
    with pytest.raises(settings.SettingsError, match="alsoProxy"):
        settings.load()


def test_the_managers_dial_lists_in_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    path = tmp_path / "telepresence" / "config.yml"
    path.parent.mkdir()
    path.write_text("manager:\n  image: img:2\n")
    config = settings.load()
    # Absent: not configured, so an installed manager's policy is left alone.
    assert config.manager_dial_allow is None and config.manager_dial_deny is None
    path.write_text("manager:\n  dialAllow: [169.254.169.254/32, 10.0.0.1]\n  dialDeny: []\n")
    config = settings.load()
    assert config.manager_dial_allow == ["169.254.169.254/32", "10.0.0.1/32"]
    assert config.manager_dial_deny == []
    path.write_text("manager:\n  dialDeny: [10.0.0.5/8]\n")
    with pytest.raises(settings.SettingsError, match=r"dialDeny: '10\.0\.0\.5/8'"):
        settings.load()
    path.write_text("manager:\n  dialAllow: {a: 1}\n")
    with pytest.raises(settings.SettingsError, match="dialAllow: expected a list"):
        settings.load()


def test_status_text_not_running_and_connected() -> None:
    text = render.status_text(
        {"user_daemon": {"running": False}, "root_daemon": {"running": False}}
    )
    assert "Root Daemon: Not running" in text and "User Daemon: Not running" in text
    text = render.status_text(
        {
            "root_daemon": {
                "running": True,
                "version": "0.1.0",
                "subnets": ["10.96.0.0/16"],
                "dns": {"nameservers": ["192.0.2.53"]},
            },
            "user_daemon": {
                "running": True,
                "version": "0.1.0",
                "status": "Connected",
                "kubernetes_server": "https://k",
                "kubernetes_context": "ctx",
                "mapped_namespaces": ["a"],
                "intercepts": 1,
            },
        }
    )
    assert "Telepresence proxy: ON (networking to the cluster is enabled)" in text
    assert "Intercepts        : 1 total" in text
    assert "- 10.96.0.0/16" in text


def test_status_text_says_why_it_is_reconnecting() -> None:
    user = {"running": True, "status": "Reconnecting", "reconnect_reason": "port-forward failed"}
    text = render.status_text({"root_daemon": {"running": False}, "user_daemon": user})
    assert "Status            : Reconnecting (port-forward failed)" in text
    assert "Telepresence proxy: OFF" in text


def _dns_lines(dns: dict[str, object]) -> list[str]:
    """The lines under "DNS" in the root daemon's part of `status`."""
    text = render.status_text(
        {
            "root_daemon": {"running": True, "version": "0.1.0", "subnets": [], "dns": dns},
            "user_daemon": {"running": False},
        }
    )
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("DNS"))
    end = next(i for i, line in enumerate(lines) if line.strip().startswith("Routed subnets"))
    return [line.strip() for line in lines[start + 1 : end]]


def test_status_text_of_the_redirect_mode_is_as_before() -> None:
    dns = {
        "mode": "redirect",
        "hook": "nftables redirect of the laptop's nameservers (no file edited)",
        "local_address": "127.0.0.1:5353",
        "nameservers": ["192.0.2.53", "192.0.2.54"],
        "upstreams": ["192.0.2.53", "192.0.2.54"],
        "cluster_names": "*.cluster.local, <svc>.<namespace> for mapped namespaces",
    }
    expected = [
        "Hooked in by : nftables redirect of the laptop's nameservers (no file edited)",
        "Local server : 127.0.0.1:5353",
        "Nameservers  : 192.0.2.53, 192.0.2.54",
        "Cluster names: *.cluster.local, <svc>.<namespace> for mapped namespaces",
    ]
    assert _dns_lines(dns) == expected
    del dns["mode"]  # a daemon from before the modes: the same lines
    assert _dns_lines(dns) == expected


def test_status_text_of_the_resolved_mode() -> None:
    dns = {
        "mode": "resolved",
        "hook": "systemd-resolved, per-link DNS on tel0",
        "local_address": "127.0.0.1:5353",
        "nameservers": [],
        "upstreams": ["192.168.1.1"],
        "cluster_names": "*.cluster.local, <svc>.<namespace> for mapped namespaces",
        "dns_address": "198.18.255.253",
        "routing_domains": ["cluster.local", "svc", "web"],
        "search_domains": ["dev"],
        "domains_left_out": [],
        "link_error": "",
    }
    assert _dns_lines(dns) == [
        "Hooked in by   : systemd-resolved, per-link DNS on tel0",
        "DNS address    : 198.18.255.253",
        "Routing domains: cluster.local, svc, web",
        "Search domains : dev",
        "Upstreams      : 192.168.1.1",
        "Cluster names  : *.cluster.local, <svc>.<namespace> for mapped namespaces",
    ]
    many = [f"ns-{i}" for i in range(20)]
    dns |= {
        "routing_domains": ["cluster.local", "svc", *many],
        "search_domains": [],
        "upstreams": [],
        "domains_left_out": ["zz-1", "zz-2"],
        "link_error": "systemd-resolved is not running",
    }
    lines = _dns_lines(dns)
    assert lines[2] == (
        "Routing domains    : cluster.local, svc, ns-0, ns-1, ns-2, ns-3, ns-4, ns-5 "
        "and 14 more (`status -o json` lists them)"
    )
    assert lines[3:5] == ["Search domains     : none", "Upstreams          : none"]
    assert lines[-2:] == [
        "Left out           : 2 namespaces (resolved's limit per link)",
        "Domains not updated: systemd-resolved is not running",
    ]


def test_status_imports_no_asyncio_and_works_without_a_daemon(tmp_path: Path) -> None:
    """`status` answers without asyncio, aiohttp or the Kubernetes client."""
    code = (
        "import sys; from telepresence.cli import main; "
        "bad = [m for m in ('asyncio', 'aiohttp', 'telepresence.k8s.api') if m in sys.modules];"
        "print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(Path(__file__).parents[2] / "src"), "HOME": str(tmp_path)},
    )
    assert out.stdout.strip() == "[]"
    result = subprocess.run(
        [sys.executable, "-m", "telepresence.cli", "status"],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(Path(__file__).parents[2] / "src"), "HOME": str(tmp_path)},
    )
    assert "User Daemon: Not running" in result.stdout


def test_manager_upgrade_and_uninstall_parse() -> None:
    args = parser().parse_args(
        [
            "manager",
            "upgrade",
            "--context",
            "c",
            "--manager-namespace",
            "tm",
            "--manager-image",
            "i",
        ]
    )
    assert (args.command, args.manager_command) == ("manager", "upgrade")
    assert (args.context, args.manager_namespace, args.manager_image) == ("c", "tm", "i")
    args = parser().parse_args(["manager", "uninstall", "--kubeconfig", "/k"])
    assert (args.manager_command, args.kubeconfig, args.manager_namespace) == (
        "uninstall",
        "/k",
        None,
    )
    with pytest.raises(SystemExit):
        parser().parse_args(["manager"])
    with pytest.raises(SystemExit):
        parser().parse_args(["manager", "uninstall", "--manager-image", "i"])


def test_status_prints_how_the_manager_compares() -> None:
    status = {
        "root_daemon": {"running": False},
        "user_daemon": {
            "running": True,
            "status": "Connected",
            "manager_version": "0.2.0",
            "manager": "0.2.0 (newer than this client 0.1.0; compatible)",
        },
    }
    lines = render.status_text(status).splitlines()
    (line,) = [x for x in lines if x.strip().startswith("Traffic Manager")]
    assert line.split(": ", 1)[1] == "0.2.0 (newer than this client 0.1.0; compatible)"
    del status["user_daemon"]["manager"]  # a daemon from before the comparison
    lines = render.status_text(status).splitlines()
    (line,) = [x for x in lines if x.strip().startswith("Traffic Manager")]
    assert line.split(": ", 1)[1] == "0.2.0"


def test_the_test_overrides_stay_out_of_help() -> None:
    help_text = (
        parser().format_help()
        + subprocess.run(
            [sys.executable, "-m", "telepresence.cli", "manager", "--help"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    )
    assert "TELEPRESENCE_TEST" not in help_text
    assert "upgrade" in help_text and "uninstall" in help_text


def test_which_manager_image_wins() -> None:
    """A flag beats the config file, and an image of our own beats a base image at the
    same level: it carries its own code."""
    from telepresence.cli.main import _images

    def images(argv: list[str], **config: str) -> tuple[str | None, str | None]:
        args = parser().parse_args(["connect", *argv])
        return _images(args, settings.Config(**config))

    assert images([]) == (None, None)  # the default base image, with delivered code
    assert images(["--manager-base-image", "mirror/py:3.11"]) == (None, "mirror/py:3.11")
    assert images(["--manager-image", "own:1"]) == ("own:1", None)
    assert images([], manager_base_image="b", manager_image="own:1") == ("own:1", None)
    assert images([], manager_base_image="b") == (None, "b")
    # The flag for a base image overrides an own image that only the config file names.
    assert images(["--manager-base-image", "f"], manager_image="own:1") == (None, "f")
    assert images(["--manager-image", "own:2"], manager_base_image="b") == ("own:2", None)


# --- status --flows -----------------------------------------------------------------------

CONNECTED = {
    "root_daemon": {"running": True, "version": "0.1.0", "subnets": [], "dns": {}},
    "user_daemon": {"running": True, "version": "0.1.0", "status": "Connected"},
}

FLOWS = {
    "flows": [
        {
            "protocol": "udp",
            "source": "198.51.100.2:5353",
            "destination": "10.96.0.10:53",
            "name": "",
            "sent": 40,
            "received": 0,
            "age": 0.25,
            "state": "dialing",
            "link": "tunnel-1",
            "stream": 3,
        },
        {
            "protocol": "tcp",
            "source": "198.51.100.2:40000",
            "destination": "10.96.12.4:8080",
            "name": "echo.tp-alpha",
            "sent": 78,
            "received": 13_000_000,
            "age": 612.0,
            "state": "half-closed-by-laptop",
            "link": "tunnel-2",
            "stream": 7,
        },
    ],
    "flows_open": 2,
    "errors": [
        {
            "time": "2027-01-15T08:00:06.600+00:00",
            "age": 3.4,
            "kind": "refused",
            "protocol": "tcp",
            "destination": "10.96.12.4:9999",
            "name": "echo.tp-alpha",
            "message": "connection refused",
            "count": 3,
        },
        {
            "time": "2027-01-15T08:00:04.000+00:00",
            "age": 6.0,
            "kind": "dns",
            "protocol": "dns",
            "destination": "web.nope A",
            "name": "",
            "message": "the cluster: web.nope.svc.cluster.local: no answer within 2 s",
            "count": 1,
        },
        {
            "time": "2027-01-15T08:00:01.000+00:00",
            "age": 9.0,
            "kind": "reset",
            "protocol": "tunnel",
            "destination": "tunnel-3",
            "name": "",
            "message": "the link to the traffic manager closed (port-forward closed); "
            "its flows were reset",
            "count": 1,
        },
    ],
}


def test_status_flows_parses() -> None:
    args = parser().parse_args(["status", "--flows", "-o", "json"])
    assert (args.flows, args.output) == (True, "json")
    assert parser().parse_args(["status"]).flows is False


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1260, "1.2 KiB"),
        (3_565_158, "3.4 MiB"),
        (1024 * 1024 - 1, "1.0 MiB"),  # not "1024.0 KiB"
        (5 * 1024**3, "5.0 GiB"),
        (3 * 1024**5, "3072.0 TiB"),
    ],
)
def test_human_bytes(count: int, text: str) -> None:
    assert render.human_bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0.0 s"),
        (3.44, "3.4 s"),
        (59.96, "1.0 min"),  # not "60.0 s"
        (300, "5.0 min"),
        (9000, "2.5 h"),
        (86_399, "1.0 d"),
        (200_000, "2.3 d"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert render.human_duration(seconds) == text


def test_flows_text_when_not_connected_and_from_an_older_daemon() -> None:
    not_running = {"user_daemon": {"running": False}, "root_daemon": {"running": False}}
    assert render.flows_text(not_running) == "Flows: not connected"
    idle = {"user_daemon": {"running": True, "status": "Not connected"}, "root_daemon": {}}
    assert render.flows_text({**idle, "flows": [], "errors": []}) == "Flows: not connected"
    assert render.flows_text(CONNECTED) == (
        "Flows: this daemon does not report them (it predates `status --flows`)"
    )


def test_flows_text_empty() -> None:
    status = {**CONNECTED, "flows": [], "flows_open": 0, "errors": []}
    assert render.flows_text(status) == "Flows: none open\nRecent errors: none"


def test_flows_text_full_newest_first() -> None:
    assert render.flows_text({**CONNECTED, **FLOWS}).splitlines() == [
        "Flows: 2 open",
        "  PROTOCOL  DESTINATION                      SENT  RECEIVED       AGE  STATE",
        "  udp       10.96.0.10:53                    40 B       0 B     0.2 s  dialing",
        "  tcp       10.96.12.4:8080 (echo.tp-alpha)  78 B  12.4 MiB  10.2 min  "
        "half-closed-by-laptop",
        "Recent errors: 3, the newest first",
        "       WHEN  KIND     DESTINATION                          MESSAGE",
        "  3.4 s ago  refused  tcp 10.96.12.4:9999 (echo.tp-alpha)  connection refused (3 times)",
        "  6.0 s ago  dns      web.nope A                           "
        "the cluster: web.nope.svc.cluster.local: no answer within 2 s",
        "  9.0 s ago  reset    tunnel-3                             "
        "the link to the traffic manager closed (port-forward closed); its flows were reset",
    ]


def test_flows_text_says_when_only_the_newest_are_listed() -> None:
    status = {**CONNECTED, **FLOWS, "flows_open": 300}
    assert render.flows_text(status).splitlines()[0] == "Flows: 300 open, the 2 newest listed"


def test_status_flows_prints_the_status_then_the_flows_or_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from telepresence.cli import client
    from telepresence.cli.main import cmd_status

    asked: list[dict[str, object]] = []

    def request(message: dict[str, object], **_: object) -> dict[str, object]:
        asked.append(message)
        return {**CONNECTED, **FLOWS} if message.get("flows") else dict(CONNECTED)

    monkeypatch.setattr(client, "request", request)
    assert cmd_status(parser().parse_args(["status", "--flows", "-o", "json"])) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["flows"] == FLOWS["flows"] and data["errors"] == FLOWS["errors"]
    assert data["flows_open"] == 2 and data["user_daemon"]["status"] == "Connected"
    assert cmd_status(parser().parse_args(["status", "--flows"])) == 0
    out = capsys.readouterr().out
    assert out.index("User Daemon: Running") < out.index("Flows: 2 open")
    assert "Recent errors: 3, the newest first" in out
    assert cmd_status(parser().parse_args(["status"])) == 0
    assert "Flows" not in capsys.readouterr().out
    assert asked == [
        {"cmd": "status", "flows": True},
        {"cmd": "status", "flows": True},
        {"cmd": "status"},
    ]


def test_status_flows_without_a_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    from telepresence.cli import client

    monkeypatch.setattr(client, "request", lambda message, **_: None)
    assert client.status(flows=True) == {
        "user_daemon": {"running": False},
        "root_daemon": {"running": False},
        "flows": [],
        "flows_open": 0,
        "errors": [],
    }
    assert "flows" not in client.status()
