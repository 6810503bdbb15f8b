"""The network helper: the one root process, making only the privileged changes.

Started by the unprivileged user daemon as
``sudo -n telepresence-helper --connect PATH``: the daemon listens on a Unix
socket in its owner-only runtime directory, the helper connects to it (sudo
closes inherited descriptors, hence a path), checks that the peer is the
user who ran sudo, and serves requests (see :mod:`.protocol`) until the
connection closes.  Then, or on Teardown or SIGTERM/SIGINT/SIGHUP, it undoes
everything (DNS redirect first) and exits.  ``--cleanup`` undoes what the
journals of dead helpers recorded; ``telepresence quit`` runs it.

Like sshuttle's firewall helper, it is small, synchronous and single
threaded: one request at a time, each either applied fully or rolled back,
each change written to the journal before it is made.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import logging
import logging.handlers
import os
import selectors
import signal
import socket
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path

from telepresence.netfilter import nftables, protocol, routes, tun
from telepresence.netfilter.journal import (
    DEFAULT_DIR,
    Entry,
    Journal,
    LinkEntry,
    NftTableEntry,
    RouteEntry,
    SweepReport,
    current_identity,
    sweep,
)
from telepresence.netfilter.nftables import Nft, NftError, TableConfig
from telepresence.netfilter.protocol import (
    AddHostRoutes,
    Error,
    HostRoutesDone,
    Ok,
    RemoveHostRoutes,
    Request,
    Response,
    Setup,
    SetupDone,
    SocketReady,
    Status,
    StatusReply,
    SubnetsDone,
    Teardown,
    UpdateSubnets,
    UpstreamSocket,
)
from telepresence.netfilter.subnets import (
    IPAddress,
    IPNetwork,
    find_conflicts,
    parse_cidr_list,
    routed_subnets,
)

__all__ = ["Plan", "Session", "SetupError", "main", "plan_setup"]

log = logging.getLogger("telepresence.netfilter.helper")

LOG_FILE = Path("/var/log/telepresence/helper.log")
_SO_MARK = getattr(socket, "SO_MARK", 36)
_UCRED = struct.Struct("3i")
#: Python's default SIGPIPE is already ignored; these end the session cleanly.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class SetupError(Exception):
    """A request cannot be applied as asked; the message says what to change."""


# --- validating requests (pure) ----------------------------------------------


def _ipv4_networks(items: Sequence[str], *, what: str) -> list[IPv4Network]:
    nets: list[IPv4Network] = []
    for net in parse_cidr_list(",".join(items)):
        if not isinstance(net, IPv4Network):
            raise SetupError(
                f"{what} {net} is IPv6, which the network helper does not route yet; leave it out"
            )
        nets.append(net)
    return nets


def _ipv4_addresses(items: Iterable[str], *, what: str) -> list[IPv4Address]:
    result: list[IPv4Address] = []
    for item in items:
        try:
            addr = ip_address(item)
        except ValueError:
            raise SetupError(f"invalid {what} {item!r}: expected an IPv4 address") from None
        if not isinstance(addr, IPv4Address):
            raise SetupError(f"{what} {addr} is IPv6, which the network helper does not handle yet")
        result.append(addr)
    return result


def _addresses(items: Iterable[str]) -> list[IPAddress]:
    try:
        return [ip_address(item) for item in items]
    except ValueError as e:
        raise SetupError(f"invalid host address: {e}") from None


def _port(value: int, *, what: str) -> int:
    if not 1 <= value <= 65535:
        raise SetupError(f"invalid {what} {value}: expected 1..65535")
    return value


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A validated Setup: everything needed to apply it and later requests."""

    tun_name: str
    tun_address: IPv4Address
    requested: list[IPv4Network]
    never_proxy: list[IPNetwork]
    api_server_ips: list[IPv4Address]
    allow_conflicting: bool
    allowed_conflicts: list[IPNetwork]
    table: TableConfig

    def routed(self, subnets: Iterable[IPv4Network]) -> list[IPv4Network]:
        """``subnets`` minus never-proxy, the API server and loopback: never
        route the tunnel's own transport into the tunnel."""
        nets = routed_subnets(
            service_cidrs=subnets,
            pod_cidrs=(),
            never_proxy=self.never_proxy,
            api_server_ips=self.api_server_ips,
        )
        return [n for n in nets if isinstance(n, IPv4Network)]

    def check_conflicts(
        self, nets: Iterable[IPv4Network], existing: Iterable[tuple[IPNetwork, str]]
    ) -> None:
        """Raises :class:`SetupError` naming the first overlap of ``nets`` with the
        laptop's routes (and its fixes), unless conflicts are allowed."""
        if self.allow_conflicting:
            return
        conflicts = [
            c
            for c in find_conflicts(nets, existing, own_device=self.tun_name)
            if not _within(c.overlap, self.allowed_conflicts)
        ]
        if conflicts:
            more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
            raise SetupError(conflicts[0].message + more)


def _within(net: IPNetwork, nets: Iterable[IPNetwork]) -> bool:
    return any(
        net.subnet_of(other)  # type: ignore[arg-type]  # same version checked first
        for other in nets
        if other.version == net.version
    )


def plan_setup(request: Setup) -> Plan:
    """Validates a Setup without touching the system; SetupError says what is wrong."""
    try:
        tun_name = tun.validate_tun_name(request.tun_name)
        table = nftables.validate_table_name(request.nft_table)
        never_proxy = parse_cidr_list(",".join(request.never_proxy))
        allowed = parse_cidr_list(",".join(request.allow_conflicting_subnets))
        requested = _ipv4_networks(request.subnets, what="subnet")
    except ValueError as e:
        raise SetupError(str(e)) from None
    (tun_address,) = _ipv4_addresses([request.tun_address], what="TUN address")
    if tun_address.is_loopback or tun_address.is_multicast or tun_address.is_unspecified:
        raise SetupError(f"invalid TUN address {tun_address}: use a unicast address such as ours")
    if not 0 < request.mark < 2**32:
        raise SetupError(f"invalid mark {request.mark}: expected 1..{2**32 - 1}")
    config = TableConfig(
        name=table,
        mark=request.mark,
        proxy_port=_port(request.proxy_port, what="proxy port"),
        dns_port=_port(request.dns_redirect_port, what="DNS redirect port"),
        dns_servers=_ipv4_addresses(request.dns_nameservers, what="DNS nameserver"),
        routed=(),
    )
    return Plan(
        tun_name=tun_name,
        tun_address=tun_address,
        requested=requested,
        never_proxy=never_proxy,
        api_server_ips=_ipv4_addresses(request.api_server_ips, what="API server address"),
        allow_conflicting=request.allow_conflicting,
        allowed_conflicts=allowed,
        table=config,
    )


# --- the applied state ---------------------------------------------------------


@dataclass
class _Applied:
    """What exists now, so teardown knows what to undo without asking the kernel."""

    plan: Plan
    tun: tun.Tun | None = None
    link: LinkEntry | None = None
    table: NftTableEntry | None = None
    subnets: list[IPv4Network] = field(default_factory=list)
    hosts: set[IPv4Address] = field(default_factory=set)
    routes: dict[IPv4Network, RouteEntry] = field(default_factory=dict)

    def desired_routes(self) -> set[IPv4Network]:
        return set(self.subnets) | {IPv4Network(h) for h in self.hosts}


class Session:
    """Applies requests, one at a time; every change is journaled first and
    undone by :meth:`teardown`, each undo in its own try."""

    def __init__(self, *, nft: Nft, journal: Journal) -> None:
        self._nft = nft
        self._journal = journal
        self._applied: _Applied | None = None

    def handle(self, request: Request) -> tuple[Response, list[int]]:
        """The response and descriptors to send; the caller closes the descriptors after."""
        try:
            return self._dispatch(request)
        except (SetupError, ValueError, NftError, routes.IpError, tun.TunError) as e:
            log.warning("%s failed: %s", type(request).__name__, e)
            return Error(message=str(e)), []
        except OSError as e:
            log.warning("%s failed: %s", type(request).__name__, e)
            return Error(message=f"{type(request).__name__} failed: {e}"), []
        except Exception as e:
            log.exception("%s failed", type(request).__name__)
            return Error(message=f"internal error in the network helper ({e}); see {LOG_FILE}"), []

    def _dispatch(self, request: Request) -> tuple[Response, list[int]]:
        if isinstance(request, Setup):
            return self._setup(request)
        if isinstance(request, Status):
            return self._status(), []
        if isinstance(request, Teardown):
            failures = self.teardown()
            if failures:
                raise SetupError("teardown incomplete: " + "; ".join(failures))
            return Ok(), []
        applied = self._applied
        if applied is None:
            raise SetupError(f"{type(request).__name__} before Setup: send Setup first")
        if isinstance(request, UpdateSubnets):
            nets = applied.plan.routed(_ipv4_networks(request.subnets, what="subnet"))
            new = set(nets) - set(applied.subnets)
            applied.plan.check_conflicts(sorted(new), routes.laptop_routes())
            self._reconcile(applied, subnets=nets, hosts=applied.hosts)
            return SubnetsDone(routed=[str(n) for n in applied.subnets]), []
        if isinstance(request, AddHostRoutes):
            return self._add_hosts(applied, _addresses(request.ips)), []
        if isinstance(request, RemoveHostRoutes):
            gone = set(_addresses(request.ips))
            self._reconcile(applied, subnets=applied.subnets, hosts=applied.hosts - gone)
            return HostRoutesDone(hosts=[str(h) for h in sorted(applied.hosts)]), []
        if isinstance(request, UpstreamSocket):
            return SocketReady(kind=request.kind), [self._upstream_socket(applied, request.kind)]
        raise SetupError(f"unknown request {type(request).__name__}")

    # Setup ---------------------------------------------------------------

    def _setup(self, request: Setup) -> tuple[Response, list[int]]:
        if self._applied is not None:
            raise SetupError("already set up: send Teardown first, or UpdateSubnets")
        plan = plan_setup(request)
        existing = routes.get_link(plan.tun_name)
        if existing is not None and existing.kind == "tun":
            raise SetupError(
                f"TUN device {plan.tun_name} already exists: another telepresence session is "
                "connected, or one left it behind (run `telepresence quit`)"
            )
        if existing is not None:
            raise SetupError(
                f"cannot name the TUN device {plan.tun_name}: the laptop has a "
                f"{existing.kind or 'network'} device of that name; choose another TUN name"
            )
        subnets = plan.routed(plan.requested)
        plan.check_conflicts(subnets, routes.laptop_routes())
        applied = _Applied(plan=plan)
        self._applied = applied
        try:
            self._create_tun(applied)
            self._add_routes(applied, sorted(set(subnets)))
            applied.subnets = subnets
            self._create_table(applied)
        except BaseException:
            failures = self.teardown()
            if failures:
                log.error("rollback of the failed Setup incomplete: %s", "; ".join(failures))
            raise
        assert applied.tun is not None
        log.info(
            "set up %s %s, routes %s, table %s",
            plan.tun_name,
            plan.tun_address,
            ", ".join(map(str, subnets)) or "none",
            plan.table.name,
        )
        done = SetupDone(tun_name=plan.tun_name, routed=[str(n) for n in subnets])
        return done, [os.dup(applied.tun.fd)]

    def _create_tun(self, applied: _Applied) -> None:
        plan = applied.plan
        applied.tun = tun.open_tun(plan.tun_name)
        link = routes.get_link(applied.tun.name)
        if link is None:
            raise tun.TunError(f"TUN device {applied.tun.name} vanished right after creation")
        applied.link = LinkEntry(name=link.name, ifindex=link.ifindex)
        self._journal.record(applied.link)
        routes.configure_tun(device=link.name, address=plan.tun_address)

    def _create_table(self, applied: _Applied) -> None:
        plan = applied.plan
        config = TableConfig(
            name=plan.table.name,
            mark=plan.table.mark,
            proxy_port=plan.table.proxy_port,
            dns_port=plan.table.dns_port,
            dns_servers=plan.table.dns_servers,
            routed=applied.subnets,
        )
        entry = NftTableEntry(name=config.name)
        self._journal.record(entry)
        try:
            self._nft.run(nftables.render_create(config))
        except NftError:
            # One transaction: nothing was created, and a table that exists is not ours.
            self._journal.forget(entry)
            if self._nft.table_exists(config.name):
                raise SetupError(
                    f"nftables table ip {config.name} already exists: another telepresence "
                    "session is connected, or one left it behind (run `telepresence quit`)"
                ) from None
            raise
        applied.table = entry

    # Routes and sets -----------------------------------------------------------

    def _add_routes(self, applied: _Applied, nets: Sequence[IPv4Network]) -> None:
        """Journal, then add; on failure remove what this call added, then raise."""
        assert applied.link is not None
        new = [n for n in nets if n not in applied.routes]
        if not new:
            return
        link = applied.link
        entries = {
            n: RouteEntry(network=str(n), device=link.name, ifindex=link.ifindex) for n in new
        }
        self._journal.record(*entries.values())
        applied.routes.update(entries)
        try:
            routes.add_routes(device=link.name, networks=new, source=applied.plan.tun_address)
        except routes.IpError:
            self._undo_routes(applied, new)
            raise

    def _undo_routes(self, applied: _Applied, nets: Sequence[IPv4Network]) -> None:
        """Rollback on an error path: log its own failure, never mask the first one."""
        try:
            self._delete_routes(applied, nets)
        except Exception as e:
            log.error("could not roll back routes %s: %s", ", ".join(map(str, nets)), e)

    def _delete_routes(self, applied: _Applied, nets: Sequence[IPv4Network]) -> None:
        assert applied.link is not None
        routes.delete_routes(device=applied.link.name, ifindex=applied.link.ifindex, networks=nets)
        self._journal.forget(*(applied.routes.pop(n) for n in nets if n in applied.routes))

    def _reconcile(
        self, applied: _Applied, *, subnets: list[IPv4Network], hosts: set[IPv4Address]
    ) -> None:
        """Moves routes and sets to ``subnets`` + ``hosts``, touching only the difference.

        New routes first, then one nft transaction for both sets, then the
        removal of old routes: at no point is an address in a set but not
        routed, and a failure before the nft step leaves the old state.
        """
        plan = applied.plan
        before = applied.desired_routes()
        after = set(subnets) | {IPv4Network(h) for h in hosts}
        added = sorted(after - before)
        self._add_routes(applied, added)
        commands = nftables.render_set_update(
            table=plan.table.name,
            set_name=nftables.ROUTED_SET,
            add=sorted(set(subnets) - set(applied.subnets)),
            remove=sorted(set(applied.subnets) - set(subnets)),
        ) + nftables.render_set_update(
            table=plan.table.name,
            set_name=nftables.HOSTS_SET,
            add=sorted(hosts - applied.hosts),
            remove=sorted(applied.hosts - hosts),
        )
        if commands:
            try:
                self._nft.run(commands)
            except NftError:
                self._undo_routes(applied, added)
                raise
        applied.subnets = list(subnets)
        applied.hosts = set(hosts)
        self._delete_routes(applied, sorted(before - after))
        log.info(
            "routes now %s; hosts %s",
            ", ".join(map(str, applied.subnets)) or "none",
            ", ".join(map(str, sorted(applied.hosts))) or "none",
        )

    def _add_hosts(self, applied: _Applied, ips: list[IPAddress]) -> HostRoutesDone:
        """Routes each address that may be routed; the rest are skipped with a reason
        (a DNS answer must never break the session or hijack the laptop's network)."""
        plan = applied.plan
        skipped: list[str] = []
        allowed: list[IPv4Address] = []
        existing = routes.laptop_routes()
        for ip in dict.fromkeys(ips):
            if not isinstance(ip, IPv4Address):
                skipped.append(f"{ip}: IPv6 is not routed by the network helper yet")
                continue
            if not plan.routed([IPv4Network(ip)]):
                skipped.append(f"{ip}: never proxied (API server, --never-proxy or loopback)")
                continue
            try:
                plan.check_conflicts([IPv4Network(ip)], existing)
            except SetupError as e:
                skipped.append(f"{ip}: {e}")
                continue
            allowed.append(ip)
        self._reconcile(applied, subnets=applied.subnets, hosts=applied.hosts | set(allowed))
        for reason in skipped:
            log.info("host route skipped: %s", reason)
        return HostRoutesDone(hosts=[str(h) for h in sorted(applied.hosts)], skipped=skipped)

    # Sockets and status ------------------------------------------------------

    def _upstream_socket(self, applied: _Applied, kind: str) -> int:
        """SO_MARK needs CAP_NET_ADMIN, which the daemon lacks: the helper makes the
        socket and hands it over; the mark exempts it from the DNS redirect."""
        kind_type = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_INET, kind_type)
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, applied.plan.table.mark)
            return sock.detach()
        finally:
            sock.close()

    def _status(self) -> StatusReply:
        applied = self._applied
        if applied is None:
            return StatusReply(configured=False, helper_pid=os.getpid())
        plan = applied.plan
        link = routes.get_link(plan.tun_name)
        present = (
            link is not None and applied.link is not None and link.ifindex == applied.link.ifindex
        )
        return StatusReply(
            configured=True,
            helper_pid=os.getpid(),
            tun_name=plan.tun_name,
            tun_address=str(plan.tun_address),
            tun_present=present,
            routes=[str(n) for n in routes.routes_on(plan.tun_name)] if present else [],
            hosts=[str(h) for h in sorted(applied.hosts)],
            nft_table=plan.table.name,
            nft_table_present=self._nft.table_exists(plan.table.name),
            dns_redirects=nftables.render_dns_redirects(plan.table),
            proxy_port=plan.table.proxy_port,
            mark=plan.table.mark,
        )

    # Teardown --------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Undoes everything, DNS redirect first; returns what could not be undone.

        Deleting the table removes the DNS redirect and the proxy redirect in
        one atomic step, so the laptop resolves through its own nameserver
        again before anything slower happens.  Idempotent.
        """
        applied, self._applied = self._applied, None
        if applied is None:
            return []
        failures: list[str] = []
        if applied.table is not None:
            try:
                _delete_table(self._nft, applied.table)
                self._journal.forget(applied.table)
            except Exception as e:
                failures.append(f"nftables table {applied.table.name}: {e}")
        if applied.link is not None:
            try:
                self._delete_routes(applied, sorted(applied.routes))
            except Exception as e:
                failures.append(f"routes on {applied.link.name}: {e}")
            try:
                routes.delete_link(name=applied.link.name, ifindex=applied.link.ifindex)
                self._journal.forget(applied.link, *applied.routes.values())
            except Exception as e:
                failures.append(f"link {applied.link.name}: {e}")
        if applied.tun is not None:
            with contextlib.suppress(OSError):
                os.close(applied.tun.fd)
        if failures:
            log.error("teardown incomplete: %s", "; ".join(failures))
        else:
            log.info("teardown complete")
        return failures


def _delete_table(nft: Nft, entry: NftTableEntry) -> bool:
    """True if deleted; gone already is fine, and a table owned by another live
    process (the kernel refuses us) is not ours."""
    try:
        nft.run(nftables.render_delete(entry.name))
    except NftError as e:
        if "No such file or directory" in str(e):
            return False
        if "Operation not permitted" in str(e):
            log.info("table %s belongs to another live process: left alone", entry.name)
            return False
        raise
    return True


def _undo(nft: Nft, entry: Entry) -> bool:
    """Undoes one journal entry of a dead helper; False if it was gone already."""
    if isinstance(entry, NftTableEntry):
        return _delete_table(nft, entry)
    if isinstance(entry, RouteEntry):
        network = IPv4Network(entry.network)
        return routes.delete_routes(device=entry.device, ifindex=entry.ifindex, networks=[network])
    return routes.delete_link(name=entry.name, ifindex=entry.ifindex)


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
    frame = protocol.encode(response, fds=len(fds))
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = conn.sendmsg([frame], ancillary)
        if sent < len(frame):
            conn.sendall(frame[sent:])
    else:
        conn.sendall(frame)


def _receive(conn: socket.socket) -> bytes:
    """Bytes from the daemon; stray descriptors (requests carry none) are closed."""
    data, ancillary, _flags, _addr = conn.recvmsg(
        65536, socket.CMSG_SPACE(protocol.MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                os.close(fd)
    return data


def serve(conn: socket.socket, session: Session, *, wakeup: socket.socket) -> int:
    """Answers requests until Teardown, the connection closes, or a stop signal.

    Returns the exit status: 0 when everything was undone, 1 otherwise
    (the journal then keeps what is left for ``--cleanup``).
    """
    decoder = protocol.FrameDecoder()
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
            while (item := decoder.next()) is not None:
                message, _ = item
                if not isinstance(message, Request):
                    raise protocol.ProtocolError(f"unexpected {type(message).__name__}")
                log.debug("request %s", message)
                response, fds = session.handle(message)
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
    return 1 if session.teardown() else 0


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
            report = sweep(journal_dir, current=current_identity(), undo=lambda e: _undo(nft, e))
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


def run(path: str, *, journal_dir: Path = DEFAULT_DIR) -> int:
    """``--connect PATH``: serve one daemon, then undo everything and return."""
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
        return 2
    with conn, Nft() as nft:
        session = Session(nft=nft, journal=Journal(journal_dir, owner=current_identity()))
        try:
            return serve(conn, session, wakeup=wakeup_read)
        finally:
            session.teardown()  # a no-op unless serve() itself failed


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
    parser.add_argument("--debug", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("telepresence-helper: must run as root (the daemon uses sudo)", file=sys.stderr)
        return 2
    _setup_logging(debug=args.debug)
    if args.cleanup:
        return cleanup()
    return run(args.connect)


if __name__ == "__main__":
    sys.exit(main())
