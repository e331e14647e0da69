#!/usr/bin/env bash
# Builds hack/kstatus (sigs.k8s.io/cli-utils' kstatus, the health computation Flux, Helm 4's
# --wait and kpt use) from the Go module proxy, cached under ~/.cache by the hash of its source.
# The tests run it on live objects (`UWSGI_IT_KSTATUS`).
#
# Prints the binary's path on stdout (progress goes to stderr):
#   export UWSGI_IT_KSTATUS=$(hack/kstatus.sh)
set -euo pipefail
cd "$(dirname "$0")/kstatus"

CACHE=${UWSGI_IT_CACHE:-$HOME/.cache/uwsgi-it-operator}
key=$(cat go.mod go.sum main.go | sha256sum | cut -c1-16)
out=$CACHE/kstatus/$key/kstatus
if [ ! -x "$out" ]; then
  command -v go >/dev/null || { echo "[kstatus] go is required" >&2; exit 1; }
  echo "[kstatus] building kstatus (sigs.k8s.io/cli-utils $(sed -n 's/^\tsigs.k8s.io\/cli-utils //p' go.mod))" >&2
  mkdir -p "$(dirname "$out")"
  CGO_ENABLED=0 go build -trimpath -o "$out.tmp" .
  mv "$out.tmp" "$out"
fi
echo "$out"
