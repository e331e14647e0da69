#!/usr/bin/env bash
# Builds hack/alertcheck (Prometheus' own rule parser and PromQL engine, github.com/prometheus/
# prometheus) from the Go module proxy, cached under ~/.cache by the hash of its source. The
# tests run it on the chart's alert rules and on scrapes of the running system
# (`UWSGI_IT_ALERTCHECK`).
#
# Prints the binary's path on stdout (progress goes to stderr):
#   export UWSGI_IT_ALERTCHECK=$(hack/alertcheck.sh)
set -euo pipefail
cd "$(dirname "$0")/alertcheck"

CACHE=${UWSGI_IT_CACHE:-$HOME/.cache/uwsgi-it-operator}
key=$(cat go.mod go.sum main.go | sha256sum | cut -c1-16)
out=$CACHE/alertcheck/$key/alertcheck
if [ ! -x "$out" ]; then
  command -v go >/dev/null || { echo "[alertcheck] go is required" >&2; exit 1; }
  echo "[alertcheck] building alertcheck (github.com/prometheus/prometheus $(sed -n 's/^\tgithub.com\/prometheus\/prometheus //p' go.mod))" >&2
  mkdir -p "$(dirname "$out")"
  CGO_ENABLED=0 go build -trimpath -o "$out.tmp" .
  mv "$out.tmp" "$out"
fi
echo "$out"
