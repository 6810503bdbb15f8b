"""The network helper, for real: sudo-started by an unprivileged fake daemon in the
laptop namespace, with real nftables, a real TUN, real routes and real DNS clients.

Every test compares the laptop namespace's network state (nft ruleset, links,
addresses, routes in all tables, rules, listening sockets) before and after,
and demands it be identical: after Teardown, after the daemon is killed, and
after the helper is killed and ``--cleanup`` runs.  Nothing here touches the
host's own namespace.

The fake daemon (FAKE_DAEMON below) is a stand-in for the user daemon: it
uses the real :class:`telepresence.netfilter.client.HelperClient`, listens
where the redirects point (a transparent-proxy stub that answers with
SO_ORIGINAL_DST, and a DNS stub that answers every A query with
FAKE_ANSWER), reads the TUN, and takes commands as JSON lines on stdin.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devcluster.settings import LAPTOP_USER
from telepresence.netfilter import policy
from telepresence.netfilter.install import LAUNCHER
from tests.e2e.cluster import Cluster, wait_for

#: The root-owned helper `telepresence helper install` put in place for the laptop user
#: (scripts/install-laptop.sh), which sudo runs for it without a password.
HELPER = str(LAUNCHER)
# The helper chooses these itself (netfilter.policy); a request cannot name them.
TUN_PREFIX = policy.TUN_NAME.rstrip("0123456789")
TUN = policy.TUN_NAME
TABLE = policy.NFT_TABLE
FAKE_ANSWER = "10.96.77.77"
RESOLVER = "198.51.100.53"
REAL_ANSWER = "198.51.100.2"  # what the laptop's dnsmasq says for www.example.test
MARK = policy.MARK
#: Held by tests that start a session in the laptop namespace (see the `laptop` fixture).
JOURNALS = Path("/var/lib/telepresence")
LOCK = Path("/run/lock/telepresence-e2e-laptop-session.lock")

FAKE_DAEMON = r"""
import asyncio, json, os, socket, struct, sys, tempfile
from pathlib import Path

import dns.message, dns.rrset

from telepresence.netfilter.client import HelperClient, HelperError

HELPER, FAKE_ANSWER = sys.argv[1], sys.argv[2]
SO_ORIGINAL_DST = 80


def emit(**event):
    print(json.dumps(event), flush=True)


def answer(wire):
    query = dns.message.from_wire(wire)
    response = dns.message.make_response(query)
    q = query.question[0]
    emit(event="dns_query", name=q.name.to_text(), rdtype=q.rdtype)
    if q.rdtype == 1:
        response.answer.append(dns.rrset.from_text(q.name, 5, "IN", "A", FAKE_ANSWER))
    return response.to_wire()


class DnsUdp(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(answer(data), addr)


async def dns_tcp(reader, writer):
    size = struct.unpack("!H", await reader.readexactly(2))[0]
    reply = answer(await reader.readexactly(size))
    writer.write(struct.pack("!H", len(reply)) + reply)
    await writer.drain()
    writer.close()


async def proxy(reader, writer):
    sock = writer.get_extra_info("socket")
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack("!2xH4s8x", raw)
    original = f"{socket.inet_ntoa(addr)}:{port}"
    emit(event="proxied", original=original)
    writer.write(original.encode() + b"\n")
    await writer.drain()
    writer.close()


def read_tun(fd):
    try:
        packet = os.read(fd, 65535)
    except OSError:
        return
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 17:
        return
    ihl = (packet[0] & 15) * 4
    sport, dport = struct.unpack("!HH", packet[ihl : ihl + 4])
    emit(event="tun_packet", src=socket.inet_ntoa(packet[12:16]),
         dst=socket.inet_ntoa(packet[16:20]), sport=sport, dport=dport,
         payload=packet[ihl + 8 :].hex())


def upstream_query(sock, kind):
    wire = dns.message.make_query("www.example.test", "A").to_wire()
    sock.settimeout(5)
    if kind == "udp":
        sock.sendto(wire, ("198.51.100.53", 53))
        data = sock.recv(65535)
    else:
        sock.connect(("198.51.100.53", 53))
        sock.sendall(struct.pack("!H", len(wire)) + wire)
        size = struct.unpack("!H", sock.recv(2, socket.MSG_WAITALL))[0]
        data = sock.recv(size, socket.MSG_WAITALL)
    reply = dns.message.from_wire(data)
    return sorted(r.address for rrset in reply.answer for r in rrset)


async def main():
    loop = asyncio.get_running_loop()
    proxy_server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    proxy_port = proxy_server.sockets[0].getsockname()[1]
    dns_transport, _ = await loop.create_datagram_endpoint(DnsUdp, local_addr=("127.0.0.1", 0))
    dns_port = dns_transport.get_extra_info("sockname")[1]
    dns_server = await asyncio.start_server(dns_tcp, "127.0.0.1", dns_port)
    runtime = Path(tempfile.mkdtemp(prefix="tp-helper-e2e-"))
    try:
        client = await HelperClient.start(command=["sudo", "-n", HELPER], runtime_dir=runtime,
                                          debug=True)
    except HelperError as e:
        emit(event="ready", ok=False, error=str(e))
        return
    emit(event="ready", ok=True, pid=os.getpid(), helper_pid=client.helper_pid,
         proxy_port=proxy_port, dns_port=dns_port, runtime=str(runtime))
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tun_fd = None
    while line := await reader.readline():
        command = json.loads(line)
        cmd = command.pop("cmd")
        try:
            if cmd == "setup":
                command.setdefault("proxy_port", proxy_port)
                command.setdefault("dns_redirect_port", dns_port)
                result = await client.setup(**command)
                tun_fd = result.tun_fd
                os.set_blocking(tun_fd, False)
                loop.add_reader(tun_fd, read_tun, tun_fd)
                reply = {"routed": [str(n) for n in result.routed], "tun": result.tun_name}
            elif cmd == "update":
                reply = {"routed": [str(n) for n in await client.update_subnets(**command)]}
            elif cmd == "add_hosts":
                hosts = await client.add_host_routes(**command)
                reply = {"hosts": [str(h) for h in hosts.hosts], "skipped": hosts.skipped}
            elif cmd == "remove_hosts":
                reply = {"hosts": [str(h) for h in await client.remove_host_routes(**command)]}
            elif cmd == "upstream":
                with await client.upstream_socket(command["kind"]) as sock:
                    mark = sock.getsockopt(socket.SOL_SOCKET, 36)
                    answers = await loop.run_in_executor(None, upstream_query, sock,
                                                         command["kind"])
                reply = {"answers": answers, "mark": mark}
            elif cmd == "status":
                import msgspec
                reply = {"status": msgspec.to_builtins(await client.status())}
            elif cmd == "teardown":
                await client.teardown()
                reply = {"exit": await client.wait_exited()}
            elif cmd == "exit":
                emit(event="reply", cmd=cmd, ok=True)
                os._exit(0)
            else:
                raise ValueError(f"unknown command {cmd}")
        except HelperError as e:
            emit(event="reply", cmd=cmd, ok=False, error=str(e), type=type(e).__name__)
        else:
            emit(event="reply", cmd=cmd, ok=True, **reply)


asyncio.run(main())
"""

# A process of its own in the laptop namespace: connects and prints the first line it gets.
TCP_PROBE = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print(s.makefile().readline().strip())
except OSError as e:
    print(f"error: {e.strerror or e}")
"""

UDP_PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
"""

# The peer-credential check: root listens, the laptop user sudo-starts the helper at it.
WRONG_PEER = r"""
import json, os, shutil, socket, subprocess, sys, tempfile
folder = tempfile.mkdtemp()
path = os.path.join(folder, "helper.sock")
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
listener.listen(1)
os.chmod(folder, 0o755)
proc = subprocess.run(
    ["setpriv", f"--reuid={sys.argv[2]}", f"--regid={sys.argv[2]}", "--init-groups", "--",
     "sudo", "-n", sys.argv[1], "--connect", path],
    capture_output=True, text=True, timeout=30)
listener.settimeout(1)
try:
    conn, _ = listener.accept()
    conn.settimeout(5)
    received = conn.recv(100)
except OSError:
    received = b""
print(json.dumps({"status": proc.returncode, "stderr": proc.stderr, "received": received.hex()}))
shutil.rmtree(folder)
"""


_SNAPSHOT = "; echo '@@@'; ".join(
    [
        "nft list ruleset",
        "ip -j link",
        "ip -j addr",
        "ip -j route show table all",
        "ip -j -6 route show table all",
        "ip -j rule",
        "ss -Hlntup",
    ]
)
_PID = re.compile(r"pid=(\d+)")


@dataclass(frozen=True)
class Snapshot:
    """The laptop namespace's network state, keyed so that objects can be attributed."""

    nft: dict[str, str]  # "table ip NAME" -> its listing
    links: dict[str, Any]  # ifname -> `ip -j link` object
    addrs: dict[str, Any]
    routes: list[Any]  # IPv4 and IPv6, all tables
    rules: list[Any]
    sockets: dict[str, set[int]]  # listening socket (ss line sans users) -> owner pids


def snapshot(cluster: Cluster) -> Snapshot:
    out = cluster.laptop("sh", "-c", _SNAPSHOT, root=True).stdout
    nft, link, addr, route, route6, rule, ss = (part.strip() for part in out.split("@@@\n"))
    tables = {}
    for block in re.split(r"^(?=table )", nft, flags=re.MULTILINE):
        if block.strip():
            header = block.split("{", 1)[0].strip()
            tables[header] = re.sub(r"redirect to :\d+", "redirect to :PORT", block.strip())
    sockets: dict[str, set[int]] = {}
    for line in ss.splitlines():
        key = " ".join(line.split("users:", 1)[0].split())
        sockets.setdefault(key, set()).update(int(p) for p in _PID.findall(line))
    return Snapshot(
        nft=tables,
        links={x["ifname"]: x for x in json.loads(link)},
        addrs={x["ifname"]: x for x in json.loads(addr)},
        routes=[*json.loads(route), *json.loads(route6)],
        rules=json.loads(rule),
        sockets=sockets,
    )


def journals_of(daemon: FakeDaemon) -> list[Path]:
    """What the helper's journal still holds on disk (it must be gone once all is undone)."""
    return list(JOURNALS.glob(f"helper-journal-*-{daemon.helper_pid}.json"))


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


@dataclass
class FakeDaemon:
    """The fake daemon's process and the events it prints."""

    proc: subprocess.Popen[str]
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    seen: list[dict[str, Any]] = field(default_factory=list)
    ready: dict[str, Any] = field(default_factory=dict)
    stderr: list[str] = field(default_factory=list)

    def start_reading(self) -> None:
        def read_stdout() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                try:
                    self.events.put(json.loads(line))
                except json.JSONDecodeError:
                    self.events.put({"event": "garbage", "line": line})

        def read_stderr() -> None:
            assert self.proc.stderr is not None
            self.stderr.extend(self.proc.stderr)

        for target in (read_stdout, read_stderr):
            threading.Thread(target=target, daemon=True).start()

    def wait_event(self, match: Callable[[dict[str, Any]], bool], *, timeout: float = 30) -> Any:
        """The first event (already seen or new) that ``match``es; consumed when found."""

        def check() -> dict[str, Any] | None:
            while True:
                try:
                    self.seen.append(self.events.get_nowait())
                except queue.Empty:
                    break
            for event in self.seen:
                if match(event):
                    self.seen.remove(event)
                    return event
            if self.proc.poll() is not None and self.events.empty():
                raise AssertionError(f"fake daemon exited {self.proc.returncode}: {self.stderr}")
            return None

        return wait_for(check, timeout=timeout, what=f"a fake daemon event; seen {self.seen}")

    def request(self, cmd: str, *, timeout: float = 30, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = self.wait_event(
            lambda e: e.get("event") == "reply" and e.get("cmd") == cmd, timeout=timeout
        )
        return reply

    @property
    def pid(self) -> int:
        return int(self.ready["pid"])

    @property
    def helper_pid(self) -> int:
        return int(self.ready["helper_pid"])

    def exit(self) -> None:
        """Exits without Teardown (the helper must notice the closed connection)."""
        self.request("exit")
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            if self.ready.get("pid") and pid_alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self.ready.get("runtime"):
            shutil.rmtree(self.ready["runtime"], ignore_errors=True)


@dataclass
class Laptop:
    """The laptop namespace during one test: its state before, and the fake daemons started.

    Other engineers' tests may run telepresence sessions in the same namespace
    at the same time.  Comparisons therefore leave out what is provably
    theirs — devices and nft tables that are neither in the baseline nor
    named like ours, and listening sockets of processes that are not ours —
    and everything else must match exactly.
    """

    cluster: Cluster
    script: Path
    baseline: Snapshot
    daemons: list[FakeDaemon] = field(default_factory=list)

    def start_daemon(self) -> FakeDaemon:
        argv = self.cluster.harness_argv(str(self.script), HELPER, FAKE_ANSWER)
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        daemon = FakeDaemon(proc=proc)
        self.daemons.append(daemon)
        daemon.start_reading()
        daemon.ready = daemon.wait_event(lambda e: e.get("event") == "ready")
        assert daemon.ready["ok"], daemon.ready
        return daemon

    def comparable(self, snap: Snapshot, *, with_sockets: bool) -> dict[str, Any]:
        base = self.baseline
        ours = {p for d in self.daemons if d.ready.get("ok") for p in (d.pid, d.helper_pid)}
        foreign = {n for n in snap.links if n not in base.links and not n.startswith(TUN_PREFIX)}
        result: dict[str, Any] = {
            "nft": {
                name: text
                for name, text in snap.nft.items()
                if name in base.nft or name.startswith(f"table ip {TABLE}")
            },
            "links": {n: x for n, x in snap.links.items() if n not in foreign},
            "addrs": {n: x for n, x in snap.addrs.items() if n not in foreign},
            "routes": [r for r in snap.routes if r.get("dev") not in foreign],
            "rules": snap.rules,
        }
        if with_sockets:
            result["sockets"] = {
                key: pids
                for key, pids in snap.sockets.items()
                if key in base.sockets or not pids or pids & ours
            }
        return result

    def state(self, *, with_sockets: bool = True) -> dict[str, Any]:
        return self.comparable(snapshot(self.cluster), with_sockets=with_sockets)

    def wait_restored(
        self, *, expected: Snapshot | None = None, sockets: bool = True, timeout: float = 20
    ) -> None:
        """Waits for the namespace to look exactly as ``expected`` (default: the baseline);
        on timeout, the assertion shows what still differs."""
        reference = self.comparable(expected or self.baseline, with_sockets=sockets)

        def check() -> bool:
            now = self.state(with_sockets=sockets)
            diff = {k: (reference[k], now[k]) for k in reference if reference[k] != now[k]}
            if diff:
                raise AssertionError(f"differs (before, now): {diff}")
            return True

        wait_for(check, timeout=timeout, what="the laptop namespace to be as before")


def setup_args(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "subnets": ["10.96.0.0/16", "10.244.0.0/16"],
        "api_server_ips": ["192.0.2.1"],
    }
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def script() -> Iterator[Path]:
    """The fake daemon, where the laptop user can read it (pytest's tmp_path is root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="tp-netfilter-e2e-"))
    folder.chmod(0o755)
    path = folder / "fake_daemon.py"
    path.write_text(FAKE_DAEMON)
    path.chmod(0o644)
    yield path
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def synced(cluster: Cluster) -> Cluster:
    """The laptop user runs a copy of src/: make it the code under test."""
    from devcluster import laptop

    laptop.sync_sources(cluster.settings)
    return cluster


def _no_session_running(cluster: Cluster) -> bool:
    """No TUN device in the laptop namespace: nobody's session is up."""
    links = json.loads(cluster.laptop("ip", "-j", "link", root=True).stdout)
    return not any(link.get("link_type") == "none" for link in links)


@pytest.fixture
def laptop(synced: Cluster, script: Path) -> Iterator[Laptop]:
    """The laptop namespace to ourselves, as far as telepresence sessions go.

    Sessions routing the same subnets cannot coexist, so tests that start one
    take LOCK (an advisory flock other suites can share) and wait until no
    session of anyone else is up before recording the baseline.
    """
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wait_for(
            lambda: _no_session_running(synced),
            timeout=120,
            what="other telepresence sessions in the laptop namespace to end",
        )
        bench = Laptop(cluster=synced, script=script, baseline=snapshot(synced))
        try:
            yield bench
        finally:
            for daemon in bench.daemons:
                daemon.stop()


def tcp_probe(cluster: Cluster, host: str, port: int) -> str:
    return cluster.laptop("python3", "-c", TCP_PROBE, host, str(port)).stdout.strip()


def dig(cluster: Cluster, *flags: str) -> str:
    argv = ["dig", "+short", "+time=2", "+tries=1", *flags, f"@{RESOLVER}", "www.example.test"]
    return cluster.laptop(*argv, check=False).stdout.strip()


def test_redirects_work_and_teardown_restores_everything(laptop: Laptop) -> None:
    cluster = laptop.cluster
    assert dig(cluster) == REAL_ANSWER
    daemon = laptop.start_daemon()
    reply = daemon.request("setup", **setup_args())
    assert reply["ok"], reply
    assert reply["routed"] == ["10.96.0.0/16", "10.244.0.0/16"]

    # TCP to a routed subnet lands on the proxy, which sees the original destination.
    assert tcp_probe(cluster, "10.96.5.5", 80) == "10.96.5.5:80"
    assert tcp_probe(cluster, "10.244.0.7", 8080) == "10.244.0.7:8080"
    # The API server is never routed into the tunnel.
    route = json.loads(cluster.laptop("ip", "-j", "route", "get", "192.0.2.1").stdout)
    assert route[0]["dev"] == "eth0"

    # DNS to the configured nameserver, over UDP and TCP, is answered by the daemon.
    assert dig(cluster) == FAKE_ANSWER
    assert dig(cluster, "+tcp") == FAKE_ANSWER
    getent = cluster.laptop("getent", "hosts", "www.example.test").stdout
    assert getent.split()[0] == FAKE_ANSWER

    # UDP to a routed subnet is not NATed: it comes out of the TUN, from the TUN's address.
    cluster.laptop("python3", "-c", UDP_PROBE, "10.96.0.10", "53", b"via-tun".hex())
    packet = daemon.wait_event(lambda e: e.get("event") == "tun_packet" and e["dport"] == 53)
    assert (packet["dst"], packet["src"]) == ("10.96.0.10", "198.18.255.254")
    assert bytes.fromhex(packet["payload"]) == b"via-tun"

    # Marked upstream sockets reach the real resolver, not the redirect.
    for kind in ("udp", "tcp"):
        reply = daemon.request("upstream", kind=kind)
        assert reply["ok"], reply
        assert (reply["answers"], reply["mark"]) == ([REAL_ANSWER], MARK)

    status = daemon.request("status")["status"]
    assert status["tun_present"] and status["nft_table_present"]
    assert sorted(status["routes"]) == ["10.244.0.0/16", "10.96.0.0/16"]
    dns_port = daemon.ready["dns_port"]
    assert status["dns_redirects"] == [f"{RESOLVER}:53 -> 127.0.0.1:{dns_port} (udp+tcp)"]

    # Subnets follow UpdateSubnets; host routes come and go; the API server is refused.
    assert daemon.request("update", subnets=["10.96.0.0/16"])["routed"] == ["10.96.0.0/16"]
    assert tcp_probe(cluster, "10.244.0.7", 8080).startswith("error")
    reply = daemon.request("add_hosts", ips=["203.0.113.2", "192.0.2.1", "2001:db8::1"])
    assert reply["hosts"] == ["203.0.113.2"]
    assert [s.split(":")[0] for s in reply["skipped"]] == ["192.0.2.1", "2001"]
    assert tcp_probe(cluster, "203.0.113.2", 80) == "203.0.113.2:80"
    assert daemon.request("remove_hosts", ips=["203.0.113.2"])["hosts"] == []
    assert tcp_probe(cluster, "203.0.113.2", 80).startswith("error")
    assert daemon.request("update", subnets=["10.96.0.0/16", "10.244.0.0/16"])["ok"]
    assert tcp_probe(cluster, "10.244.0.7", 8080) == "10.244.0.7:8080"

    reply = daemon.request("teardown")
    assert reply == {"event": "reply", "cmd": "teardown", "ok": True, "exit": 0}
    # The DNS redirect is gone by the time Teardown is answered.
    assert dig(cluster) == REAL_ANSWER
    assert not pid_alive(daemon.helper_pid)
    laptop.wait_restored(sockets=False)
    assert journals_of(daemon) == []
    daemon.exit()
    laptop.wait_restored()


def test_killed_daemon_makes_the_helper_undo_everything(laptop: Laptop) -> None:
    daemon = laptop.start_daemon()
    assert daemon.request("setup", **setup_args())["ok"]
    assert dig(laptop.cluster) == FAKE_ANSWER
    os.kill(daemon.pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(daemon.helper_pid), timeout=20, what="the helper to exit")
    assert dig(laptop.cluster) == REAL_ANSWER
    laptop.wait_restored()
    assert journals_of(daemon) == []


def test_sigterm_makes_the_helper_undo_everything_while_the_daemon_lives(laptop: Laptop) -> None:
    daemon = laptop.start_daemon()
    assert daemon.request("setup", **setup_args())["ok"]
    os.kill(daemon.helper_pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(daemon.helper_pid), timeout=20, what="the helper to exit")
    # The daemon still holds the TUN: the helper deleted the link rather than wait for it.
    laptop.wait_restored(sockets=False, timeout=1)
    assert journals_of(daemon) == []
    assert daemon.request("status")["type"] == "HelperGone"
    daemon.exit()
    laptop.wait_restored()


def test_killed_helper_is_cleaned_up_by_cleanup(laptop: Laptop) -> None:
    cluster = laptop.cluster
    daemon = laptop.start_daemon()
    assert daemon.request("setup", **setup_args())["ok"]
    os.kill(daemon.helper_pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(daemon.helper_pid), timeout=20, what="the helper to die")
    # The kernel dropped the owned table with its owner, and the DNS redirect with it ...
    before = laptop.comparable(laptop.baseline, with_sockets=False)["nft"]
    wait_for(lambda: laptop.state()["nft"] == before, timeout=10, what="the nft table to go")
    assert dig(cluster) == REAL_ANSWER
    # ... but the daemon still holds the TUN, so the link and its routes stay until --cleanup.
    assert TUN in snapshot(cluster).links
    assert daemon.request("status")["type"] == "HelperGone"
    assert journals_of(daemon) != []
    removed = cluster.laptop("sudo", "-n", HELPER, "--cleanup").stdout.splitlines()
    assert f"removed leftover TUN device {TUN}" in removed
    assert f"removed leftover route 10.96.0.0/16 dev {TUN}" in removed
    laptop.wait_restored(sockets=False, timeout=1)
    assert journals_of(daemon) == []
    assert cluster.laptop("sudo", "-n", HELPER, "--cleanup").stdout == ""  # idempotent
    daemon.exit()
    laptop.wait_restored()


def test_conflicting_or_bad_setup_is_refused_and_leaves_nothing(laptop: Laptop) -> None:
    daemon = laptop.start_daemon()
    reply = daemon.request("setup", **setup_args(subnets=["10.96.0.0/16", "198.51.100.0/24"]))
    assert not reply["ok"]
    error = reply["error"]
    assert "\n" not in error
    assert "198.51.100.0/24 overlaps route 198.51.100.0/30 on device eth0" in error
    assert "--never-proxy 198.51.100.0/30" in error
    laptop.wait_restored(sockets=False, timeout=1)

    bad: list[dict[str, Any]] = [
        {"subnets": ["10.96.0.5/16"]},
        {"subnets": ["fd00::/8"]},
        {"subnets": ["0.0.0.0/0"]},
        {"subnets": ["127.0.0.0/8"]},
        {"subnets": ["192.0.2.0/24"]},  # covers the API server
        {"proxy_port": 0},
    ]
    for overrides in bad:
        reply = daemon.request("setup", **setup_args(**overrides))
        assert not reply["ok"] and "\n" not in reply["error"], (overrides, reply)
        laptop.wait_restored(sockets=False, timeout=1)

    # The same helper still works once the input is right.
    assert daemon.request("setup", **setup_args())["ok"]
    daemon.exit()
    laptop.wait_restored()


def test_a_second_helper_is_refused_and_changes_nothing(laptop: Laptop) -> None:
    """The helper's TUN and table are fixed names: a second session's setup fails before
    it changes anything, and the first session's state stays exactly as it was."""
    first = laptop.start_daemon()
    assert first.request("setup", **setup_args())["ok"]
    with_first = snapshot(laptop.cluster)
    second = laptop.start_daemon()
    reply = second.request("setup", **setup_args(subnets=["10.97.0.0/16"]))
    assert not reply["ok"]
    assert TUN in reply["error"] or TABLE in reply["error"], reply
    laptop.wait_restored(expected=with_first, sockets=False, timeout=1)
    second.exit()
    first.exit()
    laptop.wait_restored()


def test_helper_refuses_a_socket_of_another_user(synced: Cluster) -> None:
    out = synced.laptop("python3", "-c", WRONG_PEER, HELPER, LAPTOP_USER, root=True).stdout
    result = json.loads(out)
    assert result["status"] != 0
    assert "refusing" in result["stderr"] and "uid 0" in result["stderr"], result
    assert result["received"] == ""  # not even a Hello
