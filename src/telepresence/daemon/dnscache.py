"""A short-lived cache of the cluster's DNS answers.

Every cluster lookup is a round trip through the port-forward to the traffic
manager and on to the cluster's resolver, and clients ask the same thing in
bursts: glibc sends A and AAAA together, retries, and walks the search path.
A few seconds of caching absorbs the bursts.  It must stay short, because
cluster names change under our feet (pods come and go behind a headless
service, services are created while we are connected) and because the cluster
resolver (CoreDNS) itself only promises 5 seconds by default.

The cache is pure: no asyncio, and the clock is injected so tests can move time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.message
import dns.rcode
import dns.rdatatype

__all__ = ["DEFAULT_MAX_ENTRIES", "DEFAULT_MAX_TTL", "AnswerCache", "CachedAnswer", "lifetime"]

#: The longest any answer is kept, and the largest TTL handed to clients.
#: CoreDNS's kubernetes plugin answers with TTL 5 by default; keeping longer
#: would serve a pod's old address after the pod was replaced.
DEFAULT_MAX_TTL = 5.0

#: Enough for every name a busy laptop asks within a few seconds; bounds
#: memory if something loops over generated names.
DEFAULT_MAX_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A cluster answer and how long a client may still keep it.

    ``ttl`` is the answer's lifetime (its smallest TTL, capped) minus the time
    it has spent in the cache; resolvers clamp every record TTL to it so that
    nothing downstream keeps the answer longer than we would.
    """

    message: dns.message.Message
    ttl: int


def lifetime(message: dns.message.Message, *, max_ttl: float) -> float:
    """How long ``message`` may be reused, in seconds; 0 means do not cache.

    Positive answers live as long as their shortest record.  Negative answers
    (NXDOMAIN, or NOERROR without records) live as long as the SOA in the
    authority section allows (RFC 2308: the smaller of its TTL and its
    MINIMUM); without an SOA they get ``max_ttl``, which is what the cluster
    resolver's own SOA says by default.  Failures (SERVFAIL, REFUSED, ...) are
    never cached: the next query should ask again.
    """
    rcode = message.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return 0.0
    ttls: list[int] = []
    if rcode == dns.rcode.NOERROR and message.answer:
        ttls.extend(rrset.ttl for rrset in message.answer)
    else:
        for rrset in message.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                ttls.append(rrset.ttl)
                ttls.append(rrset[0].minimum)
    return float(max(0.0, min([max_ttl, *ttls])))


class AnswerCache:
    """Cluster answers keyed by (fully qualified name, query type).

    Names are compared case-insensitively, with or without the trailing dot.
    When full, expired entries are dropped first, then the oldest ones.
    """

    def __init__(
        self,
        *,
        max_ttl: float = DEFAULT_MAX_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self._max_ttl = max_ttl
        self._max_entries = max_entries
        self._clock = clock
        # key -> (expiry time, answer); dict order is insertion order, which
        # makes the first key the oldest one.
        self._entries: dict[tuple[str, int], tuple[float, dns.message.Message]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, qtype: int) -> CachedAnswer | None:
        """The cached answer with its remaining TTL, or None if absent or expired."""
        key = _key(name, qtype)
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, message = entry
        remaining = expires - self._clock()
        if remaining <= 0:
            del self._entries[key]
            return None
        return CachedAnswer(message, math.floor(remaining))

    def put(self, name: str, qtype: int, message: dns.message.Message) -> CachedAnswer:
        """Remember ``message`` for its :func:`lifetime`; return it as served now.

        Answers with lifetime 0 (failures, TTL 0 records) are not stored but
        are still returned, with TTL 0, so the caller serves them the same way.
        """
        life = lifetime(message, max_ttl=self._max_ttl)
        key = _key(name, qtype)
        self._entries.pop(key, None)
        if life > 0:
            now = self._clock()
            if len(self._entries) >= self._max_entries:
                self._evict(now)
            self._entries[key] = (now + life, message)
        return CachedAnswer(message, math.floor(life))

    def clear(self) -> None:
        self._entries.clear()

    def _evict(self, now: float) -> None:
        for key in [k for k, (expires, _) in self._entries.items() if expires <= now]:
            del self._entries[key]
        while len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]


def _key(name: str, qtype: int) -> tuple[str, int]:
    name = name.lower()
    return (name if name.endswith(".") else name + ".", qtype)
