"""The pool's upkeep: heartbeats on every link, and reconnecting what was lost.

A mixin of `pool.ManagerPool`, apart so the pool's module reads as what a link and a
session are, and this one as what happens when they fail: a dead link is dropped after
`DEAD_AFTER_HEARTBEATS` silent heartbeats, lost port-forward links are reopened to the
session's pod, and a session the manager forgot (it restarted) is joined anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from telepresence.daemon.managerlink import ManagerLink
from telepresence.tunnel.messages import ClusterInfo, Remain

log = logging.getLogger("telepresence.pool")

HEARTBEAT = 1.0
# A link that has carried nothing, not even the manager's heartbeat echo, for this many
# heartbeats is dead: a port-forward whose pod is gone, or a network that silently drops
# everything, or a laptop that slept, can leave it open without a byte. 3 s: new flows
# stop going into a dead link quickly, and a link carrying data is always heard.
DEAD_AFTER_HEARTBEATS = 3
#: The longest wait between attempts to reach the manager again: the tunnel is back at most
#: this long (plus one attempt) after the API server answers again.
MAX_BACKOFF = 1.0
#: While links drain: how often idle ones are closed and a missing replacement looked for.
DRAIN_CHECK = 0.25


class PoolUnavailable(Exception):
    """No connection to the traffic manager right now."""


class IncompatibleManager(Exception):
    """The manager and this client share no protocol version; the message is the one line
    for the user, naming the fix. Retrying cannot help."""


class PoolKeeper:
    """What the keeper needs of the pool; `ManagerPool` provides all of it."""

    tunnels: list[ManagerLink]
    size: int
    heartbeat: float
    reconnects: int
    last_problem: str
    _closing: bool
    _session_lost: bool
    _changed: asyncio.Event
    _said: set[str]

    def healthy(self) -> list[ManagerLink]:
        raise NotImplementedError

    def _forwards(self) -> list[ManagerLink]:
        raise NotImplementedError

    async def _reap_draining(self) -> None:
        raise NotImplementedError

    async def _add_link(self, pod: str) -> None:
        raise NotImplementedError

    async def _join(self) -> ClusterInfo:
        raise NotImplementedError

    def _lose_pending(self) -> None:
        raise NotImplementedError

    async def _keep_full(self) -> None:
        """Reopens lost connections; re-joins when the session is gone entirely, or joins a
        replacement when the manager is stopping; closes drained links."""
        backoff = 0.2
        while not self._closing:
            draining = any(t.draining for t in self.tunnels)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), DRAIN_CHECK if draining else None)
            self._changed.clear()
            await self._reap_draining()
            while not self._closing and len(self._forwards()) < self.size:
                try:
                    # Direct links alone keep the session: through an API server outage
                    # they carry on while port-forward links are reopened beside them.
                    healthy = self.healthy()
                    if self._session_lost or not healthy:
                        await self._rejoin()
                        await self._reap_draining()
                    else:
                        await self._add_link(healthy[0].pod)
                    backoff = 0.2
                    self._said.clear()
                except IncompatibleManager as e:
                    # A teammate replaced the manager with one we cannot talk to.
                    log.warning("cannot re-join the traffic manager: %s", e)
                    await asyncio.sleep(5)
                except Exception as e:
                    self.last_problem = f"reconnecting failed: {e or type(e).__name__}"
                    self._log_once(f"reconnecting to the traffic manager failed: {e}")
                    for t in list(self.tunnels):
                        if t.tunnel.closed:
                            self.tunnels.remove(t)
                    if any(t.draining for t in self.tunnels):
                        # The stopping manager still serves: look again soon, or as soon
                        # as the pod watch sees a replacement become ready.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), DRAIN_CHECK)
                        self._changed.clear()
                        await self._reap_draining()
                        continue
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)

    def _log_once(self, message: str) -> None:
        """Retries every 0.25 s while a replacement starts: say each thing once, and the
        repeats only at debug level."""
        if message in self._said:
            log.debug("%s (again)", message)
            return
        self._said.add(message)
        log.info("%s", message)

    async def _rejoin(self) -> None:
        """A new session: the manager restarted, every link broke, or (with draining links
        still serving) a replacement takes over."""
        handover = any(t.draining for t in self.tunnels)
        self._log_once(
            "joining a replacement traffic manager"
            if handover
            else "re-joining the traffic manager"
        )
        self._session_lost = False
        for stale in [t for t in self.tunnels if not t.draining]:
            self.tunnels.remove(stale)
            await stale.close()
        if not handover:
            self._lose_pending()
        try:
            await asyncio.wait_for(self._join(), 60)
        except BaseException:
            # A half-made session must not count as healthy: drop its links.
            for t in [t for t in self.tunnels if not t.draining]:
                self.tunnels.remove(t)
                await t.close()
            raise
        self.reconnects += 1

    async def _heartbeat(self) -> None:
        """Remain on every link; the manager echoes it, so silence means a dead link."""
        while True:
            await asyncio.sleep(self.heartbeat)
            now = time.monotonic()
            for t in list(self.tunnels):
                if now - t.last_heard > self.heartbeat * DEAD_AFTER_HEARTBEATS:
                    log.info("tunnel silent for %.0fs: reconnecting", now - t.last_heard)
                    t.abandon("no heartbeat from the traffic manager")
                elif t.session_id:
                    t.tunnel.send_control(Remain(t.session_id))
