"""Where the user's telepresence keeps sockets, logs and configuration.

Kept free of heavy imports: the CLI's hot commands (`status`) import it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

#: The root network helper's command (a console script of the wheel), found on PATH.
HELPER_COMMAND = "telepresence-helper"


def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(_home() / ".cache")
    return Path(base) / "telepresence"


def config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(_home() / ".config")
    return Path(base) / "telepresence" / "config.yml"


def logs_dir() -> Path:
    path = cache_dir() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def runtime_dir() -> Path:
    """An owner-only directory for the daemon's sockets.

    The control socket grants full control of the session, so the directory must be ours
    and closed to others; a directory that is not is refused rather than used.
    """
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) if xdg and Path(xdg).is_dir() else cache_dir()
    path = base / "telepresence-run" if base == cache_dir() else base / "telepresence"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user; remove it and retry")
    if stat.S_IMODE(info.st_mode) != 0o700:
        path.chmod(0o700)
    return path


def daemon_socket() -> Path:
    return runtime_dir() / "daemon.sock"
