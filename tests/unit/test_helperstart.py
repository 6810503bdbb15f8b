"""Starting the helper from the CLI: the sudo command line, the one line for a refusal,
and the helper's --detach handshake (a child that reports, a parent that exits on it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from telepresence.cli import helperstart


def test_sudo_may_ask_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(helperstart, "find_helper", lambda: "/usr/bin/telepresence-helper")
    argv = helperstart.helper_argv("/run/s", interactive=True, debug=False)
    assert argv == ["sudo", "/usr/bin/telepresence-helper", "--connect", "/run/s", "--detach"]
    argv = helperstart.helper_argv("/run/s", interactive=False, debug=True)
    assert argv[:2] == ["sudo", "-n"] and argv[-1] == "--debug"


def test_a_missing_helper_says_to_reinstall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(helperstart, "find_helper", lambda: None)
    with pytest.raises(helperstart.HelperStartError, match="reinstall"):
        helperstart.helper_argv("/run/s", interactive=True, debug=False)


@pytest.mark.parametrize(
    ("stderr", "interactive", "expected"),
    [
        ("sudo: a password is required\n", False, "run `telepresence connect` in a terminal"),
        ("sudo: a terminal is required to read the password\n", False, "in a terminal"),
        ("Sorry, try again.\nsudo: 3 incorrect password attempts\n", True,
         "sudo refused (3 incorrect password attempts)"),
        ("telepresence-helper: cannot connect to the daemon at /x: refused\n", True,
         "the network helper failed to start: cannot connect to the daemon at /x: refused"),
        ("", False, "sudo refused; run `telepresence connect` in a terminal"),
    ],
)  # fmt: skip
def test_a_refusal_is_one_line_naming_the_fix(
    stderr: str, interactive: bool, expected: str
) -> None:
    line = helperstart.refusal(stderr, interactive=interactive)
    assert expected in line and "\n" not in line


DETACH = """
import os, sys
from telepresence.netfilter.helper import detach
outcome = detach()
if isinstance(outcome, int):
    sys.exit(outcome)
with open(sys.argv[2], "w") as f:
    f.write(f"{os.getsid(0) == os.getpid()}")
outcome(sys.argv[1])
"""


@pytest.mark.parametrize(("report", "status"), [("ok", 0), ("cannot connect: refused", 2)])
def test_detach_returns_once_the_child_reports(tmp_path: Path, report: str, status: int) -> None:
    marker = tmp_path / "child"
    proc = subprocess.run(
        [sys.executable, "-c", DETACH, report, str(marker)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == status
    assert marker.read_text() == "True"  # the child leads a session of its own
    if status:
        assert proc.stderr.strip() == f"telepresence-helper: {report}"
