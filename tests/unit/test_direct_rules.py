"""The direct transport's pure parts: where to dial, the config keys, the credentials and
the manager's checks of what a laptop registers."""

from __future__ import annotations

import datetime
from ipaddress import ip_network
from pathlib import Path

import pytest
from cryptography import x509

from telepresence.cli import settings
from telepresence.daemon.direct import DirectUnavailable, Endpoint, endpoints
from telepresence.daemon.directcreds import LIFETIME, mint
from telepresence.directtls import SERVER_NAME_SUFFIX, parse_address
from telepresence.manager.directlisten import DirectCredentialError, DirectListener
from telepresence.tunnel.messages import DirectGrant, DirectRequest, decode_control, encode_control

CLUSTER = [ip_network("10.96.0.0/16"), ip_network("10.244.0.0/16")]


def test_the_nodeport_on_the_pods_node_is_the_way_in() -> None:
    assert endpoints(configured=None, node_port=31443, host_ip="192.0.2.1", routed=CLUSTER) == [
        Endpoint("192.0.2.1", 31443, "NodePort on the manager's node")
    ]


def test_a_load_balancer_comes_before_the_nodeport() -> None:
    found = endpoints(
        configured=None,
        node_port=31443,
        host_ip="192.0.2.1",
        ingress=["lb.example.com"],
        service_port=8083,
        routed=CLUSTER,
    )
    assert [str(e) for e in found] == ["lb.example.com:8083", "192.0.2.1:31443"]


def test_the_configured_address_is_the_only_one_tried() -> None:
    found = endpoints(configured="[2001:db8::5]:30443", node_port=31443, host_ip="192.0.2.1")
    assert found == [Endpoint("2001:db8::5", 30443, "set in the config file")]
    assert str(found[0]) == "[2001:db8::5]:30443"


def test_an_address_routed_into_the_tunnel_is_no_way_around_it() -> None:
    # A node whose address is inside --also-proxy would be reached through port-forward.
    with pytest.raises(DirectUnavailable, match="inside a subnet routed to the cluster"):
        endpoints(
            configured=None,
            node_port=31443,
            host_ip="10.0.0.7",
            routed=[*CLUSTER, ip_network("10.0.0.0/8")],
        )


def test_without_a_nodeport_there_is_nowhere() -> None:
    with pytest.raises(DirectUnavailable, match="no NodePort or load balancer"):
        endpoints(configured=None, node_port=None, host_ip="192.0.2.1")


@pytest.mark.parametrize("text", ["host", "host:", ":80", "h:0", "h:65536", "h:x"])
def test_bad_addresses_are_named(text: str) -> None:
    with pytest.raises(ValueError, match="is not host:port"):
        parse_address(text)


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> settings.Config:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "telepresence").mkdir(exist_ok=True)
    (tmp_path / "telepresence" / "config.yml").write_text(text)
    return settings.load()


def test_config_turns_direct_off_or_points_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _config(tmp_path, monkeypatch, "routing: {}\n").direct == "auto"
    assert _config(tmp_path, monkeypatch, "transport: {direct: off}\n").direct == "off"
    config = _config(tmp_path, monkeypatch, "transport: {directAddress: 'lb.corp:443'}\n")
    assert (config.direct, config.direct_address) == ("auto", "lb.corp:443")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("transport: {direct: sometimes}", "transport.direct: 'sometimes' is not auto or off"),
        ("transport: {directAddress: lb.corp}", "transport.directAddress: 'lb.corp' is not host"),
        ("transport: [direct]", "transport: expected keys direct and directAddress"),
    ],
)
def test_bad_transport_config_is_one_line_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    with pytest.raises(settings.SettingsError, match=message):
        _config(tmp_path, monkeypatch, text + "\n")


def test_credentials_are_per_session_short_lived_and_pinned() -> None:
    now = datetime.datetime(2026, 12, 2, tzinfo=datetime.UTC)
    a, b = mint(now), mint(now)
    assert a.server_name != b.server_name and a.server_name.endswith(SERVER_NAME_SUFFIX)
    server = x509.load_pem_x509_certificate(a.server_cert.encode())
    assert server.not_valid_after_utc == now + LIFETIME
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [a.server_name]
    # The manager gets everything but the client's key.
    request = a.request()
    assert a.client_key not in repr(request) and request.client_cert == a.client_cert
    # The request survives the wire.
    assert decode_control(encode_control(request)) == request
    assert decode_control(encode_control(DirectGrant(port=8083))) == DirectGrant(port=8083)


def test_the_listener_refuses_what_it_cannot_use() -> None:
    listener = DirectListener()
    good = mint().request()
    listener.register("s1", good)
    assert len(listener) == 1
    with pytest.raises(DirectCredentialError, match="is not ours"):
        listener.register("s2", DirectRequest("evil.example.com", *_pems(good)))
    with pytest.raises(DirectCredentialError, match="another session"):
        listener.register("s2", good)
    other = mint().request()
    # A key that does not belong to the certificate.
    mismatched = DirectRequest(other.server_name, good.server_cert, other.server_key, "x")
    with pytest.raises(DirectCredentialError, match="unusable credentials"):
        listener.register("s2", mismatched)
    with pytest.raises(DirectCredentialError, match="larger than any we mint"):
        listener.register(
            "s2", DirectRequest(other.server_name, other.server_cert * 20, other.server_key, "")
        )
    # Registering again replaces; forgetting removes.
    listener.register("s1", other)
    assert len(listener) == 1
    listener.forget("s1")
    assert len(listener) == 0


def _pems(request: DirectRequest) -> tuple[str, str, str]:
    return request.server_cert, request.server_key, request.client_cert
