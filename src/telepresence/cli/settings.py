"""The user's config file and the parsing of list flags, with errors a user can act on.

~/.config/telepresence/config.yml (all keys optional):

    manager:
      # The Python image the manager's code runs on (its code comes in ConfigMaps);
      # a mirror of the default docker.io/library/python:3.11-slim for air-gapped clusters.
      baseImage: registry.example.com/mirror/python:3.11-slim
      # Or an image of our own with the code in it (deploy/ builds it); wins over baseImage.
      image: ghcr.io/telepresence-py/traffic-manager:0.1.0
      namespace: ambassador
      # The manager's dial policy (docs/architecture.md): open default-refused ranges,
      # refuse more. Unset: an installed manager's policy is left as it is.
      dialAllow: [169.254.169.254/32]
      dialDeny: [10.0.5.0/24]
    transport:
      # The direct transport (mutual TLS to the manager's NodePort, past the API server):
      # auto (used whenever the laptop can reach it) or off (always port-forward).
      direct: auto
      # Where the manager's direct listener is, when no NodePort is reachable as such
      # (a load balancer, a tunnel of your own); host:port.
      directAddress: 203.0.113.7:30443
    routing:
      alsoProxy: [10.0.0.0/8]
      neverProxy: [10.0.5.0/24]
      allowConflictingSubnets: [10.96.0.0/16]
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from telepresence import paths
from telepresence.directtls import parse_address


class SettingsError(Exception):
    """Bad configuration or flag; the message names the item and the fix."""


@dataclass(frozen=True)
class Config:
    manager_image: str | None = None
    manager_base_image: str | None = None
    manager_namespace: str | None = None
    also_proxy: list[str] = field(default_factory=list)
    never_proxy: list[str] = field(default_factory=list)
    allow_conflicting_subnets: list[str] = field(default_factory=list)
    # None: not configured (see `ensure_manager`), unlike an empty list.
    manager_dial_allow: list[str] | None = None
    manager_dial_deny: list[str] | None = None
    direct: str = "auto"
    direct_address: str | None = None


def cidrs(text: str, flag: str) -> list[str]:
    """`10.0.0.0/8,192.168.1.5` → networks as strings; a bare address is a /32."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=True)))
        except ValueError as e:
            raise SettingsError(
                f"{flag}: {item!r} is not a subnet ({e}); use CIDR notation like 10.0.0.0/8"
            ) from None
    return out


def parse_mapped_namespaces(text: str | None) -> list[str] | None:
    """None means every namespace (also for `all`)."""
    if text is None or text.strip() in ("", "all"):
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if not name.replace("-", "").isalnum() or name != name.lower() or len(name) > 63:
            raise SettingsError(
                f"--mapped-namespaces: {name!r} is not a namespace name (lower-case letters, "
                "digits and '-')"
            )
    return names


def _cidr_key(section: dict[str, Any], key: str, where: str) -> list[str] | None:
    """An optional list of CIDRs; None when the key is absent."""
    if key not in section:
        return None
    value = section[key]
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise SettingsError(f"{where} {key}: expected a list of CIDRs like [10.0.0.0/8]")
    return cidrs(",".join(str(v) for v in value), f"{where} {key}")


def load() -> Config:
    path = paths.config_file()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Config()
    import yaml

    try:
        doc: dict[str, Any] = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise SettingsError(f"{path} is not valid YAML: {e}; fix or remove it") from None
    manager = doc.get("manager") or {}
    routing = doc.get("routing") or {}
    transport = doc.get("transport") or {}
    where = str(path)
    direct, direct_address = _transport(transport, where)
    return Config(
        manager_image=manager.get("image"),
        manager_base_image=manager.get("baseImage"),
        manager_namespace=manager.get("namespace"),
        manager_dial_allow=_cidr_key(manager, "dialAllow", where),
        manager_dial_deny=_cidr_key(manager, "dialDeny", where),
        also_proxy=cidrs(",".join(routing.get("alsoProxy") or []), f"{where} alsoProxy"),
        never_proxy=cidrs(",".join(routing.get("neverProxy") or []), f"{where} neverProxy"),
        allow_conflicting_subnets=cidrs(
            ",".join(routing.get("allowConflictingSubnets") or []),
            f"{where} allowConflictingSubnets",
        ),
        direct=direct,
        direct_address=direct_address,
    )


def _transport(section: Any, where: str) -> tuple[str, str | None]:
    """``transport.direct`` (auto or off) and ``transport.directAddress`` (host:port)."""
    if not isinstance(section, dict):
        raise SettingsError(f"{where} transport: expected keys direct and directAddress")
    direct = section.get("direct", "auto")
    if direct is False:  # YAML reads a bare `off` as false
        direct = "off"
    if direct not in ("auto", "off"):
        raise SettingsError(f"{where} transport.direct: {direct!r} is not auto or off")
    address = section.get("directAddress")
    if address is not None:
        address = str(address)
        try:
            parse_address(address)
        except ValueError as e:
            raise SettingsError(f"{where} transport.directAddress: {e}") from None
    return direct, address
