"""The user daemon process: a control socket, and at most one session.

Started detached by `telepresence connect`, as the user (kubeconfig credentials and exec
plugins belong to the user). It exits after `quit`, after a failed connect (so a failure
leaves no process behind), and on SIGTERM, always undoing its session first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

from telepresence import __version__, ipc, paths, versions
from telepresence.benchclient import BenchError
from telepresence.daemon import benchrun, control
from telepresence.daemon.request import ConnectError, ConnectRequest
from telepresence.daemon.session import Session
from telepresence.fdlimit import raise_open_file_limit
from telepresence.netfilter.client import HelperListener

log = logging.getLogger("telepresence.daemon")


class Daemon:
    def __init__(self, *, debug: bool) -> None:
        self.debug = debug
        self.session: Session | None = None
        #: Where the helper `connect` starts on the user's terminal connects, from the
        #: CLI's `helper-listen` until the next connect takes it.
        self.helper_listener: HelperListener | None = None
        self.stopping = asyncio.Event()
        self.server: asyncio.Server | None = None
        self._connecting = asyncio.Lock()
        self._clients: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        sock_path = paths.daemon_socket()
        sock_path.unlink(missing_ok=True)
        old_umask = os.umask(0o177)  # the socket is created owner-only
        try:
            self.server = await asyncio.start_unix_server(
                self._client, path=str(sock_path), limit=ipc.MAX_REQUEST
            )
        finally:
            os.umask(old_umask)
        sock_path.chmod(0o600)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.stopping.set)
        log.info("user daemon %s ready on %s", __version__, sock_path)
        try:
            await self.stopping.wait()
        finally:
            self.server.close()
            await self._end_session()
            sock_path.unlink(missing_ok=True)
            log.info("user daemon stopped")

    async def _end_session(self) -> None:
        if self.helper_listener is not None:
            self.helper_listener.close()
            self.helper_listener = None
        session, self.session = self.session, None
        if session is not None:
            await session.close()

    def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._handle(reader, writer), name="control-client")
        self._clients.add(task)
        task.add_done_callback(self._clients.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(obj: dict[str, Any]) -> None:
            writer.write(ipc.encode(obj))

        try:
            try:
                line = await reader.readline()
            except ValueError:  # longer than the reader's limit
                line = b""
                send({"error": f"a request of more than {ipc.MAX_REQUEST} bytes refused"})
            if not line:
                return
            try:
                command = control.parse_request(line)
            except ipc.MalformedMessage as e:
                log.info("control client: %s", e)
                send({"error": str(e)})
                return
            match command:
                case control.Status(flows=flows):
                    send({"result": self.status(flows=flows)})
                case control.HelperListen():
                    send(self._helper_listen())
                case control.Connect(request):
                    await self._connect(request, send)
                case control.Intercept() | control.Leave() | control.ListIntercepts():
                    send(self._intercepts(command))
                case control.Bench(seconds):
                    send(await self._bench(seconds))
                case control.Quit():
                    send({"result": {"pid": os.getpid()}})
                    await writer.drain()
                    self.stopping.set()
            await writer.drain()
        except (ConnectionError, ValueError) as e:
            log.info("control client: %s", e)
        finally:
            writer.close()

    async def _bench(self, seconds: float) -> dict[str, Any]:
        session = self.session
        if session is None or not session.connected or session.pool is None:
            return {"error": "not connected: run `telepresence connect` first"}
        try:
            result = await benchrun.run(session.pool, seconds=seconds)
        except BenchError as e:
            return {"error": str(e)}
        return {"result": {"transport": session.status()["user_daemon"]["transport"], **result}}

    async def _connect(self, request: ConnectRequest, send: Any) -> None:
        async with self._connecting:
            if self.session is not None and self.session.connected:
                send({"result": self.session.connect_result()})
                return
            listener, self.helper_listener = self.helper_listener, None
            session = Session(
                request, debug=self.debug, on_lost=self._session_lost, helper_listener=listener
            )
            try:
                result = await session.connect(lambda text: send({"progress": text}))
            except ConnectError as e:
                log.warning("connect failed: %s", e)
                await session.close()
                send({"error": str(e)})
                self.stopping.set()
                return
            except Exception as e:
                log.exception("connect failed")
                await session.close()
                send(
                    {
                        "error": f"connect failed unexpectedly: {e}; see "
                        f"{paths.logs_dir() / 'daemon.log'}"
                    }
                )
                self.stopping.set()
                return
            self.session = session
            send({"result": result})

    def _helper_listen(self) -> dict[str, Any]:
        """Opens the socket for a helper the CLI starts (see `HelperListener`)."""
        if self.session is not None:
            return {"error": "already connected; run `telepresence quit` first"}
        if self.helper_listener is None:
            self.helper_listener = HelperListener(paths.runtime_dir())
        return {"result": {"socket": str(self.helper_listener.path)}}

    def _intercepts(
        self, command: control.Intercept | control.Leave | control.ListIntercepts
    ) -> dict[str, Any]:
        session = self.session
        if session is None or not session.connected:
            return {"error": "not connected; run `telepresence connect` first"}
        try:
            if isinstance(command, control.Intercept):
                session.intercept(command.name, command.namespace)
            elif isinstance(command, control.Leave):
                session.leave(command.name)
        except ConnectError as e:
            return {"error": str(e)}
        return {"result": {"intercepts": session.status()["user_daemon"]["intercept_list"]}}

    def _session_lost(self, reason: str) -> None:
        """The network helper died: without it nothing routes, so stop cleanly."""
        log.error("session lost: %s", reason)
        self.stopping.set()

    def status(self, *, flows: bool = False) -> dict[str, Any]:
        """The session's status; with ``flows``, also its open flows and recent errors
        (`telepresence status --flows`), empty lists when there is no session."""
        if self.session is None:
            status: dict[str, Any] = {
                "user_daemon": {
                    "running": True,
                    "version": versions.package_version(),
                    "status": "Not connected",
                },
                "root_daemon": {"running": False},
            }
            if flows:  # the shape of FlowBook.snapshot, with nothing in it
                status.update({"flows": [], "flows_open": 0, "errors": []})
            return status
        status = self.session.status()
        if flows:
            status.update(self.session.flows())
        return status


def main() -> None:
    parser = argparse.ArgumentParser(prog="telepresence-daemon")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    raise_open_file_limit()
    policy = event_loop_policy(os.environ)
    if policy is not None:
        asyncio.set_event_loop_policy(policy)
    log.info("event loop: %s", "uvloop" if policy is not None else "asyncio")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Daemon(debug=args.debug).serve())


#: "asyncio" keeps the standard library's loop even where uvloop is installed (for A/B
#: benchmarks, and a way out should uvloop misbehave somewhere).
EVENT_LOOP_ENV = "TELEPRESENCE_EVENT_LOOP"


def event_loop_policy(env: Mapping[str, str]) -> asyncio.AbstractEventLoopPolicy | None:
    """uvloop where it is installed: every flow's bytes pass through the event loop
    several times, and uvloop's loop and transports cost less per pass."""
    if env.get(EVENT_LOOP_ENV) == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    policy: asyncio.AbstractEventLoopPolicy = uvloop.EventLoopPolicy()
    return policy
