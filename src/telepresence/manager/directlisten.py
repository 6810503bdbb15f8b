"""The direct transport's listener: mutually authenticated TLS, one identity per session.

A laptop that can reach the manager's pod without the API server (a NodePort, a load
balancer, routable pod IPs) sends its links here instead of through port-forward. Nothing
else is served on this port: a TLS client must name a registered session in SNI, which
selects that session's context, and present exactly the client certificate the session
registered (`DirectRequest`, sent over a port-forward link that RBAC authenticated). A
connection that passes belongs to that one session and may only `Remain` in it.

The manager cannot make keys (its image has no crypto library); the laptop mints them
(`daemon/directcreds.py`), and they live here only in memory, until the session ends.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from telepresence.directtls import SERVER_NAME_SUFFIX, load_chain
from telepresence.tunnel.messages import DirectRequest

log = logging.getLogger("telepresence.manager")

#: A PEM certificate or key of a P-256 pair is well under 1 KiB; this bounds what one
#: request may make the manager parse.
MAX_PEM = 8 * 1024


class DirectCredentialError(Exception):
    """The laptop's DirectRequest cannot be used; the message goes back in DirectGrant."""


@dataclass
class _Registration:
    session_id: str
    server_name: str
    context: ssl.SSLContext


class DirectListener:
    """The TLS context of the listening socket and the sessions' contexts behind it."""

    def __init__(self) -> None:
        self._by_name: dict[str, _Registration] = {}
        self._by_session: dict[str, _Registration] = {}
        # Serves no certificate of its own: a client that names no registered session
        # fails the handshake in the SNI callback.
        self.context = self._base_context()
        self.context.sni_callback = self._select

    @staticmethod
    def _base_context() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def register(self, session_id: str, request: DirectRequest) -> None:
        """Accept ``session_id``'s links with these credentials (replacing earlier ones of
        the same session). Raises DirectCredentialError on anything unusable."""
        if not request.server_name.endswith(SERVER_NAME_SUFFIX) or len(request.server_name) > 253:
            raise DirectCredentialError(f"server name {request.server_name[:80]!r} is not ours")
        if max(map(len, (request.server_cert, request.server_key, request.client_cert))) > MAX_PEM:
            raise DirectCredentialError("credentials larger than any we mint")
        existing = self._by_name.get(request.server_name)
        if existing is not None and existing.session_id != session_id:
            raise DirectCredentialError("that server name belongs to another session")
        ctx = self._base_context()
        try:
            load_chain(ctx, request.server_cert, request.server_key)
            ctx.load_verify_locations(cadata=request.client_cert)
        except (ssl.SSLError, ValueError) as e:
            raise DirectCredentialError(f"unusable credentials: {e}") from None
        self.forget(session_id)
        reg = _Registration(session_id, request.server_name, ctx)
        self._by_name[request.server_name] = reg
        self._by_session[session_id] = reg

    def forget(self, session_id: str) -> None:
        """The session ended: its credentials stop working for new connections."""
        reg = self._by_session.pop(session_id, None)
        if reg is not None:
            self._by_name.pop(reg.server_name, None)

    def _select(
        self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        reg = self._by_name.get(server_name or "")
        if reg is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        conn.context = reg.context
        return None

    def session_of(self, ssl_object: ssl.SSLObject | None) -> str | None:
        """The session an established connection authenticated as, by the context its
        handshake used; None when that session has ended since."""
        if ssl_object is None:
            return None
        for reg in self._by_session.values():
            if ssl_object.context is reg.context:
                return reg.session_id
        return None

    def __len__(self) -> int:
        return len(self._by_session)
