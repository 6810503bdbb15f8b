"""The `telepresence` command: parse flags, talk to the user daemon, print.

It stays light on purpose: `status` opens a socket and prints, without importing asyncio,
aiohttp or the Kubernetes client, so it answers in tens of milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from telepresence import __version__
from telepresence.cli import client, render

HELPER_COMMAND = "telepresence-helper"


class CliError(Exception):
    """One line for the user, saying what to do; exit code 1."""


def _kube_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", help="the kubeconfig context to use")
    p.add_argument("--kubeconfig", help="path to the kubeconfig file (default: $KUBECONFIG)")
    p.add_argument("-n", "--namespace", help="the namespace to put on the DNS search path")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="telepresence",
        description="Make this machine behave like one more pod in your Kubernetes cluster.",
    )
    top.add_argument("--debug", action="store_true", help="verbose logs in the daemon log")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("connect", help="connect to the cluster (installs the traffic manager)")
    _kube_flags(p)
    p.add_argument("--manager-image", help="traffic manager image reference")
    p.add_argument(
        "--manager-namespace",
        default=None,
        help="namespace of the traffic manager (default ambassador)",
    )
    p = sub.add_parser("status", help="show the connection")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    sub.add_parser("quit", help="disconnect and undo every change on this machine")
    sub.add_parser("version", help="show the version")
    p = sub.add_parser("manifests", help="print the traffic manager's manifests (for GitOps)")
    p.add_argument("--manager-image", help="traffic manager image reference")
    return top


def _helper_cleanup() -> None:
    """Undo what a dead network helper left (its journal says what); idempotent."""
    helper = shutil.which(HELPER_COMMAND)
    if helper is None:
        return
    argv = [helper, "--cleanup"] if os.geteuid() == 0 else ["sudo", "-n", helper, "--cleanup"]
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False, timeout=60)


def cmd_status(args: argparse.Namespace) -> int:
    status = client.status()
    if args.output == "json":
        print(json.dumps(status, indent=2))
    else:
        print(render.status_text(status))
    return 0


def cmd_quit(args: argparse.Namespace) -> int:
    print("Telepresence Daemon quitting...", end="", flush=True)
    client.quit()
    _helper_cleanup()
    print("done")
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    status = client.status()
    if status["user_daemon"].get("status") == "Connected":
        ud = status["user_daemon"]
        print(
            f"Already connected to context {ud['kubernetes_context']} ({ud['kubernetes_server']})"
        )
        return 0
    if not status["user_daemon"]["running"]:
        print("Launching Telepresence Daemon ...", flush=True)
        client.launch_daemon(debug=args.debug)
    request: dict[str, Any] = {
        "cmd": "connect",
        "kubeconfig": args.kubeconfig,
        "context": args.context,
        "namespace": args.namespace,
        "manager_image": args.manager_image,
        "manager_namespace": args.manager_namespace,
        "env": dict(os.environ),
    }
    result = client.request_with_progress(request, render.Progress(sys.stdout))
    print(f"Connected to context {result['context']} ({result['server']})")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"telepresence-py {__version__}")
    return 0


def cmd_manifests(args: argparse.Namespace) -> int:
    from telepresence.k8s import manifests

    kwargs = {"image": args.manager_image} if args.manager_image else {}
    sys.stdout.write(manifests.manifests_yaml(**kwargs))
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "connect": cmd_connect,
        "status": cmd_status,
        "quit": cmd_quit,
        "manifests": cmd_manifests,
        "version": cmd_version,
    }
    started = time.monotonic()
    try:
        code = commands[args.command](args)
    except (client.DaemonError, CliError) as e:
        print(f"telepresence {args.command}: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    if args.debug:
        print(f"({time.monotonic() - started:.3f}s)", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
