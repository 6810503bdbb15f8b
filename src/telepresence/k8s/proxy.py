"""Which proxy, if any, carries a connection to the API server: kubectl's rules, pure.

A cluster's ``proxy-url`` is used for every connection to that cluster; ``NO_PROXY`` does not
apply to it (kubectl hands it to Go as a fixed proxy). Otherwise the environment decides, as
Go's ``golang.org/x/net/http/httpproxy`` does for kubectl: ``HTTPS_PROXY`` (or
``https_proxy``) for an https server, ``HTTP_PROXY`` (or ``http_proxy``) for an http one, the
upper-case name first and an empty value counting as unset; never for ``localhost`` or a
loopback address; and not when an entry of ``NO_PROXY`` (or ``no_proxy``) matches.

The same choice serves the REST calls and the port-forward WebSockets, so a laptop behind a
corporate proxy reaches the cluster both ways or neither.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}


class ProxyError(ValueError):
    """A proxy setting telepresence cannot use; the message names the setting and the fix."""


@dataclass(frozen=True, kw_only=True)
class Proxy:
    """An HTTP CONNECT proxy: ``url`` is ``scheme://host:port`` without credentials, which
    travel as the ``Proxy-Authorization`` value instead (and stay out of logs and reprs)."""

    url: str
    source: str
    authorization: str | None = field(default=None, repr=False)

    def headers(self) -> dict[str, str]:
        return {"Proxy-Authorization": self.authorization} if self.authorization else {}


def parse_proxy(raw: str, *, source: str) -> Proxy:
    """A proxy URL as Go parses it: without a scheme, ``http://`` is assumed; a default
    port per scheme; ``user:password@`` becomes Basic proxy authorization. SOCKS (which
    kubectl also speaks) is refused, naming the setting, since aiohttp has no SOCKS client."""
    text = raw.strip()
    parts = urlsplit(text)
    if not parts.scheme or not parts.netloc:
        parts = urlsplit("http://" + text)
    scheme = parts.scheme.lower()
    if scheme in ("socks5", "socks5h", "socks4", "socks"):
        raise ProxyError(
            f"{source} is a SOCKS proxy ({_redacted(text)}), which telepresence does not "
            "support: use an HTTP CONNECT proxy (http:// or https://)"
        )
    if scheme not in ("http", "https"):
        raise ProxyError(
            f"{source} has the unsupported scheme {scheme!r} ({_redacted(text)}): use "
            "http:// or https://"
        )
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise ProxyError(f"{source} is not a valid proxy URL ({_redacted(text)}): {e}") from e
    if not host:
        raise ProxyError(f"{source} names no proxy host ({_redacted(text)})")
    shown = f"[{host}]" if ":" in host else host
    authorization = None
    if parts.username is not None:
        user = unquote(parts.username)
        password = unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        authorization = f"Basic {token}"
    return Proxy(
        url=f"{scheme}://{shown}:{port or DEFAULT_PORTS[scheme]}",
        source=source,
        authorization=authorization,
    )


def _redacted(url: str) -> str:
    """The URL for a message, with any password replaced."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _env(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """The first of ``names`` with a non-empty value, and that value (Go's getEnvAny)."""
    for name in names:
        value = environ.get(name, "")
        if value:
            return name, value
    return None


def select_proxy(
    server: str, *, proxy_url: str | None, environ: Mapping[str, str], cluster: str = ""
) -> Proxy | None:
    """The proxy for connections to ``server``, or None to connect directly."""
    if proxy_url:
        where = f"proxy-url of cluster {cluster!r}" if cluster else "proxy-url"
        return parse_proxy(proxy_url, source=where)
    target = urlsplit(server)
    scheme = target.scheme.lower()
    if scheme == "https":
        found = _env(environ, "HTTPS_PROXY", "https_proxy")
    elif scheme == "http":
        found = _env(environ, "HTTP_PROXY", "http_proxy")
    else:
        return None
    if found is None:
        return None
    host = target.hostname or ""
    port = target.port or DEFAULT_PORTS.get(scheme, 443)
    no_proxy = _env(environ, "NO_PROXY", "no_proxy")
    if not use_proxy(host, port, no_proxy=no_proxy[1] if no_proxy else ""):
        return None
    name, value = found
    return parse_proxy(value, source=name)


# --- NO_PROXY -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Domain:
    suffix: str  # always starts with "."
    exact_too: bool  # "foo.com" matches foo.com itself; ".foo.com" only its subdomains
    port: str


@dataclass(frozen=True)
class _Ip:
    ip: IPAddress
    port: str


@dataclass(frozen=True)
class NoProxy:
    """A parsed ``NO_PROXY`` list. ``everything`` for an entry ``*``."""

    everything: bool = False
    networks: tuple[IPNetwork, ...] = ()
    ips: tuple[_Ip, ...] = ()
    domains: tuple[_Domain, ...] = ()


def parse_no_proxy(value: str) -> NoProxy:
    """Entries separated by commas: ``*``; a CIDR; an IP, optionally ``[v6]:port`` or
    ``v4:port``; a domain, optionally with a leading ``.`` or ``*.`` and a ``:port``."""
    networks: list[IPNetwork] = []
    ips: list[_Ip] = []
    domains: list[_Domain] = []
    for raw in value.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return NoProxy(everything=True)
        if "/" in entry:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
        host, port = _split_host_port(entry)
        if not host:
            continue  # ":80" and the like: no host, nothing to match
        ip = _ip(host)
        if ip is not None:
            ips.append(_Ip(ip, port))
            continue
        if host.startswith("*."):
            host = host[1:]
        exact_too = not host.startswith(".")
        suffix = _idna(host if not exact_too else "." + host)
        domains.append(_Domain(suffix, exact_too, port))
    return NoProxy(networks=tuple(networks), ips=tuple(ips), domains=tuple(domains))


def use_proxy(host: str, port: int, *, no_proxy: str | NoProxy) -> bool:
    """Whether a connection to ``host:port`` goes through the environment's proxy."""
    host = host.strip().lower().strip("[]")
    if not host:
        return True
    if host == "localhost":
        return False
    ip = _ip(host)
    if ip is not None and ip.is_loopback:
        return False
    rules = parse_no_proxy(no_proxy) if isinstance(no_proxy, str) else no_proxy
    if rules.everything:
        return False
    port_text = str(port)
    if ip is not None:
        if any(ip in net for net in rules.networks if net.version == ip.version):
            return False
        if any(m.ip == ip and m.port in ("", port_text) for m in rules.ips):
            return False
    name = _idna(host)
    for m in rules.domains:
        if (name.endswith(m.suffix) or (m.exact_too and name == m.suffix[1:])) and m.port in (
            "",
            port_text,
        ):
            return False
    return True


def _split_host_port(entry: str) -> tuple[str, str]:
    """Go's net.SplitHostPort, falling back to the whole entry as the host."""
    if entry.startswith("["):
        close = entry.find("]")
        if close > 0:
            rest = entry[close + 1 :]
            if rest.startswith(":"):
                return entry[1:close], rest[1:]
            if not rest:
                return entry[1:close], ""
        return entry, ""
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, port
    return entry, ""


def _ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # Go compares ::ffff:a.b.c.d and a.b.c.d as equal
    return ip


def _idna(host: str) -> str:
    """Unicode names in their ASCII form, label by label (a leading dot stays)."""
    if host.isascii():
        return host
    try:
        return ".".join(label.encode("idna").decode("ascii") for label in host.split("."))
    except UnicodeError:
        return host


__all__ = [
    "NoProxy",
    "Proxy",
    "ProxyError",
    "parse_no_proxy",
    "parse_proxy",
    "select_proxy",
    "use_proxy",
]
