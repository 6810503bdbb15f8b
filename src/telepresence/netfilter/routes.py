"""Links, addresses and routes, through ``ip`` (iproute2) subprocesses.

``ip -j`` gives JSON to read and ``ip -batch -`` applies many routes in one
process, which is all the helper needs; raw netlink would be more code to
audit in a root process for no gain at this size.  Parsing and rendering are
pure functions (unit-tested); :func:`run_ip` is the only I/O.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import stat
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from telepresence.netfilter.subnets import IPNetwork

__all__ = [
    "IP_CANDIDATES",
    "IpError",
    "LaptopNetwork",
    "Link",
    "add_routes",
    "configure_tun",
    "delete_link",
    "delete_routes",
    "get_link",
    "laptop_network",
    "laptop_routes",
    "parse_gateways",
    "parse_routes",
    "parse_rule_marks",
    "render_route_batch",
    "routes_on",
    "run_ip",
]

#: Where iproute2 lives on every distribution we know.  Never searched through
#: PATH: this runs as root, and the caller's PATH (or an `ip` in a directory the
#: caller can write) must not choose the program root runs.
IP_CANDIDATES = ("/usr/sbin/ip", "/sbin/ip")
#: The whole environment of every child: nothing inherited from the caller.
_ENV = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
#: Route types that can carry traffic somewhere else; blackhole, local,
#: broadcast etc. describe this host, not a network a VPN reaches.
_UNICAST = "unicast"


class IpError(Exception):
    """An ``ip`` command failed; the message names it and its first error line."""


def find_ip(candidates: Sequence[str] = IP_CANDIDATES) -> str:
    """The first candidate that is a regular file, owned by root and writable by
    root only (checked after following symlinks, as exec would follow them)."""
    for path in candidates:
        try:
            info = os.stat(path)
        except OSError:
            continue
        if (
            stat.S_ISREG(info.st_mode)
            and info.st_uid == 0
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        ):
            return path
    raise IpError(f"iproute2 not found as a root-owned {' or '.join(candidates)}: install it")


def run_ip(*args: str, input: str | None = None) -> str:
    proc = subprocess.run(
        [find_ip(), *args],
        input=input,
        capture_output=True,
        text=True,
        env=_ENV,
        check=False,
        timeout=30,
    )
    if proc.returncode != 0:
        detail = next((s for s in proc.stderr.splitlines() if s.strip()), f"exit {proc.returncode}")
        raise IpError(f"ip {' '.join(args)}: {detail.strip()}")
    return proc.stdout


def _json(*args: str) -> Any:
    out = run_ip("-j", *args)
    return json.loads(out) if out.strip() else []


def parse_routes(routes: Iterable[dict[str, Any]], *, family: int) -> list[tuple[IPNetwork, str]]:
    """``(network, device)`` for unicast routes in ``ip -j -4|-6 route show table all`` output.

    Every table but ``local`` counts, so a VPN that routes through a policy
    table (WireGuard's 51820) is seen too.  Routes without a device
    (unreachable, prohibit) cannot be hijacked and are skipped.
    """
    result: list[tuple[IPNetwork, str]] = []
    for route in routes:
        if route.get("type", _UNICAST) != _UNICAST or route.get("table") == "local":
            continue
        if "dst" not in route or "dev" not in route:
            continue
        dst = str(route["dst"])
        if dst == "default":
            dst = "0.0.0.0/0" if family == 4 else "::/0"
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if net.version == family:
            result.append((net, str(route["dev"])))
    return result


def parse_gateways(routes: Iterable[dict[str, Any]]) -> list[IPv4Address]:
    """Gateways of IPv4 default routes (and of the 0.0.0.0/1 + 128.0.0.0/1 pair that
    full-tunnel VPNs use instead), in every table: the laptop's way out, which no
    cluster subnet may capture.  Multipath routes list theirs under ``nexthops``."""
    found: list[IPv4Address] = []
    for route in routes:
        dst = str(route.get("dst", ""))
        if dst not in ("default", "0.0.0.0/0", "0.0.0.0/1", "128.0.0.0/1"):
            continue
        hops = [route, *route.get("nexthops", [])]
        for hop in hops:
            with contextlib.suppress(ValueError):
                gateway = ipaddress.ip_address(str(hop.get("gateway", "")))
                if isinstance(gateway, IPv4Address) and gateway not in found:
                    found.append(gateway)
    return found


def parse_rule_marks(rules: Iterable[dict[str, Any]]) -> list[tuple[int, int]]:
    """``(fwmark, mask)`` of every policy routing rule (``ip -j rule``) that
    selects by mark: a socket carrying a matching mark is routed differently,
    which is how WireGuard and other VPNs exempt their own traffic."""
    marks: list[tuple[int, int]] = []
    for rule in rules:
        if "fwmark" not in rule:
            continue
        with contextlib.suppress(ValueError):
            mark = int(str(rule["fwmark"]), 0)
            mask = int(str(rule.get("fwmask", "0xffffffff")), 0)
            marks.append((mark, mask))
    return marks


@dataclass(frozen=True, kw_only=True)
class LaptopNetwork:
    """What the helper checks requests against, read fresh for each request."""

    routes: list[tuple[IPNetwork, str]]
    gateways: list[IPv4Address]
    rule_marks: list[tuple[int, int]]


def laptop_network() -> LaptopNetwork:
    routes4 = _json("-4", "route", "show", "table", "all")
    return LaptopNetwork(
        routes=[
            *parse_routes(routes4, family=4),
            *parse_routes(_json("-6", "route", "show", "table", "all"), family=6),
        ],
        gateways=parse_gateways(routes4),
        rule_marks=[*parse_rule_marks(_json("-4", "rule")), *_ipv6_rule_marks()],
    )


def _ipv6_rule_marks() -> list[tuple[int, int]]:
    """Empty where IPv6 is disabled (``ip -6 rule`` then fails)."""
    try:
        return parse_rule_marks(_json("-6", "rule"))
    except IpError:
        return []


def laptop_routes() -> list[tuple[IPNetwork, str]]:
    """The laptop's IPv4 and IPv6 unicast routes, in all tables."""
    return [
        *parse_routes(_json("-4", "route", "show", "table", "all"), family=4),
        *parse_routes(_json("-6", "route", "show", "table", "all"), family=6),
    ]


def routes_on(device: str) -> list[IPv4Network]:
    """IPv4 destinations routed to ``device`` in the main table."""
    return [
        IPv4Network(str(route["dst"]))
        for route in _json("-4", "route", "show", "dev", device)
        if route.get("dst") not in (None, "default")
    ]


def render_route_batch(
    verb: str, *, device: str, networks: Sequence[IPv4Network], source: IPv4Address
) -> str:
    """``ip -batch`` input: one ``route VERB`` line per network, all on ``device``."""
    if verb not in ("add", "del"):
        raise ValueError(f"route verb must be add or del, not {verb!r}")
    src = f" src {source}" if verb == "add" else ""
    return "".join(f"route {verb} {net} dev {device}{src}\n" for net in networks)


def add_routes(*, device: str, networks: Sequence[IPv4Network], source: IPv4Address) -> None:
    """All routes or an :class:`IpError` (then some may exist: the caller undoes them).

    ``src`` pins the source address to the TUN's own, which the transparent
    proxy's redirect needs (a packet from 0.0.0.0 is dropped after NAT).
    """
    if networks:
        batch = render_route_batch("add", device=device, networks=networks, source=source)
        run_ip("-batch", "-", input=batch)


def delete_routes(*, device: str, ifindex: int, networks: Sequence[IPv4Network]) -> bool:
    """Deletes the routes that exist; missing ones are fine (idempotent).
    True if there was anything to delete.

    Nothing to do when the link ``ifindex`` is gone: its routes went with it,
    and a link that took over the name is someone else's.  ``-force``
    carries on past a missing route; success is then judged by reading the
    routes back, not by parsing error text.
    """
    link = get_link(device)
    if not networks or link is None or link.ifindex != ifindex:
        return False
    if not set(routes_on(device)) & set(networks):
        return False
    batch = render_route_batch("del", device=device, networks=networks, source=IPv4Address(0))
    with contextlib.suppress(IpError):
        run_ip("-force", "-batch", "-", input=batch)
    left = set(routes_on(device)) & set(networks)
    if left:
        nets = ", ".join(str(n) for n in sorted(left))
        raise IpError(f"could not delete routes to {nets} on {device}")
    return True


@dataclass(frozen=True)
class Link:
    name: str
    ifindex: int
    kind: str


def get_link(name: str) -> Link | None:
    """The link called ``name`` in this namespace, or None."""
    try:
        links = _json("-d", "link", "show", "dev", name)
    except IpError:
        return None
    for link in links:
        if link.get("ifname") == name:
            kind = str(link.get("linkinfo", {}).get("info_kind", ""))
            return Link(name=name, ifindex=int(link["ifindex"]), kind=kind)
    return None


def configure_tun(*, device: str, address: IPv4Address) -> None:
    """Address /32 and up.  ``addrgenmode none`` first: no IPv6 link-local
    address, so the kernel sends no router solicitations into the TUN."""
    run_ip("link", "set", "dev", device, "addrgenmode", "none")
    run_ip("addr", "add", f"{address}/32", "dev", device)
    run_ip("link", "set", "dev", device, "up")


def delete_link(*, name: str, ifindex: int | None, kind: str = "tun") -> bool:
    """Deletes the link if it is still the one we made; False if it was gone.

    The name alone is not proof: after our TUN vanished another session may
    have created one with the same name.  Interface indexes are not reused
    soon, so a matching index (when known) and kind identify ours.
    """
    link = get_link(name)
    if link is None or link.kind != kind or (ifindex is not None and link.ifindex != ifindex):
        return False
    run_ip("link", "del", "dev", name)
    return True
