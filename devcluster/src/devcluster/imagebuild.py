"""The recipes of devcluster's container images, and the cache that makes rebuilding free.

The node runs real containers, but there is no container engine or registry: every image is
a Debian base layer made by mmdebstrap plus layers packed from directories (`oci`), written as
an OCI archive for `ctr images import`. Each layer is cached under a key that hashes everything
that goes into it, and each image under the hash of its layer keys and config, so a second build
runs no mmdebstrap, no pip, and writes nothing, and any build of the same inputs has the same
manifest digest.

    python -m devcluster.imagebuild [--out DIR] [NAME...]
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import telepresence
from devcluster import images, oci
from devcluster.settings import Settings

PYTHON_BASE_IMAGE = images.PYTHON_BASE_IMAGE
BASE_SUITE = "bookworm"
BASE_VARIANT = "minbase"
BASE_PACKAGES = ("python3", "ca-certificates")
# Bump when the trim rules or anything else about how a base rootfs is made changes: it is part
# of the base layer's cache key, so the next build makes a new one.
TRIM_VERSION = 1
# dpkg filters, permanent in the image so that a later apt-get install stays trimmed as well.
# Copyright files stay: they are small and the licences ask for them.
DPKG_TRIM = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
)
# Left by mmdebstrap in the rootfs; the runtime provides /dev, /etc/hostname and resolv.conf.
TRIM_PATHS = (
    "dev/*",
    "etc/hostname",
    "etc/resolv.conf",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/cache/apt/*.bin",
    "var/lib/apt/lists/*",
    "var/log/apt/*",
)
# Bump when how the app or manager layers are made changes (pip clean-up, compileall flags).
LAYER_VERSION = 1
BASE_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8")
APP_ENV = ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1")
# The test servers run as this numeric user: no passwd entry needed, and runAsNonRoot holds.
APP_USER = "1000:1000"
HOST_PYTHON = "/usr/bin/python3"
# The repository: devcluster/src/devcluster/imagebuild.py -> the root.
REPO = Path(__file__).resolve().parents[3]
MANAGER_RECIPE = REPO / "deploy" / "manager-image.toml"

_Owners = Mapping[str, tuple[int, int]]


class BuildError(Exception):
    """A build step failed; the message says which and what to do."""


def say(message: str) -> None:
    """Progress on stderr: the base takes a minute or more, and silence looks like a hang."""
    print(f"imagebuild: {message}", file=sys.stderr, flush=True)


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class LayerRecipe:
    """How to fill a directory with a layer's contents, and the hash of all of its inputs."""

    name: str
    key: str
    make: Callable[[Path], _Owners | None]


@dataclass(frozen=True, kw_only=True)
class ImageRecipe:
    reference: str
    layers: tuple[LayerRecipe, ...]
    config: oci.ImageConfig
    # Run before the archive is written, to fail the build rather than the pod.
    verify: Callable[[Store], None] | None = None

    @property
    def archive_name(self) -> str:
        repository, _, _ = self.reference.rpartition(":")
        return f"{repository.rsplit('/', 1)[-1]}-{oci.tag_of(self.reference)}.oci.tar"

    def matches(self, name: str) -> bool:
        """A CLI name: the full reference, `repo-basename:tag`, or `repo-basename`."""
        short = self.reference.rsplit("/", 1)[-1]
        return name in (self.reference, short, short.rpartition(":")[0])


@dataclass(frozen=True)
class Store:
    """The on-disk cache: blobs by digest, layer records by key, scratch space for builds."""

    root: Path

    @property
    def blobs(self) -> Path:
        return self.root / "blobs" / "sha256"

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    @property
    def requirements(self) -> Path:
        return self.root / "requirements"

    @property
    def scratch(self) -> Path:
        return self.root / "tmp"

    def layer(self, recipe: LayerRecipe) -> oci.Layer:
        """The cached layer for the recipe's key, built first if it is missing."""
        record = self.layers / f"{recipe.key}.json"
        if record.exists():
            saved = json.loads(record.read_text())
            path = oci.blob_path(self.blobs, saved["digest"])
            if path.exists():
                return oci.Layer(
                    digest=saved["digest"], diff_id=saved["diff_id"], size=saved["size"], path=path
                )
        self.scratch.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=self.scratch, prefix=f"{recipe.name}-"))
        try:
            tree = work / "tree"
            tree.mkdir()
            started = time.monotonic()
            say(f"{recipe.name}: preparing")
            owners = recipe.make(tree)
            say(f"{recipe.name}: packing")
            layer = oci.write_layer(tree, store=self.blobs, owners=owners)
            say(
                f"{recipe.name}: {layer.digest[:19]} {layer.size / 1e6:.1f} MB "
                f"in {time.monotonic() - started:.0f} s"
            )
        finally:
            _remove_tree(work)
        _write_atomically(
            record,
            oci.canonical_json(
                {"digest": layer.digest, "diff_id": layer.diff_id, "size": layer.size}
            ),
        )
        return layer


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _check_unmounted(path: Path) -> None:
    """Refuse to delete in a tree with a mount inside: a chroot's /dev may be the host's."""
    inside = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        mounted = [line.split()[4] for line in f if line.split()[4].startswith(inside)]
    if mounted:
        raise BuildError(f"not deleting in {path}: {mounted[0]} is still mounted; unmount it")


def _remove_tree(path: Path) -> None:
    _check_unmounted(path)
    shutil.rmtree(path)


def _run(cmd: Sequence[str], *, what: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, check=True, text=True, **kwargs)
    except FileNotFoundError as e:
        raise BuildError(f"{what}: {cmd[0]} not found (scripts/setup.sh installs it)") from e
    except subprocess.CalledProcessError as e:
        detail = (e.stderr or "").strip().splitlines()[-1:] or [f"exit status {e.returncode}"]
        raise BuildError(f"{what} failed: {detail[0]}") from e


# --- the Debian base -------------------------------------------------------------------------


def host_apt_sources(suite: str) -> list[str]:
    """The host's apt source files that name the suite, so the base uses the same mirror.

    mmdebstrap pastes each file into the rootfs's sources.list; files for other suites or
    third-party repositories (whose keys the rootfs lacks) are left out. With none, mmdebstrap
    falls back to deb.debian.org with the updates and security suites.
    """
    etc = Path("/etc/apt")
    candidates = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.sources"))]
    candidates += sorted((etc / "sources.list.d").glob("*.list"))
    names_suite = re.compile(rf"(^|\s){re.escape(suite)}(-[a-z]+)?(\s|$)")
    found = []
    for path in candidates:
        if not path.is_file():
            continue
        lines = [
            line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
        ]
        if any(names_suite.search(line) for line in lines):
            found.append(str(path))
    return found


def _owners_in(tree: Path) -> dict[str, tuple[int, int]]:
    """Paths not owned by root:root (shadow, utmp, mail...), which the layer must keep."""
    owners = {}
    for rel, _, st in oci.walk(tree):
        if st.st_uid or st.st_gid:
            owners[rel] = (st.st_uid, st.st_gid)
    return owners


def base_layer(*, suite: str = BASE_SUITE, packages: Sequence[str] = BASE_PACKAGES) -> LayerRecipe:
    """A minimal Debian rootfs with the given packages, trimmed of docs, locales and caches."""
    wanted = sorted(set(packages))

    def make(tree: Path) -> _Owners:
        if shutil.which("mmdebstrap") is None:
            raise BuildError("mmdebstrap not found: apt-get install mmdebstrap (scripts/setup.sh)")
        sources = host_apt_sources(suite)
        say(
            f"base: mmdebstrap {suite} {BASE_VARIANT} +{','.join(wanted)}"
            f" from {sources or 'the default mirror'}"
        )
        cmd = [
            "mmdebstrap",
            f"--variant={BASE_VARIANT}",
            f"--include={','.join(wanted)}",
            "--format=directory",
            *(f"--dpkgopt={rule}" for rule in DPKG_TRIM),
            suite,
            str(tree),
            *sources,
        ]
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(oci.SOURCE_DATE_EPOCH)}
        _run(cmd, what="mmdebstrap", env=env)
        _remove_tree_contents(tree, TRIM_PATHS)
        return _owners_in(tree)

    return LayerRecipe(
        name="base",
        key=_key("debian-base", suite, BASE_VARIANT, *wanted, f"trim-{TRIM_VERSION}"),
        make=make,
    )


def _remove_tree_contents(tree: Path, patterns: Sequence[str]) -> None:
    _check_unmounted(tree)
    for pattern in patterns:
        for path in sorted(tree.glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


# --- layers from this repository -------------------------------------------------------------


def _copy_sources(source: Path, target: Path) -> None:
    """Copy a package's sources, without caches or tests (modes are normalised afterwards)."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        if not _is_source(entry):
            continue
        if entry.is_dir():
            _copy_sources(entry, target / entry.name)
        else:
            shutil.copyfile(entry, target / entry.name)


def _normalise_modes(tree: Path) -> None:
    """Modes 0644/0755 whatever the umask of the checkout or of pip was."""
    for root, dirs, files in os.walk(tree):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, 0o755 if executable else 0o644)
    os.chmod(tree, 0o755)


def _is_source(path: Path) -> bool:
    return path.name not in ("__pycache__", "tests") and path.suffix not in (".pyc", ".pyo")


def _tree_hash(root: Path) -> str:
    """The content of a source tree as the copy sees it: paths, exec bits and bytes."""
    digest = hashlib.sha256()
    for path in _source_files(root):
        digest.update(f"{path.relative_to(root)}\0{os.access(path, os.X_OK)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _source_files(root: Path) -> Iterator[Path]:
    for entry in sorted(root.iterdir()):
        if not _is_source(entry):
            continue
        if entry.is_dir():
            yield from _source_files(entry)
        else:
            yield entry


# Source in devcluster/images -> file in /app. Not /app/http.py: Python puts the script's
# directory first on sys.path, and a script named http.py hides the stdlib's http package.
APP_SCRIPTS = {"http.py": "http_server.py", "echo.py": "echo_server.py"}


def app_layer() -> LayerRecipe:
    """The stdlib-only test servers under /app: one layer shared by four images."""
    sources = Path(images.__file__).parent

    def make(tree: Path) -> None:
        app = tree / "app"
        app.mkdir()
        for source, target in sorted(APP_SCRIPTS.items()):
            shutil.copyfile(sources / source, app / target)
        _normalise_modes(tree)

    parts = [
        f"{target}:{hashlib.sha256((sources / source).read_bytes()).hexdigest()}"
        for source, target in sorted(APP_SCRIPTS.items())
    ]
    return LayerRecipe(name="app", key=_key("app", str(LAYER_VERSION), *parts), make=make)


def _compile(tree: Path, directory: Path) -> None:
    """Write .pyc files that need no source check, so a read-only root never recompiles.

    unchecked-hash pycs do not depend on file times, and a fixed hash seed keeps frozenset
    constants in the same order, so the bytes are the same on every build.
    """
    env = {**os.environ, "PYTHONHASHSEED": "0", "SOURCE_DATE_EPOCH": str(oci.SOURCE_DATE_EPOCH)}
    cmd = [
        HOST_PYTHON,
        "-m",
        "compileall",
        "-q",
        "-f",
        "-j0",
        "--invalidation-mode",
        "unchecked-hash",
        "-s",
        str(tree),
        "-p",
        "/",
        str(directory),
    ]
    _run(cmd, what="compileall", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _check_host_python(version: str) -> None:
    out = _run(
        [HOST_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        what="host python",
        capture_output=True,
    ).stdout.strip()
    if out != version:
        raise BuildError(
            f"{HOST_PYTHON} is Python {out} but the image's is {version}:"
            " the .pyc files it compiles would not load"
        )


def _pip_clean(target: Path) -> None:
    """Drop what pip writes about this install rather than about the package."""
    dropped = {"INSTALLER", "REQUESTED", "direct_url.json"}
    shutil.rmtree(target / "bin", ignore_errors=True)
    for info in sorted(target.glob("*.dist-info")):
        for name in dropped:
            (info / name).unlink(missing_ok=True)
        record = info / "RECORD"
        if record.exists():
            kept = [
                line
                for line in record.read_text().splitlines()
                if line.split(",", 1)[0].rsplit("/", 1)[-1] not in dropped
                and not line.startswith("../")
            ]
            record.write_text("".join(f"{line}\n" for line in kept))


def locked_requirements(repo: Path, roots: Sequence[str], *, cache: Path) -> list[str]:
    """The `name==version ; marker` lines uv.lock pins for `roots` and all they depend on.

    Kept in `cache` by the lock file's hash, so that a warm build needs no `uv` on PATH.
    """
    lock = (repo / "uv.lock").read_bytes()
    saved = cache / f"{_key(hashlib.sha256(lock).hexdigest(), *sorted(roots))}.txt"
    if saved.exists():
        return saved.read_text().splitlines()
    out = _run(
        [
            "uv",
            "export",
            "--frozen",
            "--no-dev",
            "--no-emit-project",
            "--no-hashes",
            "--no-header",
            "--format",
            "requirements-txt",
        ],
        what="uv export",
        cwd=repo,
        capture_output=True,
    ).stdout
    selected = select_requirements(out, roots)
    _write_atomically(saved, "".join(f"{line}\n" for line in selected).encode())
    return selected


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def select_requirements(exported: str, roots: Sequence[str]) -> list[str]:
    """From `uv export` text, the lines needed by `roots`, following its `# via` comments."""
    lines: dict[str, str] = {}
    parents: dict[str, set[str]] = {}
    current = ""
    for raw in exported.splitlines():
        line = raw.strip()
        if not line:
            continue
        if not raw.startswith(" "):
            match = re.match(r"[A-Za-z0-9._-]+", line)
            if match is None or line.startswith(("#", "-")):
                continue
            current = _normal(match.group())
            lines[current] = line
            parents[current] = set()
        elif current and line.startswith("#"):
            via = line.lstrip("#").strip().removeprefix("via").strip()
            if via:
                parents[current].add(_normal(via))
    missing = {_normal(root) for root in roots} - lines.keys()
    if missing:
        raise BuildError(f"not in uv.lock's runtime dependencies: {', '.join(sorted(missing))}")
    needed = {_normal(root) for root in roots}
    while True:
        more = {name for name, via in parents.items() if via & needed} - needed
        if not more:
            return [lines[name] for name in sorted(needed)]
        needed |= more


@dataclass(frozen=True, kw_only=True)
class ManagerRecipe:
    """deploy/manager-image.toml, read."""

    repository: str
    debian_packages: tuple[str, ...]
    python: str
    install_dir: str
    packages: tuple[str, ...]
    requirements: tuple[str, ...]
    entrypoint: tuple[str, ...]
    user: str
    exposed_ports: tuple[str, ...]
    env: tuple[str, ...]

    @classmethod
    def load(cls, path: Path) -> ManagerRecipe:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise BuildError(f"cannot read the manager's recipe: {e}") from e
        return cls(
            repository=data["repository"],
            debian_packages=tuple(data["debian_packages"]),
            python=data["python"],
            install_dir=data["install_dir"],
            packages=tuple(data["packages"]),
            requirements=tuple(data["requirements"]),
            entrypoint=tuple(data["entrypoint"]),
            user=data["user"],
            exposed_ports=tuple(data.get("exposed_ports", ())),
            env=tuple(f"{name}={value}" for name, value in data.get("env", {}).items()),
        )


def manager_dependencies_layer(recipe: ManagerRecipe, requirements: Sequence[str]) -> LayerRecipe:
    """The manager's third-party packages, installed from wheels only and precompiled."""

    def make(tree: Path) -> None:
        _check_host_python(recipe.python)
        target = tree / recipe.install_dir.lstrip("/")
        target.mkdir(parents=True)
        pinned = tree.parent / "requirements.txt"
        pinned.write_text("".join(f"{line}\n" for line in requirements))
        say(f"manager-deps: pip install {len(requirements)} pinned packages")
        _run(
            [
                HOST_PYTHON,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--no-compile",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--root-user-action=ignore",
                "--target",
                str(target),
                "-r",
                str(pinned),
            ],
            what="pip install",
            capture_output=True,
        )
        _pip_clean(target)
        _compile(tree, target)
        _normalise_modes(tree)

    return LayerRecipe(
        name="manager-deps",
        key=_key(
            "manager-deps", str(LAYER_VERSION), recipe.python, recipe.install_dir, *requirements
        ),
        make=make,
    )


def manager_code_layer(recipe: ManagerRecipe) -> LayerRecipe:
    """This project's packages, copied from src/ without caches or tests, and precompiled."""
    src = Path(telepresence.__file__).parent.parent
    hashes = [f"{name}:{_tree_hash(src / name)}" for name in recipe.packages]

    def make(tree: Path) -> None:
        _check_host_python(recipe.python)
        target = tree / recipe.install_dir.lstrip("/")
        for name in recipe.packages:
            _copy_sources(src / name, target / name)
        _compile(tree, target)
        _normalise_modes(tree)

    return LayerRecipe(
        name="manager-code",
        key=_key("manager-code", str(LAYER_VERSION), recipe.python, recipe.install_dir, *hashes),
        make=make,
    )


def _check_imports(store: Store, layers: Sequence[LayerRecipe], install_dir: str) -> None:
    """Import the manager from its own layers, without site-packages.

    A dependency missing from the recipe's list then fails the build, not the pod.
    """
    say("manager: import check")
    store.scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.scratch) as scratch:
        root = Path(scratch)
        for recipe in layers:
            layer = store.layer(recipe)
            _run(["tar", "-xzf", str(layer.path), "-C", str(root)], what="unpack layer")
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "import telepresence.manager.server, telepresence.manager.runtime"
        )
        path = str(root / install_dir.lstrip("/"))
        _run(
            [HOST_PYTHON, "-S", "-E", "-c", code, path],
            what="manager import check",
            capture_output=True,
        )


# --- the images ------------------------------------------------------------------------------


def pause_layer(binary: Path) -> LayerRecipe:
    """The sandbox image's one file: the pause binary built with the Kubernetes binaries."""

    def make(tree: Path) -> None:
        shutil.copyfile(binary, tree / "pause")
        (tree / "pause").chmod(0o755)

    return LayerRecipe(
        name="pause",
        key=_key("pause", str(LAYER_VERSION), hashlib.sha256(binary.read_bytes()).hexdigest()),
        make=make,
    )


def recipes(
    store: Store, *, pause_binary: Path, manager: ManagerRecipe | None = None
) -> list[ImageRecipe]:
    """Every image devcluster runs, under the exact references its manifests use."""
    base = base_layer()
    app = app_layer()

    def server(reference: str, *entrypoint: str) -> ImageRecipe:
        config = oci.ImageConfig(
            entrypoint=("python3", *entrypoint),
            user=APP_USER,
            env=(*BASE_ENV, *APP_ENV),
            working_dir="/app",
        )
        return ImageRecipe(reference=reference, layers=(base, app), config=config)

    manager = manager or ManagerRecipe.load(MANAGER_RECIPE)
    own_layers = (
        manager_dependencies_layer(
            manager, locked_requirements(REPO, manager.requirements, cache=store.requirements)
        ),
        manager_code_layer(manager),
    )
    manager_reference = f"{manager.repository}:{telepresence.__version__}"
    if manager_reference != images.MANAGER_IMAGE:
        raise BuildError(
            f"{MANAGER_RECIPE.name} builds {manager_reference}"
            f" but devcluster runs {images.MANAGER_IMAGE}"
        )
    manager_config = oci.ImageConfig(
        entrypoint=manager.entrypoint,
        user=manager.user,
        env=(*BASE_ENV, *manager.env),
        exposed_ports=manager.exposed_ports,
    )
    return [
        ImageRecipe(
            reference=images.PAUSE_IMAGE,
            layers=(pause_layer(pause_binary),),
            # The uid and gid kubeadm's pause image runs as: nobody's.
            config=oci.ImageConfig(entrypoint=("/pause",), user="65535:65535"),
        ),
        ImageRecipe(
            reference=PYTHON_BASE_IMAGE,
            layers=(base,),
            config=oci.ImageConfig(cmd=("python3",), env=BASE_ENV),
        ),
        server(images.HTTP_IMAGE, "/app/http_server.py"),
        server(images.TCP_ECHO_IMAGE, "/app/echo_server.py", "--protocol", "tcp"),
        server(images.UDP_ECHO_IMAGE, "/app/echo_server.py", "--protocol", "udp"),
        server(
            images.SAMPLE_APP_IMAGE,
            "/app/http_server.py",
            "--title",
            "Welcome to the EdgyCorp WebApp",
        ),
        ImageRecipe(
            reference=manager_reference,
            layers=(base_layer(packages=manager.debian_packages), *own_layers),
            config=manager_config,
            verify=lambda store: _check_imports(store, own_layers, manager.install_dir),
        ),
    ]


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One build at a time per cache: two would race on the same scratch and records."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_image(store: Store, recipe: ImageRecipe, *, out: Path) -> tuple[Path, str]:
    """The image's archive and manifest digest, written only when that digest is new.

    Layers come from the cache, so the digest costs a few small reads; an archive whose record
    names the same digest is the same image, byte for byte.
    """
    archive = out / recipe.archive_name
    record = archive.with_name(archive.name.removesuffix(".tar") + ".json")
    layers = [store.layer(layer) for layer in recipe.layers]
    digest = oci.image_digest(recipe.config, layers)
    if (
        archive.exists()
        and record.exists()
        and json.loads(record.read_text()).get("manifest") == digest
    ):
        return archive, digest
    if recipe.verify is not None:
        recipe.verify(store)
    say(f"writing {archive}")
    written = oci.write_archive(
        archive, reference=recipe.reference, config=recipe.config, layers=layers
    )
    _write_atomically(
        record,
        oci.canonical_json({"manifest": written, "reference": recipe.reference}),
    )
    return archive, written


def build_all(
    settings: Settings, *, out: Path | None = None, names: Sequence[str] = ()
) -> dict[str, tuple[Path, str]]:
    """Build (or find cached) the named images, all by default: reference -> (archive, digest)."""
    store = Store(settings.paths.cache / "images")
    out = out or store.root / "archives"
    selected = recipes(store, pause_binary=settings.binary("pause"))
    if names:
        unknown = [n for n in names if not any(r.matches(n) for r in selected)]
        if unknown:
            known = ", ".join(r.reference for r in selected)
            raise BuildError(f"unknown image {unknown[0]!r}; known: {known}")
        selected = [r for r in selected if any(r.matches(n) for n in names)]
    with _locked(store.root):
        return {r.reference: build_image(store, r, out=out) for r in selected}


def build(settings: Settings, *, out: Path | None = None) -> dict[str, Path]:
    """Every image's archive, by reference, for `ctr -n k8s.io images import`."""
    return {ref: archive for ref, (archive, _) in build_all(settings, out=out).items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.imagebuild", description=__doc__)
    parser.add_argument("--out", type=Path, help="archive directory (default: the cache)")
    parser.add_argument("names", nargs="*", metavar="NAME", help="e.g. http-server; default all")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        built = build_all(Settings(), out=args.out, names=args.names)
    except BuildError as e:
        print(f"imagebuild: {e}", file=sys.stderr)
        return 1
    for reference, (archive, digest) in built.items():
        print(f"{reference}\t{digest}\t{archive}")
    say(f"done in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
