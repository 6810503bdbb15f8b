"""The open-file limit is raised in a child process, so the test runner's own is untouched."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import resource, sys
from telepresence.fdlimit import raise_open_file_limit
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
got = raise_open_file_limit(wanted=int(sys.argv[1]))
print(got, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)
"""


def run(wanted: int) -> tuple[int, int, int]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(wanted)], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[0]), int(out[1]), int(out[2])


def test_the_soft_limit_is_raised_to_the_wanted_value_within_the_hard_one() -> None:
    got, soft, hard = run(4096)
    assert got == soft == min(4096, hard)
    assert soft > 256


def test_never_above_the_hard_limit() -> None:
    got, soft, hard = run(2**40)
    assert got == soft == hard
