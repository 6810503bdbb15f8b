"""Starting the root network helper from `telepresence connect`, on the user's terminal.

sudo keeps its "already authenticated" timestamp per terminal, and the user daemon has
none, so only the CLI, in the foreground, can let sudo ask for the password (or use the
timestamp of an earlier sudo in the same terminal). It runs ``sudo telepresence-helper
--connect SOCKET --detach``: the helper connects to the daemon's socket, then lives on in
the background, and sudo's exit status says whether that worked. This happens before the
daemon changes anything, so a refused password leaves nothing behind.
"""

from __future__ import annotations

import subprocess
import sys

from telepresence.netfilter.install import find_helper
from telepresence.paths import HELPER_COMMAND


class HelperStartError(Exception):
    """One line for the user, naming the fix."""


def helper_argv(socket_path: str, *, interactive: bool, debug: bool) -> list[str]:
    helper = find_helper()
    if helper is None:
        raise HelperStartError(
            f"the network helper `{HELPER_COMMAND}` is not on PATH; reinstall telepresence"
        )
    # Without a terminal sudo cannot ask, so it must not try: -n fails at once instead.
    sudo = ["sudo"] if interactive else ["sudo", "-n"]
    return [*sudo, helper, "--connect", socket_path, "--detach", *(["--debug"] if debug else [])]


def refusal(stderr: str, *, interactive: bool) -> str:
    """The user's line for a helper that did not start, from what sudo (or the helper)
    said last."""
    said = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    said = said.removeprefix("sudo: ").strip()
    if "password is required" in said or "terminal is required" in said:
        return (
            "telepresence needs root for its network helper and sudo needs your password: "
            "run `telepresence connect` in a terminal, or run "
            "`sudo telepresence helper install` once"
        )
    if said.startswith("telepresence-helper: "):
        return f"the network helper failed to start: {said.removeprefix('telepresence-helper: ')}"
    reason = f" ({said})" if said else ""
    hint = "" if interactive else "; run `telepresence connect` in a terminal"
    return f"telepresence needs root for its network helper and sudo refused{reason}{hint}"


def start_helper(socket_path: str, *, debug: bool) -> None:
    """Runs the helper through sudo on this terminal; returns once it has connected to the
    daemon. Raises :class:`HelperStartError`."""
    interactive = sys.stdin.isatty()
    argv = helper_argv(socket_path, interactive=interactive, debug=debug)
    # sudo asks on /dev/tty; its complaints ("Sorry, try again.") go to stderr, which the
    # user sees as they happen and which is kept for the one line at the end.
    proc = subprocess.Popen(argv, stdin=None, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    lines = []
    for raw in proc.stderr:
        line = raw.decode(errors="replace")
        lines.append(line)
        if interactive:
            sys.stderr.write(line)
            sys.stderr.flush()
    if proc.wait() != 0:
        raise HelperStartError(refusal("".join(lines), interactive=interactive))
