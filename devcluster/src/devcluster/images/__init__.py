"""The images devcluster builds and runs, each an exact, versioned reference.

`devcluster.imagebuild` builds them (the recipes live there); the modules beside this file
are the servers the test images run. A reference not listed here is not on the node, so a
pod asking for it gets ErrImagePull, as with any image the cluster cannot pull.
"""

from __future__ import annotations

from telepresence import __version__ as _telepresence_version

MANAGER_IMAGE = f"ghcr.io/telepresence-py/traffic-manager:{_telepresence_version}"
#: The stand-in for the official `python:3.11-slim`, under the very reference the traffic
#: manager runs on by default (telepresence.k8s.manifests.DEFAULT_BASE_IMAGE), so a
#: default `connect` takes the path it takes on any cluster. The contract is the official
#: image's: python3 on PATH, root by default, nothing of ours in it.
PYTHON_BASE_IMAGE = "docker.io/library/python:3.11-slim"
HTTP_IMAGE = "devcluster.local/http-server:1.0"
TCP_ECHO_IMAGE = "devcluster.local/tcp-echo:1.0"
UDP_ECHO_IMAGE = "devcluster.local/udp-echo:1.0"
SAMPLE_APP_IMAGE = "devcluster.local/edgycorp-webapp:1.0"
#: Every pod's sandbox; pinned in containerd's configuration.
PAUSE_IMAGE = "devcluster.local/pause:3.10"
