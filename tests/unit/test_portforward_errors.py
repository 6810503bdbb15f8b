"""A refused port-forward upgrade becomes one line: for a 403, the permission that decides
who may use the manager, and how to get it."""

from __future__ import annotations

from telepresence.k8s.api import Forbidden
from telepresence.k8s.portforward import PortForwardError, handshake_error


def test_a_403_names_pods_portforward_in_the_namespace_and_the_fix() -> None:
    error = handshake_error(
        403, "Invalid response status", namespace="ambassador", pod="tm-1", port=8081
    )
    assert isinstance(error, Forbidden)
    assert str(error) == (
        "your user may not create pods/portforward in namespace ambassador: ask a cluster "
        "admin to bind you a Role in namespace ambassador that allows create on "
        "pods/portforward and get, list on pods (see 'Who can use the manager' in "
        "docs/architecture.md)"
    )
    assert "\n" not in str(error)


def test_other_statuses_keep_the_status_and_the_target() -> None:
    error = handshake_error(502, "Bad Gateway", namespace="tp", pod="tm-1", port=8081)
    assert isinstance(error, PortForwardError)
    assert str(error) == "port-forward to tp/tm-1:8081 refused: HTTP 502 Bad Gateway"
