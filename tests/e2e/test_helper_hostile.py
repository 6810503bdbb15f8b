"""Hostile requests, sent by the unprivileged laptop user straight to the root helper's
socket, are refused with an Error and change nothing on the laptop.

The laptop user (not the real daemon) listens on a socket, starts the helper at it
through the same sudoers rule the product uses, and writes raw frames: a
0.0.0.0/0 route, the VPN-style 0.0.0.0/1 + 128.0.0.0/1 pair, a subnet over the API
server's address, a foreign nameserver, an arbitrary socket mark, the old
allow-everything switch, a huge message, garbage, wrong types, a response type as a
request.  Each case gets a fresh helper.  The laptop namespace's nft ruleset,
links, addresses, routes, rules and resolv.conf must be byte-for-byte as before.
"""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.e2e.cluster import Cluster
from tests.e2e.test_netfilter_helper import (  # fixtures, and the same helper and snapshot
    HELPER,
    Laptop,
    laptop,
    script,
    snapshot,
    synced,
)

__all__ = ["laptop", "script", "synced"]  # fixtures used through pytest's lookup

API_SERVER = "192.0.2.1"  # devcluster's node_ip, where the API server listens

# Runs as the laptop user in the laptop namespace: one fresh helper per case.
HOSTILE = r"""
import json, os, socket, struct, subprocess, sys, tempfile

import msgspec

HELPER = sys.argv[1]
CASES = json.loads(sys.stdin.read())


def recv_exact(conn, size):
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_message(conn):
    header = recv_exact(conn, 5)
    if header is None:
        return None
    length, _fds = struct.unpack("!IB", header)
    body = recv_exact(conn, length)
    return None if body is None else msgspec.msgpack.decode(body)


def send(conn, data):
    try:
        conn.sendall(data)
        return "sent"
    except (BrokenPipeError, ConnectionResetError) as e:
        return f"peer closed while sending: {e.strerror}"


STATUS = msgspec.msgpack.encode({"type": "Status"})
STATUS = struct.pack("!IB", len(STATUS), 0) + STATUS

for case in CASES:
    folder = tempfile.mkdtemp(prefix="tp-hostile-")
    path = os.path.join(folder, "helper.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(30)
    proc = subprocess.Popen(["sudo", "-n", HELPER, "--connect", path],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    result = {"name": case["name"]}
    try:
        conn, _ = listener.accept()
        conn.settimeout(30)
        result["hello"] = read_message(conn)
        result["send"] = send(conn, bytes.fromhex(case["payload"]))
        result["reply"] = read_message(conn)
        if case.get("then_status"):
            send(conn, STATUS)
            result["status"] = read_message(conn)
        conn.close()
    except OSError as e:
        result["error"] = str(e)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    result["exit"] = proc.returncode
    result["stderr"] = proc.stderr.read()
    listener.close()
    os.unlink(path)
    os.rmdir(folder)
    print(json.dumps(result), flush=True)
"""


def frame(body: Any) -> bytes:
    data = body if isinstance(body, bytes) else msgspec.msgpack.encode(body)
    return struct.pack("!IB", len(data), 0) + data


def setup(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "Setup",
        "subnets": ["10.96.0.0/16"],
        "api_server_ips": [API_SERVER],
        "dns_redirect_port": 40053,
        "proxy_port": 40080,
    }
    body.update(changes)
    return body


# (name, raw bytes, what the Error must say, whether the connection stays usable)
CASES: list[tuple[str, bytes, str, bool]] = [
    ("default route", frame(setup(subnets=["0.0.0.0/0"])), "default route", True),
    ("vpn pair", frame(setup(subnets=["0.0.0.0/1", "128.0.0.0/1"])), "wider than /8", True),
    ("api server", frame(setup(subnets=["192.0.2.0/24"])), "API server's address", True),
    ("loopback", frame(setup(subnets=["127.0.0.0/8"])), "loopback", True),
    ("link-local", frame(setup(subnets=["169.254.0.0/16"])), "link-local", True),
    ("multicast", frame(setup(subnets=["224.0.0.0/8"])), "multicast", True),
    (
        "foreign nameserver",
        frame(setup(dns_nameservers=["198.51.100.2"])),
        "unknown field `dns_nameservers`",
        True,
    ),
    ("arbitrary mark", frame(setup(mark=0xCA6C)), "unknown field `mark`", True),
    (
        "mark on a socket",
        frame({"type": "UpstreamSocket", "kind": "udp", "mark": 0xCA6C}),
        "unknown field `mark`",
        True,
    ),
    (
        "raw socket",
        frame({"type": "UpstreamSocket", "kind": "raw"}),
        "Invalid enum value 'raw'",
        True,
    ),
    ("allow everything", frame(setup(allow_conflicting=True)), "unknown field", True),
    ("own tun name", frame(setup(tun_name="eth0")), "unknown field `tun_name`", True),
    ("own table", frame(setup(nft_table="filter")), "unknown field `nft_table`", True),
    ("wrong types", frame(setup(subnets="10.0.0.0/8")), "Expected `array`", True),
    ("response as request", frame({"type": "Hello", "version": 2, "pid": 1}), "Invalid", True),
    ("garbage body", frame(b"\xc1\xc1\xc1\xc1\xc1\xc1\xc1\xc1"), "malformed message", True),
    ("garbage stream", b"\xde\xad\xbe\xef" * 16, "bytes refused", False),
    (
        "huge message",
        frame(setup(subnets=["10.96.0.0/16"] * 100_000)),
        "bytes refused: the limit is 65536",
        False,
    ),
]


def laptop_state(cluster: Cluster) -> dict[str, Any]:
    snap = snapshot(cluster)
    resolv = cluster.laptop("cat", "/etc/resolv.conf").stdout
    return {
        "nft": snap.nft,
        "links": snap.links,
        "addrs": snap.addrs,
        "routes": snap.routes,
        "rules": snap.rules,
        "resolv.conf": resolv,
    }


@pytest.fixture
def hostile_script(laptop: Laptop) -> Iterator[Path]:
    path = laptop.script.parent / "hostile.py"
    path.write_text(HOSTILE)
    path.chmod(0o644)
    yield path
    path.unlink(missing_ok=True)


def test_hostile_requests_are_refused_and_change_nothing(
    laptop: Laptop, hostile_script: Path
) -> None:
    cluster = laptop.cluster
    before = laptop_state(cluster)
    cases = [
        {"name": name, "payload": payload.hex(), "then_status": usable}
        for name, payload, _, usable in CASES
    ]
    argv = cluster.harness_argv(str(hostile_script), HELPER)
    proc = subprocess.run(
        argv, input=json.dumps(cases), capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr
    results = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert sorted(results) == sorted(name for name, *_ in CASES)

    for name, _, expected, usable in CASES:
        result = results[name]
        assert "error" not in result, result
        assert result["hello"]["type"] == "Hello", result
        reply = result["reply"]
        assert reply is not None and reply["type"] == "Error", result
        assert expected in reply["message"] and "\n" not in reply["message"], (name, reply)
        if usable:  # a well-framed bad message leaves the connection working
            assert result["status"]["type"] == "StatusReply", result
            assert result["status"]["configured"] is False, result
        assert result["exit"] == 0, result  # nothing to undo, and nothing failed to undo

    assert laptop_state(cluster) == before
