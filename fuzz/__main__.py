"""``python -m fuzz``: run the fuzzers, list them, (re)write or check the seed corpus, or
replay inputs (a crash artifact, say) through a harness without atheris.

    python -m fuzz run [TARGET ...] [--runs N] [--max-total-time S] [-- LIBFUZZER-FLAG ...]
    python -m fuzz list
    python -m fuzz corpus [--check]
    python -m fuzz replay TARGET FILE ...
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def default_workdir() -> Path:
    """Outside the repository: libFuzzer writes what it learns into the first corpus
    directory and crash artifacts next to it, and neither belongs in a commit."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "telepresence-fuzz"


@dataclass(frozen=True, slots=True)
class Outcome:
    target: str
    code: int
    inputs: int | None
    seconds: float
    peak_rss_mb: float


def libfuzzer_argv(
    target: str,
    *,
    workdir: Path,
    runs: int | None,
    max_total_time: int | None,
    timeout: int,
    rss_limit_mb: int,
    extra: list[str],
) -> list[str]:
    """The engine's command line: the flags, the work corpus (written), then the seeds
    (only read)."""
    work = workdir / target
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    flags = [
        f"-timeout={timeout}",
        f"-rss_limit_mb={rss_limit_mb}",
        f"-max_len={TARGETS[target].max_len}",
        f"-artifact_prefix={work}/",
        "-print_final_stats=1",
    ]
    if runs is not None:
        flags.append(f"-runs={runs}")
    if max_total_time is not None:
        flags.append(f"-max_total_time={max_total_time}")
    return [
        sys.executable,
        "-m",
        "fuzz.engine",
        target,
        *flags,
        *extra,
        str(work / "corpus"),
        str(CORPUS / target),
    ]


_EXECUTED = re.compile(r"stat::number_of_executed_units:\s*(\d+)")


def run_one(argv: list[str], target: str) -> Outcome:
    """Runs one engine, passing its output through, and measures it: libFuzzer counts the
    inputs, the kernel the peak RSS (``wait4``)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True, errors="replace")
    inputs = None
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        if match := _EXECUTED.search(line):
            inputs = int(match.group(1))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    return Outcome(target, code, inputs, time.monotonic() - started, usage.ru_maxrss / 1024)


def cmd_run(args: argparse.Namespace) -> int:
    outcomes = []
    for target in args.targets or list(TARGETS):
        argv = libfuzzer_argv(
            target,
            workdir=args.workdir,
            runs=args.runs,
            max_total_time=args.max_total_time,
            timeout=args.timeout,
            rss_limit_mb=args.rss_limit_mb,
            extra=args.libfuzzer,
        )
        print(f"fuzz: {target}: {' '.join(argv[3:])}", file=sys.stderr, flush=True)
        outcomes.append(run_one(argv, target))
    print()
    for o in outcomes:
        verdict = "ok" if o.code == 0 else f"FAILED (exit {o.code}; see {args.workdir / o.target})"
        inputs = "?" if o.inputs is None else f"{o.inputs}"
        rate = "" if not o.inputs else f", {o.inputs / o.seconds:.0f}/s"
        print(
            f"{o.target:12} {inputs:>9} inputs in {o.seconds:7.1f} s{rate},"
            f" peak RSS {o.peak_rss_mb:.0f} MB: {verdict}"
        )
    return 0 if all(o.code == 0 for o in outcomes) else 1


def harness(target: str) -> Any:
    return importlib.import_module(f"fuzz.targets.{target}")


def seed_files(target: str) -> dict[str, bytes]:
    seeds: dict[str, bytes] = harness(target).seeds()
    for name in seeds:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name):
            raise ValueError(f"seed name {name!r} of {target}: lower-case letters, digits, . and -")
    return seeds


def cmd_corpus(args: argparse.Namespace) -> int:
    """Writes every target's seeds, replacing what was there; with --check, only says
    whether the files on disk are exactly what the harnesses make."""
    stale = []
    for target in TARGETS:
        want = seed_files(target)
        directory = CORPUS / target
        have = {p.name: p.read_bytes() for p in directory.glob("*")} if directory.is_dir() else {}
        if have == want:
            continue
        stale.append(target)
        if args.check:
            continue
        directory.mkdir(parents=True, exist_ok=True)
        for name in have.keys() - want.keys():
            (directory / name).unlink()
        for name, data in want.items():
            (directory / name).write_bytes(data)
        print(f"fuzz/corpus/{target}: {len(want)} seeds")
    if args.check and stale:
        print(f"stale seed corpus: {', '.join(stale)}; run `python -m fuzz corpus`")
        return 1
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    test_one_input = harness(args.target).TestOneInput
    for path in args.files:
        test_one_input(Path(path).read_bytes())
        print(f"{path}: ok")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for name, target in TARGETS.items():
        print(f"{name:12} {target.about}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run targets one after another under atheris")
    run.add_argument("targets", nargs="*", metavar="TARGET", help="default: every target")
    run.add_argument("--runs", type=int, help="inputs per target (libFuzzer -runs)")
    run.add_argument(
        "--max-total-time", type=int, default=60, help="seconds per target (default 60; 0: none)"
    )
    run.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    run.add_argument("--rss-limit-mb", type=int, default=1024, help="memory limit (MB)")
    run.add_argument("--workdir", type=Path, default=default_workdir(), help="corpus, crashes")
    run.set_defaults(func=cmd_run)

    corpus = sub.add_parser("corpus", help="write the seed corpus from the harnesses")
    corpus.add_argument("--check", action="store_true", help="only check it is up to date")
    corpus.set_defaults(func=cmd_corpus)

    replay = sub.add_parser("replay", help="run files through a harness, without atheris")
    replay.add_argument("target", choices=list(TARGETS))
    replay.add_argument("files", nargs="+")
    replay.set_defaults(func=cmd_replay)

    sub.add_parser("list", help="the targets").set_defaults(func=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Everything after "--" goes to libFuzzer as it is.
    cut = argv.index("--") if "--" in argv else len(argv)
    p = parser()
    args = p.parse_args(argv[:cut])
    if args.command == "run":
        args.libfuzzer = argv[cut + 1 :]
        unknown = [t for t in args.targets if t not in TARGETS]
        if unknown:
            p.error(f"unknown target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
        if args.max_total_time == 0:
            args.max_total_time = None
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
