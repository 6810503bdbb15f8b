"""Packing the manager's code for ConfigMaps: deterministic, within the size limit, whole
packages per archive, and complete (what the manager imports is what is packed)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from telepresence.k8s import managercode
from telepresence.k8s.managercode import SourceFile

# A ConfigMap's data may hold at most this many bytes (the API server's limit).
CONFIGMAP_LIMIT = 1024 * 1024


def noise(size: int, seed: int) -> bytes:
    """Bytes deflate cannot shrink."""
    blocks = (hashlib.sha256(f"{seed}/{i}".encode()).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def names(archive: bytes) -> list[str]:
    return zipfile.ZipFile(io.BytesIO(archive)).namelist()


def test_the_same_files_give_the_same_bytes_in_any_order() -> None:
    files = [SourceFile("b/x.py", b"x = 1\n"), SourceFile("a.py", b"a = 2\n")]
    one, other = managercode.pack(files), managercode.pack(list(reversed(files)))
    assert one == other
    assert names(one.archives[0]) == ["a.py", "b/x.py"]


def test_a_changed_file_changes_the_digest() -> None:
    one = managercode.pack([SourceFile("a.py", b"a = 1\n")])
    other = managercode.pack([SourceFile("a.py", b"a = 2\n")])
    assert one.digest != other.digest and one.short_digest != other.short_digest


def test_packages_are_never_split_across_archives() -> None:
    files = [SourceFile(f"{pkg}/m{i}.py", noise(4096, i)) for pkg in "abc" for i in range(3)]
    bundle = managercode.pack(files, limit=30_000)
    assert len(bundle.archives) > 1
    seen: dict[str, int] = {}
    for index, archive in enumerate(bundle.archives):
        assert len(archive) <= 30_000
        for name in names(archive):
            assert seen.setdefault(name.split("/")[0], index) == index


def test_a_package_too_big_for_one_configmap_is_an_error() -> None:
    files = [SourceFile(f"big/m{i}.py", noise(8192, i)) for i in range(4)]
    with pytest.raises(managercode.CodeError, match="big"):
        managercode.pack(files, limit=20_000)


def test_the_real_code_fits_in_configmaps_and_replaces_msgspec() -> None:
    bundle = managercode.build()
    assert all(len(a) <= managercode.ARCHIVE_LIMIT < CONFIGMAP_LIMIT for a in bundle.archives)
    packed = {n for a in bundle.archives for n in names(a)}
    assert "telepresence/manager/__main__.py" in packed
    assert "msgspec/__init__.py" in packed and "msgspec/msgpack.py" in packed
    # Sources only: nothing compiled for the laptop's Python and libc, no test helpers.
    assert not [n for n in packed if not n.endswith(".py")]
    assert not packed & managercode.EXCLUDED


# Imports the manager as its entry point does and prints the third-party top-level
# modules that came with it.
IMPORTS = """
import json, sys, sysconfig
before = set(sys.modules)
import telepresence.manager.runtime, telepresence.manager.server, telepresence.manager.process
stdlib = sysconfig.get_paths()["stdlib"]
found = set()
for name in set(sys.modules) - before:
    path = getattr(sys.modules[name], "__file__", None) or ""
    if path and not path.startswith(stdlib + "/") or "site-packages" in path:
        found.add(name.split(".")[0])
print(json.dumps(sorted(found)))
"""


def test_the_dependency_list_is_what_the_manager_imports() -> None:
    out = subprocess.run(
        [sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True
    ).stdout
    imported = set(json.loads(out)) - {"telepresence", "msgspec"}
    assert imported == set(managercode.DEPENDENCIES)


def test_the_packed_code_runs_without_anything_installed(tmp_path: Path) -> None:
    """As on the stock image: no site-packages, only the archives on the path, pure-Python
    paths selected. The manager's modules import, and the msgspec they get is ours."""
    bundle = managercode.build()
    paths = []
    for i, archive in enumerate(bundle.archives):
        path = tmp_path / f"{i}.zip"
        path.write_bytes(archive)
        paths.append(str(path))
    check = "\n".join(
        [
            f"import sys; sys.path[:0] = {paths!r}",
            "import telepresence.manager.runtime, telepresence.manager.process, msgspec, aiohttp",
            "from telepresence.tunnel import messages",
            "m = messages.Arrive(name='n', install_id='i', version='1')",
            "assert messages.decode_control(messages.encode_control(m)) == m",
            f"assert msgspec.__file__.startswith({str(tmp_path)!r}), msgspec.__file__",
        ]
    )
    env = {"PATH": "/usr/bin:/bin", **managercode.PURE_PYTHON_ENV}
    result = subprocess.run(
        [sys.executable, "-S", "-E", "-c", check], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
