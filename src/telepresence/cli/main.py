"""The `telepresence` command: parse flags, talk to the user daemon, print.

It stays light on purpose: `status` opens a socket and prints, without importing asyncio,
aiohttp or the Kubernetes client, so it answers in tens of milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from telepresence import __version__
from telepresence.cli import client, helperstart, render, settings


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
    _image_flags(p)
    p.add_argument(
        "--manager-namespace",
        default=None,
        help="namespace of the traffic manager (default ambassador)",
    )
    p.add_argument(
        "--mapped-namespaces",
        metavar="NS,NS",
        help="only these namespaces resolve as <svc>.<ns> (default: all you may list)",
    )
    p.add_argument(
        "--also-proxy",
        metavar="CIDR,CIDR",
        default="",
        help="route these subnets to the cluster too",
    )
    p.add_argument(
        "--never-proxy",
        metavar="CIDR,CIDR",
        default="",
        help="never route these subnets to the cluster",
    )
    p.add_argument(
        "--allow-conflicting-subnets",
        metavar="CIDR,CIDR",
        default="",
        help="route these subnets even where they overlap a route of this machine",
    )
    p = sub.add_parser("status", help="show the connection")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.add_argument(
        "--flows",
        action="store_true",
        help="also the open flows (bytes each way, age, state) and the last errors "
        "(refused dials, resets, DNS failures)",
    )
    sub.add_parser("quit", help="disconnect and undo every change on this machine")
    p = sub.add_parser("intercept", help="start a local-only intercept (names of NS resolve)")
    p.add_argument("name")
    p.add_argument("-n", "--namespace", required=True)
    p.add_argument(
        "--local-only",
        action="store_true",
        required=True,
        help="change nothing in the cluster; put NAMESPACE on the search path",
    )
    p = sub.add_parser("leave", help="end an intercept")
    p.add_argument("name")
    sub.add_parser("list", help="list intercepts")
    sub.add_parser("version", help="show the version")
    p = sub.add_parser(
        "bench", help="measure throughput and latency to the traffic manager through the tunnel"
    )
    p.add_argument("--seconds", type=float, default=3.0, help="per direction (default 3)")
    p.add_argument(
        "--port-forward",
        action="store_true",
        help="also measure the same through `kubectl port-forward` (needs kubectl on PATH)",
    )
    p.add_argument("--kubeconfig", help="for kubectl (default: $KUBECONFIG)")
    p = sub.add_parser("manifests", help="print the traffic manager's manifests (for GitOps)")
    _image_flags(p)
    p = sub.add_parser("helper", help="install the root network helper for prompt-free connects")
    helper_sub = p.add_subparsers(dest="helper_command", metavar="ACTION")
    helper_sub.required = True
    p = helper_sub.add_parser(
        "install",
        help="(as root) a root-owned helper, and a sudoers rule letting USER run it",
    )
    p.add_argument("--user", help="who may run it (default: the user who ran sudo)")
    p = helper_sub.add_parser("uninstall", help="(as root) remove the helper and its sudoers rule")
    p.add_argument("--user", help="only take this user's permission away")
    p = sub.add_parser("manager", help="upgrade or uninstall the cluster's traffic manager")
    manager_sub = p.add_subparsers(dest="manager_command", metavar="ACTION")
    manager_sub.required = True
    p = manager_sub.add_parser(
        "upgrade",
        help="replace an older traffic manager with this client's (never downgrades)",
    )
    _manager_flags(p)
    _image_flags(p)
    p = manager_sub.add_parser(
        "uninstall", help="remove everything `connect` installed in the cluster"
    )
    _manager_flags(p)
    return top


def _image_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--manager-base-image",
        metavar="IMAGE",
        help="the Python image the traffic manager's code runs on "
        "(default docker.io/library/python:3.11-slim; set a mirror when air-gapped)",
    )
    p.add_argument(
        "--manager-image",
        metavar="IMAGE",
        help="a traffic manager image of our own, with the code in it (deploy/ builds it)",
    )


def _images(args: argparse.Namespace, config: settings.Config) -> tuple[str | None, str | None]:
    """(own image, base image): a flag wins over the config file, and an own image given
    anywhere wins over a base image, as it carries its own code."""
    base = args.manager_base_image or config.manager_base_image
    own = args.manager_image or (None if args.manager_base_image else config.manager_image)
    return own, (None if own else base)


def _manager_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", help="the kubeconfig context to use")
    p.add_argument("--kubeconfig", help="path to the kubeconfig file (default: $KUBECONFIG)")
    p.add_argument(
        "--manager-namespace",
        default=None,
        help="namespace of the traffic manager (default ambassador)",
    )


def _helper_cleanup() -> None:
    """Undo what a dead network helper left (its journal says what); idempotent."""
    from telepresence.netfilter.install import find_helper

    helper = find_helper()
    if helper is None:
        return
    argv = [helper, "--cleanup"] if os.geteuid() == 0 else ["sudo", "-n", helper, "--cleanup"]
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False, timeout=60)


def cmd_status(args: argparse.Namespace) -> int:
    status = client.status(flows=args.flows)
    if args.output == "json":
        print(json.dumps(status, indent=2))
    else:
        print(render.status_text(status))
        if args.flows:
            print(render.flows_text(status))
    return 0


def cmd_quit(args: argparse.Namespace) -> int:
    print("Telepresence Daemon quitting...", end="", flush=True)
    client.quit()
    _helper_cleanup()
    print("done")
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    # Flags and config first: a bad value must fail before any process is started.
    config = settings.load()
    own_image, base_image = _images(args, config)
    request: dict[str, Any] = {
        "cmd": "connect",
        "kubeconfig": args.kubeconfig,
        "context": args.context,
        "namespace": args.namespace,
        "manager_image": own_image,
        "manager_base_image": base_image,
        "manager_namespace": args.manager_namespace or config.manager_namespace,
        "manager_dial_allow": config.manager_dial_allow,
        "manager_dial_deny": config.manager_dial_deny,
        "mapped_namespaces": settings.parse_mapped_namespaces(args.mapped_namespaces),
        "also_proxy": settings.cidrs(args.also_proxy, "--also-proxy") or config.also_proxy,
        "never_proxy": settings.cidrs(args.never_proxy, "--never-proxy") or config.never_proxy,
        "allow_conflicting_subnets": settings.cidrs(
            args.allow_conflicting_subnets, "--allow-conflicting-subnets"
        )
        or config.allow_conflicting_subnets,
        "direct": config.direct,
        "direct_address": config.direct_address,
        "env": dict(os.environ),
    }
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
    if os.geteuid() != 0:
        _start_helper(debug=args.debug)
    result = client.request_with_progress(request, render.Progress(sys.stdout))
    print(f"Connected to context {result['context']} ({result['server']})")
    for warning in result.get("warnings", []):
        print(f"Warning: {warning}", file=sys.stderr)
    return 0


def _start_helper(*, debug: bool) -> None:
    """The root helper, through sudo on this terminal, before the daemon connects; on a
    refusal the daemon goes too, so nothing is left behind."""
    listening = client.request({"cmd": "helper-listen"})
    if listening is None:
        raise client.DaemonError("the daemon stopped at start; see its log")
    try:
        helperstart.start_helper(listening["socket"], debug=debug)
    except (helperstart.HelperStartError, KeyboardInterrupt) as e:
        client.quit()
        if isinstance(e, KeyboardInterrupt):
            raise CliError("interrupted; nothing was changed") from None
        raise CliError(str(e)) from None


def cmd_intercept(args: argparse.Namespace) -> int:
    _daemon_call({"cmd": "intercept", "name": args.name, "namespace": args.namespace})
    return 0


def cmd_leave(args: argparse.Namespace) -> int:
    _daemon_call({"cmd": "leave", "name": args.name})
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    result = _daemon_call({"cmd": "list"})
    for item in result["intercepts"]:
        print(f"{item['name']}: {item['kind']} intercept (namespace {item['namespace']})")
    return 0


def _daemon_call(message: dict[str, Any]) -> dict[str, Any]:
    result = client.request(message)
    if result is None:
        raise CliError("not connected; run `telepresence connect` first")
    return result


def cmd_version(args: argparse.Namespace) -> int:
    print(f"telepresence-py {__version__}")
    return 0


def cmd_manifests(args: argparse.Namespace) -> int:
    from telepresence.k8s import managercode, manifests

    config = settings.load()
    own, base = _images(args, config)
    sys.stdout.write(
        manifests.manifests_yaml(
            image=own or base or manifests.DEFAULT_BASE_IMAGE,
            code=None if own else managercode.build(),
            dial_allow=config.manager_dial_allow or (),
            dial_deny=config.manager_dial_deny or (),
        )
    )
    return 0


def cmd_helper(args: argparse.Namespace) -> int:
    from telepresence.netfilter import install

    try:
        done = (
            install.install(user=args.user)
            if args.helper_command == "install"
            else install.uninstall(user=args.user)
        )
    except install.InstallError as e:
        raise CliError(str(e)) from e
    for line in done:
        print(line)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from telepresence.benchclient import BenchError
    from telepresence.cli import bench

    status = client.status()
    if status["user_daemon"].get("status") != "Connected":
        raise CliError("not connected: run `telepresence connect` first")
    print(f"Measuring for {args.seconds:g} s each way, then 100 fresh connections ...", flush=True)
    try:
        tunnel = bench.through_tunnel(args.seconds)
        rows = [("telepresence", tunnel)]
        if args.port_forward:
            rows.append(
                (
                    "kubectl port-forward",
                    bench.through_kubectl(status, args.seconds, args.kubeconfig),
                )
            )
    except (bench.BenchFailed, BenchError) as e:
        raise CliError(str(e)) from None
    print(f"Transport: {tunnel['transport']}")
    print(bench.table(rows))
    return 0


def cmd_manager(args: argparse.Namespace) -> int:
    from telepresence.cli import manager

    config = settings.load()
    own_image, base_image = (
        _images(args, config) if args.manager_command == "upgrade" else (None, None)
    )
    namespace = args.manager_namespace or config.manager_namespace or "ambassador"
    progress = render.Progress(sys.stdout)
    try:
        if args.manager_command == "upgrade":
            last = manager.upgrade(
                kubeconfig_path=args.kubeconfig,
                context=args.context,
                namespace=namespace,
                image=own_image,
                base_image=base_image,
                dial_allow=config.manager_dial_allow,
                dial_deny=config.manager_dial_deny,
                progress=progress.step,
            )
        else:
            state = client.status()["user_daemon"]
            if state.get("running") and state.get("status") != "Not connected":
                raise CliError(
                    "this machine is connected through the Traffic Manager; "
                    "run `telepresence quit` first"
                )
            last = manager.uninstall(
                kubeconfig_path=args.kubeconfig,
                context=args.context,
                namespace=namespace,
                progress=progress.step,
            )
    except manager.ManagerCommandError as e:
        raise CliError(str(e)) from e
    finally:
        progress.done()
    if last:
        print(last)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "connect": cmd_connect,
        "status": cmd_status,
        "quit": cmd_quit,
        "manifests": cmd_manifests,
        "helper": cmd_helper,
        "manager": cmd_manager,
        "intercept": cmd_intercept,
        "leave": cmd_leave,
        "list": cmd_list,
        "version": cmd_version,
        "bench": cmd_bench,
    }
    started = time.monotonic()
    try:
        code = commands[args.command](args)
    except (client.DaemonError, CliError, settings.SettingsError) as e:
        command = args.command
        if command == "manager":
            command = f"manager {args.manager_command}"
        print(f"telepresence {command}: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    if args.debug:
        print(f"({time.monotonic() - started:.3f}s)", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
