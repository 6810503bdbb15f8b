"""Which destinations the traffic manager dials for a laptop; pure, no I/O.

The manager dials from inside the cluster with the pod's network identity, so without a
policy a laptop could reach what only the pod itself should: its own loopback (the
manager's listeners, anything a sidecar binds there) and link-local addresses, where
clouds serve instance metadata and credentials (169.254.169.254). Those are refused by
default; everything else in reach of the pod stays reachable, because reaching the
cluster is the product.

Rule: the most specific prefix that contains the address decides. At equal prefix length
a configured entry beats a default, and a configured deny beats a configured allow (the
conservative choice when one network is listed twice). An address no entry contains is
allowed. So ``TELEPRESENCE_DIAL_ALLOW=169.254.169.254/32`` opens the metadata address and
nothing else of 169.254.0.0/16, and ``TELEPRESENCE_DIAL_DENY=10.0.5.0/24`` closes a range
that no default touches. An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) is judged as
the IPv4 address it reaches.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from telepresence.manager.config import DIAL_ALLOW_ENV, DIAL_DENY_ENV

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DialPolicyError(ValueError):
    """A list of networks that does not parse; the message is one line naming the variable,
    the entry and the expected form."""


class Source(enum.IntEnum):
    """Where an entry comes from; at equal prefix length the higher value wins."""

    DEFAULT_DENY = 0
    ALLOW = 1
    DENY = 2


@dataclass(frozen=True)
class Entry:
    network: IPNetwork
    source: Source
    #: For defaults, what the range is ("link-local"); shown in the refusal.
    what: str = ""

    @property
    def allows(self) -> bool:
        return self.source is Source.ALLOW


def _net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


#: Refused unless allowed: the manager's own host and the link-local ranges.
DEFAULT_DENY: tuple[Entry, ...] = (
    Entry(_net("0.0.0.0/8"), Source.DEFAULT_DENY, "in 0.0.0.0/8, which reaches the manager itself"),
    Entry(_net("127.0.0.0/8"), Source.DEFAULT_DENY, "the manager's own loopback"),
    Entry(_net("::1/128"), Source.DEFAULT_DENY, "the manager's own loopback"),
    # Connecting to :: reaches the local host on Linux, like 0.0.0.0.
    Entry(_net("::/128"), Source.DEFAULT_DENY, "unspecified, which reaches the manager itself"),
    Entry(
        _net("169.254.0.0/16"),
        Source.DEFAULT_DENY,
        "link-local, where clouds serve instance metadata",
    ),
    Entry(_net("fe80::/10"), Source.DEFAULT_DENY, "link-local"),
)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    #: Why a dial is refused, as one line for the laptop's log; empty when allowed.
    reason: str = ""


class DialPolicy:
    """Decides per destination address; build it with :meth:`from_env` or the constructor."""

    def __init__(self, *, allow: Iterable[IPNetwork] = (), deny: Iterable[IPNetwork] = ()) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self.entries: tuple[Entry, ...] = (
            *DEFAULT_DENY,
            *(Entry(n, Source.ALLOW) for n in self.allow),
            *(Entry(n, Source.DENY) for n in self.deny),
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DialPolicy:
        """From the manager container's environment; raises :class:`DialPolicyError`."""
        return cls(
            allow=parse_networks(env.get(DIAL_ALLOW_ENV, ""), variable=DIAL_ALLOW_ENV),
            deny=parse_networks(env.get(DIAL_DENY_ENV, ""), variable=DIAL_DENY_ENV),
        )

    def check(self, address: str) -> Verdict:
        """The verdict for a dial to ``address`` (an IP literal, as OPEN carries)."""
        try:
            ip: IPAddress = ipaddress.ip_address(address)
        except ValueError:
            return Verdict(False, f"{address!r} is not an IP address")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        matching = [e for e in self.entries if ip in e.network]
        if not matching:
            return Verdict(True)
        winner = max(matching, key=lambda e: (e.network.prefixlen, e.source))
        if winner.allows:
            return Verdict(True)
        if winner.source is Source.DEFAULT_DENY:
            return Verdict(False, f"{address} is {winner.what} (allow it with {DIAL_ALLOW_ENV})")
        return Verdict(False, f"{address} is in {winner.network}, listed in {DIAL_DENY_ENV}")

    def describe(self) -> str:
        """One line for the manager's start-up log."""
        allow = ",".join(map(str, self.allow)) or "-"
        deny = ",".join(map(str, self.deny)) or "-"
        return (
            f"dial policy: refusing {', '.join(str(e.network) for e in DEFAULT_DENY)} "
            f"by default; allow {allow}; deny {deny}"
        )


def parse_networks(text: str, *, variable: str) -> tuple[IPNetwork, ...]:
    """``169.254.169.254/32, 10.0.5.0/24`` → networks; a bare address is a host network.
    Host bits set (``10.0.0.5/8``) are an error: such a typo would silently widen a rule."""
    out: list[IPNetwork] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=True))
        except ValueError as e:
            raise DialPolicyError(
                f"{variable}: {item!r} is not a network ({e}); use comma-separated CIDRs "
                "like 169.254.169.254/32,10.0.5.0/24"
            ) from None
    return tuple(out)


def format_networks(networks: Iterable[str | IPNetwork]) -> str:
    """The environment variable's value for a list of networks."""
    return ",".join(str(n) for n in networks)
