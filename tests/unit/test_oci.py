"""The OCI writer: layers and archives are byte-for-byte reproducible and form a valid layout."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from devcluster import oci

REFERENCE = "devcluster.local/http-server:1.0"
CONFIG = oci.ImageConfig(
    entrypoint=("python3", "/app/http_server.py"),
    user="1000:1000",
    env=("PATH=/usr/bin:/bin", "PYTHONUNBUFFERED=1"),
    working_dir="/app",
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "app" / "lib").mkdir(parents=True)
    (root / "app" / "main.py").write_text("print('hello')\n")
    (root / "app" / "lib" / "data.bin").write_bytes(bytes(range(256)) * 64)
    (root / "app" / "run.sh").write_text("#!/bin/sh\nexec python3 /app/main.py\n")
    (root / "app" / "run.sh").chmod(0o755)
    (root / "app" / "link").symlink_to("main.py")
    os.link(root / "app" / "main.py", root / "app" / "main-again.py")
    (root / "etc").mkdir()
    (root / "etc" / "shadow").write_text("root:*:1::::::\n")
    return root


def layer(tree: Path, store: Path, **kwargs: Any) -> oci.Layer:
    return oci.write_layer(tree, store=store, **kwargs)


def members(blob: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(blob, "r:gz") as tar:
        return tar.getmembers()


# --- layers -----------------------------------------------------------------


def test_same_tree_same_layer(tree: Path, tmp_path: Path) -> None:
    first = layer(tree, tmp_path / "a")
    second = layer(tree, tmp_path / "b")
    assert (first.digest, first.diff_id, first.size) == (second.digest, second.diff_id, second.size)
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.path.name == first.digest.removeprefix("sha256:")


def test_digests_describe_the_blob(tree: Path, tmp_path: Path) -> None:
    built = layer(tree, tmp_path / "store")
    blob = built.path.read_bytes()
    assert built.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert built.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    assert built.size == len(blob)


def test_content_change_changes_digest(tree: Path, tmp_path: Path) -> None:
    before = layer(tree, tmp_path / "a")
    (tree / "app" / "main.py").write_text("print('bye')\n")
    assert layer(tree, tmp_path / "b").digest != before.digest


def test_mode_change_changes_digest(tree: Path, tmp_path: Path) -> None:
    before = layer(tree, tmp_path / "a")
    (tree / "app" / "main.py").chmod(0o600)
    assert layer(tree, tmp_path / "b").digest != before.digest


def test_mtimes_do_not_matter(tree: Path, tmp_path: Path) -> None:
    before = layer(tree, tmp_path / "a")
    for path in [tree, *tree.rglob("*")]:
        os.utime(path, (1_000_000_000, 1_000_000_000), follow_symlinks=False)
    assert layer(tree, tmp_path / "b").digest == before.digest


def test_entries_sorted_normalised_and_typed(tree: Path, tmp_path: Path) -> None:
    entries = {m.name: m for m in members(layer(tree, tmp_path / "s").path)}
    assert list(entries) == [
        "app",
        "app/lib",
        "app/lib/data.bin",
        "app/link",
        "app/main-again.py",
        "app/main.py",
        "app/run.sh",
        "etc",
        "etc/shadow",
    ]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in entries.values()} == {
        (oci.SOURCE_DATE_EPOCH, 0, 0, "root", "root")
    }
    assert entries["app/run.sh"].mode == 0o755
    assert entries["app/link"].issym() and entries["app/link"].linkname == "main.py"
    # The first name in entry order holds the data, the second links to it.
    assert entries["app/main-again.py"].isfile()
    assert entries["app/main.py"].islnk()
    assert entries["app/main.py"].linkname == "app/main-again.py"


def test_owner_override(tree: Path, tmp_path: Path) -> None:
    built = layer(tree, tmp_path / "s", owners={"etc/shadow": (0, 42)})
    entries = {m.name: m for m in members(built.path)}
    assert (entries["etc/shadow"].uid, entries["etc/shadow"].gid) == (0, 42)
    assert entries["etc/shadow"].gname == ""
    assert (entries["etc"].uid, entries["etc"].gid) == (0, 0)
    assert built.digest != layer(tree, tmp_path / "t").digest


def test_gzip_header_has_no_time_or_name(tree: Path, tmp_path: Path) -> None:
    header = layer(tree, tmp_path / "s").path.read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08"
    assert header[3] == 0  # no FNAME or other optional fields
    assert header[4:8] == b"\0\0\0\0"  # mtime 0


# --- archives ---------------------------------------------------------------


def unpack(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {
            m.name: f.read()
            for m in tar.getmembers()
            if m.isfile() and (f := tar.extractfile(m)) is not None
        }


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(files: dict[str, bytes], digest: str) -> bytes:
    data = files[f"blobs/sha256/{digest.removeprefix('sha256:')}"]
    assert sha(data) == digest
    return data


def test_archive_is_a_valid_oci_layout(tree: Path, tmp_path: Path) -> None:
    layers = [layer(tree, tmp_path / "store")]
    archive = tmp_path / "image.tar"
    digest = oci.write_archive(archive, reference=REFERENCE, config=CONFIG, layers=layers)
    files = unpack(archive)

    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    assert index["mediaType"] == oci.INDEX_TYPE
    (descriptor,) = index["manifests"]
    assert descriptor["digest"] == digest
    assert descriptor["annotations"] == {
        "io.containerd.image.name": REFERENCE,
        "org.opencontainers.image.ref.name": "1.0",
    }
    manifest_bytes = blob(files, digest)
    assert descriptor["size"] == len(manifest_bytes)
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == oci.MANIFEST_TYPE
    assert manifest["config"]["mediaType"] == oci.CONFIG_TYPE
    config = json.loads(blob(files, manifest["config"]["digest"]))
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert config["config"]["User"] == "1000:1000"
    assert config["config"]["Entrypoint"] == ["python3", "/app/http_server.py"]
    assert config["config"]["Env"] == ["PATH=/usr/bin:/bin", "PYTHONUNBUFFERED=1"]
    assert config["config"]["WorkingDir"] == "/app"
    assert "Cmd" not in config["config"]
    (layer_descriptor,) = manifest["layers"]
    (diff_id,) = config["rootfs"]["diff_ids"]
    assert layer_descriptor["mediaType"] == oci.LAYER_TYPE
    layer_bytes = blob(files, layer_descriptor["digest"])
    assert layer_descriptor["size"] == len(layer_bytes)
    assert sha(gzip.decompress(layer_bytes)) == diff_id
    assert config["rootfs"]["type"] == "layers"

    assert oci.manifest_digest(archive) == digest
    assert oci.image_digest(CONFIG, layers) == digest


def test_json_is_canonical(tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    oci.write_archive(archive, reference=REFERENCE, config=CONFIG, layers=[])
    index = unpack(archive)["index.json"]
    assert b" " not in index and b"\n" not in index
    assert index == oci.canonical_json(json.loads(index))


def test_archive_reproducible(tree: Path, tmp_path: Path) -> None:
    built = [layer(tree, tmp_path / "a"), layer(tree, tmp_path / "b")]
    one, two = tmp_path / "one.tar", tmp_path / "two.tar"
    first = oci.write_archive(one, reference=REFERENCE, config=CONFIG, layers=built[:1])
    second = oci.write_archive(two, reference=REFERENCE, config=CONFIG, layers=built[1:])
    assert first == second
    assert one.read_bytes() == two.read_bytes()


def test_config_change_changes_manifest_digest(tree: Path, tmp_path: Path) -> None:
    layers = [layer(tree, tmp_path / "s")]
    other = oci.ImageConfig(entrypoint=CONFIG.entrypoint, env=CONFIG.env, user="0")
    assert oci.image_digest(CONFIG, layers) != oci.image_digest(other, layers)


@pytest.mark.parametrize(
    ("reference", "tag"),
    [
        ("devcluster.local/http-server:1.0", "1.0"),
        ("ghcr.io/telepresence-py/traffic-manager:0.1.0", "0.1.0"),
        ("registry:5000/app", "latest"),
        ("registry:5000/app:v2", "v2"),
    ],
)
def test_tag_of(reference: str, tag: str) -> None:
    assert oci.tag_of(reference) == tag


def test_blob_path_rejects_other_digests(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        oci.blob_path(tmp_path, "sha512:" + "0" * 64)
    assert oci.blob_path(tmp_path, "sha256:" + "a" * 64) == tmp_path / ("a" * 64)


def test_layer_streams_without_leftovers(tree: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    built = layer(tree, store)
    assert [p.name for p in store.iterdir()] == [built.path.name]
    assert io.BytesIO(built.path.read_bytes()).read(2) == b"\x1f\x8b"
