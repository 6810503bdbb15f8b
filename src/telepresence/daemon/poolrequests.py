"""Questions the laptop asks the manager in control messages, paired with their answers.

DNS lookups are answered out of order and paired by request id; a DirectRequest has one
answer, DirectGrant, and a session asks one at a time. Apart from the pool (`pool.py`),
which owns the links these travel on, so each reads on its own.
"""

from __future__ import annotations

import asyncio
import itertools

from telepresence.tunnel.messages import DirectGrant, DnsAnswer


class PendingRequests:
    def __init__(self) -> None:
        self._dns: dict[int, asyncio.Future[DnsAnswer]] = {}
        self._ids = itertools.count(1)
        self._grant: asyncio.Future[DirectGrant] | None = None

    def new_lookup(self) -> tuple[int, asyncio.Future[DnsAnswer]]:
        request_id = next(self._ids)
        fut: asyncio.Future[DnsAnswer] = asyncio.get_running_loop().create_future()
        self._dns[request_id] = fut
        return request_id, fut

    def forget_lookup(self, request_id: int) -> None:
        self._dns.pop(request_id, None)

    def new_grant(self) -> asyncio.Future[DirectGrant]:
        if self._grant is not None and not self._grant.done():
            self._grant.cancel()
        self._grant = asyncio.get_running_loop().create_future()
        return self._grant

    def answered(self, message: DnsAnswer | DirectGrant) -> None:
        """An answer arrived; one nobody waits for any more is dropped."""
        if isinstance(message, DirectGrant):
            fut: asyncio.Future[DirectGrant] | asyncio.Future[DnsAnswer] | None = self._grant
            self._grant = None
        else:
            fut = self._dns.pop(message.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(message)  # type: ignore[arg-type]

    def fail_all(self, error: Exception) -> None:
        """The session is gone: nothing asked in it will be answered."""
        pending: list[asyncio.Future[DnsAnswer] | asyncio.Future[DirectGrant]] = [
            *self._dns.values()
        ]
        if self._grant is not None:
            pending.append(self._grant)
        for fut in pending:
            if not fut.done():
                fut.set_exception(error)
        self._dns.clear()
        self._grant = None
