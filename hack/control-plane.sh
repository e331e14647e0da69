#!/usr/bin/env bash
# Builds the pinned Kubernetes control plane used by the tests and by `hack/run-local.sh`:
# kube-apiserver, kube-controller-manager and kubectl from k8s.io/kubernetes, etcd from
# go.etcd.io/etcd/server/v3. Everything comes from the Go module proxy; the binaries are cached
# under ~/.cache so only the first run pays for the build.
#
# Prints the directory holding the binaries on stdout (progress goes to stderr), so callers can do
#   export UWSGI_IT_CONTROL_PLANE_BIN=$(hack/control-plane.sh)
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.35.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
CACHE=${UWSGI_IT_CACHE:-$HOME/.cache/uwsgi-it-operator}
out=$CACHE/control-plane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION
binaries=(etcd kube-apiserver kube-controller-manager kubectl)

say() { printf '[control-plane] %s\n' "$*" >&2; }

complete() {
  local b
  for b in "${binaries[@]}"; do [ -x "$out/bin/$b" ] || return 1; done
}

if complete; then
  echo "$out/bin"
  exit 0
fi

command -v go >/dev/null || { say "go is required to build the control plane"; exit 1; }
mkdir -p "$out/bin"
export CGO_ENABLED=0 GOFLAGS=-mod=mod

# --- kube-apiserver, kube-controller-manager, kubectl --------------------------------------
# k8s.io/kubernetes replaces its staging modules with ./staging paths that do not exist in the
# module zip, so a wrapper module replaces each of them with its published v0.X.Y instead. The
# list is generated from the kubernetes go.mod itself, so a version bump needs no manual edit.
k8s_wrapper=$CACHE/build/kubernetes-$K8S_VERSION
staging_version=v0.${K8S_VERSION#v1.}
mkdir -p "$k8s_wrapper"
say "resolving k8s.io/kubernetes@$K8S_VERSION (the first run downloads and builds the binaries; later runs use the cache)"
k8s_gomod=$(cd "$k8s_wrapper" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
  sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
{
  echo "module uwsgi.it/operator/hack/kubernetes"
  echo
  echo "go 1.25.0"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  echo "replace ("
  sed -n 's#^[[:space:]]*\(k8s.io/[^ ]*\) => ./staging/src/.*#\t\1 => \1 '"$staging_version"'#p' "$k8s_gomod"
  echo ")"
} >"$k8s_wrapper/go.mod"
cat >"$k8s_wrapper/tools.go" <<'EOF'
//go:build tools

// Package tools pins the commands this wrapper builds.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
EOF
(cd "$k8s_wrapper" && go mod tidy >&2)

# shellcheck source=hack/k8s-build.sh
source "$(dirname "$0")/k8s-build.sh"
build_k8s_commands "$k8s_wrapper" "$out/bin" "$K8S_VERSION" kube-apiserver kube-controller-manager kubectl

# --- etcd ------------------------------------------------------------------------------------
etcd_wrapper=$CACHE/build/etcd-$ETCD_VERSION
mkdir -p "$etcd_wrapper"
cat >"$etcd_wrapper/go.mod" <<EOF
module uwsgi.it/operator/hack/etcd

go 1.25.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
cat >"$etcd_wrapper/tools.go" <<'EOF'
//go:build tools

// Package tools pins the etcd server command this wrapper builds.
package tools

import _ "go.etcd.io/etcd/server/v3"
EOF
say "building etcd $ETCD_VERSION"
(cd "$etcd_wrapper" && go mod tidy >&2 &&
  go build -trimpath -ldflags "-s -w" -o "$out/bin/etcd.tmp" go.etcd.io/etcd/server/v3)
mv "$out/bin/etcd.tmp" "$out/bin/etcd"

complete
say "control plane ready in $out/bin"
echo "$out/bin"
