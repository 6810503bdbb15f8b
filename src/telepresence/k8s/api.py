"""A small async client for the Kubernetes API, on aiohttp.

It speaks only the handful of verbs telepresence needs (get, list, watch, server-side
apply, create, delete) on plain dicts, so it stays small enough to read in one sitting.
HTTP and connection failures are translated here, once, into :class:`KubeError`
subclasses whose messages say what the user can do about them; nothing outside ``k8s/``
ever sees an aiohttp exception.

It works with a kubeconfig (:class:`~telepresence.k8s.kubeconfig.ClusterAccess`, on the
laptop) and with a pod's service account (:func:`in_cluster_access`, in the traffic
manager): both are an :class:`Access`, which gives the :class:`Route` to the server (TLS
server name, proxy) and the :class:`Credentials` of each request, and a fresh set after a
401. This module imports neither yaml nor the kubeconfig's credential plugins, so the
manager does not load them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

import aiohttp
import msgspec

log = logging.getLogger(__name__)

Obj = dict[str, Any]

FIELD_MANAGER = "telepresence"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


# --- errors -------------------------------------------------------------------------------


class KubeError(Exception):
    """Anything that went wrong talking to the API server; ``str()`` is one line for the
    user that says what to do."""


class ApiUnreachable(KubeError):
    """No HTTP answer at all: connection refused or reset, TLS failure, timeout, or a proxy
    that would not connect us."""

    def __init__(self, server: str, cause: BaseException, *, proxy: str | None = None) -> None:
        self.server = server
        self.proxy = proxy
        reason = str(cause) or type(cause).__name__
        through = f" through the proxy {proxy}" if proxy else ""
        if isinstance(cause, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
            advice = (
                "check the proxy (the cluster's proxy-url, or HTTPS_PROXY and NO_PROXY) and "
                "its credentials"
            )
        elif isinstance(cause, aiohttp.ClientSSLError | ssl.SSLError):
            advice = (
                "check the kubeconfig's certificate-authority, tls-server-name and the server "
                "address"
            )
        else:
            advice = "check your network or VPN, and that the kubeconfig's server is right"
        super().__init__(
            f"cannot reach the Kubernetes API server at {server}{through} ({reason}): {advice}"
        )


class ApiError(KubeError):
    """The API server answered with an error status (a ``Status`` object)."""

    def __init__(
        self, *, status: int, reason: str = "", detail: str = "", details: Obj | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.detail = detail
        self.details: Obj = details or {}
        super().__init__(self._message())

    def _message(self) -> str:
        return (
            f"the Kubernetes API server answered HTTP {self.status}: {self.detail or self.reason}"
        )


class Unauthorized(ApiError):
    def _message(self) -> str:
        return (
            "the cluster rejected your credentials (HTTP 401): log in again or refresh the "
            "kubeconfig's credentials (for a cloud cluster, its CLI's get-credentials command)"
        )


_CANNOT = re.compile(
    r'cannot (?P<verb>\w+) resource "(?P<resource>[^"]+)"'
    r'(?: in API group "(?P<group>[^"]*)")?'
    r'(?: in the namespace "(?P<namespace>[^"]+)")?'
)

DEFAULT_FORBIDDEN_HINT = "ask a cluster admin to grant it"


class Forbidden(ApiError):
    """Authorization failed. ``verb``, ``resource`` and ``namespace`` name what was denied;
    ``hint`` is the advice that ends the message, which a caller that knows the user's goal
    may replace with :meth:`with_hint`."""

    def __init__(
        self,
        *,
        status: int = 403,
        reason: str = "Forbidden",
        detail: str = "",
        details: Obj | None = None,
        verb: str = "",
        resource: str = "",
        namespace: str | None = None,
        hint: str = DEFAULT_FORBIDDEN_HINT,
    ) -> None:
        found = _CANNOT.search(detail)
        if found:
            verb = found["verb"]
            resource = found["resource"]
            namespace = found["namespace"] or namespace
        elif "attempting to grant RBAC permissions not currently held" in detail:
            verb = "grant, through"
        self.verb = verb or "access"
        self.resource = resource or str((details or {}).get("kind", "")) or "this resource"
        self.namespace = namespace
        self.hint = hint
        super().__init__(status=status, reason=reason, detail=detail, details=details)

    @property
    def namespace_terminating(self) -> bool:
        """Admission refuses new objects in a namespace being deleted, with a 403 that
        has nothing to do with the user's permissions."""
        return "because it is being terminated" in self.detail

    def _message(self) -> str:
        if self.namespace_terminating:
            return f"{self.detail}: wait until it is gone, then retry"
        where = f" in namespace {self.namespace}" if self.namespace else ""
        return f"your user may not {self.verb} {self.resource}{where}: {self.hint}"

    def with_hint(self, hint: str) -> Forbidden:
        return Forbidden(
            status=self.status,
            reason=self.reason,
            detail=self.detail,
            details=self.details,
            verb=self.verb,
            resource=self.resource,
            namespace=self.namespace,
            hint=hint,
        )


class NotFound(ApiError):
    def _message(self) -> str:
        return self.detail or "not found"


class Conflict(ApiError):
    def _message(self) -> str:
        return f"{self.detail or 'conflict'}: someone else changed it at the same time; retry"


class Gone(ApiError):
    """The resourceVersion asked for is too old; a watch answers it by listing again."""


class Invalid(ApiError):
    def _message(self) -> str:
        return f"the cluster rejected the object as invalid: {self.detail or self.reason}"


_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    422: Invalid,
}

_VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def error_from_status(
    status_code: int, body: Obj, *, method: str = "GET", path: str = ""
) -> ApiError:
    """The exception for an error answer; ``body`` is the ``Status`` object if there was one."""
    detail = str(body.get("message", ""))
    reason = str(body.get("reason", ""))
    details = body.get("details") if isinstance(body.get("details"), dict) else None
    cls = _BY_STATUS.get(status_code, ApiError)
    if cls is Forbidden:
        namespace, resource = _path_parts(path)
        return Forbidden(
            status=status_code,
            reason=reason,
            detail=detail,
            details=details,
            verb=_VERBS.get(method.upper(), method.lower()),
            resource=resource,
            namespace=namespace,
        )
    return cls(status=status_code, reason=reason, detail=detail, details=details)


def _path_parts(path: str) -> tuple[str | None, str]:
    """(namespace, resource) from an API path, for messages when the server gave none."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    namespace = None
    if "namespaces" in parts:
        i = parts.index("namespaces")
        if i + 2 < len(parts):
            namespace = parts[i + 1]
            return namespace, parts[i + 2]
    # /api/v1/<res>[/name] or /apis/<group>/<version>/<res>[/name]
    base = 2 if parts[:1] == ["api"] else 3
    return namespace, parts[base] if len(parts) > base else ""


# --- credentials --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Route:
    """How connections reach the API server, for the life of an :class:`Access`:
    ``server_hostname`` is the name the server's certificate is checked against and sent as
    SNI (a kubeconfig's ``tls-server-name``; None for the URL's host); ``proxy`` an HTTP
    CONNECT proxy URL, with ``proxy_headers`` for its authorization."""

    server_hostname: str | None = None
    proxy: str | None = None
    proxy_headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    def aiohttp_options(self) -> dict[str, Any]:
        """Keyword arguments for an aiohttp request or ws_connect (a fresh dict each time:
        aiohttp adds to the proxy headers it is given)."""
        return {
            "server_hostname": self.server_hostname,
            "proxy": self.proxy,
            "proxy_headers": dict(self.proxy_headers) if self.proxy_headers else None,
        }


@dataclass(frozen=True, kw_only=True, eq=False)
class Credentials:
    """What one request presents: ``headers`` (Authorization) and ``tls``, the TLS context
    that also carries the client certificate. Compared by identity: after a 401, the caller
    hands back the one that failed, so that concurrent failures refresh it once."""

    headers: Mapping[str, str] = field(repr=False)
    tls: ssl.SSLContext


class Access(Protocol):
    """What :class:`KubeApi` and a port-forward need from a set of credentials. Errors are
    :class:`KubeError` subclasses whose message names the fix."""

    @property
    def server(self) -> str: ...

    @property
    def namespace(self) -> str: ...

    @property
    def route(self) -> Route: ...

    async def credentials(self, *, rejected: Credentials | None = None) -> Credentials:
        """The credentials for the next request: cached while valid; renewed when
        ``rejected`` (which the API server just answered with 401) is still the current
        set, else the current set, which someone renewed meanwhile."""
        ...


class InClusterConfigError(KubeError):
    """Not running in a pod, or the pod has no service account token."""


@dataclass(kw_only=True)
class InClusterAccess:
    """A pod's own service account. The token is a projected one that the kubelet rotates
    (hourly by default), so it is read again from disk once ``token_max_age`` seconds old,
    as client-go does, instead of being kept for the life of the process."""

    server: str
    namespace: str
    token_file: Path
    ca_file: Path
    token_max_age: float = 60.0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    route: Route = field(default_factory=Route)  # in the pod network: direct, no proxy
    _token: str = field(default="", init=False, repr=False)
    _read_at: float = field(default=float("-inf"), init=False, repr=False)
    _ssl: ssl.SSLContext | None = field(default=None, init=False, repr=False)
    _issued: Credentials | None = field(default=None, init=False, repr=False)

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
        return self._ssl

    def token(self) -> str:
        now = self.clock()
        if not self._token or now - self._read_at >= self.token_max_age:
            try:
                self._token = self.token_file.read_text().strip()
            except OSError as e:
                if not self._token:
                    raise InClusterConfigError(
                        f"cannot read the service account token {self.token_file}: {e.strerror}"
                    ) from e
                log.warning("keeping the old token: cannot read %s: %s", self.token_file, e)
            self._read_at = now
        return self._token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def refresh(self) -> None:
        """Forget the cached token, so the next request reads the file (after a 401)."""
        self._read_at = float("-inf")

    async def credentials(self, *, rejected: Credentials | None = None) -> Credentials:
        if rejected is not None and rejected is self._issued:
            self.refresh()
        headers = self.headers()
        issued = self._issued
        if issued is None or issued.headers != headers:
            issued = self._issued = Credentials(headers=headers, tls=self.ssl_context())
        return issued


def in_cluster_access(
    *,
    environ: Mapping[str, str] | None = None,
    secrets_dir: Path = SERVICE_ACCOUNT_DIR,
) -> InClusterAccess:
    """Credentials of the pod this process runs in, as a kubelet provides them."""
    env = os.environ if environ is None else environ
    host = env.get("KUBERNETES_SERVICE_HOST")
    port = env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise InClusterConfigError(
            "KUBERNETES_SERVICE_HOST is not set: this is not running in a Kubernetes pod"
        )
    token_file = secrets_dir / "token"
    if not token_file.exists():
        raise InClusterConfigError(
            f"{token_file} is missing: the pod needs automountServiceAccountToken"
        )
    if ":" in host:  # an IPv6 service address
        host = f"[{host}]"
    try:
        namespace = (secrets_dir / "namespace").read_text().strip()
    except OSError:
        namespace = "default"
    access = InClusterAccess(
        server=f"https://{host}:{port}",
        namespace=namespace,
        token_file=token_file,
        ca_file=secrets_dir / "ca.crt",
    )
    access.token()  # fail now, not on the first request
    return access


# --- paths --------------------------------------------------------------------------------

_PLURALS = {
    "Endpoints": "endpoints",
    "NetworkPolicy": "networkpolicies",
    "PodSecurityPolicy": "podsecuritypolicies",
    "Ingress": "ingresses",
    "IngressClass": "ingressclasses",
    "StorageClass": "storageclasses",
    "PriorityClass": "priorityclasses",
    "RuntimeClass": "runtimeclasses",
}


def plural(kind: str) -> str:
    return _PLURALS.get(kind, kind.lower() + "s")


def resource_path(
    api_version: str, resource: str, *, namespace: str | None = None, name: str | None = None
) -> str:
    """``/api/v1/namespaces/ns/pods/name`` and friends."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    ns = f"/namespaces/{namespace}" if namespace else ""
    tail = f"/{name}" if name else ""
    return f"{base}{ns}/{resource}{tail}"


def object_path(obj: Obj) -> str:
    """The URL path of an object given as a manifest (apiVersion, kind, metadata)."""
    meta = obj["metadata"]
    return resource_path(
        obj["apiVersion"], plural(obj["kind"]), namespace=meta.get("namespace"), name=meta["name"]
    )


# --- watch events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listed:
    """The full state of the collection: the first event of a watch, and again after any
    gap (410 Gone), so a consumer reconciles from it instead of trusting it missed nothing."""

    items: tuple[Obj, ...]
    resource_version: str


@dataclass(frozen=True, slots=True)
class Changed:
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    object: Obj


WatchEvent = Listed | Changed


# --- the client ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ApiTimeouts:
    """Seconds. ``request`` bounds a whole ordinary call: an API server that has not
    answered a GET in 30 s is as good as unreachable. ``watch`` is the server-side watch
    duration; the stream then ends cleanly and is resumed from the last resourceVersion,
    which keeps a silently dead connection from hanging a watch for ever."""

    connect: float = 10.0
    request: float = 30.0
    watch: int = 290


_decoder = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()


class KubeApi:
    """One HTTP connection pool to one API server. Use ``async with`` (or :meth:`close`)."""

    def __init__(
        self, access: Access, *, timeouts: ApiTimeouts = ApiTimeouts(), page_size: int = 500
    ) -> None:
        self.access = access
        self.server = access.server.rstrip("/")
        self.namespace = access.namespace
        self.timeouts = timeouts
        self.page_size = page_size
        self.route = access.route
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeApi:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No environment proxies (trust_env stays off): the Route decides, by kubectl's
            # rules. TLS comes with each request, since an exec plugin may change the client
            # certificate while the pool lives.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=16),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect),
            )
        return self._session

    def _unreachable(self, cause: BaseException) -> ApiUnreachable:
        return ApiUnreachable(self.server, cause, proxy=self.route.proxy)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Obj | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        data = _encoder.encode(body) if body is not None else None
        creds = await self.access.credentials()
        for attempt in (1, 2):
            headers = {"Accept": "application/json", **creds.headers}
            if data is not None:
                headers["Content-Type"] = content_type
            try:
                async with self._client().request(
                    method,
                    self.server + path,
                    params=params,
                    data=data,
                    headers=headers,
                    ssl=creds.tls,
                    timeout=aiohttp.ClientTimeout(
                        total=self.timeouts.request, sock_connect=self.timeouts.connect
                    ),
                    **self.route.aiohttp_options(),
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise self._unreachable(e) from e
            if status == 401 and attempt == 1:
                # Credentials may have rotated or expired early: renew them, once.
                creds = await self.access.credentials(rejected=creds)
                continue
            result = _decode(raw)
            if status >= 400:
                raise error_from_status(status, result, method=method, path=path)
            return result
        raise AssertionError("unreachable")

    # --- verbs ----------------------------------------------------------------------------

    async def get(self, path: str) -> Obj:
        return await self._request("GET", path)

    async def list(
        self,
        path: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> Obj:
        """A whole collection, page by page, as one ``...List`` object."""
        params = _selectors(label_selector, field_selector)
        params["limit"] = str(self.page_size)
        items: list[Obj] = []
        while True:
            page = await self._request("GET", path, params=params)
            items.extend(page.get("items") or [])
            cont = page.get("metadata", {}).get("continue")
            if not cont:
                page["items"] = items
                return page
            params["continue"] = cont

    async def create(self, path: str, body: Obj, *, dry_run: bool = False) -> Obj:
        """POST to a collection path. With ``dry_run`` the server runs authorization,
        admission and validation and stores nothing."""
        params = {"dryRun": "All"} if dry_run else None
        return await self._request("POST", path, params=params, body=body)

    async def apply(self, body: Obj, *, path: str | None = None, dry_run: bool = False) -> Obj:
        """Server-side apply, forcing ownership of the fields we set: we are the one
        installer of these objects, so a conflict with a hand edit resolves in our favour."""
        params = {"fieldManager": FIELD_MANAGER, "force": "true"}
        if dry_run:
            params["dryRun"] = "All"
        return await self._request(
            "PATCH",
            path or object_path(body),
            params=params,
            body=body,
            content_type="application/apply-patch+yaml",  # JSON is YAML
        )

    async def delete(self, path: str, *, missing_ok: bool = True) -> Obj | None:
        """Deletes; the garbage collector removes dependents (a Deployment's ReplicaSets and
        pods) in the background. None if it was already gone."""
        try:
            return await self._request("DELETE", path, params={"propagationPolicy": "Background"})
        except NotFound:
            if missing_ok:
                return None
            raise

    async def watch(
        self,
        path: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> AsyncGenerator[WatchEvent, None]:
        """List, then watch from the list's resourceVersion, for as long as the consumer
        iterates. A stream the server ends is resumed where it stopped; a resourceVersion
        that expired (410 Gone) makes it list again and yield a fresh :class:`Listed`.
        Connection failures raise :class:`ApiUnreachable`: the consumer decides to retry."""
        while True:
            listing = await self.list(
                path, label_selector=label_selector, field_selector=field_selector
            )
            rv = str(listing.get("metadata", {}).get("resourceVersion", ""))
            yield Listed(items=tuple(listing.get("items") or ()), resource_version=rv)
            try:
                while True:
                    stream = self._watch_stream(
                        path, rv, label_selector=label_selector, field_selector=field_selector
                    )
                    # aclosing: a consumer that stops early releases the connection now.
                    async with contextlib.aclosing(stream):
                        async for event in stream:
                            if isinstance(event, str):
                                rv = event  # a bookmark
                                continue
                            rv = str(event.object.get("metadata", {}).get("resourceVersion", rv))
                            yield event
            except Gone:
                log.debug("watch of %s expired at %s: listing again", path, rv)

    async def _watch_stream(
        self,
        path: str,
        resource_version: str,
        *,
        label_selector: str | None,
        field_selector: str | None,
    ) -> AsyncGenerator[Changed | str, None]:
        """One watch request: yields events, and bookmarks as their resourceVersion."""
        params = _selectors(label_selector, field_selector)
        params.update(
            watch="true",
            resourceVersion=resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(self.timeouts.watch),
        )
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeouts.connect, sock_read=self.timeouts.watch + 30
        )
        creds = await self.access.credentials()
        for attempt in (1, 2):
            headers = {"Accept": "application/json", **creds.headers}
            try:
                async with self._client().get(
                    self.server + path,
                    params=params,
                    headers=headers,
                    timeout=timeout,
                    ssl=creds.tls,
                    **self.route.aiohttp_options(),
                ) as resp:
                    if resp.status == 401 and attempt == 1:
                        creds = await self.access.credentials(rejected=creds)
                        continue
                    if resp.status >= 400:
                        raise error_from_status(resp.status, _decode(await resp.read()), path=path)
                    buffer = b""
                    async for chunk in resp.content.iter_any():
                        buffer += chunk
                        *lines, buffer = buffer.split(b"\n")
                        for line in lines:
                            if line.strip():
                                event = _watch_event(_decode(line), path=path)
                                if event is not None:
                                    yield event
                    return
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise self._unreachable(e) from e


def _selectors(label_selector: str | None, field_selector: str | None) -> dict[str, str]:
    params: dict[str, str] = {}
    if label_selector:
        params["labelSelector"] = label_selector
    if field_selector:
        params["fieldSelector"] = field_selector
    return params


def _decode(raw: bytes) -> Obj:
    if not raw.strip():
        return {}
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError:
        return {"message": raw.decode(errors="replace").strip()[:500]}


def _watch_event(event: Obj, *, path: str) -> Changed | str | None:
    kind = event.get("type")
    obj = event.get("object") or {}
    if kind in ("ADDED", "MODIFIED", "DELETED"):
        return Changed(type=kind, object=obj)
    if kind == "BOOKMARK":
        return str(obj.get("metadata", {}).get("resourceVersion", ""))
    if kind == "ERROR":
        raise error_from_status(int(obj.get("code") or 500), obj, path=path)
    return None


def is_ready(pod: Obj) -> bool:
    """A pod that serves: Ready condition true, and not on its way out."""
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


T = TypeVar("T")


async def wait_until(
    api: KubeApi,
    path: str,
    check: Callable[[dict[str, Obj]], T | None],
    *,
    label_selector: str | None = None,
    field_selector: str | None = None,
) -> T:
    """Watches a collection until ``check(objects by name)`` returns something truthy, and
    returns that. ``check`` may raise to give up. Callers put a deadline around it."""
    objects: dict[str, Obj] = {}
    async for event in api.watch(
        path, label_selector=label_selector, field_selector=field_selector
    ):
        if isinstance(event, Listed):
            objects = {o["metadata"]["name"]: o for o in event.items}
        elif event.type == "DELETED":
            objects.pop(event.object["metadata"]["name"], None)
        else:
            objects[event.object["metadata"]["name"]] = event.object
        result = check(objects)
        if result:
            return result
    raise AssertionError("a watch does not end")  # pragma: no cover


__all__ = [
    "FIELD_MANAGER",
    "Access",
    "ApiError",
    "ApiTimeouts",
    "ApiUnreachable",
    "Changed",
    "Conflict",
    "Credentials",
    "Forbidden",
    "Gone",
    "InClusterAccess",
    "InClusterConfigError",
    "Invalid",
    "KubeApi",
    "KubeError",
    "Listed",
    "NotFound",
    "Obj",
    "Route",
    "Unauthorized",
    "WatchEvent",
    "error_from_status",
    "in_cluster_access",
    "is_ready",
    "object_path",
    "plural",
    "resource_path",
    "wait_until",
]
