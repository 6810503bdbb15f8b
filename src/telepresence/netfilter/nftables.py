"""The helper's nftables table: rendering its rules, and libnftables through ctypes.

The table is created with ``flags owner`` from a libnftables context that
the helper keeps open for its whole life.  The kernel ties an owned table to
the netlink socket that created it and deletes it when that socket closes,
so the DNS and proxy redirects vanish with the helper, even on ``kill -9``;
a short-lived ``nft`` process would take the table with it on exit.  Only
the owner may change an owned table, which is why every later change goes
through the same :class:`Nft` context.

Layout (family ``ip``; the helper handles IPv4 only)::

    set routed     interval set of routed subnets
    set hosts      single addresses routed for external names (a separate set:
                   a /32 inside a routed subnet would overlap an interval)
    set dns_servers the laptop's nameservers; always present (maybe empty), so a
                   resolv.conf change is one set flush + add (render_nameservers)
    chain dns      nat/output -100: mark -> return; udp+tcp :53 to dns_servers
                   -> ct mark, redirect to the daemon's DNS server; in DNS mode "resolved"
                   also tcp :53 to the link's DNS address (resolved's TCP
                   fallback; its UDP goes to the TUN, where the daemon answers)
    chain proxy    nat/output -100: mark -> return; tcp to @routed/@hosts
                   -> ct mark, redirect to the daemon's transparent proxy

    chain dns_zone filter/output -300: mark -> return; to dns_servers :53, and the
                   daemon's DNS server's answers -> conntrack zone DNS_ZONE

Every redirect also ors the helper's mark into the connection's ct mark, so that
teardown forgets those connections' NAT decisions (:mod:`.conntrack`).

Why a zone: conntrack knows a connection by its addresses and ports, and glibc and the
daemon's upstream sockets take their source ports from the same range. A query whose
port a recent exchange of the daemon with the same nameserver used (kept 30-120 s) would
match that exchange's entry, whose decision was "no redirect", and reach the laptop's
nameserver instead of the daemon: a cluster name would fail, for one lookup in five
while the daemon forwarded thousands of queries. Redirected queries live in a zone of
their own, so neither kind of entry can be taken for the other. Only the laptop's own
queries (output hook) are zoned: a container's, forwarded and masqueraded, are not ours.

UDP to routed subnets is not NATed: the route takes it to the TUN, where the
daemon reads it.  The rendering functions are pure and unit-tested; the
only I/O is :class:`Nft`.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

__all__ = [
    "Nft",
    "NftError",
    "TableConfig",
    "render_create",
    "render_delete",
    "render_dns_redirects",
    "render_nameservers",
    "render_set_update",
    "validate_table_name",
]

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
ROUTED_SET = "routed"
HOSTS_SET = "hosts"
DNS_SET = "dns_servers"
#: Before the usual nat priority (100 for srcnat, -100 dstnat); same as dstnat,
#: so the redirect happens before anything a user configured at a later priority.
PRIORITY = -100
#: Before conntrack (-200), where a packet's conntrack zone can still be chosen.
RAW_PRIORITY = -300
#: The conntrack zone of redirected DNS queries: 0x1074, the helper's mark.
DNS_ZONE = 4212


class NftError(Exception):
    """libnftables refused a command; the message is its first error line."""


def validate_table_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid nftables table name {name!r}: use a letter, then up to 31 "
            "letters, digits or underscores"
        )
    return name


@dataclass(frozen=True, kw_only=True)
class TableConfig:
    """What the table redirects where.  ``mark`` exempts the daemon's upstream sockets;
    ``link_dns``: the address systemd-resolved sends the TUN link's names to (DNS mode
    "resolved"), whose TCP port 53 goes to the daemon's DNS server."""

    name: str
    mark: int
    proxy_port: int
    dns_port: int
    dns_servers: Sequence[IPv4Address]
    routed: Sequence[IPv4Network]
    hosts: Sequence[IPv4Address] = ()
    link_dns: IPv4Address | None = None


def _elements(items: Iterable[IPv4Network | IPv4Address]) -> str:
    return ", ".join(str(i) for i in items)


def _set(name: str, items: Sequence[IPv4Network | IPv4Address], *, interval: bool) -> list[str]:
    lines = [f"\tset {name} {{", "\t\ttype ipv4_addr"]
    if interval:
        lines.append("\t\tflags interval")
    if items:
        lines.append(f"\t\telements = {{ {_elements(items)} }}")
    lines.append("\t}")
    return lines


def render_create(config: TableConfig) -> str:
    """One atomic transaction that creates the whole table, or fails if it exists.

    ``create`` (not ``add``) makes a leftover or a second helper's table an
    error instead of a silent merge; the table block repeats ``flags owner``
    because a block without it would ask the kernel to clear the flag.
    """
    name = validate_table_name(config.name)
    mark = f"meta mark 0x{config.mark:08x} return"
    # The connection keeps the mark, so teardown can forget exactly these NAT decisions
    # (conntrack.py); or-ed in, so a ct mark someone else set survives.
    redirect = f"ct mark set ct mark or 0x{config.mark:08x} redirect to"
    lines = [
        f"create table ip {name} {{ flags owner; }}",
        f"table ip {name} {{",
        "\tflags owner",
        *_set(ROUTED_SET, config.routed, interval=True),
        *_set(HOSTS_SET, config.hosts, interval=False),
    ]
    # Even with no nameserver yet: one may appear in resolv.conf later, and then only
    # the set's elements change (an empty set matches nothing).
    lines += _set(DNS_SET, config.dns_servers, interval=False)
    # Every packet of a redirected query, both ways, in its own conntrack zone (as the
    # module docstring says why); before conntrack, so at raw priority.
    dns_port = config.dns_port
    lines += [
        "\tchain dns_zone {",
        f"\t\ttype filter hook output priority {RAW_PRIORITY}; policy accept;",
        f"\t\t{mark}",
        f"\t\tip daddr @{DNS_SET} meta l4proto {{ tcp, udp }} th dport 53 ct zone set {DNS_ZONE}",
        f"\t\tip saddr 127.0.0.1 meta l4proto {{ tcp, udp }} th sport {dns_port} "
        f"ct zone set {DNS_ZONE}",
    ]
    if config.link_dns is not None:
        lines.append(f"\t\tip daddr {config.link_dns} tcp dport 53 ct zone set {DNS_ZONE}")
    lines.append("\t}")
    lines += [
        "\tchain dns {",
        f"\t\ttype nat hook output priority {PRIORITY}; policy accept;",
        f"\t\t{mark}",
        f"\t\tip daddr @{DNS_SET} udp dport 53 {redirect} :{config.dns_port}",
        f"\t\tip daddr @{DNS_SET} tcp dport 53 {redirect} :{config.dns_port}",
    ]
    if config.link_dns is not None:
        lines.append(f"\t\tip daddr {config.link_dns} tcp dport 53 {redirect} :{config.dns_port}")
    lines.append("\t}")
    lines += [
        "\tchain proxy {",
        f"\t\ttype nat hook output priority {PRIORITY}; policy accept;",
        f"\t\t{mark}",
        f"\t\tip daddr @{ROUTED_SET} meta l4proto tcp {redirect} :{config.proxy_port}",
        f"\t\tip daddr @{HOSTS_SET} meta l4proto tcp {redirect} :{config.proxy_port}",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def render_delete(name: str) -> str:
    return f"delete table ip {validate_table_name(name)}\n"


def render_set_update(
    *,
    table: str,
    set_name: str,
    add: Sequence[IPv4Network | IPv4Address],
    remove: Sequence[IPv4Network | IPv4Address],
) -> str:
    """One transaction (so never half applied): removals first, so an interval
    that is being replaced by an overlapping one never collides with it."""
    validate_table_name(table)
    lines = []
    if remove:
        lines.append(f"delete element ip {table} {set_name} {{ {_elements(remove)} }}")
    if add:
        lines.append(f"add element ip {table} {set_name} {{ {_elements(add)} }}")
    return "".join(line + "\n" for line in lines)


def render_nameservers(*, table: str, nameservers: Sequence[IPv4Address]) -> str:
    """Replaces the redirected nameservers in one transaction: the flush and the add
    commit together, so no query sees the set empty or half-changed, and whatever
    was in the set before (however it got there) is gone afterwards."""
    validate_table_name(table)
    lines = [f"flush set ip {table} {DNS_SET}"]
    if nameservers:
        lines.append(f"add element ip {table} {DNS_SET} {{ {_elements(nameservers)} }}")
    return "".join(line + "\n" for line in lines)


def render_dns_redirects(config: TableConfig) -> list[str]:
    """Human-readable redirect targets, for status."""
    lines = [
        f"{server}:53 -> 127.0.0.1:{config.dns_port} (udp+tcp)" for server in config.dns_servers
    ]
    if config.link_dns is not None:
        lines.append(f"{config.link_dns}:53 -> 127.0.0.1:{config.dns_port} (tcp)")
    return lines


class Nft:
    """A libnftables context, kept open so that tables it creates with ``flags owner`` live
    exactly as long as this process (or until :meth:`close`)."""

    def __init__(self, library: str = "libnftables.so.1") -> None:
        try:
            lib = ctypes.CDLL(library)
        except OSError as e:
            raise NftError(f"cannot load {library} ({e}): install libnftables1") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.restype = ctypes.c_int
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.restype = ctypes.c_int
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not ctx:
            raise NftError("nft_ctx_new failed: out of memory?")
        if lib.nft_ctx_buffer_output(ctx) or lib.nft_ctx_buffer_error(ctx):
            lib.nft_ctx_free(ctx)
            raise NftError("libnftables: cannot buffer output")
        self._lib = lib
        self._ctx: int | None = ctx

    def run(self, commands: str) -> str:
        """Run ``commands`` as one transaction; its output, or :class:`NftError`."""
        if self._ctx is None:
            raise NftError("libnftables context already closed")
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
        errors = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            first = next((line for line in errors.splitlines() if line.strip()), "unknown error")
            raise NftError(f"nftables: {first.removeprefix('Error: ')}")
        return output

    def table_exists(self, name: str) -> bool:
        try:
            self.run(f"list table ip {validate_table_name(name)}\n")
        except NftError:
            return False
        return True

    def close(self) -> None:
        """Frees the context; an owned table it created disappears now."""
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
