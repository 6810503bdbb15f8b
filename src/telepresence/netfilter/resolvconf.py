"""The laptop's resolver configuration, read the way glibc reads it.

The one resolv.conf parser of the laptop side: the root helper uses it to
decide which nameservers to redirect (it never takes them from its caller,
or a caller could hijack any address's port 53), and the user daemon uses it
for the upstream it forwards to and the laptop's own search domains, so both
always agree on what "the laptop's nameserver" is.  Also the ``hosts:`` line
of nsswitch.conf, which says whether glibc asks DNS or systemd-resolved at all.
Pure, apart from :func:`read_resolv_conf` and :func:`read_hosts_sources`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_TIMEOUT",
    "MAXNS",
    "NSSWITCH_CONF",
    "RESOLV_CONF",
    "ResolvConf",
    "hosts_sources",
    "read_hosts_sources",
    "read_resolv_conf",
]

RESOLV_CONF = Path("/etc/resolv.conf")
NSSWITCH_CONF = Path("/etc/nsswitch.conf")
#: glibc's MAXNS: nameserver lines after the third are ignored by the resolver,
#: so redirecting them would hijack an address nobody on the laptop queries.
MAXNS = 3
#: A resolv.conf is a few hundred bytes; reading more is a sign of a wrong file.
_MAX_SIZE = 64 * 1024
_COMMENT = re.compile(r"[#;]")
#: glibc's RES_TIMEOUT and RES_DFLRETRY: seconds a client waits for one nameserver,
#: and how many rounds over the list it makes, when ``options`` says nothing.
DEFAULT_TIMEOUT = 5
DEFAULT_ATTEMPTS = 2
#: glibc's caps on ``timeout:`` (RES_MAXRETRANS) and ``attempts:`` (RES_MAXRETRY).
_MAX_TIMEOUT = 30
_MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class ResolvConf:
    """``nameservers``: the IPv4 addresses among the first :data:`MAXNS` nameserver
    lines, in order (the ones telepresence redirects and forwards to; the helper
    handles IPv4 only); ``search``: the last ``search``/``domain`` line's domains;
    ``timeout`` and ``attempts``: ``options timeout:N attempts:N`` as glibc clamps
    them, which bound how long a client waits for the daemon's answer."""

    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    timeout: int = DEFAULT_TIMEOUT
    attempts: int = DEFAULT_ATTEMPTS

    @classmethod
    def parse(cls, text: str) -> ResolvConf:
        """resolv.conf(5): ``#`` or ``;`` starts a comment, at the start of a line or
        after a value; the last ``search`` or ``domain`` line wins; a nameserver that
        is not an IP address still takes one of the :data:`MAXNS` places, as in glibc."""
        nameservers: list[str] = []
        seen = 0
        search: list[str] = []
        timeout, attempts = DEFAULT_TIMEOUT, DEFAULT_ATTEMPTS
        for raw in text.splitlines():
            words = _COMMENT.split(raw, maxsplit=1)[0].split()
            if not words:
                continue
            keyword, args = words[0], words[1:]
            if keyword == "nameserver" and args:
                seen += 1
                if seen > MAXNS:
                    continue
                try:
                    address = ipaddress.ip_address(args[0])
                except ValueError:
                    continue
                if isinstance(address, IPv4Address) and str(address) not in nameservers:
                    nameservers.append(str(address))
            elif keyword in ("search", "domain"):
                search = [a.rstrip(".") for a in args if a.rstrip(".")]
            elif keyword == "options":
                timeout = _option(args, "timeout:", timeout, low=1, high=_MAX_TIMEOUT)
                attempts = _option(args, "attempts:", attempts, low=1, high=_MAX_ATTEMPTS)
        return cls(tuple(nameservers), tuple(search), timeout=timeout, attempts=attempts)

    def ipv4_nameservers(self) -> list[IPv4Address]:
        return [IPv4Address(n) for n in self.nameservers]


def _option(args: list[str], prefix: str, current: int, *, low: int, high: int) -> int:
    """The last ``prefix``N among ``args``, clamped as glibc does; junk is ignored."""
    for arg in args:
        if arg.startswith(prefix):
            try:
                current = max(low, min(high, int(arg[len(prefix) :])))
            except ValueError:
                continue
    return current


def _read(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_SIZE)
    except OSError:
        return None
    return data.decode("utf-8", errors="replace")


def read_resolv_conf(path: Path = RESOLV_CONF) -> ResolvConf:
    """The parsed file; a missing or unreadable file is an empty configuration
    (no nameserver to redirect), not an error."""
    text = _read(path)
    return ResolvConf() if text is None else ResolvConf.parse(text)


def hosts_sources(text: str) -> list[str]:
    """The words after ``hosts:`` in nsswitch.conf(5) text: sources (``files``,
    ``resolve``, ``dns``, ``mdns4_minimal``) and actions (``[NOTFOUND=return]``), in
    order; empty without such a line."""
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("hosts:"):
            return line.split(":", 1)[1].split()
    return []


def read_hosts_sources(path: Path = NSSWITCH_CONF) -> list[str]:
    """:func:`hosts_sources` of the file; a missing or unreadable file has none (glibc
    then uses its built-in default, which does not name ``resolve``)."""
    text = _read(path)
    return [] if text is None else hosts_sources(text)
