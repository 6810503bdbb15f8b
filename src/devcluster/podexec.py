"""Runs inside a pod's network namespace (under `ip netns exec`) and becomes the container.

`ip netns exec` has already given us a private mount namespace with the pod's resolv.conf;
here the service-account files are mounted where a kubelet puts them, then privileges are
dropped to the pod's user and the container's command is exec'd.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
_MS_BIND = 4096
_MS_RDONLY = 1
_MS_REMOUNT = 32
_PR_SET_PDEATHSIG = 1


def _bind_mount(source: str, target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")
    libc.mount(None, target.encode(), None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY, None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sa-dir")
    parser.add_argument("--uid", type=int, default=0)
    parser.add_argument("--gid", type=int, default=0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.sa_dir:
        _bind_mount(args.sa_dir, SA_MOUNT)
    os.setgroups([])
    os.setgid(args.gid)
    os.setuid(args.uid)
    # After setuid: changing credentials clears the parent-death signal.
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.chdir("/")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
