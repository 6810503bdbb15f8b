"""Which of the laptop's nameservers to ask, in what order, for how long: pure logic.

The daemon forwards every name that is not the cluster's to the laptop's own
nameservers (all of them are redirected to it, so it must do the failover
that glibc would have done).  glibc tries them in resolv.conf order, every
time, waiting ``timeout`` seconds (5 by default) for each: with a dead first
server every lookup costs five seconds.  We do better on two counts:

* a short wait per server (:func:`attempt_timeouts`: at most about a second,
  within one overall budget), and
* memory (:class:`UpstreamSelector`): a server that did not answer is tried
  last for a while (``hold_down``), so the lookups after the first one go
  straight to a server that works; when the while is over it is first again,
  so a server that comes back (the router rebooted) is used again.

An answer of any kind, even SERVFAIL or REFUSED, proves a server alive; such
answers make the forwarder try the next server for this query
(:func:`try_next`, as glibc does) without holding the server down.

No sockets and no clock here: times are passed in, so the tests are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Server", "UpstreamSelector", "attempt_timeouts", "try_next"]

#: (address, port): port 53 in real use, any port in tests.
Server = tuple[str, int]

#: RCODEs after which glibc's res_send asks the next nameserver: SERVFAIL,
#: NOTIMP, REFUSED.  FORMERR and NXDOMAIN are answers about the query itself.
_NEXT_RCODES = frozenset({2, 4, 5})


def try_next(reply: bytes) -> bool:
    """Whether ``reply`` (wire bytes) is worth asking the next server about."""
    return len(reply) >= 4 and (reply[3] & 0x0F) in _NEXT_RCODES


def attempt_timeouts(count: int, *, total: float, per_server: float) -> list[float]:
    """How long to wait for each of ``count`` servers, in the order they are tried.

    Each waits at most ``per_server`` and an equal share of ``total``, so every
    server gets its turn within the budget; the last one tried gets whatever is
    left, so a laptop with one slow nameserver waits the whole budget for it
    (as before failover existed) rather than a fraction of it.
    """
    if count <= 0:
        return []
    each = min(per_server, total / count)
    return [each] * (count - 1) + [max(0.0, total - each * (count - 1))]


@dataclass
class UpstreamSelector:
    """The order to try the laptop's nameservers in, remembering which did not answer.

    ``servers`` is resolv.conf's order (at most three, as glibc reads them);
    :meth:`update` replaces it when resolv.conf changes, keeping what is known
    about servers that stay.  A server :meth:`failed` goes last until
    ``hold_down`` seconds have passed or it :meth:`answered`.
    """

    servers: tuple[Server, ...] = ()
    #: Long enough that a dead router costs one slow lookup, not one per lookup;
    #: short enough that a server that comes back is used again within a minute.
    hold_down: float = 30.0
    _down_until: dict[Server, float] = field(default_factory=dict)

    def order(self, now: float) -> list[Server]:
        """Servers that are not held down, in resolv.conf order; then those held
        down, the one whose hold ends first first (every server is still tried:
        when all seem dead, the least recently failed is the best guess)."""
        up = [s for s in self.servers if self._down_until.get(s, 0.0) <= now]
        down = sorted(
            (s for s in self.servers if self._down_until.get(s, 0.0) > now),
            key=lambda s: self._down_until[s],
        )
        return up + down

    def failed(self, server: Server, now: float) -> None:
        """``server`` did not answer in time (or refused the connection)."""
        if server in self.servers:
            self._down_until[server] = now + self.hold_down

    def answered(self, server: Server) -> None:
        self._down_until.pop(server, None)

    def is_down(self, server: Server, now: float) -> bool:
        return self._down_until.get(server, 0.0) > now

    def update(self, servers: Sequence[Server]) -> bool:
        """Follow a new list (resolv.conf changed); True if it differs.  A server
        that stays keeps its state; one that left is forgotten."""
        new = tuple(dict.fromkeys(servers))
        if new == self.servers:
            return False
        self.servers = new
        self._down_until = {s: t for s, t in self._down_until.items() if s in new}
        return True
