"""The user daemon's DNS resolver: cluster names from the cluster, the rest untouched.

While connected, the laptop's queries reach the daemon: redirected by nftables
from its configured nameservers to :class:`~telepresence.daemon.dnsserver.DnsServer`
on 127.0.0.1, or, with systemd-resolved, sent by resolved over the TUN for the
link's domains and answered by :class:`~telepresence.daemon.udp.UdpRelay`.  Either
way :class:`Resolver` answers them.  For each query
:func:`~telepresence.daemon.dnsrules.route_query` decides where it goes:

* UPSTREAM: the original bytes go to the laptop's original nameservers (in
  resolv.conf order, the next when one does not answer: :mod:`.forwarder`) and
  the answer comes back byte for byte, on the transport the client used (over
  TCP with the same 2-byte length framing).  The laptop's DNS behaves exactly as
  before, including EDNS, DNSSEC records and truncation.
* CLUSTER: the cluster is asked for each candidate name in order; its answer
  (NXDOMAIN included) is final.  A failure or timeout gives SERVFAIL.
* CLUSTER_THEN_UPSTREAM: as CLUSTER, but when the cluster has none of the
  names (NXDOMAIN for all) or cannot be asked, the original query goes
  upstream untouched, so the laptop's own names never depend on the cluster.

Layout: :mod:`.dnsanswers` holds every protocol decision as pure functions;
:class:`Resolver` here strings them together with the cluster lookup, the
cache and an upstream forwarder, without sockets; :mod:`.dnsserver` is the
asyncio shell that listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from telepresence.daemon.dnsanswers import (
    MAX_TCP_SIZE,
    MalformedQuery,
    Outcome,
    classify,
    cluster_addresses,
    cluster_qtype,
    cluster_response,
    decode_query,
    describe,
    encode_response,
    error_response,
    plan_query,
    type_text,
    udp_size_limit,
)
from telepresence.daemon.dnscache import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_TTL,
    AnswerCache,
    CachedAnswer,
)
from telepresence.daemon.dnsrules import Action, NameRules

__all__ = [
    "ClusterAnswerHook",
    "ClusterLookup",
    "ClusterLookupFailed",
    "DnsObserver",
    "DnsSettings",
    "Forward",
    "Resolver",
]

#: Told the addresses of a fresh cluster answer; may be a coroutine (adding a route takes
#: a round trip to the network helper), awaited before the client gets the answer.
ClusterAnswerHook = Callable[[list[IPv4Address]], Awaitable[None] | None]

log = logging.getLogger("telepresence.daemon.dns")

#: Asks the cluster's resolver for one absolute name and query type; returns
#: its answer, or None (or raises, best :class:`ClusterLookupFailed` saying why)
#: when the cluster cannot be asked.
ClusterLookup = Callable[[str, int], Awaitable[dns.message.Message | None]]

#: Sends a query's wire bytes upstream and returns the reply's wire bytes;
#: the second argument says whether to use TCP.
Forward = Callable[[bytes, bool], Awaitable[bytes]]


class ClusterLookupFailed(Exception):
    """The cluster could not be asked; the message says why, for `status --flows`."""


class DnsObserver(Protocol):
    """Told what the resolver learns, for `status --flows`
    (:class:`~telepresence.daemon.flowbook.FlowBook` is one)."""

    def dns_answered(self, name: str, addresses: Sequence[IPv4Address]) -> None:
        """A program asked ``name`` and the cluster answered these addresses."""

    def dns_failed(self, question: str, message: str) -> None:
        """The program's question ("name TYPE") failed: the cluster or the laptop's
        nameservers could not answer it."""


@dataclass(frozen=True, slots=True)
class _Failure:
    """Why one cluster lookup gave nothing."""

    reason: str


#: Slack on top of the forwarder's own budget before a query is abandoned.
_UPSTREAM_GRACE = 0.5


@dataclass(frozen=True, slots=True)
class DnsSettings:
    """Tuning of the DNS server; each default says why it is what it is."""

    #: Budget for the whole cluster part of one query, all candidate names
    #: together.  glibc waits 5 s before it retries; this plus
    #: ``upstream_timeout`` stays below that, so even a query that falls back
    #: upstream after a slow cluster is answered before the client gives up.
    cluster_timeout: float = 2.0
    #: Budget for one query's upstream part, every nameserver together (lowered
    #: to resolv.conf's ``options timeout:`` when that is shorter); on expiry the
    #: client gets SERVFAIL.
    upstream_timeout: float = 2.5
    #: The longest wait for one nameserver before asking the next: a dead first
    #: nameserver costs at most this much, once (see ``upstream_hold_down``).
    upstream_server_timeout: float = 1.0
    #: How long a nameserver that did not answer is asked last; afterwards it is
    #: first again, so one that comes back is used within this long.
    upstream_hold_down: float = 30.0
    #: Cap on how long cluster answers are cached and on the TTLs clients see.
    cache_max_ttl: float = DEFAULT_MAX_TTL
    cache_max_entries: int = DEFAULT_MAX_ENTRIES
    #: Largest UDP answer we send to EDNS clients (and advertise): 1232 is the
    #: size DNS Flag Day 2020 settled on to avoid IP fragmentation.
    max_udp_payload: int = 1232
    #: Queries in progress at once; beyond this, new queries are dropped and
    #: the client retries.  Bounds memory if something floods us.
    max_pending: int = 1024
    #: A TCP client that has no query in progress is disconnected after this
    #: long (RFC 7766 suggests seconds, not minutes).
    tcp_idle_timeout: float = 10.0


class Resolver:
    """Answers one query's wire bytes with wire bytes (or None: drop).

    Holds the cache and the cluster lookups in flight, so concurrent queries
    for the same name and type (A and AAAA from glibc, client retries) share
    one round trip to the cluster.
    """

    def __init__(
        self,
        *,
        rules: Callable[[], NameRules],
        cluster_subnets: Callable[[], Sequence[IPv4Network]],
        cluster_lookup: ClusterLookup,
        forward: Forward,
        on_cluster_answer: ClusterAnswerHook | None = None,
        observer: DnsObserver | None = None,
        settings: DnsSettings = DnsSettings(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rules = rules
        self._cluster_subnets = cluster_subnets
        self._cluster_lookup = cluster_lookup
        self._forward = forward
        self._on_cluster_answer = on_cluster_answer
        self._observer = observer
        self._settings = settings
        self._cache = AnswerCache(
            max_ttl=settings.cache_max_ttl, max_entries=settings.cache_max_entries, clock=clock
        )
        self._lookups: dict[tuple[str, int], asyncio.Task[CachedAnswer | _Failure]] = {}

    async def answer(self, wire: bytes, *, tcp: bool) -> bytes | None:
        """The reply to ``wire``; never raises except on cancellation."""
        try:
            query = decode_query(wire)
        except MalformedQuery as exc:
            log.debug("malformed query (%d bytes)", len(wire), exc_info=exc.__cause__)
            return exc.reply
        try:
            return await self._answer(query, wire, tcp=tcp)
        except Exception:
            log.exception("DNS query %s failed", describe(query))
            return self._encode(error_response(query, dns.rcode.SERVFAIL), query, tcp=tcp)

    async def close(self) -> None:
        """Cancel the cluster lookups in flight and wait for them to end."""
        tasks = list(self._lookups.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._lookups.clear()
        self._cache.clear()

    async def _answer(self, query: dns.message.Message, wire: bytes, *, tcp: bool) -> bytes:
        route = plan_query(query, self._rules(), cluster_subnets=self._cluster_subnets())
        if route.action is Action.UPSTREAM:
            log.debug("%s: upstream (%s)", describe(query), route.reason.value)
            return await self._upstream(query, wire, tcp=tcp)

        outcome, name, answer, failure = await self._ask_cluster(
            route.names, cluster_qtype(query.question[0].rdtype)
        )
        log.debug("%s: %s (%s) via %s", describe(query), outcome.value, route.reason.value, name)
        if answer is not None and (outcome is Outcome.FOUND or route.action is Action.CLUSTER):
            # The addresses the program gets (an AAAA question asks the cluster for A too).
            if (
                outcome is Outcome.FOUND
                and self._observer is not None
                and query.question[0].rdtype == dns.rdatatype.A
            ):
                addresses = cluster_addresses(answer.message)
                if addresses:
                    self._observer.dns_answered(_question_name(query), addresses)
            response = cluster_response(
                query,
                cluster_name=dns.name.from_text(name),
                answer=answer,
                max_udp_payload=self._settings.max_udp_payload,
            )
            return self._encode(response, query, tcp=tcp)
        if route.action is Action.CLUSTER_THEN_UPSTREAM:
            if failure:
                self._failed(query, f"the cluster: {failure}; asked the laptop's nameservers")
            return await self._upstream(query, wire, tcp=tcp)
        self._failed(query, f"the cluster: {failure}")
        return self._encode(self._error(query, dns.rcode.SERVFAIL), query, tcp=tcp)

    async def _ask_cluster(
        self, names: Sequence[str], qtype: int
    ) -> tuple[Outcome, str, CachedAnswer | None, str]:
        """Try ``names`` in order within the cluster budget.

        FOUND with the first name the cluster has; else MISSING with the
        last NXDOMAIN if the cluster answered for every name; else FAILED.
        The last item is why a name failed ("" when none did).
        """
        missing: tuple[str, CachedAnswer] | None = None
        failure = ""
        try:
            async with asyncio.timeout(self._settings.cluster_timeout):
                for name in names:
                    answer = await self._lookup(name, qtype)
                    if isinstance(answer, _Failure):
                        failure = f"{name.rstrip('.')}: {answer.reason}"
                        continue
                    outcome = classify(answer.message)
                    if outcome is Outcome.FOUND:
                        return outcome, name, answer, ""
                    if outcome is Outcome.MISSING:
                        missing = (name, answer)
                    else:
                        failure = f"{name.rstrip('.')}: {_rcode_text(answer.message)}"
        except TimeoutError:
            log.debug("cluster lookup of %s timed out", names)
            failure = f"no answer within {self._settings.cluster_timeout:g} s"
        if missing is not None and not failure:
            return Outcome.MISSING, *missing, ""
        return Outcome.FAILED, names[-1], None, failure or "no answer"

    def _failed(self, query: dns.message.Message, message: str) -> None:
        if self._observer is None:
            return
        if len(query.question) != 1:
            self._observer.dns_failed(describe(query), message)
            return
        question = f"{_question_name(query)} {type_text(query.question[0].rdtype)}"
        self._observer.dns_failed(question, message)

    async def _lookup(self, name: str, qtype: int) -> CachedAnswer | _Failure:
        cached = self._cache.get(name, qtype)
        if cached is not None:
            return cached
        key = (name.lower(), qtype)
        task = self._lookups.get(key)
        if task is None:
            task = asyncio.create_task(
                self._fetch(name, qtype),
                name=f"dns-cluster-lookup {name} {type_text(qtype)}",
            )
            self._lookups[key] = task
            task.add_done_callback(lambda done: self._lookup_done(key, done))
        # Shielded: a client that gives up (timeout, close of its connection)
        # must not cancel a lookup other clients wait for, and a late answer
        # still fills the cache for the client's retry.
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                return _Failure("the DNS server is closing")  # close(), not this query
            raise

    def _lookup_done(
        self, key: tuple[str, int], task: asyncio.Task[CachedAnswer | _Failure]
    ) -> None:
        if self._lookups.get(key) is task:
            del self._lookups[key]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("DNS lookup task failed", exc_info=exc)

    async def _fetch(self, name: str, qtype: int) -> CachedAnswer | _Failure:
        try:
            async with asyncio.timeout(self._settings.cluster_timeout):
                message = await self._cluster_lookup(name, qtype)
        except TimeoutError:
            return _Failure(f"no answer within {self._settings.cluster_timeout:g} s")
        except Exception as exc:  # the tunnel's failures are not ours to crash on
            log.debug("cluster lookup of %s failed: %r", name, exc)
            return _Failure(str(exc) or type(exc).__name__)
        if message is None:
            return _Failure("the traffic manager could not be asked")
        outcome = classify(message)
        if outcome is Outcome.FAILED:
            return _Failure(_rcode_text(message))
        if outcome is Outcome.FOUND and self._on_cluster_answer is not None:
            addresses = cluster_addresses(message)
            if addresses:
                # Before the client sees the answer, so the route to an
                # address outside the routed subnets exists when it connects.
                try:
                    pending = self._on_cluster_answer(addresses)
                    if pending is not None:
                        await pending
                except Exception:
                    log.exception("on_cluster_answer failed")
        return self._cache.put(name, qtype, message)

    async def _upstream(self, query: dns.message.Message, wire: bytes, *, tcp: bool) -> bytes:
        try:
            # The forwarder keeps within upstream_timeout itself; this is the backstop.
            async with asyncio.timeout(self._settings.upstream_timeout + _UPSTREAM_GRACE):
                return await self._forward(wire, tcp)
        except (OSError, TimeoutError, EOFError) as exc:
            log.debug("%s: upstream failed: %r", describe(query), exc)
            why = (
                "no answer in time"
                if isinstance(exc, TimeoutError)
                else (str(exc) or type(exc).__name__)
            )
            self._failed(query, f"the laptop's nameservers: {why}")
            return self._encode(self._error(query, dns.rcode.SERVFAIL), query, tcp=tcp)

    def _error(self, query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
        return error_response(query, rcode, max_udp_payload=self._settings.max_udp_payload)

    def _encode(
        self, response: dns.message.Message, query: dns.message.Message, *, tcp: bool
    ) -> bytes:
        limit = (
            MAX_TCP_SIZE
            if tcp
            else udp_size_limit(query, max_udp_payload=self._settings.max_udp_payload)
        )
        return encode_response(response, max_size=limit)


def _question_name(query: dns.message.Message) -> str:
    """The name the program asked, as it would type it (no final dot)."""
    return str(query.question[0].name.to_text(omit_final_dot=True))


def _rcode_text(message: dns.message.Message) -> str:
    return f"answered {dns.rcode.to_text(message.rcode())}"
