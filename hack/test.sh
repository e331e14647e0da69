#!/usr/bin/env bash
# The project's test command (README: "Run the tests"); .ci/run calls exactly this.
# On a fresh machine it installs the Debian packages, builds the pinned control plane and the
# real cluster's node binaries, and builds the images (all cached under
# ~/.cache/uwsgi-it-operator); with a warm cache only the image's binary layer is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

bash hack/install-deps.sh
UWSGI_IT_CONTROL_PLANE_BIN=$(bash hack/control-plane.sh)
export UWSGI_IT_CONTROL_PLANE_BIN

# CI starts from a clean clone every time; keeping its build products in the cache makes the
# warm run fast without touching a developer's in-tree target/.
if [ -n "${CI:-}" ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="$HOME/.cache/uwsgi-it-operator/cargo-target"
fi

# kstatus (sigs.k8s.io/cli-utils), run by the tests on live objects: GitOps health as Flux reads it.
UWSGI_IT_KSTATUS=$(bash hack/go-tool.sh kstatus)
export UWSGI_IT_KSTATUS
# Prometheus' rule parser and PromQL engine: the chart's alerts, checked and evaluated on scrapes.
UWSGI_IT_ALERTCHECK=$(bash hack/go-tool.sh alertcheck)
export UWSGI_IT_ALERTCHECK
# Flux's healthCheckExprs evaluator (github.com/fluxcd/pkg/runtime/cel): the shipped expressions.
UWSGI_IT_FLUXHEALTH=$(bash hack/go-tool.sh fluxhealth)
export UWSGI_IT_FLUXHEALTH

# The real cluster (tests/real_cluster.rs): kubelet, kube-proxy, kube-scheduler, containerd,
# and the images it runs (the release binary, the platform distro, the pause image).
UWSGI_IT_NODE_BIN=$(bash hack/node-binaries.sh)
export UWSGI_IT_NODE_BIN
echo "[test] building the images (hack/images.sh)" >&2
bash hack/images.sh >/dev/null
# The registry the real cluster's release is pushed to and its nodes pull from, and the tool that
# pushes the images (hack/release.sh, run by hack/cluster.sh up).
bash hack/go-tool.sh registry >/dev/null
bash hack/go-tool.sh crane >/dev/null

# Every crate of the lock file, for every platform (the Dockerfile test reads the whole graph).
echo "[test] cargo fetch" >&2
cargo fetch --locked --quiet

echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "[test] cargo test" >&2
cargo test --workspace --locked --no-fail-fast
