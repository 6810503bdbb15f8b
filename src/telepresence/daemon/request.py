"""What `connect` was asked, and the facts it starts from; no session state here.

:class:`ConnectRequest` is the CLI's request as the control socket carried it;
:func:`helper_command` and :func:`api_server_addresses` look up, once per connect,
how to start the network helper and which addresses must stay out of the tunnel.
:class:`ConnectError` is the one-line failure every step of a connect raises.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from telepresence import ipc
from telepresence.netfilter.install import find_helper
from telepresence.paths import HELPER_COMMAND

__all__ = ["ConnectError", "ConnectRequest", "api_server_addresses", "helper_command"]


class ConnectError(Exception):
    """Connecting failed; the message is one line that says what to do."""


@dataclass(frozen=True, kw_only=True)
class ConnectRequest:
    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    manager_image: str | None = None
    manager_base_image: str | None = None
    manager_namespace: str | None = None
    # The manager's dial policy lists; None: not configured, an installed manager keeps its.
    manager_dial_allow: tuple[str, ...] | None = None
    manager_dial_deny: tuple[str, ...] | None = None
    # None: every namespace the user may list, followed live.
    mapped_namespaces: tuple[str, ...] | None = None
    also_proxy: tuple[str, ...] = ()
    never_proxy: tuple[str, ...] = ()
    allow_conflicting_subnets: tuple[str, ...] = ()
    #: The direct transport: "auto" (used when the manager can be reached) or "off".
    direct: str = "auto"
    #: Where the direct listener is, instead of the NodePort found (host:port).
    direct_address: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, req: Mapping[str, Any]) -> ConnectRequest:
        """The connect request as the control socket carried it; every field checked.
        Raises ipc.MalformedMessage, naming the first field of the wrong type."""
        return cls(
            kubeconfig=ipc.optional_text(req, "kubeconfig"),
            context=ipc.optional_text(req, "context"),
            namespace=ipc.optional_text(req, "namespace"),
            manager_image=ipc.optional_text(req, "manager_image"),
            manager_base_image=ipc.optional_text(req, "manager_base_image"),
            manager_namespace=ipc.optional_text(req, "manager_namespace"),
            manager_dial_allow=ipc.text_list(req, "manager_dial_allow"),
            manager_dial_deny=ipc.text_list(req, "manager_dial_deny"),
            mapped_namespaces=ipc.text_list(req, "mapped_namespaces"),
            also_proxy=ipc.text_list(req, "also_proxy") or (),
            never_proxy=ipc.text_list(req, "never_proxy") or (),
            allow_conflicting_subnets=ipc.text_list(req, "allow_conflicting_subnets") or (),
            direct=ipc.optional_text(req, "direct") or "auto",
            direct_address=ipc.optional_text(req, "direct_address"),
            env=ipc.text_map(req, "env"),
        )


def helper_command() -> list[str]:
    helper = find_helper()
    if helper is None:
        raise ConnectError(
            f"the network helper `{HELPER_COMMAND}` is not on PATH; reinstall telepresence"
        )
    return [helper] if os.geteuid() == 0 else ["sudo", "-n", helper]


def api_server_addresses(server: str) -> list[str]:
    """The API server's own addresses: never routed into the tunnel that runs over it."""
    host = server.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})
