"""Will cluster names reach DNS at all? nsswitch can stop them before the resolver.

With `hosts: files mdns4_minimal [NOTFOUND=return] dns`, glibc answers every `*.local` name
from mDNS and returns NOTFOUND without asking DNS, so `svc.ns.svc.cluster.local` never
reaches our DNS server. We cannot fix that without editing a system file, so we say how.
"""

from __future__ import annotations

from pathlib import Path

NSSWITCH = Path("/etc/nsswitch.conf")


def hosts_sources(text: str) -> list[str]:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("hosts:"):
            return line.split(":", 1)[1].split()
    return []


def cluster_domain_warning(text: str, cluster_domain: str) -> str | None:
    """A one-line warning with the fix, or None when DNS sees the cluster's names."""
    if not cluster_domain.endswith("local"):
        return None
    sources = hosts_sources(text)
    if "dns" not in sources:
        return None
    before_dns = sources[: sources.index("dns")]
    mdns = [s for s in before_dns if s.startswith("mdns")]
    if not mdns or "[NOTFOUND=return]" not in " ".join(before_dns):
        return None
    return (
        f"/etc/nsswitch.conf sends *.local names to {mdns[0]} and stops there, so "
        f"*.{cluster_domain} names will not resolve; put `dns` before `{mdns[0]}` on its "
        "`hosts:` line (short names like svc.ns still work)"
    )


def check(cluster_domain: str) -> str | None:
    try:
        text = NSSWITCH.read_text()
    except OSError:
        return None
    return cluster_domain_warning(text, cluster_domain)
