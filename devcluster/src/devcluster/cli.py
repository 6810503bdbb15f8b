"""devcluster: a real Kubernetes cluster on this machine, in network namespaces.

devcluster up [--sample-app] [--laptop-dns FLAVOUR]
                                 idempotent; builds/caches binaries, starts everything
devcluster laptop-dns [FLAVOUR]  show or switch the laptop's DNS stack: plain,
                                 resolved-stub (Ubuntu) or resolved-nss (Fedora)
devcluster nodeports [open|closed]
                                 show or switch whether the laptop reaches the node's
                                 NodePorts (as a kind node is reachable from its host)
devcluster status                components, versions, namespaces, addresses
devcluster laptop [--root] -- CMD...
devcluster pod -- CMD...
devcluster down
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from devcluster import laptop, laptopdns, network, node
from devcluster.settings import NODE_NAME, NODE_NS, TOOLBOX_NS, Settings
from devcluster.supervisor import IMAGES_FILE, READY_FILE, STATUS_FILE

REQUIRED_TOOLS = (
    "ip",
    "nft",
    "dnsmasq",
    "sudo",
    "setpriv",
    "visudo",
    "go",
    "runc",
    "nsenter",
    "unshare",
    "mmdebstrap",
    "dbus-daemon",
    "findmnt",
    "dpkg-deb",
)


class DevclusterError(Exception):
    """A failure with a message that says what to do."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def supervisor_pid(settings: Settings) -> int | None:
    pid_file = settings.paths.run / "supervisor.pid"
    try:
        pid = int(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def is_up(settings: Settings) -> bool:
    return supervisor_pid(settings) is not None and (settings.paths.run / READY_FILE).exists()


def check_host() -> None:
    if os.geteuid() != 0:
        raise DevclusterError(
            "devcluster needs root (network namespaces, nftables): run it as root"
        )
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise DevclusterError(
            f"missing tools: {', '.join(missing)}; install them (see .ci/run for the packages)"
        )
    settings = Settings()
    if not (settings.paths.venv / "bin" / "python").exists():
        raise DevclusterError(
            f"no Python environment at {settings.paths.venv}; run .ci/run or "
            f"`UV_PROJECT_ENVIRONMENT={settings.paths.venv} uv sync --python /usr/bin/python3`"
        )


def build(settings: Settings) -> dict[str, Path]:
    """The binaries and the images; returns each image's archive by reference."""
    script = Path(__file__).with_name("build-binaries.sh")
    env = {**os.environ, "DEVCLUSTER_CACHE": str(settings.paths.cache)}
    v = settings.versions
    env.update(
        DEVCLUSTER_K8S_VERSION=v.kubernetes,
        DEVCLUSTER_ETCD_VERSION=v.etcd,
        DEVCLUSTER_COREDNS_VERSION=v.coredns,
        DEVCLUSTER_CONTAINERD_VERSION=v.containerd,
    )
    if subprocess.run(["bash", str(script)], env=env, check=False).returncode != 0:
        raise DevclusterError("building the cluster binaries failed; the output above says why")
    # The images, before the supervisor starts: a cold build takes minutes and shows progress.
    from devcluster import imagebuild

    try:
        return imagebuild.build(settings)
    except imagebuild.BuildError as e:
        raise DevclusterError(f"building the images failed: {e}") from e


def up(settings: Settings, *, sample_app: bool, laptop_dns: str | None = None) -> None:
    check_host()
    if laptop_dns is not None:
        laptopdns.check_flavour(laptop_dns)
    archives = build(settings)
    laptop.sync_sources(settings)
    laptop.install_commands(settings)
    if not is_up(settings):
        down(settings, quiet=True)
        settings.paths.run.mkdir(parents=True, exist_ok=True)
        (settings.paths.run / IMAGES_FILE).write_text(
            json.dumps({ref: str(path) for ref, path in archives.items()})
        )
        start_supervisor(settings)
        laptopdns.apply(settings, laptop_dns or laptopdns.DEFAULT_FLAVOUR)
    else:
        print("devcluster is already up")
        updated = node.import_images(settings, archives)
        if updated:
            print(f"imported rebuilt images: {', '.join(updated)}")
        if laptop_dns is not None and laptop_dns != laptopdns.current(settings):
            laptopdns.apply(settings, laptop_dns)
    if sample_app:
        deploy_sample_app(settings)
    print(f"devcluster is up: API server {settings.addresses.api_url}")


def start_supervisor(settings: Settings) -> None:
    paths = settings.paths
    paths.run.mkdir(parents=True, exist_ok=True)
    paths.logs.mkdir(parents=True, exist_ok=True)
    laptop.ensure_user()
    network.create_base(settings.addresses)
    resolved_root = laptopdns.unpack_resolved(settings)
    laptopdns.create_mount_namespace(settings, resolved_root=resolved_root)
    laptopdns.install_resolvectl(settings, resolved_root=resolved_root)
    log_file = (paths.logs / "supervisor.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "devcluster.supervisor"],
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=log_file,
        start_new_session=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(paths.src_copy)},
    )
    (paths.run / "supervisor.pid").write_text(str(proc.pid))
    started = time.monotonic()
    print("Starting devcluster ...", flush=True)
    while not (paths.run / READY_FILE).exists():
        if proc.poll() is not None or (paths.run / "failed").exists():
            reason = (
                (paths.run / "failed").read_text().strip()
                if (paths.run / "failed").exists()
                else f"exit code {proc.poll()}"
            )
            raise DevclusterError(f"devcluster failed to start: {reason}; logs in {paths.logs}")
        if time.monotonic() - started > 300:
            raise DevclusterError(f"devcluster did not start in 300s; logs in {paths.logs}")
        time.sleep(0.2)
    print(f"devcluster started in {time.monotonic() - started:.1f}s", flush=True)


def kubectl(
    settings: Settings, *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """kubectl as cluster admin, from the node namespace."""
    argv = [
        "ip",
        "netns",
        "exec",
        NODE_NS,
        str(settings.binary("kubectl")),
        f"--kubeconfig={settings.paths.admin_kubeconfig}",
        *args,
    ]
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise DevclusterError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def deploy_sample_app(settings: Settings) -> None:
    from devcluster.fixtures import sample_app_manifest

    kubectl(settings, "apply", "-f", "-", input=sample_app_manifest())
    kubectl(
        settings,
        "rollout",
        "status",
        "deployment/verylargejavaservice",
        "-n",
        "default",
        "--timeout=120s",
    )
    print("sample app verylargejavaservice.default:8080 is ready")


def down(settings: Settings, *, quiet: bool = False) -> None:
    paths = settings.paths
    pid = supervisor_pid(settings)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    laptop.kill_user_processes()
    laptopdns.stop_daemons(settings)
    laptopdns.destroy_mount_namespace(settings)
    node.teardown(settings)
    network.destroy_all()
    for name in ("etcd", "pki", "node"):
        shutil.rmtree(paths.run / name, ignore_errors=True)
    for name in (
        READY_FILE,
        STATUS_FILE,
        IMAGES_FILE,
        "failed",
        "supervisor.pid",
        "admin.kubeconfig",
        "laptop-dns",
    ):
        with contextlib.suppress(FileNotFoundError):
            (paths.run / name).unlink()
    if not quiet:
        print("devcluster is down")


def status(settings: Settings) -> int:
    if not is_up(settings):
        print("devcluster is down")
        return 1
    data = json.loads((settings.paths.run / STATUS_FILE).read_text())
    a = settings.addresses
    v = settings.versions
    print(f"devcluster: up (supervisor pid {data['pid']})")
    print(
        f"  kubernetes {v.kubernetes}, etcd {v.etcd}, containerd {v.containerd}, "
        f"coredns {v.coredns}"
    )
    print("  components:")
    for name, c in data["components"].items():
        state = "running" if c["running"] else "stopped"
        print(f"    {name:<24} {state:<8} pid {c['pid']}  restarts {c['restarts']}")
    print(f"  API server:   {a.api_url} (from the laptop namespace)")
    print(f"  services:     {a.service_cidr} (cluster DNS {a.dns_service_ip})")
    print(f"  pods:         {a.pod_cidr} (node podCIDR {a.node_pod_cidr})")
    namespaces = sorted(n for n in network.netns_names() if n.startswith("dc-"))
    print(f"  namespaces:   {', '.join(namespaces)}")
    print(
        f"  laptop:       {a.laptop_link_laptop}, resolver {a.laptop_resolver}, "
        f"DNS flavour {laptopdns.current(settings)}"
    )
    print(f"  external:     {a.external_ip} ({a.external_name}, reachable from pods only)")
    pods = kubectl(
        settings, "get", "pods", "-A", "-o", "wide", "--no-headers", check=False
    ).stdout.splitlines()
    print(f"  pods:         {len(pods)} on node {NODE_NAME}")
    for line in pods:
        print(f"    {line}")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="devcluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the cluster (idempotent)")
    p_up.add_argument(
        "--sample-app", action="store_true", help="deploy verylargejavaservice in default"
    )
    p_up.add_argument(
        "--laptop-dns",
        choices=laptopdns.FLAVOURS,
        help="the laptop's DNS stack (default: plain on a fresh start, else unchanged)",
    )
    p_dns = sub.add_parser("laptop-dns", help="show or switch the laptop's DNS stack")
    p_dns.add_argument("flavour", nargs="?", choices=laptopdns.FLAVOURS)
    p_ports = sub.add_parser(
        "nodeports", help="show, open or close the node's NodePort range to the laptop"
    )
    p_ports.add_argument("state", nargs="?", choices=("open", "closed"))
    sub.add_parser("down", help="stop everything and remove what devcluster made")
    sub.add_parser("status", help="show components, versions and addresses")
    p_laptop = sub.add_parser("laptop", help="run a command in the laptop namespace")
    p_laptop.add_argument("--root", action="store_true", help="run it as root")
    p_laptop.add_argument("cmd", nargs=argparse.REMAINDER)
    p_pod = sub.add_parser("pod", help="run a command inside the cluster network")
    p_pod.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    settings = Settings()
    try:
        if args.command == "up":
            up(settings, sample_app=args.sample_app, laptop_dns=args.laptop_dns)
        elif args.command == "laptop-dns":
            if args.flavour is None:
                print(laptopdns.current(settings))
                return
            check_host()
            if not is_up(settings):
                raise DevclusterError("devcluster is not up: run `devcluster up` first")
            laptopdns.apply(settings, args.flavour)
            print(f"laptop DNS: {args.flavour}")
        elif args.command == "nodeports":
            if not is_up(settings):
                raise DevclusterError("devcluster is not up: run `devcluster up` first")
            if args.state is not None:
                network.set_nodeports(settings.addresses, reachable=args.state == "open")
            print("open" if network.nodeports_open(settings.addresses) else "closed")
        elif args.command == "down":
            check_host()
            down(settings)
        elif args.command == "status":
            sys.exit(status(settings))
        elif args.command in ("laptop", "pod"):
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                raise DevclusterError(f"usage: devcluster {args.command} -- CMD...")
            if not is_up(settings):
                raise DevclusterError("devcluster is not up: run `devcluster up` first")
            if args.command == "laptop":
                env = laptop.environment(settings, root=args.root)
                full = laptop.argv(settings, cmd, root=args.root)
            else:
                env = {
                    **os.environ,
                    "KUBECONFIG": str(settings.paths.admin_kubeconfig),
                    "PYTHONPATH": str(settings.paths.src_copy),
                }
                full = ["ip", "netns", "exec", TOOLBOX_NS, *cmd]
            os.execvpe(full[0], full, env)
    except (DevclusterError, laptopdns.FlavourError) as e:
        print(f"devcluster: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
