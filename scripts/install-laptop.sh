#!/usr/bin/env bash
# Installs the product for devcluster's laptop user the way the README's Install section
# says (run as root, devcluster up): the wheel built from this checkout with
# `uv tool install` into the user's home, then `sudo telepresence helper install` from it.
set -euo pipefail
cd "$(dirname "$0")/.."
user=tpuser
home=/home/$user
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
uv build --wheel --out-dir "$out" --quiet
UV_TOOL_DIR=$home/.local/share/uv/tools UV_TOOL_BIN_DIR=$home/.local/bin \
  uv tool install --reinstall --python /usr/bin/python3 --quiet "$out"/telepresence_py-*.whl
chown -R "$user:$user" "$home/.local"
# As `sudo "$(command -v telepresence)" helper install` would run it: root, a reset environment.
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin SUDO_USER=$user "$home/.local/bin/telepresence" helper install
