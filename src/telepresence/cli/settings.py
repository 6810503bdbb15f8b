"""The user's config file and the parsing of list flags, with errors a user can act on.

~/.config/telepresence/config.yml (all keys optional):

    manager:
      image: ghcr.io/telepresence-py/traffic-manager:0.1.0
      namespace: ambassador
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


class SettingsError(Exception):
    """Bad configuration or flag; the message names the item and the fix."""


@dataclass(frozen=True)
class Config:
    manager_image: str | None = None
    manager_namespace: str | None = None
    also_proxy: list[str] = field(default_factory=list)
    never_proxy: list[str] = field(default_factory=list)
    allow_conflicting_subnets: list[str] = field(default_factory=list)


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
    where = str(path)
    return Config(
        manager_image=manager.get("image"),
        manager_namespace=manager.get("namespace"),
        also_proxy=cidrs(",".join(routing.get("alsoProxy") or []), f"{where} alsoProxy"),
        never_proxy=cidrs(",".join(routing.get("neverProxy") or []), f"{where} neverProxy"),
        allow_conflicting_subnets=cidrs(
            ",".join(routing.get("allowConflictingSubnets") or []),
            f"{where} allowConflictingSubnets",
        ),
    )
