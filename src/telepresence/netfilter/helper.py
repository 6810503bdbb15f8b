"""The network helper: the one root process, making only the privileged changes.

Started as ``sudo telepresence-helper --connect PATH --detach`` by `telepresence
connect` on the user's terminal (so sudo can ask for the password there), or as
``sudo -n telepresence-helper --connect PATH`` by the user daemon when it runs
without a CLI in front of it: the daemon listens on a Unix
socket in its owner-only runtime directory, the helper connects to it (sudo
closes inherited descriptors, hence a path), checks that the peer is the
user who ran sudo, and serves requests (see :mod:`.protocol`) until the
connection closes.  Then, or on Teardown or SIGTERM/SIGINT/SIGHUP, it undoes
everything (DNS redirect first) and exits.  ``--cleanup`` undoes what the
journals of dead helpers recorded; ``telepresence quit`` runs it.

Like sshuttle's firewall helper, it is small, synchronous and single
threaded: one request at a time, each either applied fully or rolled back.
This module is the entry point and the connection; what a request may do is
:mod:`.policy` and :mod:`.dnspolicy`, applying it :mod:`.state`.  It imports
nothing of the daemon, Kubernetes, aiohttp or dnspython (a unit test checks):
root runs only this, msgspec and jeepney.
See docs/security.md.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import selectors
import signal
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from telepresence.netfilter import fdpass, protocol
from telepresence.netfilter.journal import (
    DEFAULT_DIR,
    Journal,
    SweepReport,
    current_identity,
    sweep,
)
from telepresence.netfilter.nftables import Nft
from telepresence.netfilter.protocol import Error, Ok, Request, Response, Teardown
from telepresence.netfilter.state import LOG_FILE, NetworkState, undo_entry

__all__ = ["PeerError", "cleanup", "main", "run", "serve"]

log = logging.getLogger("telepresence.netfilter.helper")

_UCRED = struct.Struct("3i")
#: Python's default SIGPIPE is already ignored; these end the session cleanly.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# --- the connection ----------------------------------------------------------


class PeerError(Exception):
    """The process at the other end of the socket is not the user who ran sudo."""


def _expected_uid() -> int:
    sudo_uid = os.environ.get("SUDO_UID")
    return int(sudo_uid) if sudo_uid is not None else os.getuid()


def _connect(path: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        pid, uid, _gid = _UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        expected = _expected_uid()
        if uid != expected:
            raise PeerError(
                f"refusing {path}: it is served by uid {uid} (pid {pid}), but sudo was run by "
                f"uid {expected}; only the user's own daemon may drive the helper"
            )
    except BaseException:
        conn.close()
        raise
    log.info("connected to %s (daemon pid %d, uid %d)", path, pid, uid)
    return conn


def _send(conn: socket.socket, response: Response, fds: Sequence[int]) -> None:
    fdpass.send_with_fds(conn, protocol.encode(response, fds=len(fds)), fds)


def _receive(conn: socket.socket) -> bytes:
    """Bytes from the daemon; stray descriptors (requests carry none) are closed."""
    data, fds, _truncated = fdpass.recv_with_fds(conn, max_fds=protocol.MAX_FDS)
    fdpass.close_fds(fds)
    return data


def _refuse(conn: socket.socket, reason: str) -> None:
    """An :class:`Error` for a message that was never a valid request."""
    reason = " ".join(reason.split())
    log.warning("refused a malformed request: %s", reason)
    _send(conn, Error(message=reason), [])


def serve(conn: socket.socket, state: NetworkState, *, wakeup: socket.socket) -> int:
    """Answers requests until Teardown, the connection closes, or a stop signal.

    A malformed message (garbage, an unknown type or field, a wrong type) is
    answered with an Error and changes nothing; a frame that cannot be
    delimited (too large, a bad header) is answered with an Error too, and
    then the connection ends, since what follows cannot be trusted to be a
    frame.  Returns the exit status: 0 when everything was undone, 1
    otherwise (the journal then keeps what is left for ``--cleanup``).
    """
    decoder = protocol.FrameDecoder.for_requests()
    selector = selectors.DefaultSelector()
    selector.register(conn, selectors.EVENT_READ)
    selector.register(wakeup, selectors.EVENT_READ)
    try:
        _send(conn, protocol.Hello(version=protocol.VERSION, pid=os.getpid()), [])
        while True:
            ready = {key.fileobj for key, _ in selector.select()}
            if wakeup in ready:
                signum = wakeup.recv(1)[:1]
                log.info("signal %s: tearing down", signum[0] if signum else "?")
                break
            data = _receive(conn)
            if not data:
                log.info("daemon closed the connection: tearing down")
                break
            decoder.feed(data)
            while True:
                try:
                    item = decoder.next()
                except protocol.MalformedMessage as e:
                    _refuse(conn, str(e))
                    continue
                except protocol.ProtocolError as e:
                    _refuse(conn, f"{e}; closing the connection")
                    raise
                if item is None:
                    break
                message, _ = item
                if not isinstance(message, Request):  # the request decoder allows no other
                    _refuse(conn, f"{type(message).__name__} is not a request")
                    continue
                log.debug("request %s", message)
                response, fds = state.handle(message)
                try:
                    _send(conn, response, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
                if isinstance(message, Teardown):
                    return 0 if isinstance(response, Ok) else 1
    except (OSError, protocol.ProtocolError) as e:
        log.warning("connection lost (%s): tearing down", e)
    except Exception:
        log.exception("unexpected error: tearing down")
    finally:
        selector.close()
        decoder.close()
    return 1 if state.teardown() else 0


# --- entry points ---------------------------------------------------------------


def _setup_logging(*, debug: bool) -> None:
    """A root-owned log file, plus warnings on stderr for the daemon to show."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = "%(asctime)s helper[%(process)d] %(levelname)s %(message)s"
    try:
        LOG_FILE.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            LOG_FILE, maxBytes=5 * 1024 * 1024, backupCount=1
        )
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
    except OSError as e:
        print(f"telepresence-helper: cannot log to {LOG_FILE}: {e}", file=sys.stderr)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.WARNING)
    stderr.setFormatter(logging.Formatter("telepresence-helper: %(message)s"))
    root.addHandler(stderr)


def _sweep(journal_dir: Path) -> SweepReport:
    """Undoes what dead helpers left in this namespace."""
    try:
        with Nft() as nft:
            report = sweep(
                journal_dir, current=current_identity(), undo=lambda e: undo_entry(nft, e)
            )
    except Exception as e:
        log.exception("cleanup failed")
        return SweepReport(undone=[], failed=[f"{journal_dir}: {e}"], skipped=[])
    for item in report.undone:
        log.info("cleaned up %s", item)
    for item in report.skipped:
        log.debug("cleanup skipped %s", item)
    return report


def cleanup(journal_dir: Path = DEFAULT_DIR) -> int:
    """``--cleanup``: idempotent; exit status 0 when nothing is left to undo.

    Prints one line per leftover it removed, so ``telepresence quit`` can say so.
    """
    report = _sweep(journal_dir)
    for item in report.undone:
        print(f"removed leftover {item}")
    for item in report.failed:
        print(f"telepresence-helper: could not clean up {item}", file=sys.stderr)
    return 1 if report.failed else 0


def detach() -> int | Callable[[str], None]:
    """``--detach``: in the parent, waits until the child has connected to the daemon (or
    failed to) and returns the exit status, so the CLI learns the outcome from sudo's; in
    the child, which lives on without the terminal once sudo and the CLI have gone,
    returns the function that ends that report: ``ok``, or why it could not connect.
    """
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            report = pipe.read().strip()
        if report == "ok":
            return 0
        print(f"telepresence-helper: {report or 'exited before connecting'}", file=sys.stderr)
        return 2
    os.close(read_end)
    os.setsid()  # no terminal: the user closing it must not end the session

    def report_and_let_go(text: str) -> None:
        os.write(write_end, text.encode() + b"\n")
        os.close(write_end)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    return report_and_let_go


def run(
    path: str, *, journal_dir: Path = DEFAULT_DIR, report: Callable[[str], None] | None = None
) -> int:
    """``--connect PATH``: serve one daemon, then undo everything and return. ``report``
    (a detached helper's) hears whether the connection was made."""
    for failure in _sweep(journal_dir).failed:
        log.warning("leftover from an earlier helper not cleaned: %s", failure)
    wakeup_read, wakeup_write = socket.socketpair()
    wakeup_write.setblocking(False)
    signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda *_: None)
    try:
        conn = _connect(path)
    except (OSError, PeerError) as e:
        log.error("cannot connect to the daemon at %s: %s", path, e)
        if report is not None:
            report(f"cannot connect to the daemon at {path}: {e}")
        return 2
    if report is not None:
        report("ok")
    with conn, Nft() as nft:
        state = NetworkState(nft=nft, journal=Journal(journal_dir, owner=current_identity()))
        try:
            return serve(conn, state, wakeup=wakeup_read)
        finally:
            state.teardown()  # a no-op unless serve() itself failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="telepresence-helper",
        description="Telepresence's network helper: run by the user daemon through sudo.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--connect", metavar="PATH", help="the daemon's Unix socket")
    mode.add_argument(
        "--cleanup", action="store_true", help="undo what dead helpers left behind, then exit"
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="with --connect: return once connected and serve in the background",
    )
    parser.add_argument("--debug", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("telepresence-helper: must run as root (the daemon uses sudo)", file=sys.stderr)
        return 2
    _setup_logging(debug=args.debug)
    if args.cleanup:
        return cleanup()
    report = None
    if args.detach:
        detached = detach()
        if isinstance(detached, int):
            return detached
        report = detached
    return run(args.connect, report=report)


if __name__ == "__main__":
    sys.exit(main())
