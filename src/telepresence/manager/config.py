"""What the traffic manager and its manifests (`k8s/manifests.py`) must agree on: ports,
the health path, environment variable names, and the container's resources.

Kept in one small module without I/O so the CLI can build the manifests from it and the
manager image (which has no YAML library) can import it too.
"""

from __future__ import annotations

import math

from telepresence.tunnel.endpoint import RECEIVE_BUDGET, STREAM_INITIAL_WINDOW
from telepresence.tunnel.flows import PAUSE_READING_AT, WRITE_BUFFER_LIMIT

#: The tunnel listens here on the pod's loopback only: a kubelet's port-forward dials
#: ``localhost`` inside the pod, so RBAC on ``pods/portforward`` decides who may use it.
TUNNEL_PORT = 8081
TUNNEL_HOST = "127.0.0.1"
#: The health listener, on the pod network for the kubelet's probes; it answers only
#: ``GET /readyz`` and tells nothing else.
HEALTH_PORT = 8082
#: The direct transport's listener, on the pod network (a NodePort Service maps to it):
#: mutually authenticated TLS with per-session credentials only (`directlisten.py`).
DIRECT_PORT = 8083
DIRECT_HOST = "0.0.0.0"
#: The bench service (`benchservice.py`) for `telepresence bench --port-forward`: on the
#: pod's loopback, like the tunnel, so only a port-forward reaches it.
BENCH_LOCAL_PORT = 8084
#: Names the NodePort Service of the direct transport, for laptops to find.
DIRECT_SERVICE = "traffic-manager-direct"
#: How long a stopping manager (SIGTERM) keeps serving laptops that have not moved to a
#: replacement yet; the pod's terminationGracePeriodSeconds leaves room above it.
DRAIN_SECONDS = 50.0
HEALTH_HOST = "0.0.0.0"
READY_PATH = "/readyz"

#: Comma-separated CIDRs (``manager/dialpolicy.py`` has the rule).
DIAL_ALLOW_ENV = "TELEPRESENCE_DIAL_ALLOW"
DIAL_DENY_ENV = "TELEPRESENCE_DIAL_DENY"

# --- resources (docs/architecture.md, "Manager resources", derives these) ----------------

MIB = 1024 * 1024
#: asyncio's selector transports read at most this much per recv().
ASYNCIO_READ_CHUNK = 256 * 1024
#: The most one stream can pin in the manager beyond its connection's window growth,
#: both directions together: laptop → cluster, its initial window (the laptop may send
#: that before any credit returns), waiting in the dialled socket's write buffer, plus
#: WRITE_BUFFER_LIMIT that may already be there; cluster → laptop, the laptop's initial
#: window spent into the tunnel socket's write buffer (a slow port-forward), plus
#: PAUSE_READING_AT waiting for credit, plus the one read that crossed that mark.
STREAM_WORST_CASE = (
    2 * STREAM_INITIAL_WINDOW + WRITE_BUFFER_LIMIT + PAUSE_READING_AT + ASYNCIO_READ_CHUNK
)
#: The most one laptop link can pin through window growth: this side's receive budget
#: (what the laptop sent that pods have not read) and the laptop's (what we sent that the
#: laptop has not read, in the worst case all still in our tunnel socket's write buffer).
LINK_WORST_CASE = 2 * RECEIVE_BUDGET
#: The process with nothing buffered: ~40 MiB of interpreter and imports (measured), plus
#: discovery's lists of the cluster's nodes or, without node podCIDRs, pods.
BASELINE = 128 * MIB
#: Neither sessions nor their streams are limited, so the total is bounded per link and
#: per stream (docs/architecture.md, "Memory"), and the container's limit is sized for
#: this many links with their budgets exhausted and this many streams stalled at their
#: worst case at once, far more than a team's laptops keep saturated. Beyond it the
#: kernel kills the manager, and every laptop's pool re-joins the restarted pod.
PLANNED_SATURATED_LINKS = 2
PLANNED_STALLED_STREAMS = 64
MEMORY_LIMIT_MIB = 128 * math.ceil(
    (
        BASELINE
        + PLANNED_SATURATED_LINKS * LINK_WORST_CASE
        + PLANNED_STALLED_STREAMS * STREAM_WORST_CASE
    )
    / (128 * MIB)
)
#: Enough to schedule an idle manager; CPU stays unlimited, because CFS throttling of a
#: relay shows up as latency on every laptop's connections.
CPU_REQUEST = "50m"
MEMORY_REQUEST = "64Mi"


def resources() -> dict[str, dict[str, str]]:
    """The container's ``resources``: requests, and a memory limit only."""
    return {
        "requests": {"cpu": CPU_REQUEST, "memory": MEMORY_REQUEST},
        "limits": {"memory": f"{MEMORY_LIMIT_MIB}Mi"},
    }
