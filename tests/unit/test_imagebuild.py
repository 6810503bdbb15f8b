"""The manager image's own layer is reproducible: two builds in two empty stores, with the
sources copied and compiled again each time, give the same digests."""

from __future__ import annotations

from pathlib import Path

from devcluster import imagebuild


def test_the_manager_code_layer_builds_to_the_same_digest_twice(tmp_path: Path) -> None:
    recipe = imagebuild.ManagerRecipe.load(imagebuild.MANAGER_RECIPE)
    first = imagebuild.Store(tmp_path / "one").layer(imagebuild.manager_code_layer(recipe))
    second = imagebuild.Store(tmp_path / "two").layer(imagebuild.manager_code_layer(recipe))
    assert first.digest == second.digest
    assert first.diff_id == second.diff_id
    assert first.path.read_bytes() == second.path.read_bytes()
