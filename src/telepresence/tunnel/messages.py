"""Control messages: session and cluster-level conversation carried in CONTROL frames.

They are msgpack maps tagged with a ``type`` field, decoded by msgspec straight into
these structs, so a malformed or unknown message is rejected at the edge instead of
surfacing later as a missing key. Unknown *fields* are ignored, which lets a field with
a default be added without a version bump.

Direction is by convention, not enforced: the laptop sends Arrive, Remain, Depart and
DnsLookup and (protocol 3) DirectRequest; the traffic manager sends ArriveOk, ClusterInfo,
DnsAnswer, (protocol 2) Draining and (protocol 3) DirectGrant.
"""

from __future__ import annotations

import msgspec


class Arrive(msgspec.Struct, frozen=True, tag="arrive"):
    """First message of a session; the install id lets the manager recognise a laptop
    that reconnects after a network change. ``protocol_min``/``protocol_max`` are the
    tunnel protocol versions the laptop speaks; they default to 1, which is what a laptop
    that predates version ranges (and does not send them) speaks."""

    name: str
    install_id: str
    version: str
    protocol_min: int = 1
    protocol_max: int = 1


class ArriveOk(msgspec.Struct, frozen=True, tag="arrive-ok"):
    """``protocol`` is the version the manager chose for the session: the highest in both
    ranges. A manager that predates ranges does not send it, and spoke 1."""

    session_id: str
    manager_version: str
    protocol: int = 1


class Remain(msgspec.Struct, frozen=True, tag="remain"):
    """Heartbeat: the manager expires sessions that stop sending it, which reclaims
    streams left behind by a laptop that vanished without Depart."""

    session_id: str


class Depart(msgspec.Struct, frozen=True, tag="depart"):
    session_id: str


class ClusterInfo(msgspec.Struct, frozen=True, tag="cluster-info"):
    """Everything the laptop needs to route and resolve like a pod. Sent after ArriveOk
    and again whenever it changes, so the laptop never polls."""

    service_subnets: tuple[str, ...]
    pod_subnets: tuple[str, ...]
    cluster_domain: str
    dns_server_ip: str


class DnsLookup(msgspec.Struct, frozen=True, tag="dns-lookup"):
    """Asks the manager to resolve with the cluster's resolver; request_id pairs the
    answer, as lookups are answered out of order."""

    request_id: int
    qname: str
    qtype: int


class DnsAnswer(msgspec.Struct, frozen=True, tag="dns-answer"):
    """``message`` is the upstream DNS response in wire format (RFC 1035), passed through
    untouched so TTLs, SRV targets and every other record type survive. It is empty when
    the manager got no response at all; rcode then says why (e.g. 2, SERVFAIL), so the
    laptop can answer without parsing anything."""

    request_id: int
    rcode: int
    message: bytes = b""


class Draining(msgspec.Struct, frozen=True, tag="draining"):
    """The manager is stopping (its pod got SIGTERM: a rollout, a drain, a delete). It
    keeps serving open flows, and new ones, for up to ``seconds``; the laptop opens new
    flows on a replacement as soon as one is ready and closes its links here once they
    carry nothing. Sent only to sessions at protocol 2 or later: an older laptop could
    not decode it, and sees the links close when the manager exits, as before."""

    seconds: float


class DirectRequest(msgspec.Struct, frozen=True, tag="direct-request"):
    """Asks the manager to accept this session's links over mutually authenticated TLS,
    without the API server in the path (protocol 3). Sent on a port-forward link of the
    session, which RBAC already authenticated; the credentials are minted by the laptop
    for this session only (`daemon/directcreds.py`) and die with it. The manager presents
    ``server_cert`` (its ``server_key``) to a TLS client that names ``server_name`` in
    SNI, and accepts only a client whose certificate is ``client_cert``. PEM text."""

    server_name: str
    server_cert: str
    server_key: str
    client_cert: str


class DirectGrant(msgspec.Struct, frozen=True, tag="direct-grant"):
    """The answer to DirectRequest: the pod port the TLS listener is on (a Service maps a
    NodePort to it), or ``error`` saying why the manager will not (no listener, bad
    credentials); the laptop then stays on port-forward."""

    port: int = 0
    error: str = ""


# The GOAWAY reason a manager gives for a session it does not know (it restarted, or the
# session expired): the laptop must arrive again on every tunnel.
UNKNOWN_SESSION = "unknown session"
# Starts the GOAWAY reason a manager gives a laptop whose protocol range it shares no
# version with; the rest of the reason is the one line to show the user.
INCOMPATIBLE = "incompatible versions: "

ControlMessage = (
    Arrive
    | ArriveOk
    | Remain
    | Depart
    | ClusterInfo
    | DnsLookup
    | DnsAnswer
    | Draining
    | DirectRequest
    | DirectGrant
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[ControlMessage] = msgspec.msgpack.Decoder(ControlMessage)


def encode_control(message: ControlMessage) -> bytes:
    return _encoder.encode(message)


def decode_control(payload: bytes) -> ControlMessage:
    """Raises msgspec.DecodeError (ValidationError included) on anything malformed.

    msgspec itself raises UnicodeDecodeError for invalid UTF-8 in a string and
    RecursionError for deep nesting in a field it skips (msgspec issue #714); both are
    the peer's malformed bytes, so they are reported like any other."""
    try:
        return _decoder.decode(payload)
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(
            f"MessagePack data is malformed: invalid UTF-8 ({exc.reason})"
        ) from None
    except RecursionError:
        raise msgspec.DecodeError("MessagePack data is malformed: nested too deeply") from None
