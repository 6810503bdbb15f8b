"""The root helper's process imports only what it needs: no Kubernetes, no aiohttp,
no DNS server, nothing of the daemon.  Checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, sys
import telepresence.netfilter.helper
print(json.dumps(sorted(sys.modules)))
"""


def test_the_helper_entry_module_imports_nothing_it_does_not_need() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True
    ).stdout
    modules = json.loads(out)
    bad = [m for m in modules if m.split(".")[0] in ("aiohttp", "dns", "kr8s", "yaml")]
    bad += [m for m in modules if m.startswith(("telepresence.k8s", "telepresence.daemon"))]
    bad += [m for m in modules if m.startswith(("telepresence.manager", "telepresence.cli"))]
    assert bad == []
    assert not any(m.startswith("asyncio") for m in modules)
    ours = sorted(m for m in modules if m.startswith("telepresence"))
    assert set(ours) <= {
        "telepresence",
        "telepresence.netfilter",
        *(
            f"telepresence.netfilter.{m}"
            for m in (
                "conntrack", "dnspolicy", "dnsstate", "fdpass", "helper", "journal", "nftables",
                "policy", "protocol", "resolvconf", "resolved", "routes", "routestate",
                "state", "subnets", "tun",
            )
        ),
    }, ours  # fmt: skip
