"""One module per parser; each has ``TestOneInput(data)``, which asserts the parser's
contract (an ``AssertionError`` or any exception the contract does not name is a bug),
and ``seeds()``, the seed corpus made with the real encoders.

Nothing here imports the code under test: :mod:`fuzz.engine` imports a target inside
atheris' import hook, so that the code it exercises is instrumented for coverage.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TARGETS", "Target"]


@dataclass(frozen=True, slots=True)
class Target:
    #: What the fuzzer reads; shown by ``python -m fuzz list``.
    about: str
    #: Packages instrumented for coverage: the parser's, and a library it hands the
    #: bytes to when the library's branches are what steers the input.
    instrument: tuple[str, ...] = ("telepresence",)
    #: Longest input libFuzzer makes (-max_len): past every limit the parser enforces
    #: near the start of an input, small enough to keep each run fast.
    max_len: int = 4096


TARGETS: dict[str, Target] = {
    "tunnel": Target(
        "tunnel frames and the connection state machine, as either end (tunnel/protocol.py)",
        max_len=8192,
    ),
    "control": Target(
        "control messages: msgspec on the laptop, the purestruct stand-in in the manager",
    ),
    "dns": Target(
        "the daemon's DNS server: Resolver.answer over UDP and TCP framing (daemon/dns*.py)",
        instrument=("telepresence", "dns"),
    ),
    "helper": Target(
        "the root helper's requests: FrameDecoder.for_requests() and the policy checks",
    ),
    "ipc_request": Target(
        "the daemon's control socket: one request line from the CLI (daemon/control.py)",
    ),
    "ipc_reply": Target(
        "the CLI's side of the control socket: reply lines from the daemon (ipc.py)",
    ),
    "tun_packet": Target(
        "IPv4/UDP packets read from the TUN device (daemon/packets.py)",
        max_len=2048,
    ),
}
