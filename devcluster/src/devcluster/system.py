"""Running host commands and entering network namespaces."""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Sequence

_CLONE_NEWNET = 0x40000000


class CommandError(RuntimeError):
    """A host command failed; the message carries the command and its stderr."""


def run(
    args: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 60,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """`ip` in a namespace (or the current one); returns stdout."""
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    return run([*prefix, *args], check=check).stdout


def nft(script: str, *, netns: str | None = None) -> None:
    """Applies an nftables script atomically (nft -f reads it as one transaction)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    run([*prefix, "nft", "-f", "-"], input=script)


def netns_names() -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def enter_netns(name: str) -> None:
    """Moves the calling thread into a named network namespace.

    Called once at start-up, before any thread exists, so every later thread and child
    process inherits it while the mount namespace stays the host's (unlike `ip netns exec`,
    whose private mounts would hide the namespaces we create from the host).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def sysctl(name: str, value: str, *, netns: str) -> None:
    run(["ip", "netns", "exec", netns, "sysctl", "-qw", f"{name}={value}"])
