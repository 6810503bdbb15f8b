"""The cluster answer cache: lifetimes, expiry on an injected clock, eviction."""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from telepresence.daemon.dnscache import AnswerCache, lifetime

A = dns.rdatatype.A
AAAA = dns.rdatatype.AAAA
NAME = "web.ns.svc.cluster.local."
SOA = "ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 {minimum}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(name: str = NAME, *, ttl: int = 30, rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
           soa: tuple[int, int] | None = None) -> dns.message.Message:  # fmt: skip
    response = dns.message.make_response(dns.message.make_query(name, A))
    response.set_rcode(rcode)
    if rcode == dns.rcode.NOERROR and ttl >= 0:
        response.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", "10.96.0.10"))
    if soa is not None:
        soa_ttl, minimum = soa
        response.authority.append(
            dns.rrset.from_text("cluster.local.", soa_ttl, "IN", "SOA", SOA.format(minimum=minimum))
        )
    return response


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (answer(ttl=30), 5.0),  # capped
        (answer(ttl=3), 3.0),
        (answer(ttl=0), 0.0),  # TTL 0 means "do not cache"
        (answer(rcode=dns.rcode.NXDOMAIN, soa=(30, 2)), 2.0),  # RFC 2308: min(TTL, MINIMUM)
        (answer(rcode=dns.rcode.NXDOMAIN, soa=(1, 30)), 1.0),
        (answer(rcode=dns.rcode.NXDOMAIN), 5.0),  # no SOA: the cap
        (answer(ttl=-1, soa=(4, 30)), 4.0),  # NODATA with SOA
        (answer(rcode=dns.rcode.SERVFAIL), 0.0),  # failures are never cached
        (answer(rcode=dns.rcode.REFUSED), 0.0),
    ],
)
def test_lifetime(message: dns.message.Message, expected: float) -> None:
    assert lifetime(message, max_ttl=5.0) == expected


def test_entries_expire_and_report_remaining_ttl() -> None:
    clock = Clock()
    cache = AnswerCache(max_ttl=5.0, clock=clock)
    message = answer(ttl=30)
    served = cache.put(NAME, A, message)
    assert served.ttl == 5 and served.message is message

    clock.now += 1.5
    hit = cache.get(NAME, A)
    assert hit is not None and hit.message is message and hit.ttl == 3

    clock.now += 3.5  # exactly at expiry
    assert cache.get(NAME, A) is None
    assert len(cache) == 0


def test_keys_ignore_case_and_trailing_dot_but_not_type() -> None:
    cache = AnswerCache(clock=Clock())
    cache.put("Web.NS.svc.cluster.local", A, answer())
    assert cache.get(NAME, A) is not None
    assert cache.get(NAME, AAAA) is None


def test_uncacheable_answers_are_served_but_not_stored() -> None:
    cache = AnswerCache(clock=Clock())
    served = cache.put(NAME, A, answer(rcode=dns.rcode.SERVFAIL))
    assert served.ttl == 0
    assert cache.get(NAME, A) is None and len(cache) == 0


def test_put_replaces_an_older_answer() -> None:
    clock = Clock()
    cache = AnswerCache(clock=clock)
    cache.put(NAME, A, answer(ttl=2))
    newer = answer(ttl=4)
    cache.put(NAME, A, newer)
    clock.now += 3
    hit = cache.get(NAME, A)
    assert hit is not None and hit.message is newer and hit.ttl == 1


def test_eviction_drops_expired_entries_first_then_the_oldest() -> None:
    clock = Clock()
    cache = AnswerCache(max_entries=3, clock=clock)
    cache.put("short.", A, answer("short.", ttl=1))
    cache.put("old.", A, answer("old."))
    cache.put("mid.", A, answer("mid."))
    clock.now += 2  # "short." has expired
    cache.put("new.", A, answer("new."))
    assert cache.get("old.", A) is not None
    assert len(cache) == 3

    cache.put("newest.", A, answer("newest."))  # full, nothing expired: the oldest goes
    assert cache.get("old.", A) is None
    assert all(cache.get(n, A) is not None for n in ("mid.", "new.", "newest."))


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError):
        AnswerCache(max_entries=0)
