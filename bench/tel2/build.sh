#!/usr/bin/env bash
# Build Telepresence 2 (client "telepresence" and manager/agent "traffic") at
# a pinned version from the Go module proxy, into a cache directory outside
# the repository. Reuses the binaries when both are already there.
# The last line on stdout is the directory that holds the binaries.
#
# Environment:
#   TEL2_CACHE       cache root (default: $HOME/.cache/telepresence-bench/tel2)
#   TEL2_K8S_DEFS    optional path to a JSON file {"definitions": {...}} of
#                    Kubernetes schemas to embed as the chart's k8s-defs.json;
#                    without it a permissive placeholder is embedded (README.md)
#   GOFLAGS, GOMAXPROCS, GOPROXY, ...   passed to the go command as usual
#                    (e.g. GOFLAGS=-p=1 GOMAXPROCS=1 on a busy machine)
set -euo pipefail

readonly TEL2_VERSION=v2.27.4
readonly TEL2_MODULE=github.com/telepresenceio/telepresence/v2
readonly MIN_GO_MINOR=26
readonly ENV_MODULE=github.com/caarlos0/env/v11
readonly ENV_VERSION=v11.4.0
readonly ENV_PATCH=caarlos0-env-v11.4.0-funcmap-first.patch

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${TEL2_CACHE:-$HOME/.cache/telepresence-bench/tel2}
[[ $cache_root == /* ]] || cache_root=$PWD/$cache_root
out=$cache_root/$TEL2_VERSION
if [[ -n ${TEL2_K8S_DEFS:-} && $TEL2_K8S_DEFS != /* ]]; then
	TEL2_K8S_DEFS=$PWD/$TEL2_K8S_DEFS
fi

log() { printf 'tel2-build: %s\n' "$*" >&2; }

if [[ -x $out/telepresence && -x $out/traffic ]]; then
	log "reusing $out"
	echo "$out"
	exit 0
fi

for tool in go git; do
	command -v "$tool" >/dev/null || { log "$tool is not on PATH"; exit 1; }
done
go_version=$(go env GOVERSION)
go_minor=$(sed -E 's/^go1\.([0-9]+).*/\1/' <<<"$go_version")
if ! [[ $go_minor =~ ^[0-9]+$ ]] || ((go_minor < MIN_GO_MINOR)); then
	log "need Go 1.$MIN_GO_MINOR or newer, found $go_version"
	exit 1
fi
log "using $go_version, GOPROXY=$(go env GOPROXY)"

cd "$here"
mkdir -p "$cache_root"
# Scratch space lives beside this script (git-ignored) at a fixed place and is
# referred to by relative replace paths, because the binaries record replace
# paths: this keeps them byte-identical whatever the checkout or cache path.
# One build at a time per checkout.
exec 9>"$here/.build.lock"
if command -v flock >/dev/null; then
	flock 9
	if [[ -x $out/telepresence && -x $out/traffic ]]; then
		log "built meanwhile by another run: $out"
		echo "$out"
		exit 0
	fi
fi
work_rel=.work
work=$here/$work_rel
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

# Fetch the pinned modules (go.sum checks them) and find the source tree.
go mod download "$TEL2_MODULE" "$ENV_MODULE" >&2
src=$(go list -m -f '{{.Dir}}' "$TEL2_MODULE")
helm_version=$(go list -m -f '{{.Version}}' helm.sh/helm/v3)
[[ -d $src/charts/telepresence-oss ]] || { log "no chart in $src"; exit 1; }

# The chart package embeds charts/telepresence-oss/ and reads k8s-defs.json
# from it when "telepresence helm install" writes the chart. The module zip
# does not carry that file and the go command refuses overlays inside the
# module cache, so the build uses a copy of the module source with the file
# added, through a go.mod copy that replaces the module with that directory.
defs=$work/k8s-defs.json
if [[ -n ${TEL2_K8S_DEFS:-} ]]; then
	[[ -s $TEL2_K8S_DEFS ]] || { log "TEL2_K8S_DEFS=$TEL2_K8S_DEFS is not a readable file"; exit 1; }
	grep -q '"definitions"' "$TEL2_K8S_DEFS" ||
		{ log "TEL2_K8S_DEFS=$TEL2_K8S_DEFS has no \"definitions\" object"; exit 1; }
	cp "$TEL2_K8S_DEFS" "$defs"
	defs_note="from $TEL2_K8S_DEFS"
else
	# Every definition the values schema refers to, each an empty (accept
	# anything) schema: helm's validation of those sub-objects is skipped.
	names=$(grep -oE '#/definitions/[A-Za-z0-9_.-]+' "$src/charts/telepresence-oss/values.schema.yaml" |
		sed 's|#/definitions/||' | sort -u)
	{
		printf '{"definitions": {'
		sep=
		for n in $names; do
			printf '%s\n  "%s": {}' "$sep" "$n"
			sep=,
		done
		printf '\n}}\n'
	} >"$defs"
	defs_note="placeholder: $(wc -w <<<"$names") permissive definitions"
fi
log "k8s-defs.json: $defs_note"
cp -R "$src" "$work/src"
chmod -R u+w "$work/src"
cp "$defs" "$work/src/charts/telepresence-oss/k8s-defs.json"
cp go.mod "$work/go.mod"
cp go.sum "$work/go.sum"
go mod edit -replace="$TEL2_MODULE=./$work_rel/src" "$work/go.mod"

# Upstream builds against a fork of caarlos0/env whose Options.FuncMap
# parsers win over a type's UnmarshalText (the traffic-manager's slog.Level
# parser accepts "trace"). The fork is not on the proxy: patch the released
# module the same way, in a copy (see patches/ and README.md).
env_src=$(go list -m -f '{{.Dir}}' "$ENV_MODULE")
[[ $(go list -m -f '{{.Version}}' "$ENV_MODULE") == "$ENV_VERSION" ]] ||
	{ log "expected $ENV_MODULE $ENV_VERSION"; exit 1; }
cp -R "$env_src" "$work/env"
chmod -R u+w "$work/env"
(cd "$work/env" && GIT_CEILING_DIRECTORIES="$work" git apply -p1 "$here/patches/$ENV_PATCH") >&2
go mod edit -replace="$ENV_MODULE=./$work_rel/env" "$work/go.mod"

pkg_version=$TEL2_MODULE/pkg/version
ldflags="-s -w -X=$pkg_version.Version=$TEL2_VERSION -X=$pkg_version.HelmVersion=$helm_version"
start=$(date +%s)
for cmd in telepresence traffic; do
	log "building $cmd"
	CGO_ENABLED=0 go build -mod=readonly -trimpath -buildvcs=false -tags external_fuseftp \
		-modfile="$work/go.mod" -ldflags="$ldflags" \
		-o "$work/$cmd" "$TEL2_MODULE/cmd/$cmd" >&2
done
log "built in $(($(date +%s) - start)) s"

mkdir -p "$out"
cp "$defs" "$out/k8s-defs.json"
printf 'version %s\nhelm %s\ngo %s\nk8s-defs %s\n' \
	"$TEL2_VERSION" "$helm_version" "$go_version" "$defs_note" >"$out/BUILDINFO"
# Install the binaries last, each by a rename within $out, traffic before
# telepresence, so that an interrupted build is never taken for a finished one.
for cmd in traffic telepresence; do
	cp "$work/$cmd" "$out/.$cmd.tmp"
	mv -f "$out/.$cmd.tmp" "$out/$cmd"
done
echo "$out"
