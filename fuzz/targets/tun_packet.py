"""Packets read from the TUN device (daemon/packets.py): any local process can send one,
by sending UDP to a routed address (in "resolved" DNS mode, systemd-resolved sends its
queries this way too).

The contract:

- ``parse`` returns a datagram or None and never raises;
- a datagram is what the packet carries: its payload lies inside the packet, and
  ``build`` makes a packet that parses back to the same datagram;
- what ``dispatch`` decides depends on the destination only as documented: our DNS
  address's DNS port is answered locally, the rest of that address dropped, everything
  else tunnelled.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from telepresence.daemon import packets
from telepresence.daemon.udp import Dispatch, LocalDns, dispatch

__all__ = ["TestOneInput", "seeds"]


async def _no_answer(wire: bytes) -> bytes | None:
    return None


LOCAL_DNS = LocalDns(address=IPv4Address("198.18.255.253"), answer=_no_answer)


def TestOneInput(data: bytes) -> None:
    datagram = packets.parse(data)
    if datagram is None:
        return
    assert datagram.payload in data
    assert packets.parse(packets.build(datagram)) == datagram
    verdict = dispatch(datagram, LOCAL_DNS)
    if datagram.dst != LOCAL_DNS.address:
        assert verdict is Dispatch.TUNNEL
    elif datagram.dport == LOCAL_DNS.port:
        assert verdict is Dispatch.LOCAL_DNS
    else:
        assert verdict is Dispatch.DROP
    assert dispatch(datagram, None) is Dispatch.TUNNEL


def seeds() -> dict[str, bytes]:
    laptop = IPv4Address("198.51.100.2")
    query = b"\x12\x34\x01\x00\x00\x01" + bytes(6) + b"\x03web\x02ns\x00\x00\x01\x00\x01"
    valid = {
        "dns-query-to-link": packets.Datagram(laptop, 40000, LOCAL_DNS.address, 53, query),
        "udp-to-cluster": packets.Datagram(laptop, 40001, IPv4Address("10.96.0.10"), 53, query),
        "udp-other-port-on-link": packets.Datagram(laptop, 40002, LOCAL_DNS.address, 80, b"x"),
        "empty-payload": packets.Datagram(laptop, 1, IPv4Address("10.244.0.7"), 9, b""),
    }
    out = {name: packets.build(d, ident=7) for name, d in valid.items()}
    udp = out["udp-to-cluster"]
    out.update(
        {
            "bad-ipv6": b"\x60" + bytes(47),
            "bad-tcp": udp[:9] + b"\x06" + udp[10:],
            "bad-fragment": udp[:6] + b"\x20\x00" + udp[8:],
            "bad-short-total-length": udp[:2] + b"\x00\x14" + udp[4:],
            "bad-long-udp-length": udp[:24] + b"\xff\xff" + udp[26:],
            "options-header": b"\x46"
            + udp[1:2]
            + (len(udp) + 4).to_bytes(2, "big")
            + udp[4:20]
            + bytes(4)
            + udp[20:],
            "bad-truncated": udp[:25],
        }
    )
    return out
