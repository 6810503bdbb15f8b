"""`sudo telepresence helper install` and `telepresence helper uninstall`.

For people who want `connect` to start the helper without a password prompt: a sudoers
rule with NOPASSWD is only safe for a program that the user cannot change. A rule for the
helper of a user's own install (``uv tool install``, ``pipx``, a virtualenv) would be a root
shell: whoever can write its files, its interpreter or its dependencies runs as root. So
`install` copies the helper's code and dependencies to a root-owned directory, uses a
root-owned interpreter (the system's, or a copy of the user's when that one is
user-writable), writes a launcher that runs it isolated from the caller's environment
(``python -I -S``: no ``PYTHONPATH``, no user site, no current directory, no site-packages
beyond the copy), and only then writes a ``visudo``-checked rule naming that launcher alone.

Runs as root. Imports nothing beyond the standard library and ``telepresence.paths``;
the CLI and the daemon use :func:`find_helper` from here too.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from telepresence.paths import HELPER_COMMAND

#: Where the root-owned helper lives; the CLI and the daemon prefer its launcher.
INSTALL_DIR = Path("/usr/local/lib/telepresence-helper")
LAUNCHER = INSTALL_DIR / "bin" / "telepresence-helper"
#: sudo skips files of sudoers.d whose names contain a dot, so none here.
SUDOERS_RULE = Path("/etc/sudoers.d/telepresence-helper")
#: What the helper imports beyond the standard library (a unit test compares this with
#: the modules a helper really loads): its own package's netfilter part, msgspec (and
#: typing_extensions, which msgspec imports), and jeepney (systemd-resolved over D-Bus).
TELEPRESENCE_PARTS = ("__init__.py", "netfilter")
DEPENDENCIES = ("msgspec", "typing_extensions", "jeepney")

_LAUNCHER = """#!{python} -IS
# Written by `telepresence helper install`; runs the root-owned copy only.
import sys
sys.path.insert(0, {lib!r})
from telepresence.netfilter.helper import main
sys.exit(main())
"""
_RULE = """# Written by `telepresence helper install`: the root-owned helper, for these users only.
{lines}"""


class InstallError(Exception):
    """One line for the user, naming the fix."""


@dataclass(frozen=True)
class Writable:
    path: Path
    why: str


def unsafe_for_root(path: Path) -> Writable | None:
    """Why someone other than root could change what ``path`` holds, or None: it, or
    any directory above it, is not root-owned or is group/world-writable (a sticky /tmp
    aside)."""
    current = path
    while True:
        try:
            info = current.lstat()
        except FileNotFoundError:
            return Writable(current, "does not exist")
        if info.st_uid != 0:
            return Writable(current, f"is owned by uid {info.st_uid}")
        if stat.S_ISLNK(info.st_mode):  # its own mode means nothing; its target's does
            if (why := unsafe_for_root(current.resolve())) is not None:
                return why
        else:
            sticky_dir = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
            if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
                return Writable(current, "is writable by others than root")
        if current.parent == current:
            return None
        current = current.parent


def rule_lines(users: list[str], launcher: Path = LAUNCHER) -> str:
    return "".join(f"{user} ALL=(root) NOPASSWD: {launcher}\n" for user in sorted(set(users)))


def users_in_rule(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line and not line.startswith("#")]


def _interpreter() -> Path:
    """A root-owned interpreter to run the helper with: the one under this process's
    virtualenv when it is root-owned (a system Python), else a root-owned copy of it."""
    base = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if unsafe_for_root(base) is None and unsafe_for_root(stdlib) is None:
        return base
    # A user's Python (uv's or pyenv's): standalone builds are relocatable, so a copy of
    # its whole prefix works from anywhere.
    target = INSTALL_DIR / "python"
    shutil.copytree(sys.base_prefix, target, symlinks=True)
    return target / base.relative_to(Path(sys.base_prefix).resolve())


def _copy_module(name: str, lib: Path) -> None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise InstallError(f"the helper needs the Python module {name}; reinstall telepresence")
    if spec.submodule_search_locations:
        source = Path(next(iter(spec.submodule_search_locations)))
        shutil.copytree(source, lib / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy2(spec.origin, lib / Path(spec.origin).name)


def _copy_code(lib: Path) -> None:
    import telepresence

    package = Path(telepresence.__file__).parent
    (lib / "telepresence").mkdir(parents=True)
    for part in TELEPRESENCE_PARTS:
        source = package / part
        if source.is_dir():
            shutil.copytree(
                source, lib / "telepresence" / part, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(source, lib / "telepresence" / part)
    for name in DEPENDENCIES:
        _copy_module(name, lib)


def _own_by_root(root: Path) -> None:
    """root:root, and writable by root alone, whatever the sources were."""
    for path in [root, *root.rglob("*")]:
        os.lchown(path, 0, 0)
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWGRP | stat.S_IWOTH))


def _write_rule(users: list[str]) -> None:
    """Checked by visudo before it replaces the old rule, so a bad one never lands."""
    with tempfile.NamedTemporaryFile(
        "w", dir=SUDOERS_RULE.parent, prefix=".telepresence-helper.", delete=False
    ) as tmp:
        tmp.write(_RULE.format(lines=rule_lines(users)))
    path = Path(tmp.name)
    try:
        path.chmod(0o440)
        check = subprocess.run(["visudo", "-cf", str(path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise InstallError(f"visudo rejected the rule: {check.stderr.strip() or check.stdout}")
        path.rename(SUDOERS_RULE)
    finally:
        path.unlink(missing_ok=True)


def _user(explicit: str | None) -> str:
    name = explicit or os.environ.get("SUDO_USER")
    if not name or name == "root":
        raise InstallError(
            "say whose helper this is: run it with sudo as that user, or pass --user NAME"
        )
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise InstallError(f"there is no user {name!r} on this machine") from None
    return name


def install(*, user: str | None = None) -> list[str]:
    """Installs (or refreshes) the root-owned helper and allows ``user`` to run it without
    a password; returns what was done, a line each."""
    if os.geteuid() != 0:
        raise InstallError(
            "installing the helper needs root: run `sudo telepresence helper install`"
        )
    name = _user(user)
    if (why := unsafe_for_root(INSTALL_DIR.parent)) is not None:
        raise InstallError(f"cannot install into {INSTALL_DIR.parent}: {why.path} {why.why}")
    staging = INSTALL_DIR.with_name(INSTALL_DIR.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "bin").mkdir(parents=True)
        _copy_code(staging / "lib")
        if INSTALL_DIR.exists():
            shutil.rmtree(INSTALL_DIR)
        staging.rename(INSTALL_DIR)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    python = _interpreter()
    LAUNCHER.write_text(_LAUNCHER.format(python=python, lib=str(INSTALL_DIR / "lib")))
    LAUNCHER.chmod(0o755)
    _own_by_root(INSTALL_DIR)
    for path in (LAUNCHER, python):
        if (why := unsafe_for_root(path)) is not None:
            raise InstallError(f"refusing to allow {path}: {why.path} {why.why}")
    users = users_in_rule(SUDOERS_RULE.read_text()) if SUDOERS_RULE.exists() else []
    _write_rule([*users, name])
    return [
        f"Installed the helper in {INSTALL_DIR} (Python {python})",
        f"Allowed {name} to run {LAUNCHER} without a password ({SUDOERS_RULE})",
    ]


def uninstall(*, user: str | None = None) -> list[str]:
    """Takes ``user``'s line out of the rule, and removes the rule and the helper when no
    user is left (everything at once without ``user``); returns what was done."""
    if os.geteuid() != 0:
        raise InstallError(
            "removing the helper needs root: run `sudo telepresence helper uninstall`"
        )
    done = []
    users = users_in_rule(SUDOERS_RULE.read_text()) if SUDOERS_RULE.exists() else []
    if user is not None and user in users:
        users = [u for u in users if u != user]
        if users:
            _write_rule(users)
            return [f"{user} may no longer run {LAUNCHER} without a password"]
    if SUDOERS_RULE.exists() and (user is None or not users):
        SUDOERS_RULE.unlink()
        done.append(f"Removed {SUDOERS_RULE}")
    if INSTALL_DIR.exists() and (user is None or not users):
        shutil.rmtree(INSTALL_DIR)
        done.append(f"Removed {INSTALL_DIR}")
    return done or ["Nothing to remove"]


def find_helper() -> str | None:
    """The helper to run through sudo: the root-owned one `install` made, while it is
    still safe to run as root (its sudoers rule needs no password), else the one of this
    installation on PATH."""
    if LAUNCHER.exists() and unsafe_for_root(LAUNCHER) is None:
        return str(LAUNCHER)
    return shutil.which(HELPER_COMMAND)
