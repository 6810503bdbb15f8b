"""The fuzzers' smoke test (fuzz/README.md): every seed through its harness, in process;
the seed corpus exactly as the harnesses make it; each harness under atheris, briefly.

The long runs (a million inputs per target) are not for CI; these keep the harnesses,
the corpus and the command working, and replay every input that found a bug (the
``regress-`` seeds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.__main__ import CORPUS, harness, seed_files
from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_seed_passes_its_harness(target: str) -> None:
    seeds = sorted((CORPUS / target).iterdir())
    assert len(seeds) >= 5
    test_one_input = harness(target).TestOneInput
    for path in seeds:
        test_one_input(path.read_bytes())


@pytest.mark.parametrize("target", list(TARGETS))
def test_the_seed_corpus_is_what_the_harnesses_make(target: str) -> None:
    on_disk = {p.name: p.read_bytes() for p in (CORPUS / target).iterdir()}
    assert on_disk == seed_files(target), "stale: run `python -m fuzz corpus`"


@pytest.mark.parametrize("target", list(TARGETS))
def test_each_target_runs_under_atheris(target: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        # This checkout's code, whichever the environment's editable install points at.
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "devcluster" / "src")]),
    }
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz",
            "run",
            target,
            "--runs",
            "3000",
            "--max-total-time",
            "60",
            "--workdir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert "Done 3000 runs" in run.stderr, run.stderr[-4000:]
    assert f"{target}" in run.stdout and ": ok" in run.stdout, run.stdout
    assert not list(tmp_path.glob(f"{target}/crash-*"))
