"""Supervised child processes: started, logged, restarted when they stop, stopped on exit."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

log = logging.getLogger("devcluster")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Children get SIGKILL when the supervisor dies, even by kill -9."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setsid()


class Supervised:
    """One process that is kept running until `stop` is called."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_file: Path,
        env: dict[str, str] | None = None,
        on_exit: Callable[[int], None] | None = None,
        max_backoff: float = 5.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_file = log_file
        self.env = env
        self.on_exit = on_exit
        self.max_backoff = max_backoff
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.started = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"supervise:{self.name}")

    async def _run(self) -> None:
        backoff = 0.2
        while not self._stopping:
            with self.log_file.open("ab") as out:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    env=self.env,
                    preexec_fn=_die_with_parent,
                )
            self.started.set()
            code = await self.proc.wait()
            if self._stopping:
                return
            log.warning("%s exited with %s; restarting", self.name, code)
            if self.on_exit:
                self.on_exit(code)
            self.restarts += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def command_lines() -> Iterator[tuple[int, str]]:
    """Every process on the machine with its command line (arguments joined by spaces),
    for tests and benchmarks that look for a process; ones that vanish are skipped."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        yield int(proc.name), cmdline
