#!/usr/bin/env bash
# The whole system on this machine, in one command (README: "Run it locally"):
#   sudo bash hack/run-local.sh        (or, as root: bash hack/run-local.sh)
#
# Installs the Debian packages it needs, builds (first run only, cached) the pinned control
# plane and helm, builds and runs `uwsgi-it-local`: a real etcd + kube-apiserver, the CRDs and
# the chart's RBAC, the controller, one agent on each of two simulated server nodes (network
# namespaces with public addresses 203.0.113.11 and .12), the kubelet stand-in and examples/,
# then a real TCP connection to 203.0.113.11:9000 from a client namespace. It prints
# `export KUBECONFIG=...` and keeps running until Ctrl-C or SIGTERM, then removes everything it
# created (processes, network namespaces with their nft tables, temporary files).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[run-local] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "root is needed (network namespaces, nftables): sudo bash hack/run-local.sh"
  exit 1
fi
command -v cargo >/dev/null || {
  say "cargo is not on root's PATH; try: sudo env \"PATH=\$PATH\" bash hack/run-local.sh"
  exit 1
}

say "checking the Debian packages (nftables, iptables, iproute2, conntrack)"
bash hack/install-deps.sh

say "locating the control plane (the first run builds etcd, kube-apiserver and kubectl from Go modules: several minutes)"
UWSGI_IT_CONTROL_PLANE_BIN=$(bash hack/control-plane.sh)
export UWSGI_IT_CONTROL_PLANE_BIN
say "control plane binaries in $UWSGI_IT_CONTROL_PLANE_BIN"

# helm renders the chart's RBAC; without it the local run goes on as cluster-admin (and says so).
if UWSGI_IT_HELM=$(bash hack/helm.sh); then
  export UWSGI_IT_HELM
else
  say "helm unavailable: the chart's RBAC will be skipped"
fi

say "building uwsgi-it-local"
cargo build --locked -p uwsgi-it-local
target_dir=${CARGO_TARGET_DIR:-target}
say "starting $target_dir/debug/uwsgi-it-local (Ctrl-C stops it and cleans up)"
exec "$target_dir/debug/uwsgi-it-local"
