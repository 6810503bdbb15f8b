"""DnsServer on 127.0.0.1 with a fake cluster lookup and a real upstream (dnsmasq),
queried by real clients: dnspython, dig, and (in a private network and mount
namespace) glibc's getent and Python's getaddrinfo."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from telepresence.daemon.dns import DnsSettings
from telepresence.daemon.dnsrules import NameRules
from telepresence.daemon.dnsserver import DnsServer
from tests.unit.fakedns import free_port
from tests.unit.waiting import until

A = dns.rdatatype.A
AAAA = dns.rdatatype.AAAA
NOERROR = dns.rcode.NOERROR
NXDOMAIN = dns.rcode.NXDOMAIN
SERVFAIL = dns.rcode.SERVFAIL

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
DIG = shutil.which("dig")
HOST = "127.0.0.1"
WEB = "web.ns.svc.cluster.local."
DB = "db.ns.svc.cluster.local."
DB_ADDRESSES = [f"10.244.0.{i}" for i in range(1, 41)]
BROKEN = "broken.ns.svc.cluster.local."
SLOW = "slow.ns.svc.cluster.local."
SUBNETS = (IPv4Network("10.96.0.0/12"), IPv4Network("10.244.0.0/16"))
SOA_TEXT = "ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5"
UPSTREAM_RECORDS = {
    "www.example.test": "192.0.2.44",
    "printer": "192.0.2.50",
    "wpad": "192.0.2.60",
    "mail.ns": "192.0.2.70",
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, int]]:
    """dnsmasq on 127.0.0.1, answering UPSTREAM_RECORDS and NXDOMAIN for the rest."""
    port = free_port()
    records = [f"--host-record={name},{addr}" for name, addr in UPSTREAM_RECORDS.items()]
    proc = subprocess.Popen(
        [DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts",
         f"--listen-address={HOST}", "--bind-interfaces", f"--port={port}",
         *records, "--local=/#/", "--user=root", "--pid-file="],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        probe = dns.message.make_query("www.example.test.", A)
        deadline = time.monotonic() + 5
        while True:
            if proc.poll() is not None:
                assert proc.stderr is not None
                pytest.fail(f"dnsmasq exited: {proc.stderr.read().decode()}")
            try:
                dns.query.udp(probe, HOST, port=port, timeout=0.1)
                break
            except dns.exception.Timeout:
                if time.monotonic() > deadline:
                    pytest.fail("dnsmasq did not answer within 5 s")
        yield (HOST, port)
    finally:
        proc.terminate()
        proc.wait(5)


def cluster_answer(
    name: str, *addresses: str, qtype: dns.rdatatype.RdataType = A, rcode: dns.rcode.Rcode = NOERROR
) -> dns.message.Message:
    response = dns.message.make_response(dns.message.make_query(name, qtype))
    response.set_rcode(rcode)
    if addresses:
        response.answer.append(dns.rrset.from_text_list(name, 5, "IN", "A", list(addresses)))
    if rcode == NXDOMAIN:
        response.authority.append(dns.rrset.from_text("cluster.local.", 5, "IN", "SOA", SOA_TEXT))
    return response


@dataclass
class FakeCluster:
    """The cluster's resolver as the tunnel would report it."""

    calls: list[tuple[str, int]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, name: str, qtype: int) -> dns.message.Message | None:
        self.calls.append((name, qtype))
        if name == BROKEN:
            raise ConnectionError("tunnel is down")
        if name == SLOW:
            await self.release.wait()
        if qtype == A and name == WEB:
            return cluster_answer(name, "10.96.0.10")
        if qtype == A and name == DB:
            return cluster_answer(name, *DB_ADDRESSES)
        if name in (WEB, DB):
            return cluster_answer(name, qtype=dns.rdatatype.RdataType.make(qtype))
        return cluster_answer(name, qtype=dns.rdatatype.RdataType.make(qtype), rcode=NXDOMAIN)


@dataclass
class Harness:
    server: DnsServer
    cluster: FakeCluster
    rules: list[NameRules]
    routes: list[list[IPv4Address]]
    upstream_sockets: list[str]

    @property
    def port(self) -> int:
        return self.server.port


@contextlib.asynccontextmanager
async def serving(
    upstream: tuple[str, int],
    *,
    rules: NameRules | None = None,
    settings: DnsSettings | None = None,
) -> AsyncIterator[Harness]:
    cluster = FakeCluster()
    holder = [rules or NameRules(mapped_namespaces=frozenset({"ns"}))]
    routes: list[list[IPv4Address]] = []
    kinds: list[str] = []

    async def plain_socket(kind: str) -> socket.socket:
        kinds.append(kind)
        return socket.socket(
            socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
        )

    server = DnsServer(
        rules=lambda: holder[0],
        cluster_subnets=lambda: SUBNETS,
        cluster_lookup=cluster,
        upstreams=[upstream],
        upstream_socket=plain_socket,
        on_cluster_answer=routes.append,
        settings=settings or DnsSettings(),
    )
    async with server:
        assert server.port > 0
        yield Harness(server, cluster, holder, routes, kinds)


async def udp(port: int, q: dns.message.Message) -> dns.message.Message:
    return await dns.asyncquery.udp(q, HOST, port=port, timeout=3)


async def tcp(port: int, q: dns.message.Message) -> dns.message.Message:
    return await dns.asyncquery.tcp(q, HOST, port=port, timeout=3)


async def raw_udp(port: int, wire: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((HOST, port))
        await loop.sock_sendall(sock, wire)
        async with asyncio.timeout(3):
            return await loop.sock_recv(sock, 65535)


async def raw_tcp(port: int, wire: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(struct.pack("!H", len(wire)) + wire)
        async with asyncio.timeout(3):
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(size)
    finally:
        writer.close()


@dataclass
class Dig:
    status: str
    flags: set[str]
    answers: list[tuple[str, str, str]]  # owner, type, data
    text: str


async def dig(port: int, name: str, *options: str) -> Dig:
    assert DIG is not None, "dig is not installed"
    proc = await asyncio.create_subprocess_exec(
        DIG, f"@{HOST}", "-p", str(port), "+time=3", "+tries=1", name, *options,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(10):
        out, err = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, text + err.decode()
    warnings = [
        line
        for line in text.splitlines()
        if "WARNING" in line.upper() and "Multicast DNS" not in line  # about .local itself
    ]
    assert not warnings and "mismatch" not in text.lower(), text
    header = re.search(r"status: (\w+),", text)
    flags = re.search(r";; flags: ([a-z ]*);", text)
    assert header and flags, text
    section = (
        text.split(";; ANSWER SECTION:\n")[1].split("\n\n")[0] if "ANSWER SECTION" in text else ""
    )
    answers = [
        (parts[0], parts[3], parts[4])
        for parts in (line.split() for line in section.splitlines())
        if len(parts) >= 5
    ]
    return Dig(header.group(1), set(flags.group(1).split()), answers, text)


def addresses(message: dns.message.Message) -> list[str]:
    return sorted(r.address for rrset in message.answer if rrset.rdtype == A for r in rrset)


def owners(message: dns.message.Message) -> list[str]:
    return [rrset.name.to_text() for rrset in message.answer]


# -- cluster names -----------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["web.ns.svc.cluster.local.", "web.ns.svc.", "web.ns.", "WeB.Ns.SvC."]
)
async def test_cluster_names_answer_for_the_name_asked(
    upstream: tuple[str, int], name: str
) -> None:
    async with serving(upstream) as h:
        for ask in (udp, tcp):
            answer = await ask(h.port, dns.message.make_query(name, A))
            assert answer.rcode() == NOERROR
            assert owners(answer) == [name]  # exactly as asked, case included
            assert addresses(answer) == ["10.96.0.10"]
        shown = await dig(h.port, name)
        assert shown.status == "NOERROR" and {"qr", "rd", "ra"} <= shown.flags
        assert shown.answers == [(name, "A", "10.96.0.10")]
        assert h.routes[0] == [IPv4Address("10.96.0.10")]
        assert h.upstream_sockets == []


async def test_aaaa_for_an_ipv4_cluster_name_is_nodata(upstream: tuple[str, int]) -> None:
    async with serving(upstream) as h:
        for ask in (udp, tcp):
            answer = await ask(h.port, dns.message.make_query("web.ns.", AAAA))
            assert answer.rcode() == NOERROR and answer.answer == []
        shown = await dig(h.port, "web.ns.svc", "AAAA")
        assert shown.status == "NOERROR" and shown.answers == []
        missing = await dig(h.port, "nope.ns.svc", "AAAA")
        assert missing.status == "NXDOMAIN"
        assert h.upstream_sockets == []


async def test_single_label_names_on_the_search_path(upstream: tuple[str, int]) -> None:
    rules = NameRules(mapped_namespaces=frozenset({"ns"}), search_namespaces=("ns",))
    async with serving(upstream, rules=rules) as h:
        answer = await udp(h.port, dns.message.make_query("web.", A))
        assert owners(answer) == ["web."] and addresses(answer) == ["10.96.0.10"]

        # The cluster has no service "printer": the laptop's own answer.
        q = dns.message.make_query("printer.", A)
        direct = await dns.asyncquery.udp(q, upstream[0], port=upstream[1], timeout=3)
        assert await raw_udp(h.port, q.to_wire()) == direct.to_wire()
        assert ("printer.ns.svc.cluster.local.", A) in h.cluster.calls
        shown = await dig(h.port, "printer")
        assert shown.answers == [("printer.", "A", "192.0.2.50")]


@pytest.mark.parametrize("edns", [-1, 0])
async def test_other_names_are_relayed_byte_for_byte(upstream: tuple[str, int], edns: int) -> None:
    async with serving(upstream) as h:
        q = dns.message.make_query("www.example.test.", A, use_edns=edns)
        wire = q.to_wire()
        direct = await dns.asyncquery.udp(q, upstream[0], port=upstream[1], timeout=3)
        assert addresses(direct) == ["192.0.2.44"]
        assert await raw_udp(h.port, wire) == direct.to_wire()
        assert await raw_tcp(h.port, wire) == direct.to_wire()
        assert h.upstream_sockets == ["udp", "tcp"]  # only the sockets we were given
        shown = await dig(h.port, "www.example.test")
        assert shown.answers == [("www.example.test.", "A", "192.0.2.44")]
        missing = await dig(h.port, "nowhere.example.test", "+tcp")
        assert missing.status == "NXDOMAIN"
        assert h.cluster.calls == []


async def test_wpad_never_reaches_the_cluster(upstream: tuple[str, int]) -> None:
    rules = NameRules(mapped_namespaces=frozenset({"ns"}), search_namespaces=("ns",))
    async with serving(upstream, rules=rules) as h:
        answer = await udp(h.port, dns.message.make_query("wpad.", A))
        assert addresses(answer) == ["192.0.2.60"]
        shown = await dig(h.port, "wpad.ns")
        assert shown.status == "NXDOMAIN"  # dnsmasq's answer, not the cluster's
        assert h.cluster.calls == []


async def test_large_answers_truncate_over_udp_and_complete_over_tcp(
    upstream: tuple[str, int],
) -> None:
    async with serving(upstream) as h:
        q = dns.message.make_query("db.ns.", A)
        small = await udp(h.port, q)
        assert small.flags & dns.flags.TC and small.answer == []
        full = await tcp(h.port, q)
        assert not full.flags & dns.flags.TC
        assert owners(full) == ["db.ns."] and addresses(full) == sorted(DB_ADDRESSES)

        flagged = await dig(h.port, "db.ns", "+noedns", "+ignore")
        assert "tc" in flagged.flags and flagged.answers == []
        retried = await dig(h.port, "db.ns", "+noedns")  # dig retries over TCP itself
        assert sorted(a[2] for a in retried.answers) == sorted(DB_ADDRESSES)
        assert "tc" not in retried.flags
        # An EDNS client that accepts 1232 bytes gets it all over UDP.
        edns = await dig(h.port, "db.ns", "+bufsize=1232")
        assert len(edns.answers) == 40 and "tc" not in edns.flags
        assert h.cluster.calls == [(DB, A)]  # one lookup, the rest from the cache


async def test_cluster_failures(upstream: tuple[str, int]) -> None:
    async with serving(upstream) as h:
        for ask in (udp, tcp):
            answer = await ask(h.port, dns.message.make_query("broken.ns.svc.", A))
            assert answer.rcode() == SERVFAIL
        assert (await dig(h.port, "broken.ns.svc")).status == "SERVFAIL"

    # A name that may be the laptop's own falls back upstream when the cluster fails.
    async with serving(upstream) as h:
        h.cluster.calls.clear()
        answer = await udp(h.port, dns.message.make_query("mail.ns.", A))
        assert addresses(answer) == ["192.0.2.70"]
        assert h.cluster.calls == [("mail.ns.svc.cluster.local.", A)]


def _black_hole_and_mute() -> tuple[socket.socket, socket.socket]:
    """A UDP socket that swallows and a TCP listener that never answers, on one port: a
    free UDP port's TCP twin may be taken by another process, so try a few."""
    for _ in range(20):
        black_hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        black_hole.bind((HOST, 0))
        mute = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            mute.bind((HOST, black_hole.getsockname()[1]))
        except OSError:
            black_hole.close()
            mute.close()
            continue
        mute.listen()
        return black_hole, mute
    raise AssertionError("no port free for both UDP and TCP")


async def test_slow_cluster_and_dead_upstream_give_servfail(upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    black_hole, mute = _black_hole_and_mute()
    with black_hole, mute:
        port = black_hole.getsockname()[1]
        settings = DnsSettings(cluster_timeout=0.1, upstream_timeout=0.1)
        async with serving((HOST, port), settings=settings) as h:
            started = loop.time()
            for ask in (udp, tcp):
                answer = await ask(h.port, dns.message.make_query("www.example.test.", A))
                assert answer.rcode() == SERVFAIL
                answer = await ask(h.port, dns.message.make_query("slow.ns.svc.", A))
                assert answer.rcode() == SERVFAIL
            assert loop.time() - started < 2
            h.cluster.release.set()


async def test_malformed_queries(upstream: tuple[str, int]) -> None:
    async with serving(upstream) as h:
        junk = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0) + b"\x07truncat"
        for send in (raw_udp, raw_tcp):
            reply = dns.message.from_wire(await send(h.port, junk))
            assert reply.id == 0xBEEF and reply.rcode() == dns.rcode.FORMERR

        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect((HOST, h.port))
            # No header to answer: dropped.  The next datagram we receive is
            # the answer to the valid query sent after it.
            await loop.sock_sendall(sock, b"\x01")
            await loop.sock_sendall(sock, dns.message.make_query("web.ns.", A).to_wire())
            async with asyncio.timeout(3):
                reply = dns.message.from_wire(await loop.sock_recv(sock, 65535))
            assert addresses(reply) == ["10.96.0.10"]


async def test_tcp_connections_carry_pipelined_queries(upstream: tuple[str, int]) -> None:
    async with serving(upstream) as h:
        queries = [
            dns.message.make_query(name, A)
            for name in ("web.ns.", "www.example.test.", "db.ns.", "nope.ns.svc.")
        ]
        reader, writer = await asyncio.open_connection(HOST, h.port)
        writer.write(
            b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries))
        )
        replies = {}
        async with asyncio.timeout(3):
            for _ in queries:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                reply = dns.message.from_wire(await reader.readexactly(size))
                replies[reply.id] = reply
        writer.close()
        web, www, db, nope = (replies[q.id] for q in queries)
        assert addresses(web) == ["10.96.0.10"] and addresses(www) == ["192.0.2.44"]
        assert len(addresses(db)) == 40 and nope.rcode() == NXDOMAIN


async def test_close_cancels_queries_and_releases_the_port(upstream: tuple[str, int]) -> None:
    async with serving(upstream) as h:
        port = h.port
        pending = asyncio.create_task(udp(port, dns.message.make_query("slow.ns.svc.", A)))
        await until(lambda: (SLOW, A) in h.cluster.calls, "the slow lookup", timeout=3)
        names = {t.get_name() for t in asyncio.all_tasks()}
        assert any(n.startswith("dns-udp-query-") for n in names)
        assert f"dns-cluster-lookup {SLOW} A" in names
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert not any(n.startswith("dns-") for n in names)
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, port))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))


async def test_fixed_port_and_double_start(upstream: tuple[str, int]) -> None:
    port = free_port()

    async def lookup(name: str, qtype: int) -> dns.message.Message | None:
        return None

    async def sock(kind: str) -> socket.socket:
        return socket.socket()

    server = DnsServer(
        rules=NameRules,
        cluster_subnets=lambda: SUBNETS,
        cluster_lookup=lookup,
        upstreams=[upstream],
        upstream_socket=sock,
        port=port,
    )
    assert await server.start() == port == server.port
    with pytest.raises(RuntimeError):
        await server.start()
    await server.close()
    await server.close()  # idempotent


# -- glibc -------------------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import asyncio, json, socket, sys
    import dns.message, dns.rrset
    from ipaddress import IPv4Network
    from telepresence.daemon.dns import DnsSettings
    from telepresence.daemon.dnsserver import DnsServer
    from telepresence.daemon.dnsrules import NameRules

    ADDRESSES = {"web.ns.svc.cluster.local.": ["10.96.0.10"],
                 "db.ns.svc.cluster.local.": [f"10.244.0.{i}" for i in range(1, 41)]}

    async def lookup(name, qtype):
        response = dns.message.make_response(dns.message.make_query(name, qtype))
        if name not in ADDRESSES:
            response.set_rcode(3)
        elif qtype == 1:
            response.answer.append(dns.rrset.from_text_list(name, 5, "IN", "A", ADDRESSES[name]))
        return response

    async def plain(kind):
        return socket.socket(type=socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)

    async def run(*argv):
        proc = await asyncio.create_subprocess_exec(*argv, stdout=-1, stderr=-1)
        out, _ = await proc.communicate()
        return proc.returncode, out.decode()

    async def main():
        server = DnsServer(
            rules=lambda: NameRules(mapped_namespaces=frozenset({"ns"}), search_namespaces=("ns",)),
            cluster_subnets=lambda: [IPv4Network("10.96.0.0/12")],
            cluster_lookup=lookup, upstreams=[("127.0.0.1", 1)], upstream_socket=plain,
            port=53, settings=DnsSettings(upstream_timeout=0.5))
        loop = asyncio.get_running_loop()
        async with server:
            result = {
                "hosts": await run("getent", "hosts", "web.ns"),
                "ahosts": await run("getent", "ahosts", "web.ns.svc"),
                "search": await run("getent", "hosts", "web"),
                "large": await run("getent", "hosts", "db.ns"),
                "missing": await run("getent", "hosts", "nope.ns.svc"),
                "python": sorted({a[4][0] for a in await loop.getaddrinfo("web.ns", 80)}),
                "python_large": sorted(
                    {a[4][0] for a in await loop.getaddrinfo("db.ns", 80, family=socket.AF_INET)}
                ),
            }
        json.dump(result, sys.stdout)

    asyncio.run(main())
    """
)


def namespaces_usable() -> bool:
    return (
        os.geteuid() == 0
        and shutil.which("unshare") is not None
        and shutil.which("ip") is not None
        and shutil.which("getent") is not None
    )


def test_glibc_accepts_the_answers(tmp_path: Path) -> None:
    """glibc (getent, getaddrinfo) in a private network and mount namespace whose
    /etc/resolv.conf points at the server on 127.0.0.1:53; the real files and
    network are untouched."""
    if not namespaces_usable():
        pytest.fail("needs root with unshare, ip and getent: run the tests as root")
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\nsearch ns.svc.cluster.local\n")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    (tmp_path / "probe.py").write_text(PROBE)
    script = (
        "ip link set lo up"
        f" && mount --bind {tmp_path / 'resolv.conf'} /etc/resolv.conf"
        f" && mount --bind {tmp_path / 'hosts'} /etc/hosts"
        f" && exec {sys.executable} {tmp_path / 'probe.py'}"
    )
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(
        ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["hosts"] == [0, "10.96.0.10      web.ns\n"]
    assert result["ahosts"][0] == 0 and "10.96.0.10" in result["ahosts"][1]
    assert result["search"][0] == 0 and result["search"][1].startswith("10.96.0.10 ")
    code, out = result["large"]
    assert code == 0
    assert sorted(line.split()[0] for line in out.splitlines()) == sorted(DB_ADDRESSES)
    assert result["missing"][0] == 2  # "not found"
    assert result["python"] == ["10.96.0.10"]
    assert result["python_large"] == sorted(DB_ADDRESSES)  # TC over UDP, then TCP
