"""The upstream selector and the time budget: pure, with times passed in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from telepresence.daemon.upstreams import UpstreamSelector, attempt_timeouts, try_next

A, B, C = ("192.0.2.1", 53), ("192.0.2.2", 53), ("192.0.2.3", 53)


def test_servers_are_tried_in_resolv_conf_order() -> None:
    selector = UpstreamSelector((A, B, C))
    assert selector.order(now=0) == [A, B, C]


def test_a_server_that_did_not_answer_goes_last_for_a_while_then_recovers() -> None:
    selector = UpstreamSelector((A, B, C), hold_down=30)
    selector.failed(A, now=100)
    assert selector.order(now=100) == [B, C, A]
    assert selector.order(now=129.9) == [B, C, A]
    assert selector.order(now=130) == [A, B, C]  # its while is over: first again


def test_an_answer_ends_the_hold_at_once() -> None:
    selector = UpstreamSelector((A, B), hold_down=30)
    selector.failed(A, now=0)
    selector.answered(A)
    assert selector.order(now=1) == [A, B]


def test_when_all_failed_the_one_that_failed_longest_ago_goes_first() -> None:
    selector = UpstreamSelector((A, B, C), hold_down=30)
    selector.failed(B, now=0)
    selector.failed(A, now=5)
    selector.failed(C, now=10)
    assert selector.order(now=11) == [B, A, C]  # every server is still tried


def test_a_new_list_keeps_what_is_known_of_servers_that_stay() -> None:
    selector = UpstreamSelector((A, B), hold_down=30)
    selector.failed(A, now=0)
    selector.failed(B, now=0)
    assert selector.update([C, A]) is True
    assert selector.order(now=1) == [C, A]  # B forgotten, A still held down
    assert selector.update([C, A]) is False
    selector.failed(B, now=2)  # a late failure of a server no longer listed
    assert selector.order(now=3) == [C, A]
    assert selector.update([A, A]) and selector.servers == (A,)


def test_the_budget_is_short_per_server_and_bounded_per_query() -> None:
    # Default: 2.5 s per query, at most 1 s per server before the next.
    assert attempt_timeouts(1, total=2.5, per_server=1.0) == [2.5]
    assert attempt_timeouts(2, total=2.5, per_server=1.0) == [1.0, 1.5]
    three = attempt_timeouts(3, total=2.5, per_server=1.0)
    assert three[:2] == pytest.approx([2.5 / 3] * 2) and sum(three) == pytest.approx(2.5)
    # options timeout:1 shrinks the budget: both servers within the client's second.
    assert attempt_timeouts(2, total=1.0, per_server=1.0) == [0.5, 0.5]
    assert attempt_timeouts(0, total=1.0, per_server=1.0) == []


@given(
    st.integers(min_value=1, max_value=3),
    st.floats(min_value=0.1, max_value=30),
    st.floats(min_value=0.1, max_value=5),
)
def test_the_budget_is_never_exceeded_and_no_dead_server_costs_more_than_its_share(
    count: int, total: float, per_server: float
) -> None:
    timeouts = attempt_timeouts(count, total=total, per_server=per_server)
    assert len(timeouts) == count
    assert sum(timeouts) == pytest.approx(total)
    assert all(t <= per_server + 1e-9 for t in timeouts[:-1])
    assert all(t > 0 for t in timeouts)


def test_servfail_refused_and_notimp_are_worth_asking_the_next_server() -> None:
    header = bytes.fromhex("1234 8180 0000 0000 0000 0000".replace(" ", ""))
    assert not try_next(header)  # NOERROR
    assert not try_next(header[:3] + b"\x83" + header[4:])  # NXDOMAIN is an answer
    for rcode in (2, 4, 5):
        assert try_next(header[:3] + bytes([0x80 | rcode]) + header[4:])
    assert not try_next(b"\x12")
