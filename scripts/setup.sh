#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine (run as root):
# system packages, uv, and the Python environment at /opt/telepresence-dev/venv, which lives
# outside root's home so that devcluster's unprivileged laptop user and its pods can use it.
set -euo pipefail
cd "$(dirname "$0")/.."

# runc, CNI plugins: devcluster's node; mmdebstrap: its images; gcc, libc6-dev, binutils: the
# static pause binary; dbus-daemon: the laptop's system bus in the resolved DNS flavours;
# iperf3: the benchmark suite's kernel-speed far end and client.
packages=(nftables dnsmasq-base sudo dnsutils iproute2 procps psmisc util-linux python3-venv curl
  ca-certificates runc containernetworking-plugins mmdebstrap gcc libc6-dev binutils dbus-daemon
  iperf3)
missing=()
# Installed, not merely known to dpkg (a removed package keeps its config files and status).
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "setup: Go is needed to build the cluster binaries (golang 1.26+)" >&2; exit 1; }

if ! command -v uv >/dev/null; then
  echo "setup: installing uv" >&2
  python3 -m pip install --quiet uv
fi
export UV_PROJECT_ENVIRONMENT=/opt/telepresence-dev/venv
uv sync --frozen --python /usr/bin/python3 --quiet
chmod 755 /opt/telepresence-dev
