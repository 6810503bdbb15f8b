"""Control messages (CONTROL frame payloads), decoded as both ends decode them.

The laptop decodes with msgspec; the traffic manager with telepresence.purestruct, which
its image ships under the name ``msgspec``.  Here the stand-in gets its own copy of
tunnel/messages.py, built while ``msgspec`` names the stand-in, as in the image.

The contract:

- ``decode_control`` raises ``msgspec.DecodeError`` (ValidationError is one) and nothing
  else, on either implementation;
- a decoded message re-encodes to bytes that decode to the same message;
- what the stand-in accepts, msgspec accepts as the same message, byte for byte when
  re-encoded;
- what msgspec accepts, re-encoded (what a real laptop or manager sends), the stand-in
  reads as the same message.  The reverse does not hold, by design: the stand-in refuses
  some input msgspec skips unread (invalid UTF-8 or deep nesting in an unknown field, an
  extension type), which no encoder of ours writes.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import msgspec

from telepresence import purestruct
from telepresence.tunnel import messages

__all__ = ["TestOneInput", "seeds"]


def _messages_on_stand_in() -> Any:
    """tunnel/messages.py executed with ``msgspec`` bound to the stand-in."""
    spec = importlib.util.find_spec("telepresence.tunnel.messages")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text()
    name = "fuzz_messages_on_purestruct"
    module = types.ModuleType(name)
    module.__file__ = spec.origin
    sys.modules[name] = module  # the stand-in resolves annotations through it
    real = sys.modules["msgspec"]
    sys.modules["msgspec"] = purestruct
    try:
        exec(compile(source, spec.origin, "exec"), module.__dict__)
    finally:
        sys.modules["msgspec"] = real
    return module


STAND_IN = _messages_on_stand_in()


def _msgspec(data: bytes) -> messages.ControlMessage | None:
    try:
        return messages.decode_control(data)
    except msgspec.DecodeError:
        return None


def _stand_in(data: bytes) -> Any:
    try:
        return STAND_IN.decode_control(data)
    except purestruct.DecodeError:
        return None


def TestOneInput(data: bytes) -> None:
    real = _msgspec(data)
    if real is not None:
        wire = messages.encode_control(real)
        assert messages.decode_control(wire) == real
        on_stand_in = _stand_in(wire)
        assert on_stand_in is not None, (real, wire)
        assert STAND_IN.encode_control(on_stand_in) == wire, (real, on_stand_in)
    stand_in = _stand_in(data)
    if stand_in is not None:
        wire = STAND_IN.encode_control(stand_in)
        assert STAND_IN.decode_control(wire) == stand_in
        assert real is not None, (stand_in, data)
        assert messages.encode_control(real) == wire, (real, stand_in)


def seeds() -> dict[str, bytes]:
    enc = msgspec.msgpack.encode
    valid: dict[str, messages.ControlMessage] = {
        "arrive": messages.Arrive("laptop", "6c1f", "0.1.0", protocol_min=1, protocol_max=2),
        "arrive-ok": messages.ArriveOk("b2c3", "0.1.0", protocol=1),
        "remain": messages.Remain("b2c3"),
        "depart": messages.Depart("b2c3"),
        "cluster-info": messages.ClusterInfo(
            ("10.96.0.0/12",), ("10.244.0.0/16", "10.245.0.0/16"), "cluster.local", "10.96.0.10"
        ),
        "dns-lookup": messages.DnsLookup(2**32 + 1, "web.ns.svc.cluster.local.", 33),
        "dns-answer": messages.DnsAnswer(7, 0, b"\x00\x07\x81\x80" + bytes(8)),
        "dns-answer-servfail": messages.DnsAnswer(8, 2),
    }
    out = {name: messages.encode_control(m) for name, m in valid.items()}
    remain = out["remain"]
    out.update(
        {
            "bad-truncated": out["cluster-info"][:-3],
            "bad-trailing": remain + b"\xc0",
            "bad-unknown-tag": enc({"type": "nope", "session_id": "s"}),
            "bad-wrong-type": enc({"type": "dns-lookup", "request_id": "1", "qname": 1}),
            "bad-invalid-utf8": remain[:-1] + b"\xff",
            "bad-deep-unknown-field": b"\x83" + remain[1:] + b"\xa1x" + b"\x91" * 300 + b"\x01",
            "bad-ext-type": b"\x82\xa4type\xa6remain\xaasession_id\xd4\x01\x00",
            "unknown-field": enc({"type": "remain", "session_id": "s", "later": [1, {"a": b""}]}),
        }
    )
    return out
