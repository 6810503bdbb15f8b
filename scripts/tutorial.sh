#!/usr/bin/env bash
# The main job: the tutorial, end to end, on devcluster with the sample app (run as root).
# Installs what it needs, starts the cluster, then plays the user story in the laptop
# namespace as its unprivileged user.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export UV_PROJECT_ENVIRONMENT=/opt/telepresence-dev/venv
uv run --frozen devcluster up --sample-app
# The README's Install section, for the laptop user: the wheel, then the root helper.
bash scripts/install-laptop.sh
laptop() { uv run --frozen devcluster laptop -- "$@"; }
step() { printf '\n$ %s\n' "$*"; }

step telepresence connect;  laptop telepresence connect
step telepresence status;   laptop telepresence status
step curl verylargejavaservice.default:8080
laptop curl -sS --max-time 10 verylargejavaservice.default:8080
step telepresence quit;     laptop telepresence quit
step curl verylargejavaservice.default:8080
if laptop curl -sS --max-time 5 verylargejavaservice.default:8080; then
  echo "tutorial: the service is still reachable after quit" >&2; exit 1
fi
echo
echo "tutorial: done (the last curl failed, as it should once disconnected)"
