"""What the daemon logs when the cluster could not dial: the reason, at a level that fits,
and not once per retry."""

from __future__ import annotations

import logging

import pytest

from telepresence.daemon.dialfailures import DialFailureLog, describe
from telepresence.daemon.flowbook import FlowBook
from telepresence.tunnel.frames import Dial, DialError, IPProtocol

META = Dial(IPProtocol.TCP, "169.254.169.254", 80)
POLICY = (
    "refused by the manager's dial policy: 169.254.169.254 is link-local, where clouds "
    "serve instance metadata (allow it with TELEPRESENCE_DIAL_ALLOW)"
)


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (DialError.REFUSED, logging.INFO),  # a closed port is an ordinary answer
        (DialError.UNREACHABLE, logging.WARNING),
        (DialError.TIMEOUT, logging.WARNING),
        (DialError.FAILED, logging.WARNING),  # the policy's refusals among them
    ],
)
def test_levels(error: DialError, level: int) -> None:
    assert describe(META, error, "x")[0] == level


def test_the_line_names_the_destination_and_the_managers_reason() -> None:
    _, line = describe(META, DialError.FAILED, POLICY)
    assert line == f"TCP 169.254.169.254:80: the cluster dial failed: {POLICY}"
    _, line = describe(Dial(IPProtocol.UDP, "10.0.0.1", 53), DialError.TIMEOUT, "")
    assert line == "UDP 10.0.0.1:53: the cluster dial failed: timeout"


def test_each_destination_is_logged_once_per_interval() -> None:
    log = DialFailureLog(repeat_after=30)
    other = Dial(IPProtocol.TCP, "169.254.169.254", 443)
    assert log.due(META, DialError.FAILED, now=0)
    assert not log.due(META, DialError.FAILED, now=29)
    assert log.due(other, DialError.FAILED, now=29)
    assert log.due(META, DialError.TIMEOUT, now=29)
    assert log.due(META, DialError.FAILED, now=31)


def test_memory_stays_bounded() -> None:
    log = DialFailureLog(repeat_after=30, max_remembered=2)
    dials = [Dial(IPProtocol.TCP, "10.0.0.1", port) for port in (1, 2, 3)]
    for d in dials:
        assert log.due(d, DialError.FAILED, now=0)
    assert log.due(dials[0], DialError.FAILED, now=1)  # forgotten, so logged again
    assert not log.due(dials[2], DialError.FAILED, now=1)


def test_repeats_go_to_debug(caplog: pytest.LogCaptureFixture) -> None:
    log = DialFailureLog(repeat_after=30)
    with caplog.at_level(logging.DEBUG, logger="telepresence.dial"):
        log.failed(META, DialError.FAILED, POLICY, now=0)
        log.failed(META, DialError.FAILED, POLICY, now=1)
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG]
    assert POLICY in caplog.records[0].getMessage()


def test_every_failure_reaches_the_book_even_when_the_log_holds_it_back() -> None:
    book = FlowBook()
    log = DialFailureLog(repeat_after=30, book=book)
    log.failed(META, DialError.FAILED, POLICY, now=0)
    log.failed(META, DialError.FAILED, POLICY, now=1)  # at debug in the log
    (error,) = book.snapshot()["errors"]
    assert (error["kind"], error["destination"], error["message"], error["count"]) == (
        "dial-failed",
        "169.254.169.254:80",
        POLICY,
        2,
    )
