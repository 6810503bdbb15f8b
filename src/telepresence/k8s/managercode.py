"""The traffic manager's code, packed to run on a stock Python image.

No image of ours has to exist anywhere: by default the manager runs on an official
``python:3.x-slim`` image, and its code travels through the API as zip archives in
ConfigMaps, mounted read-only and put on ``PYTHONPATH`` (``zipimport`` runs them in place,
so the read-only root filesystem needs nothing unpacked). The code is what this client
runs: the ``telepresence`` package and the manager's dependencies, read from the installed
environment. Compiled extensions cannot travel (the image's Python and libc are not the
laptop's), so only ``.py`` sources go: aiohttp, multidict, yarl, frozenlist and propcache
have pure-Python fallbacks, chosen by their ``*_NO_EXTENSIONS`` variables, and msgspec,
which has none, is replaced by ``telepresence.purestruct``, the subset the manager uses.

Packing is pure (files in, archives out) and deterministic: the same sources give the same
bytes, so the digest names the code, and a changed digest is what rolls the pod.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Top-level modules the manager imports beyond the standard library, besides
#: ``telepresence`` and ``msgspec``. A unit test compares this with what importing the
#: manager really loads, so a dependency that grows a new one is caught.
DEPENDENCIES = (
    "aiohappyeyeballs",
    "aiohttp",
    "aiosignal",
    "attr",
    "dns",
    "frozenlist",
    "idna",
    "multidict",
    "propcache",
    "typing_extensions",
    "yarl",
)
#: The pure-Python replacement for msgspec, shipped under msgspec's name.
MSGSPEC_SUBSTITUTE = "telepresence.purestruct"
#: Files of the packages above that the manager never imports: test helpers and a
#: gunicorn worker, which would only add weight.
EXCLUDED = frozenset({"aiohttp/pytest_plugin.py", "aiohttp/test_utils.py", "aiohttp/worker.py"})
#: Environment that selects the pure-Python code paths of the dependencies.
PURE_PYTHON_ENV = {
    "AIOHTTP_NO_EXTENSIONS": "1",
    "FROZENLIST_NO_EXTENSIONS": "1",
    "MULTIDICT_NO_EXTENSIONS": "1",
    "PROPCACHE_NO_EXTENSIONS": "1",
    "YARL_NO_EXTENSIONS": "1",
}
#: A ConfigMap holds at most 1 MiB; archives stay well below, with room for the object.
ARCHIVE_LIMIT = 768 * 1024
#: Any fixed date works; zip cannot store one before 1980.
_EPOCH = (1980, 1, 1, 0, 0, 0)


class CodeError(Exception):
    """The manager's code cannot be collected from this installation; the message names
    the fix (usually: reinstall, or use an image with the code in it)."""


@dataclass(frozen=True)
class SourceFile:
    name: str
    """The path inside the archive, as an import sees it: ``aiohttp/client.py``."""
    data: bytes


@dataclass(frozen=True)
class CodeBundle:
    archives: tuple[bytes, ...]
    """Zip archives, each a ``PYTHONPATH`` entry, in import order."""
    digest: str
    """sha256 over the archives, hex."""

    @property
    def short_digest(self) -> str:
        """Enough to name the ConfigMaps and label them (labels allow 63 characters)."""
        return self.digest[:12]


def _archive(files: Sequence[SourceFile]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for f in files:
            info = zipfile.ZipInfo(f.name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, f.data)
    return buf.getvalue()


def top_level(name: str) -> str:
    return name.split("/", 1)[0].removesuffix(".py")


def pack(files: Iterable[SourceFile], *, limit: int = ARCHIVE_LIMIT) -> CodeBundle:
    """Groups whole top-level modules into archives of at most ``limit`` bytes, in sorted
    order, so one package never spans two archives and the result depends on nothing but
    the files. Raises CodeError when one top-level module alone does not fit."""
    groups: dict[str, list[SourceFile]] = {}
    for f in sorted(files, key=lambda f: f.name):
        groups.setdefault(top_level(f.name), []).append(f)
    archives: list[bytes] = []
    current: list[SourceFile] = []
    size = 0
    for module in sorted(groups):
        # Zip compresses each file on its own, so archives of parts add up (a little over).
        alone = len(_archive(groups[module]))
        if alone > limit:
            raise CodeError(f"the manager's dependency {module} alone is {alone} bytes")
        if current and size + alone > limit:
            archives.append(_archive(current))
            current, size = [], 0
        current.extend(groups[module])
        size += alone
    if current:
        archives.append(_archive(current))
    digest = hashlib.sha256()
    for archive in archives:
        digest.update(hashlib.sha256(archive).digest())
    return CodeBundle(archives=tuple(archives), digest=digest.hexdigest())


def _module_files(module: str, *, rename: str | None = None) -> list[SourceFile]:
    """Every ``.py`` file of an installed top-level module or package, named as the
    archive holds it (under ``rename`` when given)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise CodeError(
            f"the traffic manager needs the Python module {module}, which is not installed "
            "here: reinstall telepresence-py, or pass --manager-image with an image that "
            "contains the manager"
        )
    name = rename or module.rsplit(".", 1)[-1]
    if not spec.submodule_search_locations:
        return [SourceFile(f"{name}.py", Path(spec.origin).read_bytes())]
    root = Path(next(iter(spec.submodule_search_locations)))
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if "__pycache__" in relative:
            continue
        archive_name = f"{name}/{relative}"
        if archive_name not in EXCLUDED:
            found.append(SourceFile(archive_name, path.read_bytes()))
    return found


def collect() -> list[SourceFile]:
    """The manager's sources as this installation has them."""
    files = _module_files("telepresence")
    files += _module_files(MSGSPEC_SUBSTITUTE, rename="msgspec")
    for module in DEPENDENCIES:
        files += _module_files(module)
    return files


def build() -> CodeBundle:
    return pack(collect())
