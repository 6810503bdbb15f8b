"""`telepresence quit` waits for the daemon to exit; an exited process nobody has reaped yet
(a zombie) has exited. In a container whose PID 1 never reaps orphans, treating it as
running made every quit wait its full 30 s."""

from __future__ import annotations

import os
import subprocess
import sys

from telepresence.cli.client import running
from tests.unit.waiting import until


async def test_a_running_process_runs_and_a_zombie_does_not() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert running(child.pid)
        assert child.stdin is not None
        child.stdin.close()  # it exits; not reaped until wait()
        await until(lambda: not running(child.pid), "the child to be a zombie", timeout=10)
        assert os.waitpid(child.pid, os.WNOHANG)[0] == child.pid  # it was a zombie
    finally:
        child.kill()
        child.wait()
    assert not running(child.pid)
