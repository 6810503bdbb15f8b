"""TLS, tls-server-name, client certificates and CONNECT proxies against loopback servers:
an HTTPS API server (aiohttp, with a port-forward WebSocket) under a test CA, and a CONNECT
proxy. Certificates are made here with `cryptography` (a dev dependency through devcluster)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from telepresence.k8s.api import ApiUnreachable, InClusterAccess, KubeApi, Route, Unauthorized
from telepresence.k8s.credentials import CredentialError, tls_context
from telepresence.k8s.kubeconfig import ClusterAccess, load
from telepresence.k8s.portforward import PROTOCOL, PortForward

SERVER_NAME = "kubernetes.test"
V1 = "client.authentication.k8s.io/v1"


# --- a test PKI ---------------------------------------------------------------------------


@dataclass
class Issued:
    cert: bytes
    key: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Authority:
    def __init__(self, cn: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), False)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, cn: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), client: bool = False
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


@pytest.fixture(scope="module")
def pki() -> tuple[Authority, Authority]:
    return Authority("test cluster CA"), Authority("someone else's CA")


# --- the servers --------------------------------------------------------------------------


@dataclass
class FakeApiServer:
    url: str = ""
    valid_tokens: set[str] = field(default_factory=lambda: {"good"})
    sni: list[str | None] = field(default_factory=list)
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # path, token, client CN

    def _who(self, request: web.Request) -> tuple[str, str]:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        cn = ""
        for rdn in (peer or {}).get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    cn = value
        self.seen.append((request.path, token, cn))
        return token, cn

    async def version(self, request: web.Request) -> web.Response:
        token, cn = self._who(request)
        if token not in self.valid_tokens and not cn:
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        return web.json_response({"gitVersion": "v1.99.0", "user": cn or token})

    async def portforward(self, request: web.Request) -> web.StreamResponse:
        token, cn = self._who(request)
        if token not in self.valid_tokens and not cn:
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        port = int(request.query["ports"])
        ws = web.WebSocketResponse(protocols=(PROTOCOL,))
        await ws.prepare(request)
        head = port.to_bytes(2, "little")
        await ws.send_bytes(b"\x00" + head)
        await ws.send_bytes(b"\x01" + head)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x00":
                await ws.send_bytes(b"\x00" + msg.data[1:].upper())
        return ws


@dataclass
class ConnectProxy:
    """An HTTP CONNECT proxy that wants ``authorization`` (when set) and records requests."""

    authorization: str | None = None
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline()).decode().strip()
            headers: dict[str, str] = {}
            while (h := (await reader.readline()).decode().strip()) != "":
                name, _, value = h.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.requests.append((line, headers))
            method, target, _ = line.split(" ", 2)
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            if self.authorization and headers.get("proxy-authorization") != self.authorization:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                return
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (ConnectionError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@dataclass
class Bed:
    folder: Path
    ca: Authority
    other_ca: Authority
    api: FakeApiServer
    proxy: ConnectProxy

    def kubeconfig(
        self,
        *,
        ca: bytes | None = None,
        server_name: str | None = SERVER_NAME,
        proxy_url: str | None = None,
        user: dict[str, Any] | None = None,
    ) -> Path:
        cluster: dict[str, Any] = {
            "server": self.api.url,
            "certificate-authority-data": base64.b64encode(ca or self.ca.pem).decode(),
        }
        if server_name:
            cluster["tls-server-name"] = server_name
        if proxy_url:
            cluster["proxy-url"] = proxy_url
        doc = {
            "clusters": [{"name": "k", "cluster": cluster}],
            "users": [{"name": "u", "user": user if user is not None else {"token": "good"}}],
            "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
            "current-context": "c",
        }
        path = self.folder / "kubeconfig"
        path.write_text(yaml.safe_dump(doc))
        return path

    def access(self, **kw: Any) -> ClusterAccess:
        return load(kubeconfig=str(self.kubeconfig(**kw)), environ={})


@pytest.fixture
async def bed(tmp_path: Path, pki: tuple[Authority, Authority]) -> AsyncIterator[Bed]:
    ca, other = pki
    issued = ca.issue("apiserver", dns=(SERVER_NAME,))
    (tmp_path / "server.crt").write_bytes(issued.cert)
    (tmp_path / "server.key").write_bytes(issued.key)
    api = FakeApiServer()

    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    server_tls.load_verify_locations(cadata=ca.pem.decode())
    server_tls.verify_mode = ssl.CERT_OPTIONAL  # a client certificate, or a token

    def record_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        api.sni.append(name)

    server_tls.sni_callback = record_sni
    app = web.Application()
    app.router.add_get("/version", api.version)
    app.router.add_get("/api/v1/namespaces/{ns}/pods/{pod}/portforward", api.portforward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    api.url = f"https://127.0.0.1:{port}"

    proxy = ConnectProxy()
    proxy_server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    proxy.port = proxy_server.sockets[0].getsockname()[1]
    try:
        yield Bed(tmp_path, ca, other, api, proxy)
    finally:
        proxy_server.close()
        await runner.cleanup()


# --- trust --------------------------------------------------------------------------------


def test_the_kubeconfig_ca_replaces_the_system_store(pki: tuple[Authority, Authority]) -> None:
    ca, _ = pki
    ctx = tls_context(ca=ca.pem, insecure=False)
    assert ctx.cert_store_stats()["x509_ca"] == 1
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "test cluster CA"),),)]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    with pytest.raises(CredentialError, match="both set"):
        tls_context(ca=ca.pem, insecure=True)


async def test_the_cluster_ca_and_tls_server_name_verify_the_server(bed: Bed) -> None:
    async with KubeApi(bed.access()) as api:
        assert (await api.get("/version"))["gitVersion"] == "v1.99.0"
    assert bed.api.sni == [SERVER_NAME]


async def test_without_tls_server_name_the_url_host_is_checked(bed: Bed) -> None:
    async with KubeApi(bed.access(server_name=None)) as api:
        with pytest.raises(ApiUnreachable) as info:
            await api.get("/version")
    assert "certificate verify failed" in str(info.value)
    assert "tls-server-name" in str(info.value)
    assert bed.api.seen == []


async def test_a_server_signed_by_another_ca_is_refused(bed: Bed) -> None:
    async with KubeApi(bed.access(ca=bed.other_ca.pem)) as api:
        with pytest.raises(ApiUnreachable, match="certificate-authority"):
            await api.get("/version")
    assert bed.api.seen == []


# --- proxies ------------------------------------------------------------------------------


async def test_rest_and_port_forwards_go_through_the_proxy_with_its_credentials(bed: Bed) -> None:
    bed.proxy.authorization = "Basic " + base64.b64encode(b"me:s3cret").decode()
    access = bed.access(proxy_url=f"http://me:s3cret@127.0.0.1:{bed.proxy.port}")
    async with KubeApi(access) as api:
        assert (await api.get("/version"))["user"] == "good"
    async with aiohttp.ClientSession() as session:
        pf = await PortForward.open(session, access, namespace="ns", pod="pod", port=8081)
        await pf.send_buffers([b"hello"])
        assert await pf.receive() == b"HELLO"
        await pf.close()
    target = bed.api.url.removeprefix("https://")
    assert [line for line, _ in bed.proxy.requests] == [f"CONNECT {target} HTTP/1.1"] * 2
    assert all(h["proxy-authorization"] == bed.proxy.authorization for _, h in bed.proxy.requests)
    assert bed.api.sni == [SERVER_NAME, SERVER_NAME]  # TLS end to end, through the tunnel


async def test_an_https_proxy_is_spoken_to_over_tls(bed: Bed) -> None:
    """TLS to the proxy, and the API server's TLS inside it. As in kubectl, the proxy's
    certificate is checked with the cluster's TLS settings (here: the same CA)."""
    issued = bed.ca.issue("proxy", ips=("127.0.0.1",))
    (bed.folder / "proxy.crt").write_bytes(issued.cert)
    (bed.folder / "proxy.key").write_bytes(issued.key)
    proxy_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    proxy_tls.load_cert_chain(bed.folder / "proxy.crt", bed.folder / "proxy.key")
    proxy = ConnectProxy()
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0, ssl=proxy_tls)
    port = server.sockets[0].getsockname()[1]
    try:
        access = bed.access(proxy_url=f"https://127.0.0.1:{port}")
        assert access.route.proxy == f"https://127.0.0.1:{port}"
        async with KubeApi(access) as api:
            assert (await api.get("/version"))["user"] == "good"
        async with aiohttp.ClientSession() as session:
            pf = await PortForward.open(session, access, namespace="ns", pod="pod", port=8081)
            await pf.send_buffers([b"tls in tls"])
            assert await pf.receive() == b"TLS IN TLS"
            await pf.close()
    finally:
        server.close()
    assert len(proxy.requests) == 2
    assert bed.api.sni == [SERVER_NAME, SERVER_NAME]


async def test_a_proxy_that_refuses_is_named_in_the_error(bed: Bed) -> None:
    bed.proxy.authorization = "Basic other"
    access = bed.access(proxy_url=f"http://me:wrong@127.0.0.1:{bed.proxy.port}")
    async with KubeApi(access) as api:
        with pytest.raises(ApiUnreachable) as info:
            await api.get("/version")
    message = str(info.value)
    assert f"through the proxy http://127.0.0.1:{bed.proxy.port}" in message
    assert "407" in message and "check the proxy" in message and "wrong" not in message
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ApiUnreachable, match="check the proxy"):
            await PortForward.open(session, access, namespace="ns", pod="pod", port=8081)


# --- exec plugins over the wire -----------------------------------------------------------

PLUGIN = """\
import json, os, sys
state = os.environ["PLUGIN_STATE"]
runs = len(os.listdir(state)) + 1
open(os.path.join(state, str(runs)), "w").close()
status = {"token": f"token-{runs}"}
if os.environ.get("PLUGIN_CERTS"):
    folder = os.environ["PLUGIN_CERTS"]
    status = {"clientCertificateData": open(os.path.join(folder, f"{runs}.crt")).read(),
              "clientKeyData": open(os.path.join(folder, f"{runs}.key")).read()}
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": status}))
"""


def exec_user(folder: Path, **env: str) -> dict[str, Any]:
    (folder / "state").mkdir()
    plugin = folder / "plugin"
    plugin.write_text(f"#!{sys.executable}\n{PLUGIN}")
    plugin.chmod(0o755)
    pairs = {"PLUGIN_STATE": str(folder / "state"), **env}
    return {
        "exec": {
            "apiVersion": V1,
            "command": "./plugin",
            "env": [{"name": k, "value": v} for k, v in pairs.items()],
        }
    }


def plugin_runs(folder: Path) -> int:
    return len(list((folder / "state").iterdir()))


async def test_a_port_forward_renews_an_exec_token_once_on_401(bed: Bed) -> None:
    access = bed.access(user=exec_user(bed.folder))
    bed.api.valid_tokens = {"token-2"}
    async with aiohttp.ClientSession() as session:
        pf = await PortForward.open(session, access, namespace="ns", pod="pod", port=8081)
        await pf.close()
        assert plugin_runs(bed.folder) == 2
        # The REST calls share the renewed credential: no run.
        async with KubeApi(access) as api:
            await api.get("/version")
        assert plugin_runs(bed.folder) == 2
        # Rejected again after renewal: one more run, then the error.
        bed.api.valid_tokens = {"token-9"}
        with pytest.raises(Unauthorized):
            await PortForward.open(session, access, namespace="ns", pod="pod", port=8081)
        assert plugin_runs(bed.folder) == 3
    tokens = [token for path, token, _ in bed.api.seen]
    assert tokens == ["token-1", "token-2", "token-2", "token-2", "token-3"]


async def test_an_exec_client_certificate_is_presented_and_its_context_kept(bed: Bed) -> None:
    certs = bed.folder / "certs"
    certs.mkdir()
    for run, cn in ((1, "alice"), (2, "alice-renewed")):
        issued = bed.ca.issue(cn, client=True)
        (certs / f"{run}.crt").write_bytes(issued.cert)
        (certs / f"{run}.key").write_bytes(issued.key)
    access = bed.access(user=exec_user(bed.folder, PLUGIN_CERTS=str(certs)))
    async with KubeApi(access) as api:
        assert (await api.get("/version"))["user"] == "alice"
        first = await access.credentials()
        assert (await api.get("/version"))["user"] == "alice"
        assert await access.credentials() is first
        assert first.headers == {}
        # The server rejects it (say, revoked): a new certificate, a new TLS context.
        renewed = await access.credentials(rejected=first)
        assert renewed.tls is not first.tls
        assert (await api.get("/version"))["user"] == "alice-renewed"
    assert plugin_runs(bed.folder) == 2


# --- the manager's own access ---------------------------------------------------------------


async def test_in_cluster_credentials_follow_the_token_and_renew_on_401(
    tmp_path: Path, pki: tuple[Authority, Authority]
) -> None:
    (tmp_path / "token").write_text("first")
    (tmp_path / "ca.crt").write_bytes(pki[0].pem)
    now = [0.0]
    access = InClusterAccess(
        server="https://10.96.0.1:443",
        namespace="ambassador",
        token_file=tmp_path / "token",
        ca_file=tmp_path / "ca.crt",
        clock=lambda: now[0],
    )
    assert access.route == Route()  # in the pod network: no proxy, the URL's host
    first = await access.credentials()
    assert first.headers == {"Authorization": "Bearer first"}
    assert await access.credentials() is first
    (tmp_path / "token").write_text("second")
    renewed = await access.credentials(rejected=first)  # read again at once, not in a minute
    assert renewed.headers == {"Authorization": "Bearer second"}
    assert renewed.tls is first.tls
