"""Proxy choice for the API server, by kubectl's (Go's httpproxy) rules: pure, no sockets."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from telepresence.k8s.proxy import (
    ProxyError,
    parse_no_proxy,
    parse_proxy,
    select_proxy,
    use_proxy,
)

PROXY = {"HTTPS_PROXY": "http://proxy.corp:3128"}


# --- NO_PROXY -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "proxied"),
    [
        ("", "api.example.com", 443, True),
        # A bare domain matches itself and its subdomains, and nothing merely ending in it.
        ("example.com", "example.com", 443, False),
        ("example.com", "api.example.com", 443, False),
        ("example.com", "badexample.com", 443, True),
        # A leading dot or "*." matches subdomains only.
        (".example.com", "example.com", 443, True),
        (".example.com", "api.example.com", 443, False),
        ("*.example.com", "api.example.com", 443, False),
        ("*.example.com", "example.com", 443, True),
        # Ports: the entry's port must be the server's (default 443 for https).
        ("example.com:6443", "api.example.com", 6443, False),
        ("example.com:6443", "api.example.com", 443, True),
        ("10.0.0.1:443", "10.0.0.1", 443, False),
        ("10.0.0.1:443", "10.0.0.1", 6443, True),
        ("[fd00::1]:6443", "fd00::1", 6443, False),
        ("fd00::1", "fd00::1", 6443, False),
        # IPs and CIDRs; a CIDR ignores ports, and a host name never matches a CIDR.
        ("10.0.0.1", "10.0.0.1", 6443, False),
        ("10.0.0.1", "10.0.0.2", 6443, True),
        ("10.0.0.0/8", "10.20.30.40", 6443, False),
        ("10.0.0.0/8", "11.0.0.1", 6443, True),
        ("10.0.0.0/8", "ten.example.com", 6443, True),
        ("fd00::/8", "fd12::1", 443, False),
        # Case, blanks, empty entries, and several entries.
        (" Example.COM ,, other.org", "API.example.com", 443, False),
        ("a.org,b.org", "x.b.org", 443, False),
        # "*" anywhere in the list: nothing is proxied.
        ("a.org,*", "api.example.com", 443, False),
        # Loopback and localhost are never proxied, whatever NO_PROXY says.
        ("", "localhost", 6443, False),
        ("", "127.0.0.1", 6443, False),
        ("", "::1", 6443, False),
        # An entry without a host is ignored.
        (":443", "api.example.com", 443, True),
    ],
)
def test_no_proxy_rules(no_proxy: str, host: str, port: int, proxied: bool) -> None:
    assert use_proxy(host, port, no_proxy=no_proxy) is proxied


def test_no_proxy_compares_unicode_names_in_their_ascii_form() -> None:
    assert not use_proxy("api.xn--bcher-kva.de", 443, no_proxy="bücher.de")
    assert not use_proxy("api.bücher.de", 443, no_proxy=".xn--bcher-kva.de")


def test_a_parsed_list_is_reusable() -> None:
    rules = parse_no_proxy("10.0.0.0/8,.svc")
    assert not use_proxy("10.1.2.3", 443, no_proxy=rules)
    assert not use_proxy("kubernetes.default.svc", 443, no_proxy=rules)
    assert use_proxy("api.example.com", 443, no_proxy=rules)


@given(st.lists(st.text(alphabet="abcxyz0123456789.:*/[],- ", max_size=12), max_size=5))
def test_any_no_proxy_list_parses(entries: list[str]) -> None:
    rules = parse_no_proxy(",".join(entries))
    use_proxy("api.example.com", 443, no_proxy=rules)
    use_proxy("10.0.0.1", 443, no_proxy=rules)


# --- selection ----------------------------------------------------------------------------


def test_https_servers_use_https_proxy_and_upper_case_first() -> None:
    env = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2"}
    proxy = select_proxy("https://api.example.com:6443", proxy_url=None, environ=env)
    assert proxy is not None
    assert proxy.url == "http://upper:1"
    assert proxy.source == "HTTPS_PROXY"
    # An empty upper-case value counts as unset, as in Go.
    env = {"HTTPS_PROXY": "", "https_proxy": "http://lower:2"}
    proxy = select_proxy("https://api.example.com", proxy_url=None, environ=env)
    assert proxy is not None and proxy.url == "http://lower:2"


def test_http_servers_use_http_proxy_only() -> None:
    env = {"HTTPS_PROXY": "http://s:1", "HTTP_PROXY": "http://p:2"}
    proxy = select_proxy("http://api.example.com:8080", proxy_url=None, environ=env)
    assert proxy is not None and proxy.url == "http://p:2"
    assert select_proxy("https://api.example.com", proxy_url=None, environ={"HTTP_PROXY": "p"}) is (
        None
    )


def test_no_proxy_and_loopback_bypass_the_environment() -> None:
    env = {**PROXY, "NO_PROXY": ".corp,192.168.0.0/16"}
    assert select_proxy("https://k8s.corp:6443", proxy_url=None, environ=env) is None
    assert select_proxy("https://192.168.1.10:6443", proxy_url=None, environ=env) is None
    assert select_proxy("https://127.0.0.1:6443", proxy_url=None, environ=PROXY) is None
    assert select_proxy("https://[::1]:6443", proxy_url=None, environ=PROXY) is None
    assert select_proxy("https://k8s.example.com", proxy_url=None, environ=env) is not None
    lower = {**PROXY, "no_proxy": "k8s.example.com:443"}
    assert select_proxy("https://k8s.example.com", proxy_url=None, environ=lower) is None


def test_the_clusters_proxy_url_wins_and_ignores_no_proxy() -> None:
    env = {**PROXY, "NO_PROXY": "*"}
    proxy = select_proxy(
        "https://127.0.0.1:6443", proxy_url="https://cluster-proxy:8443", environ=env, cluster="c"
    )
    assert proxy is not None
    assert proxy.url == "https://cluster-proxy:8443"
    assert proxy.source == "proxy-url of cluster 'c'"


# --- proxy URLs ---------------------------------------------------------------------------


def test_proxy_urls_parse_as_go_does() -> None:
    assert parse_proxy("proxy.corp:3128", source="x").url == "http://proxy.corp:3128"
    assert parse_proxy("http://proxy.corp", source="x").url == "http://proxy.corp:80"
    assert parse_proxy("https://proxy.corp/", source="x").url == "https://proxy.corp:443"
    assert parse_proxy("http://[fd00::1]:3128", source="x").url == "http://[fd00::1]:3128"
    assert parse_proxy("http://proxy.corp:3128", source="x").headers() == {}


def test_credentials_in_the_url_become_basic_proxy_authorization() -> None:
    proxy = parse_proxy("http://al%40ice:p%3Ass@proxy.corp:3128", source="HTTPS_PROXY")
    assert proxy.url == "http://proxy.corp:3128"
    expected = "Basic " + base64.b64encode(b"al@ice:p:ss").decode()
    assert proxy.headers() == {"Proxy-Authorization": expected}
    assert "p%3Ass" not in repr(proxy) and expected not in repr(proxy)


def test_socks_is_refused_naming_the_setting_without_the_password() -> None:
    with pytest.raises(ProxyError) as info:
        select_proxy(
            "https://k8s.example.com",
            proxy_url="socks5://bob:secret@localhost:1080",
            environ={},
            cluster="prod",
        )
    message = str(info.value)
    assert message.startswith("proxy-url of cluster 'prod' is a SOCKS proxy")
    assert "secret" not in message and "not support" in message and "\n" not in message
    with pytest.raises(ProxyError, match="HTTPS_PROXY is a SOCKS proxy"):
        select_proxy("https://k", proxy_url=None, environ={"HTTPS_PROXY": "socks5h://p:1"})


def test_other_schemes_and_bad_ports_are_refused() -> None:
    with pytest.raises(ProxyError, match="unsupported scheme 'ftp'"):
        parse_proxy("ftp://proxy:21", source="HTTPS_PROXY")
    with pytest.raises(ProxyError, match="not a valid proxy URL"):
        parse_proxy("http://proxy:99999", source="HTTPS_PROXY")
