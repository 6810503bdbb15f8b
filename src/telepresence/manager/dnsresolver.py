"""DNS lookups for laptops, through the cluster's own resolver.

Real DNS queries (dnspython) to the nameservers of the manager pod's /etc/resolv.conf,
for the fully-qualified name the laptop sends: the laptop already decided which names
belong to the cluster and expanded its search path, so no search list applies here. Not
getaddrinfo, which has no SRV, no TTLs, and cannot tell NXDOMAIN from "no record of this
type". The response goes back as wire format, rcode and all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from telepresence.manager.discovery import RESOLV_CONF, parse_resolv_conf

log = logging.getLogger(__name__)

#: Seconds per nameserver; glibc waits 5, but a laptop's resolver gives up on us sooner,
#: and a second nameserver deserves its turn before that.
DEFAULT_TIMEOUT = 2.0

#: Answers that say "this server failed", not "this name is so": the next server may do
#: better, as glibc's resolver also moves on after them.
_TRY_NEXT = frozenset({dns.rcode.SERVFAIL, dns.rcode.REFUSED})


class DnsUnavailable(Exception):
    """No nameserver gave any response; the message names them and why."""


class ClusterResolver:
    """Queries the given nameservers in order, UDP first and TCP when the answer is
    truncated (which the laptop's glibc would also do)."""

    def __init__(
        self, *, nameservers: Sequence[str], timeout: float = DEFAULT_TIMEOUT, port: int = 53
    ) -> None:
        self.nameservers = tuple(nameservers)
        self.timeout = timeout
        self.port = port

    @classmethod
    def from_resolv_conf(
        cls, path: Path = RESOLV_CONF, *, timeout: float = DEFAULT_TIMEOUT
    ) -> ClusterResolver:
        try:
            text = path.read_text()
        except OSError as e:
            raise DnsUnavailable(f"cannot read {path}: {e.strerror}") from e
        return cls(nameservers=parse_resolv_conf(text).nameservers, timeout=timeout)

    async def lookup(self, qname: str, qtype: int) -> bytes:
        """The response to ``qname`` (taken as fully qualified) of type ``qtype``, in wire
        format; NXDOMAIN and NOERROR-without-answers are responses like any other."""
        if not self.nameservers:
            raise DnsUnavailable("no nameserver in the pod's resolv.conf")
        name = dns.name.from_text(qname, origin=dns.name.root)
        query = dns.message.make_query(name, dns.rdatatype.RdataType.make(qtype))
        failures: list[str] = []
        last: dns.message.Message | None = None
        for server in self.nameservers:
            try:
                response, _ = await dns.asyncquery.udp_with_fallback(
                    query, server, timeout=self.timeout, port=self.port, ignore_unexpected=True
                )
            except dns.exception.Timeout:
                failures.append(f"{server}: no answer in {self.timeout:g}s")
                continue
            except (OSError, dns.exception.DNSException) as e:
                failures.append(f"{server}: {e}")
                continue
            last = response
            if response.rcode() not in _TRY_NEXT:
                return response.to_wire()
            failures.append(f"{server}: {dns.rcode.to_text(response.rcode())}")
        if last is not None:
            return last.to_wire()
        raise DnsUnavailable(
            f"no nameserver answered {name} {dns.rdatatype.RdataType.make(qtype).name}: "
            + "; ".join(failures)
        )


async def lookup(qname: str, qtype: int, *, resolver: ClusterResolver | None = None) -> bytes:
    """One lookup with the pod's resolv.conf (read each time when no resolver is given:
    a tiny file, and it keeps a changed one honoured)."""
    return await (resolver or ClusterResolver.from_resolv_conf()).lookup(qname, qtype)
