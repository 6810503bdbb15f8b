"""Credentials for the direct transport, minted by the laptop for one session.

The manager's image is a stock Python with no crypto library, so the laptop makes both
key pairs and hands the manager its half (the server certificate and key, and the client
certificate it must accept) over a port-forward link, which RBAC already authenticated.
No CA: each side pins the other's self-signed certificate, so these credentials vouch for
this session's two ends and nothing else. They expire after `LIFETIME`; the manager
forgets them when the session ends, and a new session mints new ones.

The client's private key never leaves the laptop. The server's does travel, inside the
API server's TLS, to the one manager pod that serves the session, and lives only in that
process's memory.
"""

from __future__ import annotations

import datetime
import secrets
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from telepresence.directtls import SERVER_NAME_SUFFIX, load_chain
from telepresence.tunnel.messages import DirectRequest

#: Longer than any working day; a session that outlives it asks again on its next link.
LIFETIME = datetime.timedelta(hours=12)
#: Clocks of laptop and node may differ a little.
CLOCK_SKEW = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class DirectCredentials:
    """PEM text. ``server_name`` is random per session, so the (cleartext) SNI tells an
    observer nothing about the session."""

    server_name: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    expires: datetime.datetime

    def request(self) -> DirectRequest:
        """What the manager gets: everything but the client's key."""
        return DirectRequest(
            server_name=self.server_name,
            server_cert=self.server_cert,
            server_key=self.server_key,
            client_cert=self.client_cert,
        )

    def client_context(self) -> ssl.SSLContext:
        """TLS 1.3 only, trusting exactly the session's server certificate, presenting
        the session's client certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cadata=self.server_cert)
        load_chain(ctx, self.client_cert, self.client_key)
        return ctx


def _self_signed(
    common_name: str,
    *,
    usage: x509.ObjectIdentifier,
    dns_name: str | None,
    now: datetime.datetime,
) -> tuple[str, str, datetime.datetime]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    expires = now + LIFETIME
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(expires)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if dns_name is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False
        )
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode(), expires


def mint(now: datetime.datetime | None = None) -> DirectCredentials:
    """Two fresh P-256 key pairs and their self-signed certificates (about 2 ms)."""
    now = now or datetime.datetime.now(datetime.UTC)
    server_name = f"s{secrets.token_hex(12)}{SERVER_NAME_SUFFIX}"
    server_cert, server_key, expires = _self_signed(
        "telepresence traffic manager",
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        dns_name=server_name,
        now=now,
    )
    client_cert, client_key, _ = _self_signed(
        "telepresence laptop", usage=ExtendedKeyUsageOID.CLIENT_AUTH, dns_name=None, now=now
    )
    return DirectCredentials(
        server_name=server_name,
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        expires=expires,
    )
