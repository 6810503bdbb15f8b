"""Container images devcluster knows how to run, each an exact, versioned reference.

A pod whose image is not listed stays waiting, as a pod with an unpullable image would.
"""

from __future__ import annotations

from telepresence import __version__ as _telepresence_version

MANAGER_IMAGE = f"ghcr.io/telepresence-py/traffic-manager:{_telepresence_version}"
HTTP_IMAGE = "devcluster.local/http-server:1.0"
TCP_ECHO_IMAGE = "devcluster.local/tcp-echo:1.0"
UDP_ECHO_IMAGE = "devcluster.local/udp-echo:1.0"
SAMPLE_APP_IMAGE = "devcluster.local/edgycorp-webapp:1.0"

# Image reference -> Python module arguments; the container's args are appended.
IMAGES: dict[str, list[str]] = {
    MANAGER_IMAGE: ["-m", "telepresence.manager"],
    HTTP_IMAGE: ["-m", "devcluster.images.http"],
    TCP_ECHO_IMAGE: ["-m", "devcluster.images.echo", "--protocol", "tcp"],
    UDP_ECHO_IMAGE: ["-m", "devcluster.images.echo", "--protocol", "udp"],
    SAMPLE_APP_IMAGE: ["-m", "devcluster.images.http", "--title", "Welcome to the EdgyCorp WebApp"],
}


def command_for(image: str, args: list[str]) -> list[str] | None:
    """Python arguments for an image, or None when the image cannot be 'pulled'."""
    base = IMAGES.get(image)
    return None if base is None else [*base, *args]
