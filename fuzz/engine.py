"""One target under atheris: ``python -m fuzz.engine TARGET [libFuzzer flags] [CORPUS ...]``.

Started by ``python -m fuzz run``, one process per target: libFuzzer exits the process when
it is done, and a crash must not take the other targets with it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any, cast

from fuzz.targets import TARGETS


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz.engine {{{','.join(TARGETS)}}} [libFuzzer args]")
    name = argv[1]
    import atheris  # type: ignore[import-untyped]  # no type information shipped

    # Imported inside the hook, so the code under test reports coverage to libFuzzer.
    with atheris.instrument_imports(include=list(TARGETS[name].instrument)):
        module: Any = importlib.import_module(f"fuzz.targets.{name}")
    test_one_input = cast(Callable[[bytes], None], module.TestOneInput)
    atheris.Setup([argv[0], *argv[2:]], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
