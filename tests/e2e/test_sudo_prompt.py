"""Root as the docs promise: "Run `telepresence connect`, you will be prompted for your
password". A second laptop user, an admin by the `sudo` group as a laptop's owner usually
is, with no sudoers rule of ours, runs `connect` on a real terminal (a pty): sudo asks once,
a second connect in the same terminal uses sudo's cached timestamp, and a refused password
or no terminal at all leaves nothing behind. `telepresence helper install` then makes
connect prompt-free with a
root-owned copy that the user cannot change, and `uninstall --user` takes it back for one
user (tests/e2e/test_wheel_install.py uninstalls it all)."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster import laptop
from devcluster.settings import LAPTOP_USER
from telepresence.netfilter.install import INSTALL_DIR, LAUNCHER, SUDOERS_RULE
from tests.e2e.cluster import Cluster, run_without_terminal, user_argv
from tests.e2e.test_outbound import laptop_state, quit_

USER = "tppass"
PASSWORD = "correct horse 42"
HOME = Path("/home") / USER
PROMPT = f"password for {USER}:"


def argv(cluster: Cluster, script: str) -> list[str]:
    """``script`` in the laptop namespace as the password user, with the laptop's
    environment (its PATH holds the product's commands)."""
    env = laptop.environment(cluster.settings, root=False)
    env.update(HOME=str(HOME), USER=USER, LOGNAME=USER, KUBECONFIG=str(HOME / ".kube" / "config"))
    return user_argv(USER, env, "sh", "-c", script)


def on_terminal(cluster: Cluster, script: str, answers: list[str], timeout: float = 240) -> str:
    """Runs ``script`` with a pty as its controlling terminal, typing the next of
    ``answers`` at each password prompt; returns the transcript."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a new session whose terminal is the pty
        command = argv(cluster, script)
        os.execvp(command[0], command)
    transcript = ""
    answered = 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096).decode(errors="replace")
            except OSError:  # the child closed the terminal: it is done
                break
            if not chunk:
                break
            transcript += chunk
            if transcript.count(PROMPT) > answered:
                assert answered < len(answers), f"an unexpected prompt:\n{transcript}"
                os.write(fd, answers[answered].encode() + b"\n")
                answered += 1
        else:
            raise AssertionError(f"the terminal session did not end:\n{transcript}")
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    return transcript


@pytest.fixture(scope="module")
def password_user(cluster: Cluster) -> Iterator[Cluster]:
    """A second laptop user with a password and a kubeconfig, and no sudoers rule."""
    quit_(cluster)
    subprocess.run(["userdel", "-r", USER], capture_output=True, check=False)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
    subprocess.run(["chpasswd"], input=f"{USER}:{PASSWORD}", text=True, check=True)
    kube = HOME / ".kube"
    kube.mkdir(mode=0o700)
    shutil.copy(cluster.settings.paths.laptop_kubeconfig, kube / "config")
    shutil.chown(kube, USER, USER)
    shutil.chown(kube / "config", USER, USER)
    yield cluster
    subprocess.run(argv(cluster, "telepresence quit"), capture_output=True, check=False)
    subprocess.run(["userdel", "-r", USER], capture_output=True, check=False)
    for ts in (Path("/run/sudo/ts") / USER, Path("/var/lib/sudo/ts") / USER):
        ts.unlink(missing_ok=True)


@pytest.fixture()
def admin(password_user: Cluster) -> Iterator[Cluster]:
    """The user as a laptop's owner usually is: in the `sudo` group, which Debian's and
    Ubuntu's default sudoers lets run anything after a password. No rule of ours."""
    subprocess.run(["usermod", "--append", "--groups", "sudo", USER], check=True)
    yield password_user
    subprocess.run(["gpasswd", "--delete", USER, "sudo"], capture_output=True, check=False)


def test_connect_asks_for_the_password_once_per_terminal(admin: Cluster) -> None:
    cluster = admin
    before = laptop_state(cluster)
    script = (
        "telepresence connect && telepresence status && telepresence quit && "
        "telepresence connect && telepresence quit; echo exit=$?"
    )
    transcript = on_terminal(cluster, script, [PASSWORD])
    assert transcript.count(PROMPT) == 1, transcript  # the second connect: sudo's timestamp
    assert transcript.count("Connected to context devcluster") == 2, transcript
    assert "Status            : Connected" in transcript
    assert "exit=0" in transcript, transcript
    assert laptop_state(cluster) == before


def test_a_refused_password_changes_nothing(admin: Cluster) -> None:
    cluster = admin
    before = laptop_state(cluster)
    transcript = on_terminal(
        cluster,
        "sudo -K; telepresence connect; echo exit=$?; telepresence status",
        ["wrong", "wrong again", "still wrong"],
    )
    assert transcript.count(PROMPT) == 3, transcript
    assert "sudo refused (3 incorrect password attempts)" in transcript, transcript
    assert "exit=1" in transcript
    assert "User Daemon: Not running" in transcript
    assert laptop_state(cluster) == before


def test_without_a_terminal_connect_says_how_to_get_root(admin: Cluster) -> None:
    cluster = admin
    before = laptop_state(cluster)
    proc = run_without_terminal(argv(cluster, "telepresence connect"))
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "sudo needs your password: run `telepresence connect` in a terminal" in line, line
    status = subprocess.run(argv(cluster, "telepresence status"), capture_output=True, text=True)
    assert "User Daemon: Not running" in status.stdout
    assert laptop_state(cluster) == before


# --- `telepresence helper install`: no prompt, safely ----------------------------------------

EVIL = "/tmp/tp-evil-pythonpath"


@pytest.fixture()
def installed(password_user: Cluster) -> Iterator[Cluster]:
    """`sudo telepresence helper install` run by the password user (the laptop user has
    been allowed already, by the session's install)."""
    cluster = password_user
    out = cluster.laptop(
        "env", f"SUDO_USER={USER}", "telepresence", "helper", "install", root=True, timeout=300
    ).stdout
    assert f"Allowed {USER} to run {LAUNCHER} without a password" in out, out
    yield cluster
    cluster.laptop("telepresence", "helper", "uninstall", "--user", USER, root=True, check=False)
    shutil.rmtree(EVIL, ignore_errors=True)


def test_an_installed_helper_is_root_owned_and_connects_without_a_password(
    installed: Cluster,
) -> None:
    cluster = installed
    before = laptop_state(cluster)
    for path in [INSTALL_DIR, *INSTALL_DIR.rglob("*")]:
        info = path.lstat()
        assert info.st_uid == 0, path
        assert path.is_symlink() or not info.st_mode & 0o022, path
    # The interpreter in the launcher's first line is root's too.
    python = LAUNCHER.read_text().splitlines()[0].removeprefix("#!").split()[0]
    assert Path(python).resolve().stat().st_uid == 0
    rules = [
        line
        for line in SUDOERS_RULE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sorted(rules) == [
        f"{USER} ALL=(root) NOPASSWD: {LAUNCHER}",
        f"{LAPTOP_USER} ALL=(root) NOPASSWD: {LAUNCHER}",
    ]
    assert subprocess.run(["visudo", "-c"], capture_output=True).returncode == 0

    # No terminal and no password: the installed helper needs neither.
    script = (
        "telepresence connect && curl -sS --max-time 10 verylargejavaservice.default:8080 "
        "&& telepresence quit"
    )
    proc = run_without_terminal(argv(cluster, script))
    assert proc.returncode == 0, proc.stderr
    assert "<title>" in proc.stdout
    assert laptop_state(cluster) == before


def test_the_installed_helper_ignores_the_callers_python_environment(installed: Cluster) -> None:
    """Code planted on PYTHONPATH is never run by it: neither a `sitecustomize` (which any
    Python with `site` would run at start) nor a `telepresence` package."""
    marker = Path(EVIL) / "imported"
    planted = Path(EVIL) / "telepresence"
    planted.mkdir(parents=True, exist_ok=True)
    plant = f"open({str(marker)!r}, 'w').close()\n"
    planted.joinpath("__init__.py").write_text(plant)
    Path(EVIL, "sitecustomize.py").write_text(plant)
    os.chmod(EVIL, 0o755)
    # The plant works on an ordinary Python run, so its absence below means something.
    installed.laptop("env", f"PYTHONPATH={EVIL}", "python3", "-c", "pass", root=True)
    assert marker.exists()
    marker.unlink()
    proc = installed.laptop("env", f"PYTHONPATH={EVIL}", str(LAUNCHER), "--cleanup", root=True)
    assert proc.returncode == 0
    assert not marker.exists()


def test_uninstall_for_one_user_keeps_the_others(installed: Cluster) -> None:
    cluster = installed
    out = cluster.laptop("telepresence", "helper", "uninstall", "--user", USER, root=True).stdout
    assert f"{USER} may no longer run {LAUNCHER} without a password" in out
    assert LAUNCHER.exists()
    assert USER not in SUDOERS_RULE.read_text() and LAPTOP_USER in SUDOERS_RULE.read_text()
    proc = run_without_terminal(argv(cluster, "telepresence connect"))
    assert proc.returncode == 1 and "sudo needs your password" in proc.stderr
