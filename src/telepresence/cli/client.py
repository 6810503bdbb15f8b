"""The CLI's side of the daemon's control socket: newline-delimited JSON, no asyncio."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from telepresence import ipc, paths


class DaemonError(Exception):
    """The daemon refused or failed; the message is the daemon's one line for the user."""


class ProgressSink(Protocol):
    def step(self, text: str) -> None: ...
    def tick(self) -> None: ...
    def done(self) -> None: ...


def _connect(timeout: float = 2.0) -> socket.socket | None:
    path = paths.daemon_socket()
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        # A socket file with nobody behind it: a daemon that was killed.
        path.unlink(missing_ok=True)
        return None
    return sock


def _replies(sock: socket.socket, on_idle: Any = None) -> Iterator[ipc.Reply]:
    """The daemon's reply lines, checked (ipc.parse_reply); a malformed one, or one longer
    than ipc.MAX_REPLY, is a DaemonError."""
    reader = ipc.LineReader(limit=ipc.MAX_REPLY)
    try:
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if on_idle is None:
                    raise
                on_idle()
                continue
            lines = reader.feed(chunk) if chunk else [reader.end()]
            for line in lines:
                if line.strip():
                    yield ipc.parse_reply(line)
            if not chunk:
                return
    except ipc.MalformedMessage as e:
        raise DaemonError(f"{e}; see its log in {paths.logs_dir()}") from None


def request(message: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any] | None:
    """One request, one answer; None when no daemon is running."""
    sock = _connect(timeout)
    if sock is None:
        return None
    with sock:
        sock.sendall(ipc.encode(message))
        for reply in _replies(sock):
            if isinstance(reply, ipc.Failure):
                raise DaemonError(reply.message)
            if isinstance(reply, ipc.Result):
                return reply.value
    raise DaemonError(
        f"the daemon closed the connection without answering; see its log in {paths.logs_dir()}"
    )


def request_with_progress(message: dict[str, Any], progress: ProgressSink) -> dict[str, Any]:
    sock = _connect(0.1)
    if sock is None:
        raise DaemonError(f"the daemon is not running; see {paths.logs_dir()}/daemon.log")
    with sock:
        sock.sendall(ipc.encode(message))
        try:
            for reply in _replies(sock, on_idle=progress.tick):
                if isinstance(reply, ipc.Progress):
                    progress.step(reply.text)
                elif isinstance(reply, ipc.Failure):
                    progress.done()
                    raise DaemonError(reply.message)
                else:
                    progress.done()
                    return reply.value
        finally:
            progress.done()
    raise DaemonError(f"the daemon stopped while connecting; see {paths.logs_dir()}/daemon.log")


def status(*, flows: bool = False) -> dict[str, Any]:
    """The daemon's status; with ``flows``, also its open flows and recent errors
    (the keys ``flows``, ``flows_open`` and ``errors``)."""
    reply = request({"cmd": "status", "flows": True} if flows else {"cmd": "status"})
    if reply is None:
        reply = {"user_daemon": {"running": False}, "root_daemon": {"running": False}}
        if flows:
            reply.update({"flows": [], "flows_open": 0, "errors": []})
    return reply


def quit() -> None:
    reply = request({"cmd": "quit"}, timeout=60)
    if reply is None:
        return
    pid = reply.get("pid")
    deadline = time.monotonic() + 30
    while pid and time.monotonic() < deadline:
        if not running(pid):
            return
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Whether `pid` still runs. A process that has exited but whose parent has not reaped
    it yet (a zombie) has finished: the daemon is detached, so its parent is whatever
    reaps orphans, which in a container may be slow or never do it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): the signal test is all there is
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def launch_daemon(*, debug: bool) -> None:
    """Starts the user daemon detached, logging to the cache dir, and waits for its socket."""
    log = paths.logs_dir() / "daemon.log"
    argv = [sys.executable, "-m", "telepresence.daemon"]
    if debug:
        argv.append("--debug")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, cwd="/"
        )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        sock = _connect(1.0)
        if sock is not None:
            sock.close()
            return
        if proc.poll() is not None:
            raise DaemonError(f"the daemon exited at start (code {proc.returncode}); see {log}")
        time.sleep(0.02)
    raise DaemonError(f"the daemon did not start in 15s; see {log}")
