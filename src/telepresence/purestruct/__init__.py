"""A pure-Python stand-in for the part of msgspec that the traffic manager uses.

The traffic manager runs on a stock ``python:3.11-slim`` image with its code on
PYTHONPATH as zip files, where compiled extensions cannot be loaded, and msgspec has
no pure-Python fallback. The image bundler therefore copies this package into the zip
as a top-level ``msgspec`` package. It implements only what the manager's code (the
tunnel, the Kubernetes API client) uses: ``Struct`` with its class keywords, the error
classes, and MessagePack and JSON encoders and typed decoders. It imports nothing but
the standard library and its own modules, relatively, so it works under either name.

tests/unit/test_purestruct.py keeps it wire-compatible with msgspec: the bytes it
writes are compared with msgspec's, and the tunnel's tests are run against it.
"""

from __future__ import annotations

from . import json, msgpack
from ._core import DecodeError, EncodeError, MsgspecError, Struct, ValidationError

__all__ = [
    "DecodeError",
    "EncodeError",
    "MsgspecError",
    "Struct",
    "ValidationError",
    "json",
    "msgpack",
]
