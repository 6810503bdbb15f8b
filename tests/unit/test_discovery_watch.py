"""The API client's watch and error mapping, and discovery's change reporting, against a
scripted API server on loopback. The real API server is exercised by
tests/e2e/test_k8s_install.py; here we force what a healthy cluster rarely shows: an
expired resourceVersion, a stream the server ends, a rotated token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from telepresence.k8s.api import (
    ApiUnreachable,
    Changed,
    Conflict,
    Credentials,
    Forbidden,
    Gone,
    InClusterAccess,
    InClusterConfigError,
    Invalid,
    KubeApi,
    Listed,
    NotFound,
    Route,
    Unauthorized,
    error_from_status,
    in_cluster_access,
)
from telepresence.manager.discovery import (
    ClusterInfoSource,
    DiscoverySettings,
    PodSource,
    ServiceSource,
)
from telepresence.tunnel.messages import ClusterInfo
from tests.unit.waiting import until

Obj = dict[str, Any]
END = {"type": "END"}  # test marker: the server ends the watch response here


# --- errors ------------------------------------------------------------------------------------

CLUSTERROLE_DENIED = (
    'clusterroles.rbac.authorization.k8s.io "traffic-manager-ambassador" is forbidden: User '
    '"system:serviceaccount:tp-noperm:viewer" cannot patch resource "clusterroles" in API '
    'group "rbac.authorization.k8s.io" at the cluster scope'
)
DEPLOYMENT_DENIED = (
    'deployments.apps "traffic-manager" is forbidden: User "system:serviceaccount:x:y" cannot '
    'get resource "deployments" in API group "apps" in the namespace "ambassador"'
)


def test_errors_map_by_status() -> None:
    for status, cls in [
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (409, Conflict),
        (410, Gone),
        (422, Invalid),
    ]:
        err = error_from_status(status, {"message": "m", "reason": "r"})
        assert type(err) is cls
        assert err.status == status
    other = error_from_status(500, {"message": "etcdserver: request timed out"})
    assert (
        str(other) == "the Kubernetes API server answered HTTP 500: etcdserver: request timed out"
    )


def test_forbidden_names_the_verb_and_resource_and_what_to_do() -> None:
    err = error_from_status(403, {"message": CLUSTERROLE_DENIED}, method="PATCH")
    assert isinstance(err, Forbidden)
    assert str(err) == "your user may not patch clusterroles: ask a cluster admin to grant it"
    hinted = err.with_hint("ask a cluster admin to install it")
    assert str(hinted) == "your user may not patch clusterroles: ask a cluster admin to install it"
    namespaced = error_from_status(403, {"message": DEPLOYMENT_DENIED})
    assert str(namespaced).startswith("your user may not get deployments in namespace ambassador:")


def test_forbidden_without_a_server_message_uses_the_request() -> None:
    err = error_from_status(
        403, {}, method="POST", path="/api/v1/namespaces/ambassador/services?dryRun=All"
    )
    assert str(err).startswith("your user may not create services in namespace ambassador:")
    cluster = error_from_status(
        403, {}, method="GET", path="/apis/networking.k8s.io/v1/servicecidrs"
    )
    assert str(cluster).startswith("your user may not get servicecidrs:")


def test_a_namespace_being_deleted_is_not_a_permission_problem() -> None:
    detail = "unable to create new content in namespace ambassador because it is being terminated"
    err = error_from_status(403, {"message": detail}, method="PATCH")
    assert isinstance(err, Forbidden)
    assert str(err.with_hint("ask an admin")) == f"{detail}: wait until it is gone, then retry"


def test_unauthorized_says_to_refresh_credentials() -> None:
    assert "log in again" in str(error_from_status(401, {"message": "Unauthorized"}))


# --- in-cluster credentials ---------------------------------------------------------------------


def write_service_account(folder: Path, token: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "token").write_text(token + "\n")
    (folder / "namespace").write_text("ambassador")
    (folder / "ca.crt").write_text("")


def test_in_cluster_access_reads_the_pods_service_account(tmp_path: Path) -> None:
    write_service_account(tmp_path, "first")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    access = in_cluster_access(environ=env, secrets_dir=tmp_path)
    assert access.server == "https://10.96.0.1:443"
    assert access.namespace == "ambassador"
    assert access.headers() == {"Authorization": "Bearer first"}
    v6 = in_cluster_access(environ={"KUBERNETES_SERVICE_HOST": "fd00::1"}, secrets_dir=tmp_path)
    assert v6.server == "https://[fd00::1]:443"


def test_in_cluster_access_outside_a_pod_says_so(tmp_path: Path) -> None:
    with pytest.raises(InClusterConfigError, match="not running in a Kubernetes pod"):
        in_cluster_access(environ={}, secrets_dir=tmp_path)
    with pytest.raises(InClusterConfigError, match="automountServiceAccountToken"):
        in_cluster_access(environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, secrets_dir=tmp_path)


def test_the_rotated_token_is_read_again_once_stale(tmp_path: Path) -> None:
    write_service_account(tmp_path, "first")
    now = [0.0]
    access = InClusterAccess(
        server="https://10.96.0.1:443",
        namespace="ambassador",
        token_file=tmp_path / "token",
        ca_file=tmp_path / "ca.crt",
        token_max_age=60,
        clock=lambda: now[0],
    )
    assert access.token() == "first"
    (tmp_path / "token").write_text("second")
    now[0] = 59
    assert access.token() == "first"
    now[0] = 60
    assert access.token() == "second"
    (tmp_path / "token").unlink()  # a rotation in progress: keep the last good token
    now[0] = 200
    assert access.token() == "second"


# --- a scripted API server -----------------------------------------------------------------------


@dataclass
class Access:
    """Issues the next of ``tokens`` on first use and after each 401 of the current one."""

    server: str
    namespace: str = "ambassador"
    tokens: list[str] = field(default_factory=lambda: ["token-1"])
    issued: int = 0
    route: Route = field(default_factory=Route)
    current: Credentials | None = None

    async def credentials(self, *, rejected: Credentials | None = None) -> Credentials:
        if self.current is None or (rejected is not None and rejected is self.current):
            token = self.tokens[min(self.issued, len(self.tokens) - 1)]
            self.issued += 1
            self.current = Credentials(
                headers={"Authorization": f"Bearer {token}"}, tls=ssl.create_default_context()
            )
        return self.current


@dataclass
class FakeApiServer:
    """Lists from ``collections``; ``errors`` answers a path with a Status once per entry;
    every request is recorded. Watch events go through :meth:`push`: to the newest watch
    of the path, or, before one starts, into a script that each new watch plays up to an
    END (the server's timeout) or an ERROR, as the real server ends a stream there."""

    collections: dict[str, list[Obj]] = field(default_factory=dict)
    errors: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=lambda: {"token-1"})
    resource_version: int = 100
    pending: dict[str, list[Obj]] = field(default_factory=dict)
    streams: dict[str, list[asyncio.Queue[Obj]]] = field(default_factory=dict)

    def push(self, path: str, *events: Obj) -> None:
        for event in events:
            if self.streams.get(path):
                self.streams[path][-1].put_nowait(event)
            else:
                self.pending.setdefault(path, []).append(event)

    def end_streams(self) -> None:
        for queues in self.streams.values():
            for queue in queues:
                queue.put_nowait(END)

    def watch_count(self, path: str) -> int:
        return len(self.streams.get(path, []))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append((request.method, request.path, query))
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.valid_tokens:
            return status(401, "Unauthorized")
        if self.errors.get(request.path):
            code, message = self.errors[request.path].pop(0)
            return status(code, message)
        if query.get("watch") == "true":
            return await self.stream(request)
        if request.path not in self.collections:
            return status(404, "the server could not find the requested resource")
        return web.json_response(
            {
                "kind": "List",
                "metadata": {"resourceVersion": str(self.resource_version)},
                "items": self.collections[request.path],
            }
        )

    async def stream(self, request: web.Request) -> web.StreamResponse:
        queue: asyncio.Queue[Obj] = asyncio.Queue()
        script = self.pending.get(request.path, [])
        while script:
            event = script.pop(0)
            queue.put_nowait(event)
            if event["type"] in ("END", "ERROR"):
                break
        self.streams.setdefault(request.path, []).append(queue)
        response = web.StreamResponse()
        response.content_type = "application/json"
        await response.prepare(request)
        while (event := await queue.get()) is not END:
            # Split each event across two writes: the client must reassemble lines.
            line = json.dumps(event).encode() + b"\n"
            await response.write(line[:7])
            await response.write(line[7:])
            if event["type"] == "ERROR":
                break
        with contextlib.suppress(ConnectionError):  # the client may be gone already
            await response.write_eof()
        return response


def status(code: int, message: str) -> web.Response:
    return web.json_response(
        {"kind": "Status", "status": "Failure", "message": message, "code": code}, status=code
    )


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeApiServer, KubeApi]]:
    server = FakeApiServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    api = KubeApi(Access(server=f"http://127.0.0.1:{port}"))
    try:
        yield server, api
    finally:
        await api.close()
        server.end_streams()
        await runner.cleanup()


def obj(name: str, rv: int, **spec: Any) -> Obj:
    return {"metadata": {"name": name, "resourceVersion": str(rv)}, "spec": spec}


NODES = "/api/v1/nodes"


async def test_a_watch_lists_then_follows_and_resumes_where_the_stream_ended(
    fake: tuple[FakeApiServer, KubeApi],
) -> None:
    server, api = fake
    server.collections[NODES] = [obj("n1", 100)]
    server.push(
        NODES,
        {"type": "ADDED", "object": obj("n2", 101)},
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "150"}}},
        END,  # the server's timeoutSeconds ran out
        {"type": "MODIFIED", "object": obj("n2", 160)},
        {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}},
        {"type": "DELETED", "object": obj("n1", 170)},
    )
    events = []
    watch = api.watch(NODES, label_selector="a=b")
    async for event in watch:
        events.append(event)
        if len(events) == 5:
            break
    await watch.aclose()
    assert events[0] == Listed(items=(obj("n1", 100),), resource_version="100")
    assert events[1] == Changed("ADDED", obj("n2", 101))
    assert events[2] == Changed("MODIFIED", obj("n2", 160))
    # 410 Gone: listed again, and only then is the next event delivered.
    assert isinstance(events[3], Listed)
    assert events[4] == Changed("DELETED", obj("n1", 170))
    watched_from = [q["resourceVersion"] for m, p, q in server.requests if q.get("watch")]
    assert watched_from == ["100", "150", "100"]  # after the bookmark; after the re-list
    lists = [q for m, p, q in server.requests if not q.get("watch")]
    assert len(lists) == 2
    assert all(q["labelSelector"] == "a=b" for q in lists)


async def test_an_expired_watch_start_lists_again(fake: tuple[FakeApiServer, KubeApi]) -> None:
    server, api = fake
    server.collections[NODES] = []
    watch = api.watch(NODES)
    assert isinstance(await anext(watch), Listed)
    server.errors[NODES] = [(410, "too old resource version")]
    assert isinstance(await anext(watch), Listed)
    await watch.aclose()


async def test_a_rejected_token_is_fetched_again_once(fake: tuple[FakeApiServer, KubeApi]) -> None:
    server, api = fake
    server.collections[NODES] = []
    assert isinstance(api.access, Access)
    api.access.tokens = ["token-1", "token-2"]
    await api.list(NODES)
    await api.list(NODES)
    assert api.access.issued == 1  # cached: an exec plugin is not run per request
    server.valid_tokens = {"token-2"}
    await api.list(NODES)
    assert api.access.issued == 2
    server.valid_tokens = {"token-3"}
    with pytest.raises(Unauthorized):
        await api.list(NODES)


async def test_statuses_become_exceptions(fake: tuple[FakeApiServer, KubeApi]) -> None:
    server, api = fake
    with pytest.raises(NotFound):
        await api.get("/api/v1/namespaces/x/pods/y")
    assert await api.delete("/api/v1/namespaces/x/pods/y") is None
    server.errors["/api/v1/namespaces/x/services"] = [(403, DEPLOYMENT_DENIED)]
    with pytest.raises(Forbidden, match="may not get deployments in namespace ambassador"):
        await api.create("/api/v1/namespaces/x/services", {}, dry_run=True)
    assert server.requests[-1][2] == {"dryRun": "All"}


async def test_apply_is_a_forced_server_side_apply(fake: tuple[FakeApiServer, KubeApi]) -> None:
    server, api = fake
    path = "/api/v1/namespaces/ambassador/serviceaccounts/traffic-manager"
    server.collections[path] = []
    body = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "traffic-manager", "namespace": "ambassador"},
    }
    await api.apply(body, dry_run=True)
    method, seen, query = server.requests[-1]
    assert (method, seen) == ("PATCH", path)
    assert query == {"fieldManager": "telepresence", "force": "true", "dryRun": "All"}


async def test_an_unreachable_server_says_where_and_what_to_check() -> None:
    api = KubeApi(Access(server="http://127.0.0.1:9"))  # discard port: nothing listens
    with pytest.raises(ApiUnreachable) as info:
        await api.list(NODES)
    await api.close()
    assert "cannot reach the Kubernetes API server at http://127.0.0.1:9" in str(info.value)
    assert "network" in str(info.value)


# --- discovery reports changes, and only changes -------------------------------------------------

CIDRS_V1 = "/apis/networking.k8s.io/v1/servicecidrs"
SERVICES = "/api/v1/services"
PROBE = "/api/v1/namespaces/ambassador/services"


def resolv_conf(tmp_path: Path) -> DiscoverySettings:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "search ambassador.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 10.96.0.10\noptions ndots:5\n"
    )
    return DiscoverySettings(resolv_conf=conf, retry_initial=0.01)


async def next_info(queue: asyncio.Queue[ClusterInfo]) -> ClusterInfo:
    return await asyncio.wait_for(queue.get(), 5)


async def test_discovery_reports_the_first_value_and_then_only_changes(
    fake: tuple[FakeApiServer, KubeApi], tmp_path: Path
) -> None:
    server, api = fake
    server.collections[CIDRS_V1] = [obj("kubernetes", 1, cidrs=["10.96.0.0/16"])]
    server.collections[NODES] = [obj("n1", 1, podCIDRs=["10.244.0.0/24"])]
    infos: asyncio.Queue[ClusterInfo] = asyncio.Queue()
    source = ClusterInfoSource(api, on_change=infos.put_nowait, settings=resolv_conf(tmp_path))
    task = asyncio.create_task(source.run(), name="discovery")
    try:
        assert await next_info(infos) == ClusterInfo(
            service_subnets=("10.96.0.0/16",),
            pod_subnets=("10.244.0.0/24",),
            cluster_domain="cluster.local",
            dns_server_ip="10.96.0.10",
        )
        assert source.state is not None
        assert source.state.service_source is ServiceSource.SERVICE_CIDRS
        assert source.state.pod_source is PodSource.NODE_CIDRS
        server.push(
            NODES,
            # A node heartbeat changes nothing we report...
            {"type": "MODIFIED", "object": obj("n1", 2, podCIDRs=["10.244.0.0/24"])},
            # ...a second node does.
            {"type": "ADDED", "object": obj("n2", 3, podCIDRs=["10.244.1.0/24"])},
        )
        assert (await next_info(infos)).pod_subnets == ("10.244.0.0/23",)
        # The API server fails: discovery starts over, and the same value is not re-sent.
        server.collections[NODES].append(obj("n2", 3, podCIDRs=["10.244.1.0/24"]))
        server.push(CIDRS_V1, {"type": "ERROR", "object": {"code": 500, "message": "etcd gone"}})
        await until(lambda: server.watch_count(NODES) == 2, "the second watch of nodes", timeout=5)
        server.push(NODES, {"type": "ADDED", "object": obj("n3", 4, podCIDRs=["10.244.9.0/24"])})
        assert (await next_info(infos)).pod_subnets == ("10.244.0.0/23", "10.244.9.0/24")
        assert infos.empty()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_without_servicecidrs_the_probe_names_the_range(
    fake: tuple[FakeApiServer, KubeApi], tmp_path: Path
) -> None:
    server, api = fake
    server.collections[NODES] = [obj("n1", 1, podCIDRs=["10.244.0.0/24"])]
    message = (
        'Service "telepresence-probe-x" is invalid: spec.clusterIPs: Invalid value: '
        '[]string{"192.0.2.254"}: failed to allocated ip:192.0.2.254 with error:provided IP '
        "is not in the valid range. The range of valid IPs is 10.100.0.0/16"
    )
    server.errors[PROBE] = [(422, message), (422, "IPv6 is not configured on this cluster")]
    infos: asyncio.Queue[ClusterInfo] = asyncio.Queue()
    source = ClusterInfoSource(api, on_change=infos.put_nowait, settings=resolv_conf(tmp_path))
    task = asyncio.create_task(source.run(), name="discovery")
    try:
        assert (await next_info(infos)).service_subnets == ("10.100.0.0/16",)
        assert source.state is not None
        assert source.state.service_source is ServiceSource.PROBE
        probes = [(m, q) for m, p, q in server.requests if p == PROBE]
        assert probes == [("POST", {"dryRun": "All"})] * 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_with_no_cidr_anywhere_observed_addresses_are_covered(
    fake: tuple[FakeApiServer, KubeApi], tmp_path: Path
) -> None:
    server, api = fake
    server.collections[NODES] = [obj("n1", 1)]
    server.collections[SERVICES] = [obj("kubernetes", 1, clusterIP="10.96.0.1")]
    server.collections["/api/v1/pods"] = [
        {"metadata": {"name": "a", "namespace": "d"}, "spec": {}, "status": {"podIP": "10.8.0.4"}}
    ]
    infos: asyncio.Queue[ClusterInfo] = asyncio.Queue()
    source = ClusterInfoSource(api, on_change=infos.put_nowait, settings=resolv_conf(tmp_path))
    task = asyncio.create_task(source.run(), name="discovery")
    try:
        info = await next_info(infos)
        assert (info.service_subnets, info.pod_subnets) == (("10.96.0.1/32",), ("10.8.0.4/32",))
        server.push(SERVICES, {"type": "ADDED", "object": obj("dns", 2, clusterIP="10.96.0.10")})
        assert (await next_info(infos)).service_subnets == ("10.96.0.0/28",)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
