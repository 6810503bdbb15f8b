"""How the CLI prints: status in the product's familiar layout, and connect's progress."""

from __future__ import annotations

import time
from typing import Any, TextIO

SPINNER = "|/-\\"
SPIN_AFTER = 1.0


class Progress:
    """Prints each step; a step that takes over a second gets a spinner (on a terminal)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.current = ""
        self.started = 0.0
        self.frame = 0
        self.spinning = False

    def step(self, text: str) -> None:
        self.done()
        self.current = text
        self.started = time.monotonic()
        self.out.write(text + (" " if self.tty else "\n"))
        self.out.flush()

    def tick(self) -> None:
        if not self.tty or not self.current:
            return
        if time.monotonic() - self.started < SPIN_AFTER:
            return
        self.spinning = True
        self.out.write("\b" + SPINNER[self.frame % len(SPINNER)] if self.frame else SPINNER[0])
        self.frame += 1
        self.out.flush()

    def done(self) -> None:
        if self.tty and self.current:
            if self.spinning:
                self.out.write("\b")
            self.out.write("\n")
            self.out.flush()
        self.current = ""
        self.spinning = False
        self.frame = 0


def _rows(rows: list[tuple[str, Any]], indent: str = "  ") -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"{indent}{k:<{width}}: {v}" for k, v in rows]


#: Domains shown on one status line; `status -o json` lists them all (up to 256).
SHOWN_DOMAINS = 8


def _domains(domains: list[str]) -> str:
    if not domains:
        return "none"
    shown = ", ".join(domains[:SHOWN_DOMAINS])
    more = len(domains) - SHOWN_DOMAINS
    return f"{shown} and {more} more (`status -o json` lists them)" if more > 0 else shown


def _dns_rows(dns: dict[str, Any]) -> list[tuple[str, Any]]:
    """How the laptop's DNS reaches us: the nameservers redirected ("redirect", and
    daemons from before the mode existed), or systemd-resolved's link ("resolved")."""
    if dns.get("mode") != "resolved":
        return [
            ("Hooked in by", dns.get("hook", "")),
            ("Local server", dns.get("local_address", "")),
            ("Nameservers", ", ".join(dns.get("nameservers", [])) or "none"),
            ("Cluster names", dns.get("cluster_names", "")),
        ]
    rows: list[tuple[str, Any]] = [
        ("Hooked in by", dns.get("hook", "")),
        ("DNS address", dns.get("dns_address", "")),
        ("Routing domains", _domains(dns.get("routing_domains", []))),
        ("Search domains", _domains(dns.get("search_domains", []))),
        ("Upstreams", ", ".join(dns.get("upstreams", [])) or "none"),
        ("Cluster names", dns.get("cluster_names", "")),
    ]
    if left_out := dns.get("domains_left_out", []):
        rows.append(("Left out", f"{len(left_out)} namespaces (resolved's limit per link)"))
    if error := dns.get("link_error", ""):
        rows.append(("Domains not updated", error))
    return rows


def status_text(status: dict[str, Any]) -> str:
    root = status["root_daemon"]
    user = status["user_daemon"]
    lines: list[str] = []
    if not root.get("running"):
        lines.append("Root Daemon: Not running")
    else:
        lines.append("Root Daemon: Running")
        dns = root.get("dns", {})
        lines += _rows(
            [
                ("Version", root.get("version", "")),
                ("DNS", ""),
            ]
        )
        lines += _rows(_dns_rows(dns), indent="    ")
        subnets = root.get("subnets", [])
        lines += _rows([("Routed subnets", f"({len(subnets)} subnets)")])
        lines += [f"    - {s}" for s in subnets]
    if not user.get("running"):
        lines.append("User Daemon: Not running")
        return "\n".join(lines)
    lines.append("User Daemon: Running")
    proxy = (
        "ON (networking to the cluster is enabled)" if user.get("status") == "Connected" else "OFF"
    )
    state = user.get("status", "")
    if state == "Reconnecting" and user.get("reconnect_reason"):
        state = f"Reconnecting ({user['reconnect_reason']})"
    lines += _rows(
        [
            ("Version", user.get("version", "")),
            ("Status", state),
            ("Kubernetes server", user.get("kubernetes_server", "")),
            ("Kubernetes context", user.get("kubernetes_context", "")),
            ("Traffic Manager", user.get("manager") or user.get("manager_version", "")),
            ("Telepresence proxy", proxy),
            ("Mapped namespaces", ", ".join(user.get("mapped_namespaces", [])) or "all"),
            ("Intercepts", f"{user.get('intercepts', 0)} total"),
        ]
    )
    return "\n".join(lines)
