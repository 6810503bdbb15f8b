"""Pure DNS server logic: parsing, answer rewriting, truncation, framing, and the
per-query flow of the Resolver with a fake cluster and a fake upstream (no sockets)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from telepresence.daemon.dns import ClusterLookupFailed, DnsSettings, Resolver
from telepresence.daemon.dnsanswers import (
    MalformedQuery,
    Outcome,
    classify,
    cluster_addresses,
    cluster_qtype,
    cluster_response,
    decode_query,
    encode_response,
    formerr_reply,
    plan_query,
    take_frames,
    udp_size_limit,
)
from telepresence.daemon.dnscache import CachedAnswer
from telepresence.daemon.dnsrules import Action, NameRules, Reason
from telepresence.daemon.forwarder import NoUpstreamAnswer
from tests.unit.waiting import until

A = dns.rdatatype.A
AAAA = dns.rdatatype.AAAA
SRV = dns.rdatatype.SRV
MX = dns.rdatatype.MX
NOERROR = dns.rcode.NOERROR
NXDOMAIN = dns.rcode.NXDOMAIN
SERVFAIL = dns.rcode.SERVFAIL

WEB = "web.ns.svc.cluster.local."
SOA_TEXT = "ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5"
RULES = NameRules(mapped_namespaces=frozenset({"ns"}), search_namespaces=("a", "b"))
SUBNETS = (IPv4Network("10.96.0.0/12"),)
FAST = DnsSettings(cluster_timeout=0.1, upstream_timeout=0.1)


def query(
    name: str, qtype: dns.rdatatype.RdataType = A, *, edns: int = -1, payload: int = 1232
) -> dns.message.Message:
    q = dns.message.make_query(name, qtype, use_edns=edns, payload=payload)
    q.id = 4242
    return q


def cluster_answer(
    name: str,
    *addresses: str,
    qtype: dns.rdatatype.RdataType = A,
    ttl: int = 5,
    rcode: dns.rcode.Rcode = NOERROR,
    soa: bool = False,
) -> dns.message.Message:
    """What the cluster's resolver says about ``name`` (built as CoreDNS would)."""
    response = dns.message.make_response(dns.message.make_query(name, qtype))
    response.set_rcode(rcode)
    if addresses:
        response.answer.append(dns.rrset.from_text_list(name, ttl, "IN", "A", list(addresses)))
    if soa:
        response.authority.append(dns.rrset.from_text("cluster.local.", 5, "IN", "SOA", SOA_TEXT))
    return response


def roundtrip(response: dns.message.Message, *, max_size: int = 65535) -> dns.message.Message:
    """What a client parses from our bytes."""
    return dns.message.from_wire(encode_response(response, max_size=max_size))


def owner_texts(message: dns.message.Message) -> list[str]:
    return [rrset.name.to_text() for rrset in message.answer]


# -- parsing -----------------------------------------------------------------


def test_short_datagrams_and_responses_are_dropped() -> None:
    for wire in (b"", b"\x12", b"\x12\x34\x01\x00"):
        with pytest.raises(MalformedQuery) as info:
            decode_query(wire)
        assert info.value.reply is None
    response = dns.message.make_response(query("x.")).to_wire()
    with pytest.raises(MalformedQuery) as info:
        decode_query(response)
    assert info.value.reply is None  # never answer an answer


def test_garbage_after_a_header_gets_formerr_with_the_id() -> None:
    # Header claims one question, the question is cut short.
    wire = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0) + b"\x03web"
    with pytest.raises(MalformedQuery) as info:
        decode_query(wire)
    assert info.value.reply == formerr_reply(wire)
    assert info.value.reply is not None
    reply = dns.message.from_wire(info.value.reply)
    assert reply.id == 0xBEEF
    assert reply.rcode() == dns.rcode.FORMERR
    assert reply.flags & dns.flags.QR and reply.flags & dns.flags.RD


def test_plan_routes_only_standard_in_queries() -> None:
    assert plan_query(query("web.ns.svc"), RULES).action is Action.CLUSTER
    notify = query("web.ns.svc")
    notify.set_opcode(dns.opcode.NOTIFY)
    chaos = dns.message.make_query("web.ns.svc", dns.rdatatype.TXT, rdclass=dns.rdataclass.CH)
    two = query("web.ns.svc")
    two.question.append(query("other.ns.svc").question[0])
    none = query("web.ns.svc")
    none.question = []
    for odd in (notify, chaos, two, none):
        assert plan_query(odd, RULES).action is Action.UPSTREAM
    route = plan_query(query("Web.NS."), RULES)
    assert route.action is Action.CLUSTER_THEN_UPSTREAM
    assert route.reason is Reason.NAMESPACE_PSEUDO_TLD
    assert route.names == (WEB,)


def test_small_helpers() -> None:
    assert cluster_qtype(AAAA) == A and cluster_qtype(SRV) == SRV and cluster_qtype(A) == A
    assert classify(None) is Outcome.FAILED
    assert classify(cluster_answer(WEB)) is Outcome.FOUND  # NODATA: the name exists
    assert classify(cluster_answer(WEB, rcode=NXDOMAIN)) is Outcome.MISSING
    assert classify(cluster_answer(WEB, rcode=SERVFAIL)) is Outcome.FAILED
    assert classify(cluster_answer(WEB, rcode=dns.rcode.REFUSED)) is Outcome.FAILED
    srv = cluster_answer(WEB, "10.96.0.10")
    srv.additional.append(dns.rrset.from_text("pod.x.", 5, "IN", "A", "10.244.1.7"))
    assert cluster_addresses(srv) == [IPv4Address("10.96.0.10"), IPv4Address("10.244.1.7")]


# Found by the DNS fuzzer (fuzz/targets/dns.py): an A record of another class has no
# address (CHAOS A holds a domain and a number, an unknown class opaque bytes); reading
# one failed the lookup, and the client got SERVFAIL for a name the cluster has.
ODD_CLASS_A = dns.rrset.from_text("odd.", 5, "CLASS25090", "A", r"\# 4 0a600007")
CHAOS_A = dns.rrset.from_text("chaos.", 5, "CH", "A", "chaos. 1")


def test_cluster_addresses_are_those_of_class_in_only() -> None:
    answer = cluster_answer(WEB, "10.96.0.10")
    answer.answer.append(ODD_CLASS_A)
    answer.additional.append(CHAOS_A)
    assert cluster_addresses(answer) == [IPv4Address("10.96.0.10")]


# -- rewriting ---------------------------------------------------------------


def test_owner_names_become_the_asked_name_exactly_as_asked() -> None:
    q = query("WeB.Ns.")  # mixed case, as resolvers using 0x20 randomisation send
    response = cluster_response(
        q,
        cluster_name=dns.name.from_text(WEB),
        answer=CachedAnswer(cluster_answer(WEB, "10.96.0.10", "10.96.0.11"), 5),
    )
    parsed = roundtrip(response)
    assert parsed.id == 4242 and parsed.rcode() == NOERROR
    assert parsed.flags & dns.flags.RA and parsed.flags & dns.flags.RD
    assert parsed.question[0].name.to_text() == "WeB.Ns."
    assert owner_texts(parsed) == ["WeB.Ns."]
    assert sorted(r.address for r in parsed.answer[0]) == ["10.96.0.10", "10.96.0.11"]
    assert parsed.question == q.question


def test_cname_chains_keep_their_other_owners() -> None:
    ext = "ext.ns.svc.cluster.local."
    answer = dns.message.make_response(dns.message.make_query(ext, A))
    answer.answer.append(dns.rrset.from_text(ext, 5, "IN", "CNAME", "db.example.com."))
    answer.answer.append(dns.rrset.from_text("db.example.com.", 60, "IN", "A", "192.0.2.9"))
    parsed = roundtrip(
        cluster_response(
            query("ext.ns."), cluster_name=dns.name.from_text(ext), answer=CachedAnswer(answer, 5)
        )
    )
    assert [(r.name.to_text(), r.rdtype, r.ttl) for r in parsed.answer] == [
        ("ext.ns.", dns.rdatatype.CNAME, 5),
        ("db.example.com.", A, 5),  # clamped to the cache lifetime
    ]


def test_ttls_are_clamped_to_the_cached_lifetime() -> None:
    answer = cluster_answer(WEB, "10.96.0.10", ttl=30)
    name = dns.name.from_text(WEB)
    assert (
        roundtrip(cluster_response(query(WEB), cluster_name=name, answer=CachedAnswer(answer, 3)))
        .answer[0]
        .ttl
        == 3
    )
    short = cluster_answer(WEB, "10.96.0.10", ttl=1)
    assert (
        roundtrip(cluster_response(query(WEB), cluster_name=name, answer=CachedAnswer(short, 3)))
        .answer[0]
        .ttl
        == 1
    )


def test_aaaa_for_a_name_with_addresses_is_nodata() -> None:
    parsed = roundtrip(
        cluster_response(
            query("web.ns.", AAAA),
            cluster_name=dns.name.from_text(WEB),
            answer=CachedAnswer(cluster_answer(WEB, "10.96.0.10"), 5),
        )
    )
    assert parsed.rcode() == NOERROR
    assert parsed.answer == [] and parsed.authority == []
    assert parsed.question[0].rdtype == AAAA


def test_negative_answers_keep_the_soa_only_in_bailiwick() -> None:
    nx = CachedAnswer(cluster_answer("nope.ns.svc.cluster.local.", rcode=NXDOMAIN, soa=True), 5)
    name = dns.name.from_text("nope.ns.svc.cluster.local.")
    rewritten = roundtrip(cluster_response(query("nope.ns.svc."), cluster_name=name, answer=nx))
    assert rewritten.rcode() == NXDOMAIN and rewritten.authority == []
    full = roundtrip(
        cluster_response(query("nope.ns.svc.cluster.local."), cluster_name=name, answer=nx)
    )
    assert full.rcode() == NXDOMAIN
    assert [r.name.to_text() for r in full.authority] == ["cluster.local."]
    aaaa = roundtrip(cluster_response(query("nope.ns.svc.", AAAA), cluster_name=name, answer=nx))
    assert aaaa.rcode() == NXDOMAIN  # the name does not exist for any type


def test_srv_answers_keep_target_addresses() -> None:
    srv_name = "_http._tcp.web.ns.svc.cluster.local."
    answer = dns.message.make_response(dns.message.make_query(srv_name, SRV))
    answer.answer.append(dns.rrset.from_text(srv_name, 5, "IN", "SRV", f"0 100 80 {WEB}"))
    answer.additional.append(dns.rrset.from_text(WEB, 5, "IN", "A", "10.96.0.10"))
    parsed = roundtrip(
        cluster_response(
            query("_http._tcp.web.ns.", SRV),
            cluster_name=dns.name.from_text(srv_name),
            answer=CachedAnswer(answer, 5),
        )
    )
    assert owner_texts(parsed) == ["_http._tcp.web.ns."]
    assert parsed.answer[0][0].target.to_text() == WEB
    assert [r.name.to_text() for r in parsed.additional] == [WEB]


# -- sizes and framing -------------------------------------------------------


def big_answer(q: dns.message.Message, count: int = 40) -> dns.message.Message:
    addresses = [f"10.244.0.{i}" for i in range(1, count + 1)]
    name = "db.ns.svc.cluster.local."
    return cluster_response(
        q,
        cluster_name=dns.name.from_text(name),
        answer=CachedAnswer(cluster_answer(name, *addresses), 5),
    )


def test_too_big_for_udp_sets_tc_and_sends_no_records() -> None:
    q = query("db.ns.")
    wire = encode_response(big_answer(q), max_size=udp_size_limit(q, max_udp_payload=1232))
    assert len(wire) <= 512
    parsed = dns.message.from_wire(wire)
    assert parsed.flags & dns.flags.TC
    assert parsed.answer == [] and parsed.question == q.question and parsed.id == q.id

    full = dns.message.from_wire(encode_response(big_answer(q), max_size=65535))
    assert not full.flags & dns.flags.TC
    assert len(full.answer[0]) == 40


def test_edns_clients_get_bigger_udp_answers() -> None:
    q = query("db.ns.", edns=0, payload=4096)
    assert udp_size_limit(q, max_udp_payload=1232) == 1232
    parsed = dns.message.from_wire(encode_response(big_answer(q), max_size=1232))
    assert not parsed.flags & dns.flags.TC and len(parsed.answer[0]) == 40
    assert parsed.edns == 0 and parsed.payload == 1232
    assert udp_size_limit(query("x.", edns=0, payload=256), max_udp_payload=1232) == 512
    assert udp_size_limit(query("x.", edns=0, payload=1000), max_udp_payload=1232) == 1000
    assert udp_size_limit(query("x."), max_udp_payload=1232) == 512


def test_additional_records_are_dropped_before_truncating() -> None:
    q = query("web.ns.")
    response = big_answer(q, count=5)
    response.additional = [
        dns.rrset.from_text_list(f"pad{i}.example.", 5, "IN", "TXT", ["x" * 200]) for i in range(3)
    ]
    parsed = dns.message.from_wire(encode_response(response, max_size=512))
    assert not parsed.flags & dns.flags.TC
    assert len(parsed.answer[0]) == 5 and parsed.additional == []


def test_take_frames() -> None:
    buffer = bytearray(b"\x00\x03abc\x00\x00\x00\x02d")
    assert take_frames(buffer) == [b"abc", b""]
    assert buffer == b"\x00\x02d"
    buffer += b"e\x00"
    assert take_frames(buffer) == [b"de"]
    assert buffer == b"\x00"
    assert take_frames(buffer) == [] and buffer == b"\x00"


# -- Resolver with fakes -----------------------------------------------------


class FakeCluster:
    """Answers from a table; also raises, returns None or hangs on request."""

    def __init__(self, table: dict[tuple[str, int], object] | None = None) -> None:
        self.table = table or {}
        self.calls: list[tuple[str, int]] = []
        self.hang = asyncio.Event()

    async def __call__(self, name: str, qtype: int) -> dns.message.Message | None:
        self.calls.append((name, qtype))
        entry = self.table.get((name, qtype), "nxdomain")
        if entry == "nxdomain":
            return cluster_answer(
                name, qtype=dns.rdatatype.RdataType.make(qtype), rcode=NXDOMAIN, soa=True
            )
        if entry == "hang":
            await self.hang.wait()
            return None
        if isinstance(entry, BaseException):
            raise entry
        assert entry is None or isinstance(entry, dns.message.Message)
        return entry


class FakeUpstream:
    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bool]] = []
        self.error: BaseException | None = None
        self.hang = False

    async def __call__(self, wire: bytes, tcp: bool) -> bytes:
        self.calls.append((wire, tcp))
        if self.error is not None:
            raise self.error
        if self.hang:
            await asyncio.Event().wait()
        return b"upstream:" + wire


class Observer:
    """What `status --flows` is told: names of cluster answers, failed questions."""

    def __init__(self) -> None:
        self.answered: list[tuple[str, list[IPv4Address]]] = []
        self.failed: list[tuple[str, str]] = []

    def dns_answered(self, name: str, addresses: Sequence[IPv4Address]) -> None:
        self.answered.append((name, list(addresses)))

    def dns_failed(self, question: str, message: str) -> None:
        self.failed.append((question, message))


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def make_resolver(
    cluster: FakeCluster,
    upstream: FakeUpstream | None = None,
    *,
    rules: NameRules = RULES,
    seen: list[list[IPv4Address]] | None = None,
    clock: Clock | None = None,
    settings: DnsSettings = FAST,
    observer: Observer | None = None,
) -> Resolver:
    def subnets() -> Sequence[IPv4Network]:
        return SUBNETS

    return Resolver(
        rules=lambda: rules,
        cluster_subnets=subnets,
        cluster_lookup=cluster,
        forward=upstream or FakeUpstream(),
        on_cluster_answer=seen.append if seen is not None else None,
        observer=observer,
        settings=settings,
        clock=clock or Clock(),
    )


async def ask(
    resolver: Resolver, q: dns.message.Message, *, tcp: bool = False
) -> dns.message.Message:
    wire = await resolver.answer(q.to_wire(), tcp=tcp)
    assert wire is not None
    return dns.message.from_wire(wire)


async def test_search_namespaces_are_tried_in_order() -> None:
    b_web = "web.b.svc.cluster.local."
    cluster = FakeCluster({(b_web, A): cluster_answer(b_web, "10.96.3.3")})
    resolver = make_resolver(cluster)
    answer = await ask(resolver, query("web."))
    assert cluster.calls == [("web.a.svc.cluster.local.", A), (b_web, A)]
    assert owner_texts(answer) == ["web."]
    assert answer.answer[0][0].address == "10.96.3.3"


async def test_a_failing_namespace_does_not_hide_the_next_one() -> None:
    b_web = "web.b.svc.cluster.local."
    cluster = FakeCluster(
        {
            ("web.a.svc.cluster.local.", A): ConnectionError("tunnel down"),
            (b_web, A): cluster_answer(b_web, "10.96.3.3"),
        }
    )
    answer = await ask(make_resolver(cluster), query("web."))
    assert answer.answer[0][0].address == "10.96.3.3"


@pytest.mark.parametrize("entry", ["nxdomain", None, OSError("no tunnel"), "servfail", "hang"])
async def test_cluster_then_upstream_falls_back_with_the_original_bytes(entry: object) -> None:
    if entry == "servfail":
        entry = cluster_answer(WEB, rcode=SERVFAIL)
    cluster = FakeCluster({(WEB, A): entry})
    upstream = FakeUpstream()
    q = query("web.ns.", edns=0)
    wire = q.to_wire()
    for tcp in (False, True):
        assert await make_resolver(cluster, upstream).answer(wire, tcp=tcp) == b"upstream:" + wire
    assert upstream.calls == [(wire, False), (wire, True)]
    cluster.hang.set()


async def test_cluster_names_without_records_of_the_type_answer_nodata() -> None:
    # The cluster has service "web" in "ns": MX gets NODATA from the cluster,
    # not the public domain's MX next to the cluster's addresses.
    cluster = FakeCluster({(WEB, MX): cluster_answer(WEB, qtype=MX)})
    upstream = FakeUpstream()
    answer = await ask(make_resolver(cluster, upstream), query("web.ns.", MX))
    assert answer.rcode() == NOERROR and answer.answer == []
    assert upstream.calls == []


@pytest.mark.parametrize("entry", [None, RuntimeError("boom"), "servfail", "hang"])
async def test_cluster_failures_are_servfail_for_cluster_names(entry: object) -> None:
    if entry == "servfail":
        entry = cluster_answer(WEB, rcode=SERVFAIL)
    cluster = FakeCluster({(WEB, A): entry})
    upstream = FakeUpstream()
    answer = await ask(make_resolver(cluster, upstream), query("web.ns.svc."))
    assert answer.rcode() == SERVFAIL and answer.id == 4242
    assert upstream.calls == []
    cluster.hang.set()


async def test_cluster_nxdomain_is_final_for_cluster_names() -> None:
    upstream = FakeUpstream()
    answer = await ask(make_resolver(FakeCluster(), upstream), query("nope.ns.svc."))
    assert answer.rcode() == NXDOMAIN and upstream.calls == []


async def test_a_and_aaaa_share_one_cluster_lookup_and_the_cache() -> None:
    cluster = FakeCluster({(WEB, A): cluster_answer(WEB, "10.96.0.10", ttl=30)})
    clock = Clock()
    seen: list[list[IPv4Address]] = []
    resolver = make_resolver(cluster, clock=clock, seen=seen)
    a, aaaa = await asyncio.gather(
        ask(resolver, query("web.ns.")), ask(resolver, query("web.ns.", AAAA))
    )
    assert cluster.calls == [(WEB, A)]
    assert a.answer[0].ttl == 5  # capped
    assert aaaa.rcode() == NOERROR and aaaa.answer == []
    assert seen == [[IPv4Address("10.96.0.10")]]

    clock.now = 2.5
    again = await ask(resolver, query("web.ns.svc."))
    assert cluster.calls == [(WEB, A)] and again.answer[0].ttl == 2
    assert seen == [[IPv4Address("10.96.0.10")]]  # reported once per cluster answer

    clock.now = 5.0
    await ask(resolver, query("web.ns."))
    assert cluster.calls == [(WEB, A), (WEB, A)]
    assert len(seen) == 2


async def test_a_failing_route_callback_does_not_lose_the_answer() -> None:
    def explode(addresses: list[IPv4Address]) -> None:
        raise RuntimeError("no route for you")

    resolver = Resolver(
        rules=lambda: RULES,
        cluster_subnets=lambda: SUBNETS,
        cluster_lookup=FakeCluster({(WEB, A): cluster_answer(WEB, "10.96.0.10")}),
        forward=FakeUpstream(),
        on_cluster_answer=explode,
    )
    assert (await ask(resolver, query("web.ns."))).answer[0][0].address == "10.96.0.10"


async def test_records_of_other_classes_do_not_fail_the_answer() -> None:
    answer = cluster_answer(WEB, "10.96.0.10")
    answer.answer.append(ODD_CLASS_A)
    seen: list[list[IPv4Address]] = []
    reply = await ask(make_resolver(FakeCluster({(WEB, A): answer}), seen=seen), query("web.ns."))
    assert reply.rcode() == NOERROR
    assert seen == [[IPv4Address("10.96.0.10")]]


async def test_never_cluster_names_skip_the_cluster() -> None:
    cluster = FakeCluster()
    upstream = FakeUpstream()
    resolver = make_resolver(cluster, upstream)
    for name in ("wpad.", "wpad.ns.", "www.example.test.", "1.0.0.10.in-addr.arpa."):
        wire = query(name).to_wire()
        assert await resolver.answer(wire, tcp=False) == b"upstream:" + wire
    assert cluster.calls == []


async def test_rules_are_read_for_every_query() -> None:
    rules = [NameRules()]
    cluster = FakeCluster({(WEB, A): cluster_answer(WEB, "10.96.0.10")})
    upstream = FakeUpstream()
    resolver = Resolver(
        rules=lambda: rules[0],
        cluster_subnets=lambda: SUBNETS,
        cluster_lookup=cluster,
        forward=upstream,
    )
    await resolver.answer(query("web.ns.").to_wire(), tcp=False)
    assert len(upstream.calls) == 1 and cluster.calls == []
    rules[0] = RULES  # namespace "ns" appeared
    assert (await ask(resolver, query("web.ns."))).answer[0][0].address == "10.96.0.10"


@pytest.mark.parametrize("failure", ["error", "hang"])
async def test_upstream_failure_is_servfail(failure: str) -> None:
    upstream = FakeUpstream()
    if failure == "error":
        upstream.error = ConnectionRefusedError()
    else:
        upstream.hang = True
    answer = await ask(make_resolver(FakeCluster(), upstream), query("www.example.test."), tcp=True)
    assert answer.rcode() == SERVFAIL and answer.id == 4242


async def test_questions_too_big_for_udp_get_a_bare_header_with_tc() -> None:
    # Found by review while writing the DNS fuzzer: a query may ask several questions, up
    # to the size of a datagram; the SERVFAIL for one could not be made small enough for
    # UDP, and answer() raised instead of answering.
    q = query("www.example.test.")
    for i in range(8):
        q.question.append(query(f"{'q' * 60}.{'x' * 60}.n{i}.example.test.").question[0])
    wire = q.to_wire()
    assert len(wire) > 512
    upstream = FakeUpstream()
    upstream.error = ConnectionRefusedError()
    resolver = make_resolver(FakeCluster(), upstream)
    udp = await resolver.answer(wire, tcp=False)
    assert udp is not None and len(udp) <= 512
    parsed = dns.message.from_wire(udp)
    assert parsed.id == 4242 and parsed.rcode() == SERVFAIL
    assert parsed.flags & dns.flags.TC and parsed.question == []
    over_tcp = await ask(resolver, q, tcp=True)  # where the client asks again
    assert over_tcp.rcode() == SERVFAIL and len(over_tcp.question) == 9
    assert not over_tcp.flags & dns.flags.TC


async def test_unexpected_errors_become_servfail() -> None:
    def broken_rules() -> NameRules:
        raise KeyError("bug")

    resolver = Resolver(
        rules=broken_rules,
        cluster_subnets=lambda: SUBNETS,
        cluster_lookup=FakeCluster(),
        forward=FakeUpstream(),
    )
    assert (await ask(resolver, query("web.ns."))).rcode() == SERVFAIL


async def test_close_cancels_lookups_in_flight() -> None:
    cluster = FakeCluster({(WEB, A): "hang"})
    resolver = make_resolver(cluster, settings=DnsSettings(cluster_timeout=30))
    pending = asyncio.create_task(resolver.answer(query("web.ns.svc.").to_wire(), tcp=False))
    await until(lambda: cluster.calls, "the lookup to reach the cluster", timeout=5)
    lookups = [t for t in asyncio.all_tasks() if t.get_name().startswith("dns-cluster-lookup")]
    assert [t.get_name() for t in lookups] == [f"dns-cluster-lookup {WEB} A"]
    await resolver.close()
    assert lookups[0].cancelled()
    # The query waiting on the lookup sees the cancellation as a failed lookup.
    reply = await pending
    assert reply is not None and dns.message.from_wire(reply).rcode() == SERVFAIL


# -- what `status --flows` is told ------------------------------------------------


async def test_the_observer_learns_the_name_each_program_asked_for_an_address() -> None:
    cluster = FakeCluster({(WEB, A): cluster_answer(WEB, "10.96.0.10", ttl=30)})
    observer = Observer()
    resolver = make_resolver(cluster, observer=observer)
    await ask(resolver, query("web.ns."))
    await ask(resolver, query("web.ns.svc."))  # from the cache, still a program's lookup
    await ask(resolver, query("web.ns.", AAAA))  # no IPv4 address: nothing to learn
    await ask(resolver, query("nope.ns.svc."))  # NXDOMAIN is an answer, not a failure
    address = [IPv4Address("10.96.0.10")]
    assert observer.answered == [("web.ns", address), ("web.ns.svc", address)]
    assert observer.failed == []


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        (None, "web.ns.svc.cluster.local: the traffic manager could not be asked"),
        (
            ClusterLookupFailed("not connected to the traffic manager"),
            "web.ns.svc.cluster.local: not connected to the traffic manager",
        ),
        (RuntimeError(), "web.ns.svc.cluster.local: RuntimeError"),
        ("servfail", "web.ns.svc.cluster.local: answered SERVFAIL"),
    ],
)
async def test_a_failed_cluster_name_is_told_with_the_reason(entry: object, why: str) -> None:
    if entry == "servfail":
        entry = cluster_answer(WEB, rcode=SERVFAIL)
    observer = Observer()
    resolver = make_resolver(FakeCluster({(WEB, A): entry}), observer=observer)
    assert (await ask(resolver, query("web.ns.svc."))).rcode() == SERVFAIL
    assert observer.failed == [("web.ns.svc A", f"the cluster: {why}")]


async def test_a_cluster_that_does_not_answer_in_time_is_told() -> None:
    cluster = FakeCluster({(WEB, A): "hang"})
    observer = Observer()
    await ask(make_resolver(cluster, observer=observer), query("web.ns.svc."))
    ((question, message),) = observer.failed
    assert question == "web.ns.svc A"
    assert message.startswith("the cluster: ") and message.endswith("no answer within 0.1 s")
    cluster.hang.set()


async def test_a_fallback_upstream_after_a_cluster_failure_is_told_but_not_after_nxdomain() -> None:
    observer = Observer()
    failing = FakeCluster({(WEB, A): ClusterLookupFailed("reconnecting")})
    await make_resolver(failing, observer=observer).answer(query("web.ns.").to_wire(), tcp=False)
    assert observer.failed == [
        (
            "web.ns A",
            "the cluster: web.ns.svc.cluster.local: reconnecting; asked the laptop's nameservers",
        )
    ]
    observer.failed.clear()
    await make_resolver(FakeCluster(), observer=observer).answer(
        query("web.ns.").to_wire(), tcp=False
    )
    assert observer.failed == []


@pytest.mark.parametrize(
    ("failure", "why"),
    [
        (NoUpstreamAnswer("no nameserver answered (192.0.2.53: TimeoutError)"),
         "no nameserver answered (192.0.2.53: TimeoutError)"),
        (ConnectionRefusedError(), "ConnectionRefusedError"),
        ("hang", "no answer in time"),
    ],
)  # fmt: skip
async def test_upstream_failures_are_told(failure: object, why: str) -> None:
    upstream = FakeUpstream()
    if failure == "hang":
        upstream.hang = True
    else:
        assert isinstance(failure, BaseException)
        upstream.error = failure
    observer = Observer()
    resolver = make_resolver(FakeCluster(), upstream, observer=observer)
    assert (await ask(resolver, query("www.example.test.", MX))).rcode() == SERVFAIL
    assert observer.failed == [("www.example.test MX", f"the laptop's nameservers: {why}")]
