"""Nameservers as the laptop has them: every one in resolv.conf, in order, with failover when
one stops answering, and a resolv.conf rewritten mid-session (as NetworkManager does after a
Wi-Fi change) followed within a second, leaving nothing pointed at the old server."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.settings import LAPTOP_NS
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.test_outbound import connect, laptop_state, quit_

RESOLV_CONF = Path("/etc/netns") / LAPTOP_NS / "resolv.conf"
FIRST, SECOND, THIRD = "198.51.100.54", "198.51.100.55", "198.51.100.56"


def _in_laptop(*cmd: str) -> list[str]:
    return ["ip", "netns", "exec", LAPTOP_NS, *cmd]


def _resolver(address: str) -> subprocess.Popen[bytes]:
    """A home-router resolver on `address`: `whoami.lan` answers with its own address."""
    subprocess.run(_in_laptop("ip", "addr", "add", f"{address}/32", "dev", "lo"), check=True)
    return subprocess.Popen(
        _in_laptop(
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--pid-file=",
            f"--listen-address={address}",
            "--bind-interfaces",
            "--local=/#/",
            f"--host-record=whoami.lan,{address}",
            "--host-record=www.example.test,198.51.100.2",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _rewrite(text: str) -> None:
    """In place: the laptop namespace's processes see /etc/resolv.conf through a bind mount
    of this very file, which a rename would leave behind."""
    with RESOLV_CONF.open("r+") as f:
        f.seek(0)
        f.write(text)
        f.truncate()


def _whoami(cluster: Cluster) -> str | None:
    out = cluster.laptop("getent", "hosts", "whoami.lan", check=False)
    return out.stdout.split()[0] if out.returncode == 0 else None


@pytest.fixture
def three_resolvers(cluster: Cluster) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    quit_(cluster)
    saved = RESOLV_CONF.read_text()
    before = laptop_state(cluster)
    servers = {address: _resolver(address) for address in (FIRST, SECOND, THIRD)}
    try:
        yield servers
    finally:
        quit_(cluster)
        for proc in servers.values():
            proc.kill()
            proc.wait()
        for address in servers:
            subprocess.run(_in_laptop("ip", "addr", "del", f"{address}/32", "dev", "lo"))
        _rewrite(saved)
    assert laptop_state(cluster) == before


def test_failover_and_a_rewritten_resolv_conf_are_followed(
    cluster: Cluster, three_resolvers: dict[str, subprocess.Popen[bytes]]
) -> None:
    _rewrite(f"nameserver {FIRST}\nnameserver {SECOND}\nsearch lan\noptions ndots:1\n")
    connect(cluster)
    assert _whoami(cluster) == FIRST
    nft_set = ["nft", "list", "set", "ip", "telepresence", "dns_servers"]
    hooked = cluster.laptop(*nft_set, root=True).stdout
    assert FIRST in hooked and SECOND in hooked

    # The first nameserver stops: lookups fail over to the second at once.
    three_resolvers[FIRST].kill()
    three_resolvers[FIRST].wait()
    started = time.monotonic()
    assert _whoami(cluster) == SECOND
    assert time.monotonic() - started < 1.5
    started = time.monotonic()
    assert _whoami(cluster) == SECOND
    assert time.monotonic() - started < 1.0
    assert cluster.laptop("getent", "hosts", "kubernetes.default").returncode == 0

    # NetworkManager rewrites resolv.conf: followed within a second, the old servers unhooked.
    _rewrite(f"nameserver {THIRD}\nsearch lan\noptions ndots:1\n")
    changed = time.monotonic()

    # Not "lookups reach the new server": glibc reads the file too, and until the
    # redirect follows, its queries to THIRD simply are not redirected.
    def only_third_hooked() -> bool:
        hooked = cluster.laptop(*nft_set, root=True).stdout
        return THIRD in hooked and FIRST not in hooked and SECOND not in hooked

    wait_for(only_third_hooked, timeout=3, what="the redirect to follow resolv.conf")
    assert time.monotonic() - changed < 1.5
    assert _whoami(cluster) == THIRD
    status = cluster.laptop("telepresence", "status").stdout
    assert THIRD in status
    assert cluster.laptop("getent", "hosts", "kubernetes.default").returncode == 0

    quit_(cluster)
    ruleset = cluster.laptop("nft", "list", "ruleset", root=True).stdout
    assert "telepresence" not in ruleset and SECOND not in ruleset
    # Disconnected, the laptop asks its resolver directly.
    assert _whoami(cluster) == THIRD


#: In the laptop: N rounds of a lookup of the laptop's own name and one of a cluster name,
#: each from a new random source port as glibc makes them; prints the failures of each.
_LOOKUPS = """
import json, socket, sys
failed = {"laptop": 0, "cluster": 0}
for _ in range(int(sys.argv[1])):
    for kind, name in (("laptop", "www.example.test"), ("cluster", "verylargejavaservice.default")):
        try:
            socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror:
            failed[kind] += 1
print(json.dumps(failed))
"""


def _failed_lookups(cluster: Cluster, rounds: int) -> dict[str, int]:
    out = cluster.laptop("python3", "-c", _LOOKUPS, str(rounds), timeout=180).stdout
    return dict(json.loads(out))


def test_no_lookup_takes_another_s_conntrack_entry(cluster: Cluster) -> None:
    """conntrack knows a connection by addresses and ports, and keeps each DNS exchange's
    entry, with its NAT decision, for 30-120 s. Within a session, a query reusing the
    source port of one of the daemon's own forwarded queries would take that entry's "no
    redirect" and miss the cluster (one cluster lookup in five failed here that way); after
    quit, a query reusing a redirected query's port would go to the ended session's DNS
    port (32 in 1,000 after a reconnect). Redirected queries have a conntrack zone of their
    own, and quit forgets their entries."""
    quit_(cluster)
    before = laptop_state(cluster)
    connect(cluster)
    try:
        assert _failed_lookups(cluster, 3000) == {"laptop": 0, "cluster": 0}
        quit_(cluster)
        connect(cluster)
        assert _failed_lookups(cluster, 1000) == {"laptop": 0, "cluster": 0}
    finally:
        quit_(cluster)
    assert laptop_state(cluster) == before
