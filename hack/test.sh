#!/usr/bin/env bash
# The project's test command (README: "Run the tests"); .ci/run calls exactly this.
# On a fresh machine it installs the Debian packages and builds the pinned control plane
# (cached under ~/.cache/uwsgi-it-operator); with a warm cache it goes straight to cargo.
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

echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "[test] cargo test" >&2
cargo test --workspace --locked --no-fail-fast
