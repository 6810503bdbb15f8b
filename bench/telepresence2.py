"""Telepresence 2 as a contender in the benchmark suite, run on devcluster as a user would.

Everything here changes the environment around Telepresence 2, never Telepresence 2 itself:

- the binaries come from `bench/tel2/build.sh` (the Go module proxy, pinned version);
- its manager image is the upstream reference, ``ghcr.io/telepresenceio/tel2:<version>``,
  built here from the `traffic` binary on devcluster's Debian base and imported into the
  node's containerd, so the chart's defaults pull nothing;
- `telepresence helm install` puts the manager in its own namespace (``tel2``) with the agent
  injector off, so it does not meet ours;
- the client runs as the laptop user with its own config and cache directories (ours share
  the names ``~/.config/telepresence`` and ``~/.cache/telepresence``), and its root daemon
  starts through sudo, which a sudoers rule allows for that one binary during the run;
- its root daemon wants a default route, which the laptop gets for the run; devcluster's
  node forwards nothing from the laptop except through the tunnels either way.

Run as root (the suite is). `install()` and `uninstall()` bracket a suite run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.contenders import (
    CLUSTER_PROCESSES,
    Contender,
    devcluster,
    find_pids,
    in_laptop,
    kubectl,
    timed_in_laptop,
)
from devcluster import imagebuild, oci
from devcluster.laptop import argv as laptop_argv
from devcluster.laptop import environment
from devcluster.node import import_archive
from devcluster.procs import command_lines
from devcluster.settings import LAPTOP_USER, Settings

VERSION = "2.27.4"
IMAGE = f"ghcr.io/telepresenceio/tel2:{VERSION}"
NAMESPACE = "tel2"
BUILD_SCRIPT = Path(__file__).parent / "tel2" / "build.sh"
#: Where the laptop user finds the client: root-owned, outside any home directory, so that
#: the sudoers rule names a file the user cannot change.
CLIENT = Path("/opt/telepresence-bench/tel2/telepresence")
SUDOERS = Path("/etc/sudoers.d/telepresence-bench-tel2")
#: The client's own config and cache, apart from ours.
XDG = {
    "XDG_CONFIG_HOME": f"/home/{LAPTOP_USER}/.tel2/config",
    "XDG_CACHE_HOME": f"/home/{LAPTOP_USER}/.tel2/cache",
}
#: The laptop's gateway: devcluster's end of the laptop link.
GATEWAY = "198.51.100.1"


class Telepresence2Error(Exception):
    pass


def build() -> Path:
    """The directory holding `telepresence` and `traffic` (built once, then cached)."""
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False, timeout=3600
    )
    if proc.returncode != 0:
        raise Telepresence2Error(f"bench/tel2/build.sh failed: {proc.stderr.strip()[-800:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def image_archive(traffic: Path, settings: Settings) -> Path:
    """The manager image as an OCI archive: devcluster's Debian base plus what upstream's
    image adds (the binary at /usr/local/bin, a writable /home/telepresence and mount dir)."""
    store = imagebuild.Store(settings.paths.cache / "images")
    digest = hashlib.sha256(traffic.read_bytes()).hexdigest()

    def make(tree: Path) -> None:
        (tree / "usr/local/bin").mkdir(parents=True)
        shutil.copyfile(traffic, tree / "usr/local/bin/traffic")
        (tree / "usr/local/bin/traffic").chmod(0o755)
        for folder in ("home/telepresence", "tel_app_mounts"):
            (tree / folder).mkdir(parents=True)
            (tree / folder).chmod(0o777)

    layer = imagebuild.LayerRecipe(name="tel2-traffic", key=f"tel2-traffic-1-{digest}", make=make)
    layers = [store.layer(imagebuild.base_layer()), store.layer(layer)]
    config = oci.ImageConfig(entrypoint=("traffic",), env=imagebuild.BASE_ENV)
    archive = store.root / "archives" / f"tel2-{VERSION}.oci.tar"
    archive.parent.mkdir(parents=True, exist_ok=True)
    oci.write_archive(archive, reference=IMAGE, config=config, layers=layers)
    return archive


def tel2(*args: str, timeout: float = 300, check: bool = True) -> str:
    """The Telepresence 2 client, as the laptop user."""
    env = [f"{k}={v}" for k, v in XDG.items()]
    return in_laptop("env", *env, str(CLIENT), *args, timeout=timeout, check=check)


def install() -> None:
    """Binaries, image, client, sudoers rule and the manager in its namespace."""
    settings = Settings()
    binaries = build()
    import_archive(settings, image_archive(binaries / "traffic", settings))
    CLIENT.parent.mkdir(parents=True, exist_ok=True)
    for folder in (CLIENT.parent, CLIENT.parent.parent):
        folder.chmod(0o755)
    # Replaced, not rewritten: a daemon of an earlier run may still be running it.
    staged = CLIENT.with_name(".telepresence.new")
    shutil.copyfile(binaries / "telepresence", staged)
    staged.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    os.replace(staged, CLIENT)
    rule = f"{LAPTOP_USER} ALL=(root) NOPASSWD: {CLIENT} *\n"
    tmp = SUDOERS.with_name(".telepresence-bench-tel2.tmp")
    tmp.write_text(rule)
    tmp.chmod(0o440)
    subprocess.run(["visudo", "-cqf", str(tmp)], check=True)
    os.replace(tmp, SUDOERS)
    # A run that died before uninstall() left it installed: the same version will do.
    env = [f"{k}={v}" for k, v in XDG.items()]
    proc = subprocess.run(
        laptop_argv(
            Settings(),
            ["env", *env, str(CLIENT), "helm", "install", "--manager-namespace", NAMESPACE,
             "--set", "agentInjector.enabled=false"],
            root=False,
        ),
        env=environment(Settings(), root=False),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0 and "already installed" not in proc.stderr:
        raise Telepresence2Error(f"telepresence helm install failed: {proc.stderr.strip()}")
    tel2("quit", "-s", check=False)


def uninstall() -> None:
    """Undo `install()`, keeping the cached binaries and image layers."""
    tel2("quit", "-s", check=False)
    set_default_route(False)
    try:
        tel2("helm", "uninstall", "--manager-namespace", NAMESPACE, check=False)
        tel2("quit", "-s", check=False)
        # `helm install` created the namespace; its uninstall leaves it. Waited for, as the
        # next install cannot create in a terminating namespace.
        kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=120s")
    finally:
        SUDOERS.unlink(missing_ok=True)


def set_default_route(present: bool) -> None:
    verb = "replace" if present else "del"
    route = ["ip", "route", verb, "default"] + (["via", GATEWAY] if present else [])
    devcluster("laptop", "--root", "--", *route, check=present)


@dataclass
class Telepresence2(Contender):
    """Connected with Telepresence 2 to its manager in namespace ``tel2``; the target by its
    ClusterIP, as for ours."""

    cluster_ip: str = ""

    def start(self) -> dict[str, float]:
        self.host = self.cluster_ip
        in_laptop("telepresence", "quit")
        set_default_route(True)
        env = [f"{k}={v}" for k, v in XDG.items()]
        connect = timed_in_laptop(
            "env", *env, str(CLIENT), "connect", "--manager-namespace", NAMESPACE
        )
        deadline = time.monotonic() + 30
        while "Connected" not in tel2("status", check=False):
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: not connected: {tel2('status', check=False)}")
        return {"connect s": connect}

    def stop(self) -> dict[str, float]:
        env = [f"{k}={v}" for k, v in XDG.items()]
        quit_s = timed_in_laptop("env", *env, str(CLIENT), "quit", "-s")
        set_default_route(False)
        return {"quit s": quit_s}

    def pids(self) -> dict[str, int]:
        """By command lines that start with the program (sudo's own line names it too)."""
        starts = {
            "daemon": f"{CLIENT} userd ",
            "root daemon": f"{CLIENT} rootd ",
            # The manager's command line is its entrypoint alone.
            "manager": "traffic ",
        }
        found = find_pids(CLUSTER_PROCESSES)
        for pid, line in command_lines():
            for name, start in starts.items():
                if name not in found and (line + " ").startswith(start):
                    found[name] = pid
        return found
