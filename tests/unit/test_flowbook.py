"""The book behind `status --flows`: open flows with their bytes and states, the ring of
recent errors, the names of cluster addresses; every list bounded. Pure, on set clocks."""

from __future__ import annotations

import json
from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from telepresence.daemon.flowbook import ErrorKind, FlowBook, FlowRecord
from telepresence.tunnel.frames import Dial, DialError, IPProtocol

WALL = 1_800_000_000.0  # 2027-01-15T08:00:00Z


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL + self.now - 100.0


def book(**limits: int) -> tuple[FlowBook, Clock]:
    clock = Clock()
    return FlowBook(clock=clock, wall_clock=clock.wall, **limits), clock


def tcp(b: FlowBook, port: int = 8080, address: str = "10.96.0.5") -> FlowRecord:
    return b.open(
        IPProtocol.TCP,
        source="198.51.100.2:40000",
        address=address,
        port=port,
        link="tunnel-1",
        stream=port,
    )


def test_a_flow_from_open_to_close() -> None:
    b, clock = book()
    record = b.open(
        IPProtocol.TCP,
        source="198.51.100.2:40000",
        address="10.96.0.5",
        port=8080,
        link="tunnel-2",
        stream=7,
    )
    assert len(b) == 1 and record.state == "dialing"
    record.sent += 100
    record.received += 5000
    record.received += 1
    record.dialing = False
    clock.now += 2.5
    assert b.snapshot() == {
        "flows": [
            {
                "protocol": "tcp",
                "source": "198.51.100.2:40000",
                "destination": "10.96.0.5:8080",
                "name": "",
                "sent": 100,
                "received": 5001,
                "age": 2.5,
                "state": "open",
                "link": "tunnel-2",
                "stream": 7,
            }
        ],
        "flows_open": 1,
        "errors": [],
    }
    b.close(record)
    b.close(record)  # twice is harmless: the proxy and a reset may both end it
    assert len(b) == 0 and b.snapshot() == {"flows": [], "flows_open": 0, "errors": []}


def test_the_states_a_tcp_flow_goes_through() -> None:
    b, _ = book()
    record = b.open(IPProtocol.TCP, source="", address="10.96.0.5", port=80)
    assert record.state == "dialing"
    record.laptop_eof = True  # a request sent and shut before the dial completed
    assert record.state == "dialing"
    record.dialing = False
    assert record.state == "half-closed-by-laptop"
    record.laptop_eof, record.cluster_eof = False, True
    assert record.state == "half-closed-by-cluster"
    record.laptop_eof = True
    assert record.state == "closing"
    record.laptop_eof = record.cluster_eof = False
    assert record.state == "open"


def test_snapshots_list_the_newest_flows_up_to_the_limit_and_count_them_all() -> None:
    b, clock = book(max_listed=3)
    for port in range(1, 6):
        tcp(b, port)
        clock.now += 1
    snap = b.snapshot()
    assert [f["destination"] for f in snap["flows"]] == [
        "10.96.0.5:5",
        "10.96.0.5:4",
        "10.96.0.5:3",
    ]
    assert [f["age"] for f in snap["flows"]] == [1.0, 2.0, 3.0]
    assert snap["flows_open"] == 5


def test_a_flow_carries_the_name_the_program_looked_up() -> None:
    b, _ = book()
    b.dns_answered("web.ns", [IPv4Address("10.96.0.5"), IPv4Address("10.96.0.6")])
    named = b.open(IPProtocol.UDP, source="", address="10.96.0.6", port=53)
    unnamed = b.open(IPProtocol.UDP, source="", address="10.96.0.7", port=53)
    assert (named.name, unnamed.name) == ("web.ns", "")
    b.dns_answered("web.ns.svc.cluster.local", [IPv4Address("10.96.0.6")])
    assert b.open(IPProtocol.UDP, source="", address="10.96.0.6", port=53).name == (
        "web.ns.svc.cluster.local"
    )
    assert named.name == "web.ns"  # what the program asked before it connected


def test_names_are_bounded_and_the_least_recently_answered_goes_first() -> None:
    b, _ = book(max_names=2)
    b.dns_answered("a", [IPv4Address("10.0.0.1")])
    b.dns_answered("b", [IPv4Address("10.0.0.2")])
    b.dns_answered("a", [IPv4Address("10.0.0.1")])  # answered again: the most recent
    b.dns_answered("c", [IPv4Address("10.0.0.3")])
    names = [
        b.open(IPProtocol.TCP, source="", address=f"10.0.0.{i}", port=1).name for i in (1, 2, 3)
    ]
    assert names == ["a", "", "c"]


def test_dial_failures_by_kind_with_the_managers_message() -> None:
    b, clock = book()
    b.dns_answered("web.ns", [IPv4Address("10.96.0.5")])
    b.dial_failed(Dial(IPProtocol.TCP, "10.96.0.5", 9999), DialError.REFUSED, "connection refused")
    clock.now += 1
    b.dial_failed(Dial(IPProtocol.UDP, "10.96.0.9", 53), DialError.UNREACHABLE, "")
    clock.now += 1
    b.dial_failed(Dial(IPProtocol.TCP, "10.96.0.9", 80), DialError.TIMEOUT, "no answer in 10s")
    clock.now += 1
    b.dial_failed(
        Dial(IPProtocol.TCP, "169.254.169.254", 80), DialError.FAILED, "refused by the policy"
    )
    errors = b.snapshot()["errors"]
    assert [(e["kind"], e["protocol"], e["destination"], e["message"]) for e in errors] == [
        ("dial-failed", "tcp", "169.254.169.254:80", "refused by the policy"),
        ("timeout", "tcp", "10.96.0.9:80", "no answer in 10s"),
        ("dial-failed", "udp", "10.96.0.9:53", "unreachable"),  # no message: the reason
        ("refused", "tcp", "10.96.0.5:9999", "connection refused"),
    ]
    assert [e["name"] for e in errors] == ["", "", "", "web.ns"]
    assert [e["age"] for e in errors] == [0.0, 1.0, 2.0, 3.0]
    assert errors[-1]["time"] == "2027-01-15T08:00:00.000+00:00"
    assert errors[0]["time"] == "2027-01-15T08:00:03.000+00:00"


def test_resets_lost_links_and_dns_failures() -> None:
    b, _ = book()
    record = b.open(IPProtocol.TCP, source="", address="10.96.0.5", port=80)
    b.reset(record, "reset from the cluster side")
    b.link_lost("tunnel-3", "no heartbeat from the traffic manager")
    b.dns_failed("web.ns A", "the cluster: no answer within 2 s")
    errors = b.snapshot()["errors"]
    assert [(e["kind"], e["protocol"], e["destination"]) for e in errors] == [
        ("dns", "dns", "web.ns A"),
        ("reset", "tunnel", "tunnel-3"),
        ("reset", "tcp", "10.96.0.5:80"),
    ]
    assert errors[1]["message"] == (
        "the link to the traffic manager closed (no heartbeat from the traffic manager); "
        "its flows were reset"
    )


def test_a_repeated_error_counts_up_and_becomes_the_newest() -> None:
    b, clock = book()
    refused = Dial(IPProtocol.TCP, "10.96.0.5", 9999)
    b.dial_failed(refused, DialError.REFUSED, "connection refused")
    clock.now += 1
    b.dns_failed("web.ns A", "the cluster: no answer within 2 s")
    clock.now += 1
    for _ in range(3):
        b.dial_failed(refused, DialError.REFUSED, "connection refused")
    errors = b.snapshot()["errors"]
    assert [(e["destination"], e["count"], e["age"]) for e in errors] == [
        ("10.96.0.5:9999", 4, 0.0),
        ("web.ns A", 1, 1.0),
    ]


def test_the_ring_keeps_the_newest_errors() -> None:
    b, clock = book(max_errors=3)
    for port in range(1, 6):
        b.error(ErrorKind.REFUSED, protocol="tcp", destination=f"10.0.0.1:{port}", message="x")
        clock.now += 1
    assert [e["destination"] for e in b.snapshot()["errors"]] == [
        "10.0.0.1:5",
        "10.0.0.1:4",
        "10.0.0.1:3",
    ]


def test_a_full_snapshot_is_json() -> None:
    b, _ = book()
    tcp(b)
    b.open(IPProtocol.UDP, source="198.18.255.254:5353", address="10.96.0.10", port=53)
    b.dial_failed(Dial(IPProtocol.TCP, "10.96.0.5", 1), DialError.REFUSED, "connection refused")
    b.dns_failed("web.ns A", "the laptop's nameservers: no nameserver answered")
    snap = b.snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert {f["protocol"] for f in snap["flows"]} == {"tcp", "udp"}


_ERRORS = st.lists(
    st.tuples(st.sampled_from(list(ErrorKind)), st.integers(0, 6), st.booleans()), max_size=60
)


@given(_ERRORS)
def test_any_sequence_of_errors_stays_bounded_newest_first_and_counted(
    events: list[tuple[ErrorKind, int, bool]],
) -> None:
    b, clock = book(max_errors=4)
    last_seen: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], int] = {}
    for kind, port, tick in events:
        clock.now += 1 if tick else 0
        b.error(kind, protocol="tcp", destination=f"10.0.0.1:{port}", message="m")
        key = (kind.value, f"10.0.0.1:{port}")
        last_seen[key] = clock.now
        counts[key] = counts.get(key, 0) + 1
    errors = b.snapshot()["errors"]
    assert len(errors) == min(4, len(last_seen))
    ages = [e["age"] for e in errors]
    assert ages == sorted(ages)
    # What is kept is the most recently seen, each with every occurrence counted (an
    # error forgotten and seen again starts afresh, which a ring of 4 rarely shows here).
    kept = [(e["kind"], e["destination"]) for e in errors]
    newest = sorted(last_seen, key=lambda k: last_seen[k], reverse=True)
    assert {last_seen[k] for k in kept} == {last_seen[k] for k in newest[: len(kept)]}
    for e in errors:
        assert 1 <= e["count"] <= counts[(e["kind"], e["destination"])]
