#!/usr/bin/env bash
# Builds the pinned binaries of a real server node for the real-cluster tests and the local run:
# kubelet, kube-proxy and kube-scheduler from the same k8s.io/kubernetes wrapper as the control
# plane, and containerd 2.x (containerd, its runc shim, ctr) from Go modules. runc and the CNI
# plugins are Debian's (hack/install-deps.sh). Cached under ~/.cache; prints the bin directory.
#
#   export UWSGI_IT_NODE_BIN=$(hack/node-binaries.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=${K8S_VERSION:-v1.35.4}
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.2.9}
CACHE=${UWSGI_IT_CACHE:-$HOME/.cache/uwsgi-it-operator}
out=$CACHE/node/k8s-$K8S_VERSION-containerd-$CONTAINERD_VERSION
k8s_binaries=(kubelet kube-proxy kube-scheduler)
containerd_binaries=(containerd containerd-shim-runc-v2 ctr)

say() { printf '[node-binaries] %s\n' "$*" >&2; }

complete() {
  local b
  for b in "${k8s_binaries[@]}" "${containerd_binaries[@]}"; do [ -x "$out/bin/$b" ] || return 1; done
}

if complete; then
  echo "$out/bin"
  exit 0
fi
command -v go >/dev/null || { say "go is required to build the node binaries"; exit 1; }
mkdir -p "$out/bin"
export CGO_ENABLED=0 GOFLAGS=-mod=mod

# The control plane's wrapper module (hack/control-plane.sh) already replaces the staging
# modules; building the node commands from it keeps every Kubernetes binary on one version.
K8S_VERSION=$K8S_VERSION bash hack/control-plane.sh >/dev/null
k8s_wrapper=$CACHE/build/kubernetes-$K8S_VERSION
cat >"$k8s_wrapper/node_tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
(cd "$k8s_wrapper" && go mod tidy >&2)
# shellcheck source=hack/k8s-build.sh
source hack/k8s-build.sh
build_k8s_commands "$k8s_wrapper" "$out/bin" "$K8S_VERSION" "${k8s_binaries[@]}"

# containerd without the storage drivers that need cgo (overlayfs, the one used, needs none).
cd_wrapper=$CACHE/build/containerd-$CONTAINERD_VERSION
mkdir -p "$cd_wrapper"
cat >"$cd_wrapper/go.mod" <<GO
module uwsgi.it/operator/hack/containerd

go 1.25.0

require github.com/containerd/containerd/v2 $CONTAINERD_VERSION
GO
cat >"$cd_wrapper/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
GO
(cd "$cd_wrapper" && go mod tidy >&2)
tags="no_btrfs no_devmapper no_zfs no_aufs"
cd_stamp="-X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
for cmd in "${containerd_binaries[@]}"; do
  [ -x "$out/bin/$cmd" ] && continue
  say "building $cmd $CONTAINERD_VERSION"
  (cd "$cd_wrapper" && go build -trimpath -tags "$tags" -ldflags "-s -w $cd_stamp" \
    -o "$out/bin/$cmd.tmp" "github.com/containerd/containerd/v2/cmd/$cmd")
  mv "$out/bin/$cmd.tmp" "$out/bin/$cmd"
done

complete
say "node binaries ready in $out/bin"
echo "$out/bin"
