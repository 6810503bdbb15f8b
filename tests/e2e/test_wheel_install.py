"""The README's Install section, as a user runs it: scripts/install-laptop.sh (run once per
test session, by conftest) builds the wheel, installs it with `uv tool install` into the
laptop user's home and runs `sudo telepresence helper install` from it. Here: what that
left, the user story with nothing of the checkout on the path, and a full uninstall."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.settings import LAPTOP_USER
from telepresence.netfilter.install import INSTALL_DIR, SUDOERS_RULE
from tests.e2e.cluster import Cluster, run_without_terminal, user_argv
from tests.e2e.test_outbound import laptop_state, quit_

REPO = Path(__file__).resolve().parents[2]
HOME = Path("/home") / LAPTOP_USER
BIN = HOME / ".local" / "bin"
TOOLS = HOME / ".local" / "share" / "uv" / "tools"
#: The user's `telepresence`, run by root as `sudo "$(command -v telepresence)"` would:
#: sudo resets the environment, so nothing of devcluster's PYTHONPATH.
ROOT_TELEPRESENCE = ("env", "-u", "PYTHONPATH", str(BIN / "telepresence"))


def as_user(*cmd: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """CMD as the laptop user, in the laptop namespace, with only the wheel's commands
    (and the system's) on PATH, and no terminal."""
    env = {
        "HOME": str(HOME),
        "USER": LAPTOP_USER,
        "LOGNAME": LAPTOP_USER,
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "KUBECONFIG": str(HOME / ".kube" / "config"),
        "LANG": "C.UTF-8",
    }
    return run_without_terminal(user_argv(LAPTOP_USER, env, *cmd), timeout=timeout)


@pytest.fixture(scope="module")
def wheel(cluster: Cluster) -> Iterator[Cluster]:
    quit_(cluster)
    yield cluster
    as_user("telepresence", "quit")
    # Leave the helper installed for the laptop user, as the session's install did.
    cluster.laptop(*ROOT_TELEPRESENCE, "helper", "install", "--user", LAPTOP_USER, root=True,
                   timeout=300)  # fmt: skip


def test_the_wheel_holds_the_product_alone(wheel: Cluster) -> None:
    (venv,) = TOOLS.glob("telepresence-py")
    site = next(venv.glob("lib/python3*/site-packages"))
    assert (site / "telepresence" / "cli" / "main.py").exists()
    assert not (site / "devcluster").exists()
    for command in ("telepresence", "telepresence-helper"):
        assert (BIN / command).exists()
    version = as_user("telepresence", "version")
    assert version.returncode == 0 and version.stdout.startswith("telepresence-py "), version


def test_the_install_section_end_to_end(wheel: Cluster) -> None:
    cluster = wheel
    before = laptop_state(cluster)
    # The helper was installed from the user's own install, and is root's now.
    copied = INSTALL_DIR / "lib" / "telepresence" / "netfilter" / "helper.py"
    assert copied.read_bytes() == next(TOOLS.glob(
        "telepresence-py/lib/python3*/site-packages/telepresence/netfilter/helper.py"
    )).read_bytes()  # fmt: skip
    assert copied.stat().st_uid == 0

    story = as_user(
        "sh", "-c",
        "telepresence connect && curl -sS --max-time 10 verylargejavaservice.default:8080 && "
        "telepresence status && telepresence quit",
    )  # fmt: skip
    assert story.returncode == 0, story.stderr
    assert "<title>Welcome to the EdgyCorp WebApp</title>" in story.stdout
    assert "Status            : Connected" in story.stdout
    assert laptop_state(cluster) == before

    # `sudo telepresence helper uninstall` leaves nothing; then connect, without a terminal,
    # has no way to root and says how to get one, in one line.
    out = cluster.laptop(*ROOT_TELEPRESENCE, "helper", "uninstall", root=True).stdout
    assert f"Removed {SUDOERS_RULE}" in out and f"Removed {INSTALL_DIR}" in out
    assert not SUDOERS_RULE.exists() and not INSTALL_DIR.exists()
    refused = as_user("telepresence", "connect")
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()
    assert "sudo telepresence helper install" in line, line
    assert laptop_state(cluster) == before
