"""The laptop's unprivileged user, its kubeconfig, and the test harness's commands.

The product runs in the laptop namespace as this user, as on a real laptop. devcluster
does not install it: scripts/install-laptop.sh does, as the README says (the wheel with
`uv tool install` into the user's home, then `telepresence helper install`), which puts
its commands in ~/.local/bin, first on this user's PATH.
"""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

from devcluster import controlplane, laptopdns
from devcluster.pki import KeyPair
from devcluster.settings import LAPTOP_USER, Settings
from devcluster.system import run

#: What earlier devcluster versions wrote to install the product, removed by `up`.
OLD_SUDOERS = Path("/etc/sudoers.d/devcluster-telepresence")
OLD_COMMANDS = ("telepresence", "telepresence-helper")
LAPTOP_PATH = "{home}/.local/bin:{bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Wrapper scripts on the laptop's PATH, for the test harness (not the product).
_WRAPPER = """#!/bin/sh
PYTHONPATH={src} exec {python} -m {module} "$@"
"""
COMMANDS = {"devcluster": "devcluster.cli"}


def ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(LAPTOP_USER)
    except KeyError:
        run(["useradd", "--create-home", "--shell", "/bin/sh", LAPTOP_USER])
        return pwd.getpwnam(LAPTOP_USER)


def sync_sources(settings: Settings) -> None:
    """A world-readable copy of the product's and devcluster's packages, so the laptop user
    and the external host run the current code even when the checkout lives somewhere only
    root can read."""
    import devcluster
    import telepresence

    dest = settings.paths.src_copy
    tmp = dest.with_name(dest.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for package in (telepresence, devcluster):
        assert package.__file__ is not None
        here = Path(package.__file__).resolve().parent
        shutil.copytree(
            here, tmp / here.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    for root, dirs, files in os.walk(tmp):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    os.chmod(tmp, 0o755)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def install_commands(settings: Settings) -> None:
    paths = settings.paths
    paths.laptop_bin.mkdir(parents=True, exist_ok=True)
    python = paths.venv / "bin" / "python"
    for name, module in COMMANDS.items():
        script = paths.laptop_bin / name
        script.write_text(_WRAPPER.format(src=paths.src_copy, python=python, module=module))
        script.chmod(0o755)
    for name in OLD_COMMANDS:
        (paths.laptop_bin / name).unlink(missing_ok=True)
    OLD_SUDOERS.unlink(missing_ok=True)
    kubectl = paths.laptop_bin / "kubectl"
    tmp = kubectl.with_suffix(".new")
    shutil.copy(settings.binary("kubectl"), tmp)
    tmp.chmod(0o755)
    tmp.rename(kubectl)
    for folder in (paths.opt, paths.laptop_bin):
        folder.chmod(0o755)


def write_kubeconfig(settings: Settings, *, ca: Path, admin: KeyPair) -> None:
    user = ensure_user()
    path = settings.paths.laptop_kubeconfig
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(controlplane.kubeconfig(server=settings.addresses.api_url, ca=ca, client=admin))
    path.chmod(0o600)
    for p in (path.parent, path):
        os.chown(p, user.pw_uid, user.pw_gid)


def environment(settings: Settings, *, root: bool) -> dict[str, str]:
    home = "/root" if root else str(settings.paths.laptop_home)
    user = "root" if root else LAPTOP_USER
    env = {
        "HOME": home,
        "USER": user,
        "LOGNAME": user,
        # The laptop user's install (~/.local/bin), root's too: `sudo "$(command -v
        # telepresence)"` runs that same file.
        "PATH": LAPTOP_PATH.format(home=settings.paths.laptop_home, bin=settings.paths.laptop_bin),
        "KUBECONFIG": str(settings.paths.laptop_kubeconfig),
        "LANG": "C.UTF-8",
    }
    if term := os.environ.get("TERM"):
        env["TERM"] = term
    return env


def argv(settings: Settings, command: list[str], *, root: bool) -> list[str]:
    """The command line that runs `command` in the laptop's namespaces."""
    prefix = laptopdns.enter_argv(settings)
    if root:
        return [*prefix, *command]
    # setpriv, not su/runuser: no PAM session is opened, so `down` has none to close.
    return [
        *prefix,
        "setpriv",
        f"--reuid={LAPTOP_USER}",
        f"--regid={LAPTOP_USER}",
        "--init-groups",
        "--",
        *command,
    ]


def kill_user_processes() -> None:
    run(["pkill", "-KILL", "-u", LAPTOP_USER], check=False)
