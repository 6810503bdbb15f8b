#!/usr/bin/env bash
# Builds the devcluster binaries from Go modules the module proxy serves, and caches
# them by version under $DEVCLUSTER_CACHE (default ~/.cache/devcluster). A component
# whose binaries are present is never rebuilt. Progress goes to stderr.
set -euo pipefail

K8S_VERSION=${DEVCLUSTER_K8S_VERSION:-v1.36.3}
ETCD_VERSION=${DEVCLUSTER_ETCD_VERSION:-v3.6.16}
COREDNS_VERSION=${DEVCLUSTER_COREDNS_VERSION:-v1.14.7}
CONTAINERD_VERSION=${DEVCLUSTER_CONTAINERD_VERSION:-v2.4.2}
CACHE=${DEVCLUSTER_CACHE:-$HOME/.cache/devcluster}

export GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build
export GOTOOLCHAIN=local GOFLAGS=-mod=mod GOWORK=off CGO_ENABLED=0 GOPROXY=${GOPROXY:-https://proxy.golang.org}
export GONOSUMDB= GOFLAGS=-mod=mod
TAGS=selinux,notest,grpcnotrace
START=$(date +%s)

say() { echo "devcluster build [$(( $(date +%s) - START ))s] $*" >&2; }

# Runs a long command while printing a heartbeat, so a cold build visibly progresses.
with_progress() {
  local what=$1; shift
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30 &
    wait $! || true
    kill -0 "$pid" 2>/dev/null && say "$what: still building"
  done
  wait "$pid"
}

build_kubernetes() {
  local out=$CACHE/bin/kubernetes-$K8S_VERSION
  if [[ -x $out/kube-apiserver && -x $out/kubectl && -x $out/kube-controller-manager && -x $out/kube-scheduler && -x $out/kubelet && -x $out/kube-proxy && -x $out/pause ]]; then
    say "kubernetes $K8S_VERSION: cached in $out"; return
  fi
  local mod=$CACHE/src/kubernetes-$K8S_VERSION
  mkdir -p "$mod" "$out"
  local gomod
  gomod=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local patch=${K8S_VERSION##*.}
  {
    echo "module devcluster.local/kubernetes"
    echo
    echo "go 1.26.0"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    # Every staging module k8s.io/X is replaced by its published tag v0.<minor>.<patch>.
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk -v v="v0.$minor.$patch" '{print "replace " $1 " => " $1 " " v}'
  } > "$mod/go.mod"
  cat > "$mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO
  say "kubernetes $K8S_VERSION: resolving modules"
  (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true)
  local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
    [[ -x $out/$cmd ]] && continue
    say "kubernetes $K8S_VERSION: building $cmd"
    (cd "$mod" && with_progress "$cmd" go build -trimpath -tags "$TAGS" -ldflags "$ld" -o "$out/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
    mv "$out/$cmd.tmp" "$out/$cmd"
  done
  # The sandbox ("pause") image's binary, from the same module's source, as upstream builds it.
  local src
  src=$(cd "$mod" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)
  gcc -Os -Wall -Werror -static -DVERSION="$K8S_VERSION" -o "$out/pause.tmp" "$src/build/pause/linux/pause.c"
  strip "$out/pause.tmp"
  mv "$out/pause.tmp" "$out/pause"
  say "kubernetes $K8S_VERSION: done"
}

build_etcd() {
  local out=$CACHE/bin/etcd-$ETCD_VERSION
  if [[ -x $out/etcd ]]; then say "etcd $ETCD_VERSION: cached"; return; fi
  local mod=$CACHE/src/etcd-$ETCD_VERSION
  mkdir -p "$mod" "$out"
  (cd "$mod" && { [[ -f go.mod ]] || go mod init devcluster.local/etcd >/dev/null 2>&1; } && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1)
  say "etcd $ETCD_VERSION: building"
  (cd "$mod" && with_progress etcd go build -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$out/etcd.tmp" "$out/etcd"
}

build_coredns() {
  local out=$CACHE/bin/coredns-$COREDNS_VERSION
  if [[ -x $out/coredns ]]; then say "coredns $COREDNS_VERSION: cached"; return; fi
  local mod=$CACHE/src/coredns-$COREDNS_VERSION
  mkdir -p "$mod" "$out"
  cat > "$mod/main.go" <<'GO'
// A CoreDNS with only the plugins devcluster uses, so it builds without every cloud SDK.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/template"
)

// The order in which plugins handle a query, as in CoreDNS's plugin.cfg.
var directives = []string{"bind", "errors", "log", "cache", "template", "hosts", "kubernetes", "forward"}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
GO
  (cd "$mod" && { [[ -f go.mod ]] || go mod init devcluster.local/coredns >/dev/null 2>&1; } && go get "github.com/coredns/coredns@$COREDNS_VERSION" >/dev/null 2>&1 && go mod tidy >/dev/null 2>&1)
  say "coredns $COREDNS_VERSION: building"
  (cd "$mod" && with_progress coredns go build -trimpath -ldflags "-s -w" -o "$out/coredns.tmp" .)
  mv "$out/coredns.tmp" "$out/coredns"
}

build_containerd() {
  local out=$CACHE/bin/containerd-$CONTAINERD_VERSION
  if [[ -x $out/containerd && -x $out/containerd-shim-runc-v2 && -x $out/ctr ]]; then
    say "containerd $CONTAINERD_VERSION: cached"; return
  fi
  mkdir -p "$out"
  say "containerd $CONTAINERD_VERSION: building"
  local v=${CONTAINERD_VERSION#v}
  with_progress containerd env GOBIN="$out" go install -trimpath \
    -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$v" \
    "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION"
}

what=${1:-all}
case $what in
  all) build_etcd; build_coredns; build_kubernetes; build_containerd ;;
  containerd) build_containerd ;;
  kubernetes) build_kubernetes ;;
  etcd) build_etcd ;;
  coredns) build_coredns ;;
  *) echo "usage: $0 [all|kubernetes|etcd|coredns|containerd]" >&2; exit 2 ;;
esac
say "binaries ready in $CACHE/bin"
