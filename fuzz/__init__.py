"""Coverage-guided fuzzers (atheris) for everything that parses bytes from outside.

One harness per parser in :mod:`fuzz.targets`, a seed corpus per harness in
``fuzz/corpus/<target>/`` and one command to run them: ``python -m fuzz run``.  See
fuzz/README.md.  Nothing here is imported by the product.
"""
