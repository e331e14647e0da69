#!/usr/bin/env bash
# The whole system on this machine, for real, in one command (README: "Run it locally"):
#   sudo bash hack/run-local.sh        (or, as root: bash hack/run-local.sh)
#
# Installs the Debian packages it needs; builds (first run only, cached under ~/.cache) the
# pinned control plane, the node binaries (kubelet, kube-proxy, kube-scheduler, containerd) and
# helm; builds the images (hack/images.sh: the operator, the platform distro, the pause image);
# then `uwsgi-it-local` brings up the real cluster (hack/cluster.sh: control plane and two server
# nodes in network namespaces of their own, the release pushed to its loopback registry), `helm
# install`s the released chart from there, applies the quickstart
# of examples/, puts an app into hydra's home and waits until it answers on 203.0.113.10:9000
# from a client namespace. It prints `export KUBECONFIG=...` and how to use the cluster, keeps
# it until Ctrl-C or SIGTERM, then removes everything it made.
#
# For the test suite, which has built everything already: UWSGI_IT_LOCAL_BIN names the
# uwsgi-it-local binary to run, and the images are not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[run-local] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "root is needed (network namespaces, cgroups, a kubelet): sudo bash hack/run-local.sh"
  exit 1
fi
if [ -z "${UWSGI_IT_LOCAL_BIN:-}" ] && ! command -v cargo >/dev/null; then
  say "cargo is not on root's PATH; try: sudo env \"PATH=\$PATH\" bash hack/run-local.sh"
  exit 1
fi

say "checking the Debian packages"
bash hack/install-deps.sh

say "locating the control plane (the first run builds it from Go modules: several minutes)"
UWSGI_IT_CONTROL_PLANE_BIN=$(bash hack/control-plane.sh)
export UWSGI_IT_CONTROL_PLANE_BIN
say "locating the node binaries (kubelet, kube-proxy, kube-scheduler, containerd; first run builds them)"
UWSGI_IT_NODE_BIN=$(bash hack/node-binaries.sh)
export UWSGI_IT_NODE_BIN
UWSGI_IT_HELM=$(bash hack/helm.sh)
export UWSGI_IT_HELM

if [ -n "${UWSGI_IT_LOCAL_BIN:-}" ]; then
  binary=$UWSGI_IT_LOCAL_BIN
else
  say "building the images (hack/images.sh: the release binary, then the Debian root filesystems on the first run)"
  bash hack/images.sh >/dev/null
  say "building uwsgi-it-local"
  cargo build --locked --quiet -p uwsgi-it-local
  binary=${CARGO_TARGET_DIR:-target}/debug/uwsgi-it-local
fi
say "starting $binary (Ctrl-C stops it and removes everything)"
exec "$binary"
