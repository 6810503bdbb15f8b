"""nsswitch: warn exactly when mDNS would keep cluster.local names from DNS."""

from __future__ import annotations

import pytest

from telepresence.daemon.nsswitch import cluster_domain_warning, hosts_sources


@pytest.mark.parametrize(
    ("hosts", "domain", "warns"),
    [
        ("files dns", "cluster.local", False),
        ("files mdns4_minimal [NOTFOUND=return] dns", "cluster.local", True),
        ("files mdns4_minimal [NOTFOUND=return] dns mdns4", "cluster.local", True),
        ("files mdns_minimal [NOTFOUND=return] dns", "cluster.local", True),
        ("files dns mdns4_minimal [NOTFOUND=return]", "cluster.local", False),
        ("files mdns4_minimal dns", "cluster.local", False),  # falls through to dns
        ("files mdns4_minimal [NOTFOUND=return] dns", "corp.example", False),
        ("files myhostname", "cluster.local", False),  # no dns at all: not ours to judge
    ],
)
def test_warning_only_when_mdns_stops_local_names(hosts: str, domain: str, warns: bool) -> None:
    text = f"passwd: files\nhosts:          {hosts}  # comment\nnetworks: files\n"
    warning = cluster_domain_warning(text, domain)
    assert (warning is not None) == warns
    if warning:
        assert "put `dns` before" in warning and domain in warning


def test_hosts_line_is_found_with_comments_and_missing() -> None:
    assert hosts_sources("# hosts: nothing\nhosts: files dns\n") == ["files", "dns"]
    assert hosts_sources("passwd: files\n") == []
