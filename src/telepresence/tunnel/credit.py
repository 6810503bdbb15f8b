"""How much receive credit each stream of one connection gets: the connection's memory bound.

Every byte a peer may send is a byte this side may have to hold (a local reader that stops
reading leaves it in our buffers), so the credit outstanding over all streams is the
receive side's memory. A fixed large window per stream makes that grow with the number
of streams; a fixed small one caps every download near window / round trip. So a stream
starts at the connection's initial window and earns more as it is read: once it has
consumed ``evidence`` windows' worth since it last grew, its window doubles, up to
``max_window``, while the growth of all streams together stays within ``limit``. A
stream that is never read keeps its initial window; one that stalls after growing keeps
what it had, still inside the limit. The bound for one connection is therefore
``limit + initial * open streams`` (docs/architecture.md, "Memory").

Growth waits for that much evidence because credit once granted cannot be taken back: a
reader that stalls keeps its window full of our data. A flow whose reader stops after a
burst (the kernel's socket buffers absorb the first few hundred KiB of any flow) must not
have grown by then, or a hundred such flows would spend the whole budget and leave a
busy download beside them stuck at its initial window. Only a transfer that keeps going
earns a bulk window, after a few MiB.

The peer sees nothing but WINDOW_UPDATEs, which every protocol version accepts, so this
is a local policy: no negotiation, and an older peer is unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReceiveBudget:
    """Window growth for one connection. Pure bookkeeping: the state machine asks it how
    large a stream's window becomes at each credit return and tells it when a stream no
    longer needs credit."""

    limit: int
    """The most the windows of all streams together may grow above the initial window."""
    max_window: int
    """No single stream's window grows beyond this (the bandwidth-delay product one flow
    needs)."""
    evidence: int = 4
    """How many of its current windows a stream must consume before that window doubles."""
    grown: int = 0
    """Bytes of growth currently held by open streams."""

    def __post_init__(self) -> None:
        if self.limit < 0 or self.max_window <= 0:
            raise ValueError(f"invalid receive budget {self.limit}/{self.max_window}")

    def resize(self, window: int, consumed: int) -> int:
        """The stream's next window, given its current one and what it consumed since that
        was set: doubled once that is enough evidence and while this connection's budget
        and the per-stream cap allow, otherwise unchanged."""
        if consumed < self.evidence * window:
            return window
        room = min(window, self.max_window - window, self.limit - self.grown)
        if room <= 0:
            return window
        self.grown += room
        return window + room

    def release(self, window: int, initial: int) -> None:
        """A stream that grew from ``initial`` to ``window`` needs no more credit (closed,
        reset, or the peer sent FIN): its growth is free for other streams."""
        self.grown -= window - initial
        if self.grown < 0:
            raise AssertionError(f"receive budget released more than it granted ({self.grown})")
