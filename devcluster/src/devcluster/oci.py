"""A small, reproducible OCI image writer: directory trees in, an OCI layout archive out.

devcluster's node runs real containers, so it needs real images, and there is no container
engine or registry here to build them with. Images are cached and compared by digest, so the
same inputs must give the same bytes: every tar entry has a fixed mtime, root ownership unless a
path says otherwise, a sorted position, and the gzip header carries neither a name nor a time.
Nothing here runs a subprocess or touches the network; the recipes live in `imagebuild`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, cast

# 2025-01-01T00:00:00Z: every timestamp an image carries, so that rebuilding changes nothing.
SOURCE_DATE_EPOCH = 1735689600

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
# containerd names an imported image after this annotation (`ctr images import`).
NAME_ANNOTATION = "io.containerd.image.name"
REF_ANNOTATION = "org.opencontainers.image.ref.name"

# Level 6 is gzip's default: level 9 takes twice as long on a rootfs for about 1% less.
_GZIP_LEVEL = 6
_CHUNK = 1 << 20
_Owners = Mapping[str, tuple[int, int]]


@dataclass(frozen=True, kw_only=True)
class Layer:
    """A compressed layer blob on disk, with the two digests an image refers to it by."""

    digest: str  # sha256 of the gzip blob: the manifest's descriptor
    diff_id: str  # sha256 of the uncompressed tar: the config's rootfs.diff_ids
    size: int  # bytes of the gzip blob
    path: Path


@dataclass(frozen=True, kw_only=True)
class ImageConfig:
    """The runtime part of an image config; empty fields are left out, as Docker does."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    user: str = ""
    env: tuple[str, ...] = ()  # "NAME=value", in the order given
    working_dir: str = ""
    exposed_ports: tuple[str, ...] = ()  # "8081/tcp"


def canonical_json(value: Any) -> bytes:
    """The one serialisation used for every JSON blob, so equal content has equal digests."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(store: Path, digest: str) -> Path:
    """Where a blob lives in a store directory: one file per digest, named by its hex."""
    algorithm, _, hex_digest = digest.partition(":")
    if algorithm != "sha256" or len(hex_digest) != 64:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return store / hex_digest


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class _HashingWriter:
    """Hashes and counts what passes through, so a rootfs is digested while it streams."""

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self._sink.write(data)
        return len(data)

    def flush(self) -> None:
        self._sink.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def walk(root: Path, prefix: str = "") -> Iterator[tuple[str, Path, os.stat_result]]:
    """(relative path, path, lstat) below `root`, in a layer's entry order.

    Depth first, parents before children, siblings sorted by their bytes: an order that
    depends on neither the file system nor the locale.
    """
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name.encode("utf-8", "surrogateescape"))
    for entry in entries:
        rel = f"{prefix}{entry.name}"
        st = entry.stat(follow_symlinks=False)
        yield rel, Path(entry.path), st
        if stat.S_ISDIR(st.st_mode):
            yield from walk(Path(entry.path), rel + "/")


def _tarinfo(
    rel: str, path: Path, st: os.stat_result, owners: _Owners, epoch: int
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = epoch
    info.uid, info.gid = owners.get(rel, (0, 0))
    info.uname = "root" if info.uid == 0 else ""
    info.gname = "root" if info.gid == 0 else ""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
    else:
        raise ValueError(f"cannot put {path} in an image: not a file, directory or link")
    return info


def write_layer(
    tree: Path,
    *,
    store: Path,
    owners: _Owners | None = None,
    epoch: int = SOURCE_DATE_EPOCH,
) -> Layer:
    """Pack the contents of `tree` (not `tree` itself) as a gzip layer blob into `store`.

    Ownership is root for every path, except those `owners` maps (relative path -> uid, gid):
    a build's uid is an accident, a Debian rootfs's `shadow` group is not. A file linked more
    than once becomes one file and hard links to it. The tar streams through gzip into a
    temporary file that is renamed to its digest, so memory stays flat and a crash leaves no
    blob under a wrong name.
    """
    owners = owners or {}
    store.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=store, prefix=".layer-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            compressed = _HashingWriter(raw)
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=_GZIP_LEVEL
            ) as gz:
                plain = _HashingWriter(gz)
                _write_tree_tar(plain, tree, owners=owners, epoch=epoch)
        path = blob_path(store, compressed.digest)
        tmp.chmod(0o644)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Layer(digest=compressed.digest, diff_id=plain.digest, size=compressed.size, path=path)


def _write_tree_tar(sink: _HashingWriter, tree: Path, *, owners: _Owners, epoch: int) -> None:
    links: dict[tuple[int, int], str] = {}
    # A stream ("w|") needs only write(); typeshed asks for a whole IO[bytes].
    fileobj = cast(IO[bytes], sink)
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel, path, st in walk(tree):
            info = _tarinfo(rel, path, st, owners, epoch)
            if info.type != tarfile.REGTYPE:
                tar.addfile(info)
                continue
            if st.st_nlink > 1:
                first = links.setdefault((st.st_dev, st.st_ino), rel)
                if first != rel:
                    info.type, info.linkname, info.size = tarfile.LNKTYPE, first, 0
                    tar.addfile(info)
                    continue
            with path.open("rb") as f:
                tar.addfile(info, f)


def created_timestamp(epoch: int = SOURCE_DATE_EPOCH) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def config_json(
    config: ImageConfig, diff_ids: Sequence[str], *, epoch: int = SOURCE_DATE_EPOCH
) -> bytes:
    """The image config blob (OCI image-spec config.md) for amd64 Linux."""
    runtime: dict[str, Any] = {}
    if config.entrypoint:
        runtime["Entrypoint"] = list(config.entrypoint)
    if config.cmd:
        runtime["Cmd"] = list(config.cmd)
    if config.user:
        runtime["User"] = config.user
    if config.env:
        runtime["Env"] = list(config.env)
    if config.working_dir:
        runtime["WorkingDir"] = config.working_dir
    if config.exposed_ports:
        runtime["ExposedPorts"] = {port: {} for port in config.exposed_ports}
    return canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": created_timestamp(epoch),
            "config": runtime,
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        }
    )


def _descriptor(media_type: str, data_digest: str, size: int) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": data_digest, "size": size}


def manifest_json(config_blob: bytes, layers: Sequence[Layer]) -> bytes:
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": _descriptor(CONFIG_TYPE, sha256_digest(config_blob), len(config_blob)),
            "layers": [_descriptor(LAYER_TYPE, layer.digest, layer.size) for layer in layers],
        }
    )


def tag_of(reference: str) -> str:
    """The tag of `host/path:tag`; a colon before the last slash is a registry port, not a tag."""
    last = reference.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else "latest"


def index_json(manifest_blob: bytes, reference: str) -> bytes:
    descriptor = _descriptor(MANIFEST_TYPE, sha256_digest(manifest_blob), len(manifest_blob))
    descriptor["annotations"] = {NAME_ANNOTATION: reference, REF_ANNOTATION: tag_of(reference)}
    descriptor["platform"] = {"architecture": "amd64", "os": "linux"}
    return canonical_json({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": [descriptor]})


def image_blobs(
    config: ImageConfig, layers: Sequence[Layer], *, epoch: int = SOURCE_DATE_EPOCH
) -> tuple[bytes, bytes]:
    """The config and manifest blobs of an image made of `layers`."""
    config_blob = config_json(config, [layer.diff_id for layer in layers], epoch=epoch)
    return config_blob, manifest_json(config_blob, layers)


def image_digest(
    config: ImageConfig, layers: Sequence[Layer], *, epoch: int = SOURCE_DATE_EPOCH
) -> str:
    """The manifest digest `write_archive` would return, without writing anything."""
    return sha256_digest(image_blobs(config, layers, epoch=epoch)[1])


def write_archive(
    path: Path,
    *,
    reference: str,
    config: ImageConfig,
    layers: Sequence[Layer],
    epoch: int = SOURCE_DATE_EPOCH,
) -> str:
    """Write an OCI layout as a tar (what `ctr images import` reads); returns the manifest digest.

    The archive is as reproducible as its layers: fixed entry order, times and owners.
    """
    config_blob, manifest_blob = image_blobs(config, layers, epoch=epoch)
    small = {
        sha256_digest(config_blob): config_blob,
        sha256_digest(manifest_blob): manifest_blob,
    }
    blobs: dict[str, bytes | Path] = {**small, **{layer.digest: layer.path for layer in layers}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}), epoch)
            _add_bytes(tar, "index.json", index_json(manifest_blob, reference), epoch)
            _add_dir(tar, "blobs", epoch)
            _add_dir(tar, "blobs/sha256", epoch)
            for blob_digest in sorted(blobs):
                name = f"blobs/sha256/{blob_digest.removeprefix('sha256:')}"
                content = blobs[blob_digest]
                if isinstance(content, bytes):
                    _add_bytes(tar, name, content, epoch)
                else:
                    info = _plain_info(name, epoch)
                    info.size = content.stat().st_size
                    with content.open("rb") as f:
                        tar.addfile(info, f)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha256_digest(manifest_blob)


def _plain_info(name: str, epoch: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime, info.uname, info.gname = 0o644, epoch, "root", "root"
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, epoch: int) -> None:
    info = _plain_info(name, epoch)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, epoch: int) -> None:
    info = _plain_info(name, epoch)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    tar.addfile(info)


def read_json_member(archive: Path, name: str) -> Any:
    with tarfile.open(archive) as tar:
        member = tar.extractfile(name)
        if member is None:
            raise ValueError(f"{archive}: {name} is not a file")
        return json.loads(member.read())


def manifest_digest(archive: Path) -> str:
    """The digest of an archive's (single) manifest: equal digests mean identical images."""
    index = read_json_member(archive, "index.json")
    return str(index["manifests"][0]["digest"])
