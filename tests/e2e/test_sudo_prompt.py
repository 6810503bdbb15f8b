"""Root as the docs promise: "Run `telepresence connect`, you will be prompted for your
password". A second laptop user whose sudoers rule for the helper asks for a password runs
`connect` on a real terminal (a pty): sudo asks once, a second connect in the same
terminal uses sudo's cached timestamp, and a refused password or no terminal at all leaves
nothing behind."""

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
from devcluster.settings import LAPTOP_NS
from tests.e2e.cluster import Cluster
from tests.e2e.test_outbound import laptop_state, quit_

USER = "tppass"
PASSWORD = "correct horse 42"
HOME = Path("/home") / USER
SUDOERS = Path("/etc/sudoers.d/tp-test-password")
PROMPT = f"password for {USER}:"


def argv(cluster: Cluster, script: str) -> list[str]:
    """``script`` in the laptop namespace as the password user, with the laptop's
    environment (its PATH holds the product's commands)."""
    env = laptop.environment(cluster.settings, root=False)
    env.update(HOME=str(HOME), USER=USER, LOGNAME=USER, KUBECONFIG=str(HOME / ".kube" / "config"))
    return [
        "ip", "netns", "exec", LAPTOP_NS,
        "setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups", "--",
        "env", "-i", *(f"{k}={v}" for k, v in env.items()), "sh", "-c", script,
    ]  # fmt: skip


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
    quit_(cluster)
    subprocess.run(["userdel", "-r", USER], capture_output=True, check=False)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
    subprocess.run(["chpasswd"], input=f"{USER}:{PASSWORD}", text=True, check=True)
    helper = cluster.settings.paths.laptop_bin / "telepresence-helper"
    rule = SUDOERS.with_name(".tp-test-password.tmp")
    rule.write_text(f"{USER} ALL=(root) {helper}\n")  # no NOPASSWD: sudo asks
    rule.chmod(0o440)
    subprocess.run(["visudo", "-cf", str(rule)], check=True, capture_output=True)
    rule.rename(SUDOERS)
    kube = HOME / ".kube"
    kube.mkdir(mode=0o700)
    shutil.copy(cluster.settings.paths.laptop_kubeconfig, kube / "config")
    shutil.chown(kube, USER, USER)
    shutil.chown(kube / "config", USER, USER)
    yield cluster
    subprocess.run(argv(cluster, "telepresence quit"), capture_output=True, check=False)
    SUDOERS.unlink(missing_ok=True)
    subprocess.run(["userdel", "-r", USER], capture_output=True, check=False)
    for ts in (Path("/run/sudo/ts") / USER, Path("/var/lib/sudo/ts") / USER):
        ts.unlink(missing_ok=True)


def test_connect_asks_for_the_password_once_per_terminal(password_user: Cluster) -> None:
    cluster = password_user
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


def test_a_refused_password_changes_nothing(password_user: Cluster) -> None:
    cluster = password_user
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


def test_without_a_terminal_connect_says_how_to_get_root(password_user: Cluster) -> None:
    cluster = password_user
    before = laptop_state(cluster)
    proc = subprocess.run(
        argv(cluster, "telepresence connect"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # no controlling terminal
    )
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "sudo needs your password: run `telepresence connect` in a terminal" in line, line
    status = subprocess.run(argv(cluster, "telepresence status"), capture_output=True, text=True)
    assert "User Daemon: Not running" in status.stdout
    assert laptop_state(cluster) == before
