"""The user daemon's DNS server: cluster names from the cluster, the rest untouched.

While connected, nftables redirects the laptop's queries to its configured
nameserver (UDP and TCP port 53) to this server on 127.0.0.1.  For each query
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

Shape of cluster answers
------------------------

The client asked ``web.ns``; the cluster answered for
``web.ns.svc.cluster.local.``.  We rewrite the owner names of records owned by
the cluster name to the name exactly as the client asked it (same case, for
resolvers that randomise case), as Telepresence does.  The alternative, a
synthesised CNAME ``web.ns. -> web.ns.svc.cluster.local.``, would publish a
name the client never asked about: caching resolvers downstream would then
want to revalidate it on their own, and a later query for it would take a
different route.  Records owned by other names (the targets of a CNAME chain
for an ExternalName service, the A records of SRV targets) stay as they are;
they form a consistent chain from the asked name.  The cluster's SOA is
returned only when it is an ancestor of the asked name: an SOA for
``cluster.local`` in the answer for ``nope.ns`` would be out of bailiwick.
Every TTL is clamped to the cache's lifetime for the answer (at most 5 s), so
that nothing downstream keeps a cluster address after we stop answering.

AAAA queries for cluster names are answered from the cluster's *A* answer:
the tunnel carries IPv4 only, so an IPv6 address would be unreachable, and a
name with addresses must not be reported as non-existent.  The answer is
NOERROR with an empty answer section (NODATA), or NXDOMAIN if the cluster
does not have the name.  Asking for A also means the AAAA query glibc sends
together with A shares one cluster round trip and one cache entry.

A cluster name counts as found when the cluster says NOERROR, with or without
records of the asked type, as :class:`~telepresence.daemon.dnsrules.Action`
specifies: if a namespace ``dev`` has a service ``example``, ``example.dev``
is that service for every query type, and an MX query must not pull in the
public domain's records next to the cluster's addresses.

UDP answers larger than 512 bytes (or the client's EDNS payload size) are
sent with TC set, so the client retries over TCP, where the whole answer fits.

Layout: the pure functions (:func:`decode_query`, :func:`plan_query`,
:func:`cluster_response`, :func:`encode_response`, ...) hold every protocol
decision; :class:`Resolver` strings them together with the cluster lookup, the
cache and an upstream forwarder, without sockets; :class:`DnsServer` is the
asyncio shell around it.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import itertools
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from types import TracebackType
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from telepresence.daemon.dnscache import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_TTL,
    AnswerCache,
    CachedAnswer,
)
from telepresence.daemon.dnsrules import Action, NameRules, Reason, Route, route_query
from telepresence.daemon.forwarder import UpstreamForwarder, UpstreamSocket
from telepresence.daemon.upstreams import Server

__all__ = [
    "ClusterLookup",
    "DnsServer",
    "DnsSettings",
    "Forward",
    "MalformedQuery",
    "Outcome",
    "Resolver",
    "UpstreamSocket",
    "classify",
    "cluster_addresses",
    "cluster_qtype",
    "cluster_response",
    "decode_query",
    "encode_response",
    "error_response",
    "formerr_reply",
    "plan_query",
    "take_frames",
    "udp_size_limit",
]

# Told the addresses of a fresh cluster answer; may be a coroutine (adding a route takes a
# round trip to the network helper), awaited before the client gets the answer.
ClusterAnswerHook = Callable[[list[IPv4Address]], Awaitable[None] | None]

log = logging.getLogger("telepresence.daemon.dns")

#: Asks the cluster's resolver for one absolute name and query type; returns
#: its answer, or None when the cluster cannot be asked.
ClusterLookup = Callable[[str, int], Awaitable[dns.message.Message | None]]
#: Sends a query's wire bytes upstream and returns the reply's wire bytes;
#: the second argument says whether to use TCP.
Forward = Callable[[bytes, bool], Awaitable[bytes]]

_HEADER = struct.Struct("!HH")
_LENGTH = struct.Struct("!H")
_MIN_UDP_SIZE = 512
_MAX_TCP_SIZE = 65535
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


# --------------------------------------------------------------------------
# Pure protocol functions
# --------------------------------------------------------------------------


class MalformedQuery(Exception):
    """A query we cannot parse; ``reply`` is the FORMERR to send, if any."""

    def __init__(self, reply: bytes | None) -> None:
        super().__init__("malformed DNS query")
        self.reply = reply


def formerr_reply(wire: bytes) -> bytes | None:
    """A bare FORMERR answer echoing the query's id, opcode and RD flag.

    None when ``wire`` has no complete header (nothing to echo) or is itself
    a response (answering responses could set two servers ping-ponging).
    """
    if len(wire) < 12:
        return None
    qid, flags = _HEADER.unpack_from(wire)
    if flags & dns.flags.QR:
        return None
    echoed = flags & (0x7800 | dns.flags.RD)  # opcode bits and RD
    return _HEADER.pack(qid, dns.flags.QR | echoed | dns.rcode.FORMERR) + bytes(8)


def decode_query(wire: bytes) -> dns.message.Message:
    """Parse a client's query; raise :class:`MalformedQuery` if it is not one."""
    if len(wire) < 12 or _HEADER.unpack_from(wire)[1] & dns.flags.QR:
        raise MalformedQuery(None)
    try:
        return dns.message.from_wire(wire)
    except Exception as exc:  # dnspython raises many types for bad input
        raise MalformedQuery(formerr_reply(wire)) from exc


_PASS_THROUGH = Route(Action.UPSTREAM, Reason.NO_MATCH)


def plan_query(
    query: dns.message.Message,
    rules: NameRules,
    *,
    cluster_subnets: Iterable[IPv4Network] = (),
) -> Route:
    """Where ``query`` goes.  Only standard one-question IN queries can go to
    the cluster; everything else (NOTIFY, UPDATE, CHAOS ``version.bind``, a
    cookie-only query without question) passes upstream untouched."""
    if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
        return _PASS_THROUGH
    question = query.question[0]
    if question.rdclass != dns.rdataclass.IN:
        return _PASS_THROUGH
    return route_query(
        question.name.to_text(), question.rdtype, rules, cluster_subnets=cluster_subnets
    )


def cluster_qtype(qtype: int) -> int:
    """The type to ask the cluster for: A in place of AAAA (see module docstring)."""
    return dns.rdatatype.A if qtype == dns.rdatatype.AAAA else qtype


class Outcome(enum.Enum):
    """What one cluster answer says about the name."""

    FOUND = "found"  # NOERROR: the cluster has the name (maybe no records of this type)
    MISSING = "missing"  # NXDOMAIN
    FAILED = "failed"  # no answer, or SERVFAIL/REFUSED/...: we know nothing


def classify(answer: dns.message.Message | None) -> Outcome:
    if answer is None:
        return Outcome.FAILED
    rcode = answer.rcode()
    if rcode == dns.rcode.NOERROR:
        return Outcome.FOUND
    if rcode == dns.rcode.NXDOMAIN:
        return Outcome.MISSING
    return Outcome.FAILED


def cluster_addresses(answer: dns.message.Message) -> list[IPv4Address]:
    """The IPv4 addresses in an answer (answer and additional sections)."""
    return [
        IPv4Address(rdata.address)
        for rrset in (*answer.answer, *answer.additional)
        if rrset.rdtype == dns.rdatatype.A
        for rdata in rrset
    ]


def _response(query: dns.message.Message, *, max_udp_payload: int) -> dns.message.Message:
    return dns.message.make_response(query, recursion_available=True, our_payload=max_udp_payload)


def error_response(
    query: dns.message.Message, rcode: dns.rcode.Rcode, *, max_udp_payload: int = 1232
) -> dns.message.Message:
    """An empty answer to ``query`` with ``rcode`` (SERVFAIL, FORMERR, ...)."""
    response = _response(query, max_udp_payload=max_udp_payload)
    response.set_rcode(rcode)
    return response


def _clamped(rrset: dns.rrset.RRset, *, name: dns.name.Name, ttl: int) -> dns.rrset.RRset:
    return dns.rrset.from_rdata_list(name, min(rrset.ttl, ttl), list(rrset))


def cluster_response(
    query: dns.message.Message,
    *,
    cluster_name: dns.name.Name,
    answer: CachedAnswer,
    max_udp_payload: int = 1232,
) -> dns.message.Message:
    """The answer to ``query`` made from the cluster's answer for ``cluster_name``.

    Owner names equal to ``cluster_name`` become the asked name, exactly as
    asked; TTLs are clamped to ``answer.ttl``; AAAA queries (answered from the
    cluster's A answer) get NODATA; see the module docstring for why.
    """
    question = query.question[0]
    asked = question.name
    message = answer.message
    response = _response(query, max_udp_payload=max_udp_payload)
    response.set_rcode(message.rcode())

    def owner(name: dns.name.Name) -> dns.name.Name:
        return asked if name == cluster_name else name

    if message.rcode() == dns.rcode.NOERROR and question.rdtype != dns.rdatatype.AAAA:
        response.answer = [
            _clamped(rrset, name=owner(rrset.name), ttl=answer.ttl)
            for rrset in message.answer
            if len(rrset)
        ]
        response.additional = [
            _clamped(rrset, name=owner(rrset.name), ttl=answer.ttl)
            for rrset in message.additional
            if len(rrset)
        ]
    if not response.answer:
        # Negative answer: keep an SOA only if it is in bailiwick for the
        # asked name, i.e. when the client asked the cluster name itself.
        response.authority = [
            _clamped(rrset, name=rrset.name, ttl=answer.ttl)
            for rrset in message.authority
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset) and asked.is_subdomain(rrset.name)
        ]
    return response


def udp_size_limit(query: dns.message.Message, *, max_udp_payload: int) -> int:
    """The largest UDP answer ``query``'s sender accepts: 512 without EDNS,
    else its advertised size, within [512, ``max_udp_payload``]."""
    if query.edns < 0:
        return _MIN_UDP_SIZE
    return max(_MIN_UDP_SIZE, min(query.payload, max_udp_payload))


def encode_response(response: dns.message.Message, *, max_size: int) -> bytes:
    """Wire bytes of ``response`` within ``max_size``.

    If it does not fit, the additional section goes first (no TC needed:
    RFC 2181 section 9); if it still does not fit, answer and authority go
    too and TC is set, so the client asks again over TCP.  May empty sections
    of ``response``.
    """
    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        pass
    if response.additional:
        response.additional = []
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            pass
    response.answer = []
    response.authority = []
    response.flags |= dns.flags.TC
    return response.to_wire(max_size=max_size)


def take_frames(buffer: bytearray) -> list[bytes]:
    """Remove and return every complete length-prefixed message in ``buffer``
    (DNS over TCP framing, RFC 1035 section 4.2.2)."""
    frames = []
    while len(buffer) >= 2:
        (size,) = _LENGTH.unpack_from(buffer)
        if len(buffer) < 2 + size:
            break
        frames.append(bytes(buffer[2 : 2 + size]))
        del buffer[: 2 + size]
    return frames


# --------------------------------------------------------------------------
# Resolver: the per-query flow, without sockets
# --------------------------------------------------------------------------


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
        settings: DnsSettings = DnsSettings(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rules = rules
        self._cluster_subnets = cluster_subnets
        self._cluster_lookup = cluster_lookup
        self._forward = forward
        self._on_cluster_answer = on_cluster_answer
        self._settings = settings
        self._cache = AnswerCache(
            max_ttl=settings.cache_max_ttl, max_entries=settings.cache_max_entries, clock=clock
        )
        self._lookups: dict[tuple[str, int], asyncio.Task[CachedAnswer | None]] = {}

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
            log.exception("DNS query %s failed", _describe(query))
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
            log.debug("%s: upstream (%s)", _describe(query), route.reason.value)
            return await self._upstream(query, wire, tcp=tcp)

        outcome, name, answer = await self._ask_cluster(
            route.names, cluster_qtype(query.question[0].rdtype)
        )
        log.debug("%s: %s (%s) via %s", _describe(query), outcome.value, route.reason.value, name)
        if answer is not None and (outcome is Outcome.FOUND or route.action is Action.CLUSTER):
            response = cluster_response(
                query,
                cluster_name=dns.name.from_text(name),
                answer=answer,
                max_udp_payload=self._settings.max_udp_payload,
            )
            return self._encode(response, query, tcp=tcp)
        if route.action is Action.CLUSTER_THEN_UPSTREAM:
            return await self._upstream(query, wire, tcp=tcp)
        return self._encode(self._error(query, dns.rcode.SERVFAIL), query, tcp=tcp)

    async def _ask_cluster(
        self, names: Sequence[str], qtype: int
    ) -> tuple[Outcome, str, CachedAnswer | None]:
        """Try ``names`` in order within the cluster budget.

        FOUND with the first name the cluster has; else MISSING with the
        last NXDOMAIN if the cluster answered for every name; else FAILED.
        """
        missing: tuple[str, CachedAnswer] | None = None
        failed = False
        try:
            async with asyncio.timeout(self._settings.cluster_timeout):
                for name in names:
                    answer = await self._lookup(name, qtype)
                    outcome = classify(answer.message if answer else None)
                    if outcome is Outcome.FOUND and answer is not None:
                        return outcome, name, answer
                    if outcome is Outcome.MISSING and answer is not None:
                        missing = (name, answer)
                    else:
                        failed = True
        except TimeoutError:
            log.debug("cluster lookup of %s timed out", names)
            failed = True
        if missing is not None and not failed:
            return Outcome.MISSING, *missing
        return Outcome.FAILED, names[-1], None

    async def _lookup(self, name: str, qtype: int) -> CachedAnswer | None:
        cached = self._cache.get(name, qtype)
        if cached is not None:
            return cached
        key = (name.lower(), qtype)
        task = self._lookups.get(key)
        if task is None:
            task = asyncio.create_task(
                self._fetch(name, qtype),
                name=f"dns-cluster-lookup {name} {_type_text(qtype)}",
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
                return None  # the lookup was cancelled (close()), not this query
            raise

    def _lookup_done(self, key: tuple[str, int], task: asyncio.Task[CachedAnswer | None]) -> None:
        if self._lookups.get(key) is task:
            del self._lookups[key]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("DNS lookup task failed", exc_info=exc)

    async def _fetch(self, name: str, qtype: int) -> CachedAnswer | None:
        try:
            async with asyncio.timeout(self._settings.cluster_timeout):
                message = await self._cluster_lookup(name, qtype)
        except Exception as exc:  # the tunnel's failures are not ours to crash on
            log.debug("cluster lookup of %s failed: %r", name, exc)
            return None
        outcome = classify(message)
        if message is None or outcome is Outcome.FAILED:
            return None
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
            log.debug("%s: upstream failed: %r", _describe(query), exc)
            return self._encode(self._error(query, dns.rcode.SERVFAIL), query, tcp=tcp)

    def _error(self, query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
        return error_response(query, rcode, max_udp_payload=self._settings.max_udp_payload)

    def _encode(
        self, response: dns.message.Message, query: dns.message.Message, *, tcp: bool
    ) -> bytes:
        limit = (
            _MAX_TCP_SIZE
            if tcp
            else udp_size_limit(query, max_udp_payload=self._settings.max_udp_payload)
        )
        return encode_response(response, max_size=limit)


def _type_text(qtype: int) -> str:
    return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(qtype))


def _describe(query: dns.message.Message) -> str:
    if len(query.question) != 1:
        return f"query {query.id} ({len(query.question)} questions)"
    question = query.question[0]
    return f"{question.name} {dns.rdatatype.to_text(question.rdtype)}"


# --------------------------------------------------------------------------
# The asyncio shell
# --------------------------------------------------------------------------


class DnsServer:
    """DNS over UDP and TCP on ``host:port`` (port 0: any free port, the same
    for both), answering through a :class:`Resolver`.

    Use ``async with DnsServer(...) as server`` or :meth:`start` /
    :meth:`close`; :attr:`port` is the bound port.

    ``rules`` and ``cluster_subnets`` are called for every query, so they may
    change while connected.  ``cluster_lookup`` asks the cluster's resolver
    (through the tunnel) for one absolute name.  ``upstreams`` are the laptop's
    original nameservers, in resolv.conf order, tried one after another
    (:attr:`upstreams` follows a changed list); every exchange uses a fresh
    socket from ``upstream_socket`` (marked by the network helper so that the
    redirect leaves it alone).  ``on_cluster_answer`` gets the IPv4 addresses of each
    fresh cluster answer (cached answers are not reported again), before the
    client sees them, so routes to addresses outside the routed subnets can be
    added in time.
    """

    def __init__(
        self,
        *,
        rules: Callable[[], NameRules],
        cluster_subnets: Callable[[], Sequence[IPv4Network]],
        cluster_lookup: ClusterLookup,
        upstreams: Sequence[Server],
        upstream_socket: UpstreamSocket,
        on_cluster_answer: ClusterAnswerHook | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        settings: DnsSettings = DnsSettings(),
    ) -> None:
        self.upstreams = UpstreamForwarder(
            servers=upstreams,
            upstream_socket=upstream_socket,
            total=settings.upstream_timeout,
            per_server=settings.upstream_server_timeout,
            hold_down=settings.upstream_hold_down,
        )
        self._host = host
        self._requested_port = port
        self._settings = settings
        self.resolver = Resolver(
            rules=rules,
            cluster_subnets=cluster_subnets,
            cluster_lookup=cluster_lookup,
            forward=self.upstreams.forward,
            on_cluster_answer=on_cluster_answer,
            settings=settings,
        )
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[_TcpConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._task_ids = itertools.count(1)
        self._port = 0
        self._closed = False

    @property
    def port(self) -> int:
        """The port bound for both UDP and TCP (0 before :meth:`start`)."""
        return self._port

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> int:
        """Bind UDP and TCP and start answering; return the bound port."""
        if self._udp is not None or self._closed:
            raise RuntimeError("DnsServer.start() called twice")
        loop = asyncio.get_running_loop()
        # With port 0, UDP picks a port and TCP must get the same one; another
        # process may hold that TCP port, so try a few UDP ports.
        attempts = 1 if self._requested_port else 20
        for attempt in range(attempts):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self._host, self._requested_port)
            )
            port = int(udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await loop.create_server(
                    lambda: _TcpConnection(self), self._host, port, reuse_address=True
                )
            except OSError as exc:
                udp.close()
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
                continue
            self._udp = udp
            self._port = port
            break
        log.info("DNS server listening on %s:%d (udp, tcp)", self._host, self._port)
        return self._port

    async def close(self) -> None:
        """Stop listening, cancel every query in progress, close every socket."""
        if self._closed:
            return
        self._closed = True
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for connection in list(self._connections):
            connection.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.resolver.close()
        if self._tcp is not None:
            await self._tcp.wait_closed()

    def _spawn(self, coro: Coroutine[Any, Any, None], kind: str) -> bool:
        """Run one query's coroutine as a named, tracked task; False if refused."""
        if self._closed or len(self._tasks) >= self._settings.max_pending:
            coro.close()
            log.warning("DNS server busy: dropping a %s query", kind)
            return False
        task = asyncio.create_task(coro, name=f"dns-{kind}-query-{next(self._task_ids)}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return True

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("DNS task %s failed", task.get_name(), exc_info=exc)

    async def _reply_udp(self, wire: bytes, addr: tuple[str, int]) -> None:
        reply = await self.resolver.answer(wire, tcp=False)
        if reply is not None and self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(reply, addr)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._server._spawn(self._server._reply_udp(data, addr), "udp")

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from replies to vanished clients; nothing to do.
        log.debug("DNS UDP socket error: %r", exc)


class _TcpConnection(asyncio.Protocol):
    """One DNS-over-TCP client: length-framed queries, possibly pipelined,
    answered in whatever order they complete (RFC 7766)."""

    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._pending = 0
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server._connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for frame in take_frames(self._buffer):
            if self._server._spawn(self._reply(frame), "tcp"):
                self._pending += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def _reply(self, frame: bytes) -> None:
        try:
            reply = await self._server.resolver.answer(frame, tcp=True)
            if reply is not None and self._transport is not None:
                self._transport.write(_LENGTH.pack(len(reply)) + reply)
        finally:
            self._pending -= 1
            self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        if self._transport is None:
            return
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self._server._settings.tcp_idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        if self._transport is None:
            return
        if self._pending:
            self._arm_idle_timer()
        else:
            self._transport.close()
