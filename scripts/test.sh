#!/usr/bin/env bash
# The test command (README): lint, types, then every test, end to end on devcluster included.
# Run as root: the end-to-end tests create network namespaces. Nothing may be skipped in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
export UV_PROJECT_ENVIRONMENT=/opt/telepresence-dev/venv
uv run --frozen ruff check src devcluster/src tests bench fuzz
uv run --frozen ruff format --check src devcluster/src tests bench fuzz
uv run --frozen mypy
# Building the cluster binaries is the long part of a cold run; do it before the clock of
# any test starts, with its progress on the console.
uv run --frozen devcluster up --sample-app
uv run --frozen pytest "$@"
