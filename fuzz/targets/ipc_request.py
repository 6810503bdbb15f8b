"""The daemon's control socket: the request line a local client writes (daemon/control.py).

The input is what arrives on the socket; the daemon reads one line (``readline``) and
parses it.  The contract:

- ``parse_request`` raises ``ipc.MalformedMessage`` (one line) and nothing else;
- what it returns is a command whose every field has the type the daemon relies on.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from telepresence import ipc
from telepresence.daemon import control
from telepresence.daemon.request import ConnectRequest

__all__ = ["TestOneInput", "seeds"]


def _check_connect(request: ConnectRequest) -> None:
    for f in fields(request):
        value = getattr(request, f.name)
        if f.name == "env":
            assert isinstance(value, dict)
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        elif isinstance(value, tuple):
            assert all(isinstance(item, str) for item in value), (f.name, value)
        else:
            assert value is None or isinstance(value, str), (f.name, value)


def TestOneInput(data: bytes) -> None:
    line = data.split(b"\n", 1)[0] + b"\n"
    try:
        command = control.parse_request(line)
    except ipc.MalformedMessage as exc:
        assert "\n" not in str(exc), str(exc)
        return
    if isinstance(command, control.Connect):
        _check_connect(command.request)
    elif isinstance(command, control.Intercept):
        assert isinstance(command.name, str) and isinstance(command.namespace, str)
    elif isinstance(command, control.Leave):
        assert isinstance(command.name, str)
    else:
        assert isinstance(
            command, control.Status | control.HelperListen | control.ListIntercepts | control.Quit
        ), command


def seeds() -> dict[str, bytes]:
    connect = {
        "cmd": "connect",
        "kubeconfig": None,
        "context": "devcluster",
        "namespace": None,
        "manager_image": None,
        "manager_base_image": "docker.io/library/python:3.11-slim",
        "manager_namespace": "ambassador",
        "manager_dial_allow": None,
        "manager_dial_deny": ["169.254.0.0/16"],
        "mapped_namespaces": ["default", "ns"],
        "also_proxy": ["10.0.0.0/8"],
        "never_proxy": [],
        "allow_conflicting_subnets": [],
        "env": {"HOME": "/home/dev", "KUBECONFIG": "/home/dev/.kube/config"},
    }
    requests: dict[str, dict[str, Any]] = {
        "status": {"cmd": "status"},
        "helper-listen": {"cmd": "helper-listen"},
        "connect": connect,
        "intercept": {"cmd": "intercept", "name": "web", "namespace": "ns"},
        "leave": {"cmd": "leave", "name": "web"},
        "list": {"cmd": "list"},
        "quit": {"cmd": "quit"},
    }
    out = {name: ipc.encode(message) for name, message in requests.items()}
    out.update(
        {
            "bad-not-json": b"status\n",
            "bad-not-object": b'["cmd", "status"]\n',
            "bad-unknown-command": ipc.encode({"cmd": "reboot"}),
            "bad-command-not-string": ipc.encode({"cmd": {"x": 1}}),
            "bad-intercept-without-namespace": ipc.encode({"cmd": "intercept", "name": "web"}),
            "bad-connect-string-for-list": ipc.encode({**connect, "also_proxy": "10.0.0.0/8"}),
            "bad-connect-env-list": ipc.encode({**connect, "env": [["A", "1"]]}),
            "bad-deep": b"[" * 3000 + b"\n",
            "bad-invalid-utf8": b'{"cmd": "st\xffatus"}\n',
        }
    )
    return out
