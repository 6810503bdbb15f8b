"""One connected session: cluster access, traffic manager, tunnel pool, proxy, DNS, helper.

`connect` builds it step by step and reports progress; anything that fails unwinds what was
already set up (in reverse), so a failed connect leaves the laptop as it was. `close` undoes
a working session the same way, DNS first so the laptop never loses name resolution.

The DNS part (server, upstreams, resolv.conf, systemd-resolved's link domains) is
:mod:`.sessiondns`; this module tells it when namespaces and the search path change.
What was asked (:class:`~.request.ConnectRequest`) and :class:`~.request.ConnectError`
are in :mod:`.request`.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import ipaddress
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Literal

import aiohttp
import dns.message
import dns.rcode

from telepresence import paths, versions
from telepresence.daemon import manageraccess, namespaces, nsswitch, sessionstatus
from telepresence.daemon.dialfailures import DialFailureLog
from telepresence.daemon.direct import DirectRoute, Endpoint
from telepresence.daemon.dns import ClusterLookupFailed
from telepresence.daemon.dnsrules import NameRules
from telepresence.daemon.flowbook import FlowBook
from telepresence.daemon.managerwatch import watch_manager_pods
from telepresence.daemon.pool import IncompatibleManager, ManagerPool, PoolUnavailable
from telepresence.daemon.proxy import TransparentProxy
from telepresence.daemon.request import (
    ConnectError,
    ConnectRequest,
    api_server_addresses,
    helper_command,
)
from telepresence.daemon.sessiondns import SessionDns
from telepresence.daemon.udp import UdpRelay
from telepresence.k8s import kubeconfig
from telepresence.k8s.api import (
    ApiUnreachable,
    Forbidden,
    KubeApi,
    KubeError,
)
from telepresence.k8s.install import ensure_manager
from telepresence.k8s.manifests import DEFAULT_NAMESPACE
from telepresence.k8s.portforward import PortForward
from telepresence.netfilter.client import HelperClient, HelperError, HelperListener, SetupResult
from telepresence.netfilter.subnets import parse_cidr_list, routed_subnets
from telepresence.tunnel.messages import ClusterInfo

log = logging.getLogger("telepresence.session")

# Port-forward connections per session: enough to spread flows, few enough to be cheap.
POOL_SIZE = 4


class Session:
    def __init__(
        self,
        request: ConnectRequest,
        *,
        debug: bool,
        on_lost: Callable[[str], None],
        helper_listener: HelperListener | None = None,
    ) -> None:
        self.request = request
        #: Where the helper the CLI started connects; None: the daemon starts it itself.
        self.helper_listener = helper_listener
        self.debug = debug
        self.on_lost = on_lost
        self.access: kubeconfig.ClusterAccess | None = None
        self.api: KubeApi | None = None
        self.http: aiohttp.ClientSession | None = None
        self.pool: ManagerPool | None = None
        #: The direct transport's links beside the pool's port-forwards (`direct.py`).
        self.direct: DirectRoute | None = None
        self.proxy: TransparentProxy | None = None
        #: The open flows and the recent errors, for `status --flows`.
        self.book = FlowBook()
        self.dns = SessionDns(
            rules=self.name_rules,
            cluster_subnets=lambda: self.routed,
            cluster_lookup=self._cluster_lookup,
            upstream_socket=self._upstream_socket,
            on_cluster_answer=self._route_answer,
            observer=self.book,
        )
        self.helper: HelperClient | None = None
        self.tun_fd: int | None = None
        self.cluster_info: ClusterInfo | None = None
        self.routed: list[IPv4Network] = []
        self.api_server_ips: list[str] = []
        self.namespaces: frozenset[str] = frozenset()
        self.connected = False
        self.manager_namespace = request.manager_namespace or DEFAULT_NAMESPACE
        self.manager_pod = ""
        # What this daemon reports and speaks (tests fake both through the environment).
        self.version = versions.package_version()
        self.protocol = versions.protocol_range()
        self.udp: UdpRelay | None = None
        # One for TCP and UDP: why the cluster could not dial, without flooding the log.
        self.dial_log = DialFailureLog(book=self.book)
        self.host_routes: set[IPv4Address] = set()
        # Local-only intercepts: name -> namespace put on the search path.
        self.intercepts: dict[str, str] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self._subnet_lock = asyncio.Lock()

    # --- connect ---------------------------------------------------------------------

    async def connect(self, progress: Callable[[str], None]) -> dict[str, Any]:
        if self.request.env:
            # Exec credential plugins and KUBECONFIG come from the user's shell.
            os.environ.update(self.request.env)
            self.version = versions.package_version()
            self.protocol = versions.protocol_range()
        try:
            self.access = kubeconfig.load(
                kubeconfig=self.request.kubeconfig,
                context=self.request.context,
                namespace=self.request.namespace,
            )
        except kubeconfig.KubeconfigError as e:
            raise ConnectError(str(e)) from e
        access = self.access
        self.api = KubeApi(access)
        try:
            # An exec plugin's first run (a cloud CLI, maybe a token refresh) has its own
            # timeout and error; it must not eat the API server's deadline below.
            await access.credentials()
        except KubeError as e:
            raise ConnectError(str(e)) from e
        try:
            await asyncio.wait_for(self.api.get("/version"), 15)
        except (ApiUnreachable, TimeoutError) as e:
            raise ConnectError(
                f"cannot reach the API server {access.server} of context {access.context}: "
                f"{_cause(e)}; check that the cluster is running and the context is right"
            ) from e
        except KubeError as e:
            raise ConnectError(str(e)) from e
        try:
            manager = await ensure_manager(
                self.api,
                namespace=self.manager_namespace,
                image=self.request.manager_image,
                base_image=self.request.manager_base_image,
                version=self.version,
                protocol=self.protocol,
                dial_allow=self.request.manager_dial_allow,
                dial_deny=self.request.manager_dial_deny,
                progress=progress,
            )
        except KubeError as e:
            raise ConnectError(str(e)) from e
        self.manager_pod = manager.pod_name

        progress("Connecting to traffic manager...")
        self.http = aiohttp.ClientSession()
        self.pool = ManagerPool(
            open_forward=self._open_forward,
            size=POOL_SIZE,
            client_name=f"{getpass.getuser()}@{socket.gethostname()}",
            install_id=_install_id(),
            on_cluster_info=self._on_cluster_info,
            version=self.version,
            protocol=self.protocol,
            on_link_lost=self.book.link_lost,
        )
        try:
            self.cluster_info = await self.pool.start(timeout=60)
        except IncompatibleManager as e:
            # The manager's own verdict at Arrive (the Deployment's annotations agreed, or
            # the manager was replaced since): one line, naming the fix.
            raise ConnectError(str(e)) from e
        except Forbidden as e:
            # RBAC decides who may use the manager; the message names the grant to ask for.
            raise ConnectError(str(e)) from e
        except (Exception, TimeoutError) as e:
            raise ConnectError(
                f"cannot open a tunnel to the traffic manager ({_cause(e)}); check "
                f"`kubectl -n {self.manager_namespace} logs deploy/traffic-manager`"
            ) from e

        assert self.api is not None
        self.namespaces = await namespaces.load(self.api)
        self.proxy = TransparentProxy(self.pool, dial_log=self.dial_log, book=self.book)
        proxy_port = await self.proxy.start()
        dns_port = await self.dns.start()

        try:
            self.helper = await self._start_helper()
        except HelperError as e:
            if "password" in str(e) or "sudo" in str(e):
                raise ConnectError(
                    f"telepresence needs root for its network helper and sudo refused ({e}); "
                    "run `telepresence connect` in a terminal, or "
                    "`sudo telepresence helper install` once"
                ) from e
            raise ConnectError(f"the network helper failed to start: {e}") from e
        self.api_server_ips = api_server_addresses(access.server)
        if proxy := access.route.proxy:
            # Through a proxy, the connections to keep out of the tunnel are the proxy's.
            self.api_server_ips += [
                ip for ip in api_server_addresses(proxy) if ip not in self.api_server_ips
            ]
        try:
            result = await self.helper.setup(
                subnets=self._cluster_subnets(),
                dns_redirect_port=dns_port,
                proxy_port=proxy_port,
                api_server_ips=self.api_server_ips,
                never_proxy=self.request.never_proxy,
                allow_conflicting_subnets=self.request.allow_conflicting_subnets,
            )
        except HelperError as e:
            raise ConnectError(str(e)) from e
        self.tun_fd = result.tun_fd
        self.routed = result.routed
        await self._start_tun_side(result)
        self.tasks.append(asyncio.create_task(self._watch_helper(), name="watch-helper"))
        assert self.api is not None
        watch = namespaces.follow(self.api, lambda: self.namespaces, self._namespaces_changed)
        self.tasks.append(asyncio.create_task(watch, name="namespaces"))
        self.tasks.append(
            asyncio.create_task(
                watch_manager_pods(self.api, self.manager_namespace, self.pool),
                name="manager-pods",
            )
        )
        for name, coroutine in self.dns.background():
            self.tasks.append(asyncio.create_task(coroutine, name=name))
        # After the routes: an endpoint inside a routed subnet is no way around the tunnel.
        self.direct = DirectRoute(self.pool, self._locate_direct, mode=self.request.direct)
        self.tasks.append(asyncio.create_task(self.direct.run(), name="direct-route"))
        self.connected = True
        log.info(
            "connected to %s (%s); routing %s",
            access.context,
            access.server,
            ", ".join(map(str, self.routed)),
        )
        return self.connect_result()

    async def _start_tun_side(self, result: SetupResult) -> None:
        """After Setup: the UDP relay on the TUN, answering DNS there when the helper chose
        systemd-resolved, which is then told the cluster's domains."""
        assert self.pool is not None and self.helper is not None and self.tun_fd is not None
        try:
            local_dns = self.dns.adopt(result, self.helper)
        except HelperError as e:
            raise ConnectError(str(e)) from e
        self.udp = UdpRelay(
            self.pool, self.tun_fd, dial_log=self.dial_log, local_dns=local_dns, book=self.book
        )
        self.udp.start()
        try:
            # After the relay reads the TUN: resolved asks as soon as it knows the domains.
            await self.dns.apply_link_domains()
        except HelperError as e:
            raise ConnectError(
                f"systemd-resolved could not be told the cluster's DNS domains: {e}"
            ) from e

    def connect_result(self) -> dict[str, Any]:
        assert self.access is not None
        domain = self.cluster_info.cluster_domain if self.cluster_info else "cluster.local"
        warning = nsswitch.check(domain)
        return {
            "context": self.access.context,
            "server": self.access.server,
            "warnings": [warning] if warning else [],
        }

    async def _open_forward(
        self, pod: str | None, avoid: frozenset[str]
    ) -> tuple[str, PortForward]:
        assert self.api is not None and self.access is not None and self.http is not None
        return await manageraccess.open_forward(
            self.api, self.access, self.http, namespace=self.manager_namespace, pod=pod, avoid=avoid
        )

    async def _locate_direct(self, pod: str, port: int) -> list[Endpoint]:
        assert self.api is not None
        return await manageraccess.locate_direct(
            self.api,
            namespace=self.manager_namespace,
            pod=pod,
            configured=self.request.direct_address,
            routed=self.routed,
        )

    def _namespaces_changed(self, names: frozenset[str]) -> None:
        self.namespaces = names
        self.dns.domains_changed()

    def search_namespaces(self) -> tuple[str, ...]:
        """`connect --namespace` first, then local-only intercepts in the order made."""
        found = [self.request.namespace] if self.request.namespace else []
        found += list(self.intercepts.values())
        return tuple(dict.fromkeys(found))

    def mapped_namespaces(self) -> list[str]:
        if self.request.mapped_namespaces is None:
            return sorted(self.namespaces)
        return sorted(self.request.mapped_namespaces)

    def name_rules(self) -> NameRules:
        info = self.cluster_info
        mapped = self.request.mapped_namespaces
        return NameRules(
            cluster_domain=info.cluster_domain if info else "cluster.local",
            mapped_namespaces=frozenset(mapped or ()),
            all_namespaces=mapped is None,
            live_namespaces=self.namespaces,
            search_namespaces=self.search_namespaces(),
            local_search_domains=self.dns.local_search_domains,
        )

    async def _start_helper(self) -> HelperClient:
        """The helper the CLI started on the user's terminal (where sudo could ask for a
        password), or one this daemon starts with ``sudo -n`` (root, or no CLI in front)."""
        listener, self.helper_listener = self.helper_listener, None
        if listener is None:
            return await HelperClient.start(
                command=helper_command(), runtime_dir=paths.runtime_dir(), debug=self.debug
            )
        try:
            return await listener.accept()
        finally:
            listener.close()

    def _cluster_subnets(self) -> list[str]:
        """What to ask the helper to route: it refuses subnets that cover the API
        server (or loopback), so the holes are made here."""
        info = self.cluster_info
        wanted = [*info.service_subnets, *info.pod_subnets] if info else []
        try:
            nets = routed_subnets(
                service_cidrs=parse_cidr_list(",".join([*wanted, *self.request.also_proxy])),
                pod_cidrs=(),
                never_proxy=parse_cidr_list(",".join(self.request.never_proxy)),
                api_server_ips=[ipaddress.ip_address(a) for a in self.api_server_ips],
            )
        except ValueError as e:
            raise ConnectError(f"invalid subnet: {e}") from e
        return [str(n) for n in nets]

    async def _route_answer(self, addresses: list[IPv4Address]) -> None:
        """Addresses that the cluster's DNS gave (ExternalName targets, selector-less
        endpoints) and that no routed subnet covers get a host route for the session.
        Only cluster answers reach here, never the laptop's own resolver's."""
        missing = [
            a
            for a in addresses
            if a not in self.host_routes and not any(a in n for n in self.routed)
        ]
        if not missing or self.helper is None:
            return
        try:
            result = await self.helper.add_host_routes(missing)
        except HelperError as e:
            log.warning("routing %s: %s", ", ".join(map(str, missing)), e)
            return
        self.host_routes = set(result.hosts)
        for reason in result.skipped:
            log.info("not routed: %s", reason)

    # --- local-only intercepts -------------------------------------------------------

    def intercept(self, name: str, namespace: str) -> None:
        if name in self.intercepts:
            raise ConnectError(
                f"intercept {name} already exists; `telepresence leave {name}` first"
            )
        self.intercepts[name] = namespace
        self.dns.domains_changed()

    def leave(self, name: str) -> None:
        if self.intercepts.pop(name, None) is None:
            raise ConnectError(f"no intercept named {name}; `telepresence list` shows them")
        self.dns.domains_changed()

    def _on_cluster_info(self, info: ClusterInfo) -> None:
        changed = self.cluster_info is not None and info != self.cluster_info
        self.cluster_info = info
        if changed and self.helper is not None:
            self.tasks.append(asyncio.create_task(self._update_subnets(), name="subnets"))
            self.dns.domains_changed()  # the cluster domain is one of them

    async def _update_subnets(self) -> None:
        async with self._subnet_lock:
            assert self.helper is not None
            try:
                self.routed = await self.helper.update_subnets(self._cluster_subnets())
            except (HelperError, ConnectError) as e:
                log.warning("updating routed subnets failed: %s", e)

    async def _cluster_lookup(self, name: str, qtype: int) -> dns.message.Message:
        """The cluster's answer; ClusterLookupFailed says why there is none."""
        if self.pool is None:
            raise ClusterLookupFailed("not connected to the traffic manager")
        try:
            answer = await self.pool.dns_lookup(name, qtype)
        except PoolUnavailable as e:
            raise ClusterLookupFailed(str(e)) from e
        except TimeoutError as e:
            raise ClusterLookupFailed("the traffic manager did not answer in time") from e
        if not answer.message:
            raise ClusterLookupFailed(
                "the traffic manager's lookup in the cluster failed "
                f"({dns.rcode.to_text(dns.rcode.Rcode.make(answer.rcode))})"
            )
        return dns.message.from_wire(answer.message)

    async def _upstream_socket(self, kind: str) -> socket.socket:
        assert self.helper is not None
        sock_kind: Literal["udp", "tcp"] = "tcp" if kind == "tcp" else "udp"
        return await self.helper.upstream_socket(sock_kind)

    async def _watch_helper(self) -> None:
        assert self.helper is not None
        await self.helper.wait_exited()
        if self.connected:
            self.on_lost("the network helper exited")

    # --- status and teardown ---------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return sessionstatus.describe(self)

    def flows(self) -> dict[str, Any]:
        """`status --flows`: the open flows and the recent errors (`FlowBook.snapshot`)."""
        return self.book.snapshot()

    async def close(self) -> None:
        """Undo everything, each step on its own so one failure does not stop the rest."""
        self.connected = False
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        steps: list[tuple[str, Callable[[], Any]]] = []
        if self.helper_listener is not None:
            # A helper that connected but was never used sees the reset and exits.
            steps.append(("helper socket", self.helper_listener.close))
        # With systemd-resolved, the relay answers DNS until the helper has taken the
        # link's DNS away: DNS first, so the laptop never loses name resolution.
        udp_last = self.dns.mode == "resolved"
        if self.udp is not None and not udp_last:
            steps.append(("udp relay", self.udp.close))
        if self.helper is not None:
            steps.append(("network helper", self.helper.teardown))
        if self.udp is not None and udp_last:
            steps.append(("udp relay", self.udp.close))
        if self.tun_fd is not None:
            fd, self.tun_fd = self.tun_fd, None
            steps.append(("tun", lambda: _close_fd(fd)))
        steps.append(("dns server", self.dns.close))
        if self.proxy is not None:
            steps.append(("proxy", self.proxy.close))
        if self.pool is not None:
            steps.append(("tunnel pool", self.pool.close))
        if self.http is not None:
            steps.append(("http", self.http.close))
        if self.api is not None:
            steps.append(("api", self.api.close))
        for name, step in steps:
            started = time.monotonic()
            try:
                result = step()
                if asyncio.iscoroutine(result):
                    await asyncio.wait_for(result, 30)
            except Exception as e:
                log.warning("undoing %s: %s", name, e)
            log.debug("undid %s in %.3f s", name, time.monotonic() - started)


async def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _cause(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0]


def _install_id() -> str:
    path = paths.cache_dir() / "install-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        value = uuid.uuid4().hex
        path.write_text(value)
        return value
