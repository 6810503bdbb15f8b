"""Raise the open-file limit to what the system allows, at the start of a long-lived process.

Every flow holds a socket in the daemon and in the manager. Most systems start a process
with a soft limit of 1,024 descriptors and a hard limit far above it, so without this a
thousand concurrent connections end in EMFILE, which a user sees as refused connections
with nothing wrong in the cluster. Raising the soft limit up to the hard one needs no
privilege.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("telepresence")

#: Enough for tens of thousands of flows; a higher hard limit is left unused, since
#: select-based code elsewhere in a process may still assume small descriptor numbers.
WANTED = 65536


def raise_open_file_limit(wanted: int = WANTED) -> int:
    """Returns the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, e)
            return soft
        return target
    return soft
