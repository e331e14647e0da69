#!/usr/bin/env bash
# Regenerates crds/ from the Rust types and copies them into the Helm chart; the tests fail
# when either copy drifts from the types.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run -q -- crds --out crds
rm -f charts/uwsgi-it-operator/crds/*.yaml
cp crds/*.yaml charts/uwsgi-it-operator/crds/
