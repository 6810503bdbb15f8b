"""Waiting on a condition with a deadline, for the asyncio tests (never a bare sleep)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable

#: How often the condition is looked at: short, so a test waits little past the moment.
POLL = 0.01


async def until(check: Callable[[], object], what: str, timeout: float = 10) -> None:
    """Returns as soon as ``check()`` is truthy (awaited first if it is awaitable, for a
    check that must ask a server); fails naming ``what`` after ``timeout``."""

    async def poll() -> None:
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(POLL)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None
