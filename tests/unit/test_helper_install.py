"""The root-owned helper's installation, its pure parts: what counts as safe for root, the
sudoers lines, and that the copy holds everything a helper imports. Run as root, as the
whole suite is (the ownership checks chown to another uid)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from telepresence.netfilter import install


def test_root_owned_and_not_writable_by_others_is_safe(tmp_path: Path) -> None:
    # tmp_path is under the sticky /tmp: others cannot replace root's entries there.
    target = tmp_path / "bin" / "helper"
    target.parent.mkdir()
    target.write_text("")
    target.parent.chmod(0o755)
    tmp_path.chmod(0o755)
    assert install.unsafe_for_root(target) is None


def test_a_user_owned_or_group_writable_step_is_unsafe(tmp_path: Path) -> None:
    target = tmp_path / "lib" / "helper"
    target.parent.mkdir()
    target.write_text("")
    tmp_path.chmod(0o755)
    target.parent.chmod(0o775)
    found = install.unsafe_for_root(target)
    assert found is not None and found.path == target.parent and "writable" in found.why
    target.parent.chmod(0o755)
    os.chown(target, 1000, 1000)
    found = install.unsafe_for_root(target)
    assert found is not None and found.path == target and "uid 1000" in found.why


def test_a_symlink_is_judged_by_what_it_points_at(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    real = tmp_path / "real"
    real.write_text("")
    os.chown(real, 1000, 1000)
    link = tmp_path / "link"
    link.symlink_to(real)
    found = install.unsafe_for_root(link)
    assert found is not None and found.path == real


def test_rule_lines_name_the_launcher_alone_for_each_user_once() -> None:
    text = install.rule_lines(["bob", "alice", "bob"], Path("/usr/local/lib/x/bin/h"))
    assert text == (
        "alice ALL=(root) NOPASSWD: /usr/local/lib/x/bin/h\n"
        "bob ALL=(root) NOPASSWD: /usr/local/lib/x/bin/h\n"
    )
    assert install.users_in_rule("# comment\n" + text) == ["alice", "bob"]


IMPORTS = """
import json, sys, sysconfig
before = set(sys.modules)
import telepresence.netfilter.helper
stdlib = sysconfig.get_paths()["stdlib"]
found = set()
for name in set(sys.modules) - before:
    path = getattr(sys.modules[name], "__file__", None) or ""
    if path and not path.startswith(stdlib + "/"):
        found.add(name.split(".")[0] if not name.startswith("telepresence.")
                  else ".".join(name.split(".")[:2]))
print(json.dumps(sorted(found)))
"""


def test_the_copy_holds_what_the_helper_imports() -> None:
    out = subprocess.run(
        [sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True
    ).stdout
    imported = set(json.loads(out))
    ours = {m for m in imported if m.startswith("telepresence")}
    assert ours <= {"telepresence", "telepresence.netfilter"}
    assert imported - ours == set(install.DEPENDENCIES)
