"""`status --flows` in the daemon: the session's cluster lookups say why they failed, and
the status request carries the book when asked (and only then)."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any, cast

import dns.message
import dns.rdatatype
import pytest

from telepresence.daemon.dns import ClusterLookupFailed
from telepresence.daemon.main import Daemon
from telepresence.daemon.pool import ManagerPool, PoolUnavailable
from telepresence.daemon.request import ConnectRequest
from telepresence.daemon.session import Session
from telepresence.tunnel.messages import DnsAnswer


def session() -> Session:
    return Session(ConnectRequest(), debug=False, on_lost=lambda _: None)


class LookupPool:
    def __init__(self, outcome: object) -> None:
        self.outcome = outcome

    async def dns_lookup(self, qname: str, qtype: int) -> DnsAnswer:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        assert isinstance(self.outcome, DnsAnswer)
        return self.outcome


@pytest.mark.parametrize(
    ("outcome", "why"),
    [
        (None, "not connected to the traffic manager"),
        (PoolUnavailable("reconnecting"), "reconnecting"),
        (TimeoutError(), "the traffic manager did not answer in time"),
        (DnsAnswer(7, 2), "the traffic manager's lookup in the cluster failed (SERVFAIL)"),
    ],
)
async def test_a_cluster_lookup_that_fails_says_why(outcome: object, why: str) -> None:
    s = session()
    if outcome is not None:
        s.pool = cast(ManagerPool, LookupPool(outcome))
    with pytest.raises(ClusterLookupFailed) as failed:
        await s._cluster_lookup("web.ns.svc.cluster.local.", dns.rdatatype.A)
    assert str(failed.value) == why


async def test_a_cluster_lookup_returns_the_managers_answer() -> None:
    query = dns.message.make_query("web.ns.svc.cluster.local.", dns.rdatatype.A)
    wire = dns.message.make_response(query).to_wire()
    s = session()
    s.pool = cast(ManagerPool, LookupPool(DnsAnswer(7, 0, wire)))
    answer = await s._cluster_lookup("web.ns.svc.cluster.local.", dns.rdatatype.A)
    assert answer.to_wire() == wire


def test_the_session_reports_its_book() -> None:
    s = session()
    assert s.flows() == {"flows": [], "flows_open": 0, "errors": []}
    s.book.dns_failed("web.ns A", "the cluster: reconnecting")
    assert [e["destination"] for e in s.flows()["errors"]] == ["web.ns A"]


async def _ask(daemon: Daemon, request: dict[str, Any]) -> dict[str, Any]:
    """One request through the daemon's control handler, over a socketpair."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=theirs)
    client_reader, client_writer = await asyncio.open_connection(sock=ours)
    client_writer.write(json.dumps(request).encode() + b"\n")
    await daemon._handle(reader, writer)
    reply: dict[str, Any] = json.loads(await asyncio.wait_for(client_reader.readline(), 5))
    client_writer.close()
    return reply


async def test_the_status_request_carries_the_flows_only_when_asked() -> None:
    daemon = Daemon(debug=False)
    plain = (await _ask(daemon, {"cmd": "status"}))["result"]
    assert plain["user_daemon"]["status"] == "Not connected"
    assert "flows" not in plain and "errors" not in plain
    flows = (await _ask(daemon, {"cmd": "status", "flows": True}))["result"]
    assert flows["user_daemon"]["status"] == "Not connected"
    assert (flows["flows"], flows["flows_open"], flows["errors"]) == ([], 0, [])

    daemon.session = session()
    daemon.session.book.dns_failed("web.ns A", "the cluster: reconnecting")
    status = (await _ask(daemon, {"cmd": "status", "flows": True}))["result"]
    assert status["user_daemon"]["status"] == "Connecting"
    assert [e["message"] for e in status["errors"]] == ["the cluster: reconnecting"]
    assert "errors" not in (await _ask(daemon, {"cmd": "status"}))["result"]
