"""Credentials that change while a process runs: exec plugins, token files, client certificates.

The decisions are pure functions: what a plugin is told (:func:`exec_info`), what its answer
means (:func:`parse_exec_credential`), when to ask it again (:func:`needs_refresh`), when to
read a token file again (:func:`token_file_stale`). Around them, thin shells do the I/O:
:class:`ExecPlugin` runs a plugin as an asyncio subprocess and keeps its credential,
:class:`TokenFile` reads a rotating token, :class:`TlsContexts` builds an SSL context when
the client certificate changes.

One :class:`ExecPlugin` per plugin configuration serves the whole process
(:func:`shared_exec_plugin`), as client-go's cache does: a cloud CLI that takes a second per
run is run once per credential lifetime, not once per request or port-forward.

Nothing here imports aiohttp or yaml.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")


class CredentialError(Exception):
    """A credential cannot be had; ``str()`` is one line that names the source and the fix."""


@dataclass(frozen=True, kw_only=True)
class CredentialSettings:
    """Seconds.

    ``exec_timeout``: a plugin that refreshes through a cloud's token endpoint answers in a
    few seconds; one still silent after a minute is waiting for a login it cannot get
    without a terminal, and the user is better served by an error naming it.
    ``expiry_margin``: an exec credential is replaced this long before its
    ``expirationTimestamp`` (at most half its lifetime, so a short-lived one is still used),
    so that no request sets off with a token that expires on the way or on a skewed clock.
    ``token_file_max_age``: a ``tokenFile`` is read again at least this often, as client-go
    does, besides whenever the file changes."""

    exec_timeout: float = 60.0
    expiry_margin: float = 10.0
    token_file_max_age: float = 60.0


# --- exec plugins: the pure part ----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ExecConfig:
    """A kubeconfig's ``users[].user.exec``, with ``command`` resolved against the
    kubeconfig's directory when it is a relative path. Hashable: the key of the process-wide
    cache. ``cluster`` is ``spec.cluster`` of KUBERNETES_EXEC_INFO as canonical JSON, set
    only when the kubeconfig says ``provideClusterInfo: true``."""

    command: str
    api_version: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    install_hint: str = ""
    cluster: str | None = None


@dataclass(frozen=True, kw_only=True, eq=False)
class ExecCredential:
    """What a plugin answered. Times are seconds since the epoch (the plugin speaks wall
    time); ``expires_at`` None means valid until the API server rejects it. Compared by
    identity: a 401 names the very credential that failed."""

    token: str | None = field(default=None, repr=False)
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    expires_at: float | None = None
    obtained_at: float = 0.0


def exec_info(config: ExecConfig) -> str:
    """KUBERNETES_EXEC_INFO: the plugin's own apiVersion, never interactive (the daemon has
    no terminal), and the cluster only when asked for."""
    spec: dict[str, Any] = {"interactive": False}
    if config.cluster is not None:
        spec["cluster"] = json.loads(config.cluster)
    return json.dumps({"apiVersion": config.api_version, "kind": "ExecCredential", "spec": spec})


def parse_exec_credential(stdout: bytes, *, config: ExecConfig, now: float) -> ExecCredential:
    """The plugin's ExecCredential, checked as client-go checks it."""
    name = config.command
    try:
        doc = json.loads(stdout)
    except ValueError:
        first = stdout.decode(errors="replace").strip().splitlines()[:1]
        shown = f": {first[0][:80]!r}" if first else " (its output was empty)"
        raise CredentialError(
            f"credential plugin {name} printed no ExecCredential JSON{shown}"
        ) from None
    if not isinstance(doc, dict):
        raise CredentialError(f"credential plugin {name} printed JSON that is not an object")
    kind = doc.get("kind")
    if kind not in (None, "ExecCredential"):
        raise CredentialError(f"credential plugin {name} printed a {kind}, not an ExecCredential")
    if doc.get("apiVersion") != config.api_version:
        raise CredentialError(
            f"credential plugin {name} answered with apiVersion {doc.get('apiVersion')!r} but "
            f"the kubeconfig asks for {config.api_version}: make users[].user.exec.apiVersion "
            "match the plugin"
        )
    status = doc.get("status")
    if not isinstance(status, dict):
        raise CredentialError(f"credential plugin {name} printed an ExecCredential without status")
    token = str(status.get("token") or "") or None
    cert = str(status.get("clientCertificateData") or "") or None
    key = str(status.get("clientKeyData") or "") or None
    if bool(cert) != bool(key):
        raise CredentialError(
            f"credential plugin {name} returned a client certificate without its key, or a key "
            "without its certificate"
        )
    if not token and not cert:
        raise CredentialError(
            f"credential plugin {name} returned neither a token nor a client certificate"
        )
    expires_at = None
    if stamp := status.get("expirationTimestamp"):
        expires_at = parse_timestamp(
            str(stamp), what=f"credential plugin {name} returned the expirationTimestamp"
        )
    return ExecCredential(
        token=token,
        cert=cert.encode() if cert else None,
        key=key.encode() if key else None,
        expires_at=expires_at,
        obtained_at=now,
    )


def parse_timestamp(text: str, *, what: str) -> float:
    """An RFC 3339 time (Kubernetes' metav1.Time) as seconds since the epoch."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CredentialError(f"{what} {text!r}, which is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def needs_refresh(now: float, credential: ExecCredential, *, margin: float = 10.0) -> bool:
    """Whether a cached credential must be replaced before its next use: once less than
    ``margin`` remains of it, or less than half its lifetime for one shorter than that."""
    if credential.expires_at is None:
        return False
    lifetime = max(credential.expires_at - credential.obtained_at, 0.0)
    return now >= credential.expires_at - min(margin, lifetime / 2)


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _last_line(stderr: bytes | bytearray) -> str:
    lines = [ln for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    return _one_line(lines[-1]) if lines else ""


def not_found_message(config: ExecConfig) -> str:
    where = "" if "/" in config.command else " on PATH"
    hint = (
        _one_line(config.install_hint, 400)
        if config.install_hint.strip()
        else ("install it, or fix users[].user.exec.command in the kubeconfig")
    )
    return f"credential plugin {config.command} is not installed (not found{where}): {hint}"


# --- exec plugins: the process ------------------------------------------------------------


async def run_exec_plugin(
    config: ExecConfig,
    *,
    timeout: float = CredentialSettings.exec_timeout,
    environ: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
) -> ExecCredential:
    """Runs the plugin once, without a terminal: stdin is empty, stdout is the answer,
    stderr is kept for the error message (its last line) and the debug log."""
    env = dict(os.environ if environ is None else environ)
    env.update(config.env)
    env["KUBERNETES_EXEC_INFO"] = exec_info(config)
    name = config.command
    try:
        proc = await asyncio.create_subprocess_exec(
            config.command,
            *config.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own process group, killed whole on a timeout
        )
    except FileNotFoundError:
        raise CredentialError(not_found_message(config)) from None
    except PermissionError:
        raise CredentialError(
            f"credential plugin {name} is not executable: check its permissions"
        ) from None
    except OSError as e:
        raise CredentialError(f"cannot run credential plugin {name}: {e.strerror}") from None
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = bytearray(), bytearray()
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(
                _drain(proc.stdout, stdout), _drain(proc.stderr, stderr), proc.wait()
            )
    except TimeoutError:
        said = _last_line(stderr)
        raise CredentialError(
            f"credential plugin {name} gave no answer in {timeout:g} s"
            + (f" (its last words: {said})" if said else "")
            + ": run it by hand (it may be waiting for a login) and connect again"
        ) from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    for line in stderr.decode(errors="replace").splitlines():
        log.debug("credential plugin %s: %s", name, line)
    if proc.returncode != 0:
        said = _last_line(stderr) or "it printed nothing on stderr"
        raise CredentialError(
            f"credential plugin {name} failed (exit status {proc.returncode}): {said}"
        )
    return parse_exec_credential(bytes(stdout), config=config, now=clock())


async def _drain(stream: asyncio.StreamReader, into: bytearray) -> None:
    """Reads a pipe to its end, keeping what came so far if the caller gives up."""
    while chunk := await stream.read(65536):
        into += chunk


Runner = Callable[[ExecConfig], Awaitable[ExecCredential]]


class ExecPlugin:
    """One plugin's current credential. Concurrent callers wait for one run (four
    port-forwards opening at once start one plugin, not four)."""

    def __init__(
        self,
        config: ExecConfig,
        *,
        settings: CredentialSettings = CredentialSettings(),
        clock: Callable[[], float] = time.time,
        run: Runner | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.clock = clock
        self._run = run or self._run_process
        self._credential: ExecCredential | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self.runs = 0

    async def _run_process(self, config: ExecConfig) -> ExecCredential:
        return await run_exec_plugin(config, timeout=self.settings.exec_timeout, clock=self.clock)

    def _guard(self) -> asyncio.Lock:
        # A lock belongs to one event loop; a CLI command and a test each bring their own.
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def get(self, *, rejected: ExecCredential | None = None) -> ExecCredential:
        """The cached credential while it is fresh; otherwise, or when ``rejected`` is the
        cached one (the API server answered it with 401), a new one from the plugin."""
        async with self._guard():
            cached = self._credential
            if cached is None:
                reason = "first use"
            elif rejected is not None and cached is rejected:
                reason = "the API server rejected the last one"
            elif needs_refresh(self.clock(), cached, margin=self.settings.expiry_margin):
                reason = "the last one expires"
            else:
                return cached
            fresh = await self._run(self.config)
            self._credential = fresh
            self.runs += 1
            until = (
                datetime.fromtimestamp(fresh.expires_at, UTC).isoformat()
                if fresh.expires_at is not None
                else "the API server rejects it"
            )
            log.info(
                "credential plugin %s ran (%s): new credential, valid until %s",
                self.config.command,
                reason,
                until,
            )
            return fresh


_PLUGINS: dict[ExecConfig, ExecPlugin] = {}


def shared_exec_plugin(
    config: ExecConfig, *, settings: CredentialSettings = CredentialSettings()
) -> ExecPlugin:
    """The process's one :class:`ExecPlugin` for ``config``."""
    plugin = _PLUGINS.get(config)
    if plugin is None:
        plugin = _PLUGINS[config] = ExecPlugin(config, settings=settings)
    return plugin


# --- token files --------------------------------------------------------------------------

Stamp = tuple[int, int, int, int]  # device, inode, size, mtime in ns


def token_file_stale(
    *, now: float, read_at: float | None, max_age: float, seen: Stamp | None, current: Stamp | None
) -> bool:
    """Whether to read a token file again: never read, read ``max_age`` ago, or changed
    (a projected token is swapped in by a symlink, which changes the inode)."""
    return read_at is None or now - read_at >= max_age or current != seen


class TokenFile:
    """A bearer token in a file that someone else rotates. A failed re-read keeps the last
    good token, as client-go does: a rotation in progress is not an outage."""

    def __init__(
        self, path: Path, *, max_age: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self.max_age = max_age
        self.clock = clock
        self._token: str | None = None
        self._seen: Stamp | None = None
        self._read_at: float | None = None
        self.reads = 0

    def _stamp(self) -> Stamp | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def expire(self) -> None:
        """Read the file on the next use (the API server rejected its token)."""
        self._read_at = None

    def read(self) -> str:
        now = self.clock()
        current = self._stamp()
        if self._token is not None and not token_file_stale(
            now=now, read_at=self._read_at, max_age=self.max_age, seen=self._seen, current=current
        ):
            return self._token
        self._seen, self._read_at = current, now
        try:
            token = self.path.read_text().strip()
        except OSError as e:
            if self._token is None:
                raise CredentialError(f"cannot read tokenFile {self.path}: {e.strerror}") from e
            log.warning("keeping the last token: cannot read tokenFile %s: %s", self.path, e)
            return self._token
        self.reads += 1
        self._token = token
        return token


# --- TLS ----------------------------------------------------------------------------------


def _no_password() -> bytes:
    # Without this, OpenSSL would prompt on the terminal for an encrypted key.
    return b""


def tls_context(
    *, ca: bytes | None, insecure: bool, cert: bytes | None = None, key: bytes | None = None
) -> ssl.SSLContext:
    """The client side of TLS to one API server. A kubeconfig CA is the only trust anchor
    for that cluster (the system store would let any public CA vouch for the API server);
    without one, the system store. As in Go, any certificate of the CA bundle anchors a
    chain, an intermediate too."""
    if insecure and ca:
        raise CredentialError(
            "certificate-authority and insecure-skip-tls-verify are both set; remove one"
        )
    if insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ca:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii"))
        except (ssl.SSLError, ValueError) as e:
            raise CredentialError(
                f"the certificate-authority is not a PEM certificate ({e}): fix the kubeconfig"
            ) from None
    else:
        ctx = ssl.create_default_context()
    if cert and key:
        # ssl loads a chain from files only: a private directory, for a moment.
        with tempfile.TemporaryDirectory(prefix="tp-tls-") as tmp:
            cert_file, key_file = Path(tmp) / "client.crt", Path(tmp) / "client.key"
            cert_file.write_bytes(cert)
            key_file.write_bytes(key)
            try:
                ctx.load_cert_chain(str(cert_file), str(key_file), password=_no_password)
            except ssl.SSLError as e:
                raise CredentialError(
                    f"the client certificate and key cannot be used ({e.reason or e}): they "
                    "must be PEM, match each other, and the key must not be encrypted"
                ) from None
    return ctx


class TlsContexts:
    """The SSL context of one cluster, rebuilt only when the client certificate changes (an
    exec plugin may hand out a new one with each credential)."""

    def __init__(self, *, ca: bytes | None, insecure: bool) -> None:
        self.ca = ca
        self.insecure = insecure
        self._key: tuple[bytes | None, bytes | None] | None = None
        self._ctx: ssl.SSLContext | None = None
        self.built = 0

    def get(self, cert: bytes | None, key: bytes | None) -> ssl.SSLContext:
        if self._ctx is None or self._key != (cert, key):
            self._ctx = tls_context(ca=self.ca, insecure=self.insecure, cert=cert, key=key)
            self._key = (cert, key)
            self.built += 1
        return self._ctx


__all__ = [
    "EXEC_API_VERSIONS",
    "CredentialError",
    "CredentialSettings",
    "ExecConfig",
    "ExecCredential",
    "ExecPlugin",
    "TlsContexts",
    "TokenFile",
    "exec_info",
    "needs_refresh",
    "not_found_message",
    "parse_exec_credential",
    "parse_timestamp",
    "run_exec_plugin",
    "shared_exec_plugin",
    "tls_context",
    "token_file_stale",
]
