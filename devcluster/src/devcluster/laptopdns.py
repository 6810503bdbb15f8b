"""The laptop's own mount namespace and its DNS stack, in three flavours.

Laptops resolve names in one of three ways, and the product must work on each:

- ``plain``: /etc/resolv.conf names a nameserver (dnsmasq here), ``hosts: files dns``;
- ``resolved-stub`` (Ubuntu): a real systemd-resolved, resolv.conf names its 127.0.0.53
  stub, ``hosts: files dns``;
- ``resolved-nss`` (Fedora): the same resolved, and ``hosts: files resolve
  [!UNAVAIL=return] dns``: glibc asks resolved over varlink and sends no port-53 packet.

In the resolved flavours resolved's upstream is the laptop's dnsmasq, and a dbus-daemon
carries its D-Bus API (what the product's helper calls). Both are real programs: Debian's
systemd-resolved, libnss-resolve and libsystemd-shared, of the version the host's systemd
libraries have, unpacked (not installed: installing would relink the host's resolv.conf
and edit its nsswitch.conf) and cached by version.

Everything the laptop runs enters one persistent mount namespace (:func:`enter_argv`),
made at ``up``: its /etc/resolv.conf and /etc/nsswitch.conf are bind mounts of the files
in /etc/netns/<laptop>/ (rewritten in place, so a running process sees a change, as on a
laptop), /sys shows the laptop's links, the unpacked libraries are overlaid read-only on
the multiarch library directory, and /run/dbus and /run/systemd are its own tmpfs, so
the product can never reach the host's bus or the host's resolved.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

from devcluster import network
from devcluster.settings import LAPTOP_NS, Settings
from devcluster.system import CommandError, run

FLAVOURS = ("plain", "resolved-stub", "resolved-nss")
DEFAULT_FLAVOUR = "plain"
#: The packages unpacked for the resolved flavours (one version for all three).
PACKAGES = ("systemd-resolved", "libnss-resolve", "libsystemd-shared")
RESOLVED_USER = "systemd-resolve"
STUB_RESOLV_CONF = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n"
_HOSTS = {
    "plain": "files dns",
    "resolved-stub": "files dns",
    "resolved-nss": "files resolve [!UNAVAIL=return] dns",
}
_NSSWITCH = """\
# devcluster laptop ({flavour})
passwd:         files
group:          files
shadow:         files
hosts:          {hosts}
networks:       files
protocols:      files
services:       files
"""
_RESOLVED_CONF = """\
[Resolve]
DNS={upstream}
Domains=lan
LLMNR=no
MulticastDNS=no
DNSSEC=no
"""
# A system bus for the laptop alone: the default policy of a system bus (method calls
# only to services whose own policy allows them), plus resolved's policy file.
_BUS_CONF = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
  </policy>
  <includedir>{policy_dir}</includedir>
</busconfig>
"""


class FlavourError(Exception):
    """The flavour cannot be set up; the message says why."""


def etc_dir() -> Path:
    """The files `ip netns exec` and the laptop's mount namespace bind over /etc."""
    return Path("/etc/netns") / LAPTOP_NS


def _mnt_dir(settings: Settings) -> Path:
    return settings.paths.run / "mnt"


def mount_namespace(settings: Settings) -> Path:
    return _mnt_dir(settings) / "laptop"


def enter_argv(settings: Settings) -> list[str]:
    """The prefix that runs a command in the laptop's network and mount namespaces."""
    return [
        "nsenter",
        f"--net=/run/netns/{LAPTOP_NS}",
        f"--mount={mount_namespace(settings)}",
        f"--wd={os.getcwd()}",
    ]


def nsswitch_text(flavour: str) -> str:
    return _NSSWITCH.format(flavour=flavour, hosts=_HOSTS[flavour])


def check_flavour(flavour: str) -> str:
    if flavour not in FLAVOURS:
        choices = ", ".join(FLAVOURS)
        raise FlavourError(f"unknown laptop DNS flavour {flavour!r}: use one of {choices}")
    return flavour


# --- the unpacked packages ---------------------------------------------------------------


def _installed_version(package: str) -> str | None:
    proc = run(["dpkg-query", "-W", "-f", "${Version}", package], check=False)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def _candidate_version(package: str) -> str | None:
    out = run(["apt-cache", "policy", package], check=False).stdout
    match = re.search(r"Candidate:\s*(\S+)", out)
    return match.group(1) if match and match.group(1) != "(none)" else None


def resolved_version() -> str:
    """The host's libsystemd-shared version when it has one (resolved must match the
    library it links), else the version apt would install."""
    version = _installed_version("libsystemd-shared") or _candidate_version("systemd-resolved")
    if version is None:
        raise FlavourError(
            "no systemd-resolved package known to apt: run `apt-get update` (Debian or Ubuntu)"
        )
    return version


def unpack_resolved(settings: Settings) -> Path:
    """The root of the unpacked packages, cached by version under the devcluster cache."""
    version = resolved_version()
    root = settings.paths.cache / f"resolved-{re.sub(r'[^A-Za-z0-9.+-]', '_', version)}"
    if (root / "usr" / "bin" / "resolvectl").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        os.chmod(tmp, 0o755)  # apt's sandbox user writes the download here
        download = ["apt-get", "download", *(f"{p}={version}" for p in PACKAGES)]
        if run(download, timeout=300, check=False, cwd=tmp).returncode != 0:
            # Package lists may be missing or stale on a fresh machine: refresh them once.
            run(["apt-get", "update", "-qq"], timeout=300, check=False)
            try:
                run(download, timeout=300, cwd=tmp)
            except CommandError as e:
                raise FlavourError(f"downloading systemd-resolved {version} failed: {e}") from e
        tree = Path(tmp) / "root"
        for deb in sorted(Path(tmp).glob("*.deb")):
            run(["dpkg-deb", "-x", str(deb), str(tree)])
        shutil.rmtree(root, ignore_errors=True)
        tree.rename(root)
    return root


def _resolved_binary(root: Path) -> Path:
    for candidate in ("lib/systemd/systemd-resolved", "usr/lib/systemd/systemd-resolved"):
        if (root / candidate).exists():
            return root / candidate
    raise FlavourError(f"no systemd-resolved binary in {root}")


def _multiarch_libdir() -> Path:
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    return Path("/usr/lib") / multiarch


def ensure_resolved_user() -> None:
    """resolved drops to this user by name; it must exist in the laptop's /etc/passwd,
    which is the host's (the laptop's users are the host's, as devcluster's own are)."""
    if run(["getent", "passwd", RESOLVED_USER], check=False).returncode != 0:
        run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/",
             "--shell", "/usr/sbin/nologin", RESOLVED_USER]
        )  # fmt: skip


# --- the mount namespace -----------------------------------------------------------------


def create_mount_namespace(settings: Settings, *, resolved_root: Path) -> None:
    """The laptop's persistent mount namespace (see the module docstring)."""
    folder = etc_dir()
    folder.mkdir(parents=True, exist_ok=True)
    resolv = folder / "resolv.conf"
    if not resolv.exists():
        raise FlavourError(f"{resolv} is missing: the laptop namespace is not set up")
    nsswitch = folder / "nsswitch.conf"
    if not nsswitch.exists():
        nsswitch.write_text(nsswitch_text(DEFAULT_FLAVOUR))
    mnt = _mnt_dir(settings)
    mnt.mkdir(parents=True, exist_ok=True)
    if run(["findmnt", "--mountpoint", str(mnt)], check=False).returncode != 0:
        run(["mount", "--bind", str(mnt), str(mnt)])
        run(["mount", "--make-private", str(mnt)])
    target = mount_namespace(settings)
    target.touch()
    libdir = _multiarch_libdir()
    script = "\n".join(
        [
            "set -e",
            "mount -t sysfs sysfs /sys",
            f"mount --bind {resolv} /etc/resolv.conf",
            f"mount --bind {nsswitch} /etc/nsswitch.conf",
            f"mount -t overlay overlay -o ro,lowerdir={resolved_root}{libdir}:{libdir} {libdir}",
            "mount -t tmpfs -o mode=0755 tmpfs /run/systemd",
            "mkdir -p /run/dbus",
            "mount -t tmpfs -o mode=0755 tmpfs /run/dbus",
        ]
    )
    run(
        ["nsenter", f"--net=/run/netns/{LAPTOP_NS}",
         "unshare", f"--mount={target}", "--propagation", "slave", "sh", "-c", script]
    )  # fmt: skip


def destroy_mount_namespace(settings: Settings) -> None:
    mnt = _mnt_dir(settings)
    target = mount_namespace(settings)
    run(["umount", str(target)], check=False)
    run(["umount", str(mnt)], check=False)
    with contextlib.suppress(FileNotFoundError):
        target.unlink()


# --- the flavours ------------------------------------------------------------------------


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.paths.run / f"laptop-{name}.pid"


def _flavour_file(settings: Settings) -> Path:
    return settings.paths.run / "laptop-dns"


def current(settings: Settings) -> str:
    try:
        return check_flavour(_flavour_file(settings).read_text().strip())
    except (FileNotFoundError, FlavourError):
        return DEFAULT_FLAVOUR


def _rewrite(path: Path, text: str) -> None:
    """In place: the laptop sees the file through a bind mount, which a rename would
    leave pointing at the old one."""
    with path.open("r+" if path.exists() else "w") as f:
        f.seek(0)
        f.write(text)
        f.truncate()


def stop_daemons(settings: Settings) -> None:
    for name in ("resolved", "dbus"):
        pid_file = _pid_file(settings, name)
        try:
            pid = int(pid_file.read_text())
        except (FileNotFoundError, ValueError):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)
    # A fresh tmpfs content for the next start: no stale socket or resolved state.
    run([*enter_argv(settings), "sh", "-c", "rm -rf /run/dbus/* /run/systemd/*"], check=False)


def _spawn(settings: Settings, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    settings.paths.logs.mkdir(parents=True, exist_ok=True)
    with (settings.paths.logs / f"laptop-{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            [*enter_argv(settings), *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd="/",
        )
    _pid_file(settings, name).write_text(str(proc.pid))
    return proc


def _wait(what: str, ready: list[str], settings: Settings, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while run([*enter_argv(settings), *ready], check=False).returncode != 0:
        if proc.poll() is not None:
            raise FlavourError(
                f"{what} exited with {proc.returncode}; see {settings.paths.logs}/laptop-*.log"
            )
        if time.monotonic() > deadline:
            raise FlavourError(f"{what} did not come up in 20 s; see {settings.paths.logs}")
        time.sleep(0.1)


def start_daemons(settings: Settings, *, resolved_root: Path) -> None:
    """dbus-daemon, then systemd-resolved with the laptop's dnsmasq as its upstream."""
    conf_dir = settings.paths.run / "laptop-dbus"
    conf_dir.mkdir(parents=True, exist_ok=True)
    bus_conf = conf_dir / "system.conf"
    bus_conf.write_text(_BUS_CONF.format(policy_dir=resolved_root / "usr/share/dbus-1/system.d"))
    upstream = settings.addresses.laptop_resolver
    setup = (
        "mkdir -p /run/systemd/resolved.conf.d && "
        f"printf '%s' '{_RESOLVED_CONF.format(upstream=upstream)}' "
        "> /run/systemd/resolved.conf.d/devcluster.conf"
    )
    run([*enter_argv(settings), "sh", "-c", setup])
    dbus = _spawn(
        settings,
        "dbus",
        ["dbus-daemon", f"--config-file={bus_conf}", "--nofork", "--nopidfile", "--nosyslog"],
    )
    _wait("dbus-daemon", ["test", "-S", "/run/dbus/system_bus_socket"], settings, dbus)
    resolved = _spawn(
        settings, "resolved", ["env", "-u", "NOTIFY_SOCKET", str(_resolved_binary(resolved_root))]
    )
    resolvectl = str(resolved_root / "usr/bin/resolvectl")
    _wait("systemd-resolved", [resolvectl, "status"], settings, resolved)


def apply(settings: Settings, flavour: str) -> None:
    """Switch the laptop to ``flavour`` (idempotent): stop resolved and its bus, rewrite
    resolv.conf and nsswitch.conf in place, start them again for a resolved flavour."""
    check_flavour(flavour)
    stop_daemons(settings)
    folder = etc_dir()
    addr = settings.addresses
    if flavour == "plain":
        plain = network.resolv_conf_text(**network.laptop_resolv_conf(addr))
        _rewrite(folder / "resolv.conf", plain)
    else:
        _rewrite(folder / "resolv.conf", STUB_RESOLV_CONF)
    _rewrite(folder / "nsswitch.conf", nsswitch_text(flavour))
    if flavour != "plain":
        root = unpack_resolved(settings)
        ensure_resolved_user()
        start_daemons(settings, resolved_root=root)
    _flavour_file(settings).write_text(flavour + "\n")


def install_resolvectl(settings: Settings, *, resolved_root: Path) -> None:
    """resolvectl on the laptop's PATH (a copy: the cache may be in root's home)."""
    target = settings.paths.laptop_bin / "resolvectl"
    tmp = target.with_suffix(".new")
    shutil.copy(resolved_root / "usr/bin/resolvectl", tmp)
    tmp.chmod(0o755)
    tmp.rename(target)
