#!/usr/bin/env bash
# Builds one of the project's Go tools from the Go module proxy, pinned by hack/<dir>/go.mod and
# go.sum, cached under ~/.cache by the hash of their source, and prints the binary's path on
# stdout (progress goes to stderr):
#
#   hack/go-tool.sh kstatus       sigs.k8s.io/cli-utils' kstatus (hack/kstatus): GitOps health
#                                 as Flux and Helm 4's --wait read it            UWSGI_IT_KSTATUS
#   hack/go-tool.sh alertcheck    Prometheus' rule parser and PromQL engine
#                                 (hack/alertcheck): the chart's alerts         UWSGI_IT_ALERTCHECK
#   hack/go-tool.sh fluxhealth    Flux's healthCheckExprs evaluator (github.com/fluxcd/pkg/
#                                 runtime/cel, hack/fluxhealth)                UWSGI_IT_FLUXHEALTH
#   hack/go-tool.sh registry      the CNCF distribution registry (hack/oci-tools)
#   hack/go-tool.sh crane         go-containerregistry's crane (hack/oci-tools): pushes images
#
# e.g. export UWSGI_IT_KSTATUS=$(hack/go-tool.sh kstatus)
set -euo pipefail
cd "$(dirname "$0")"

name=${1:?usage: hack/go-tool.sh kstatus|alertcheck|fluxhealth|registry|crane}
case $name in
  kstatus | alertcheck | fluxhealth) dir=$name package=. ;;
  registry) dir=oci-tools package=github.com/distribution/distribution/v3/cmd/registry ;;
  crane) dir=oci-tools package=github.com/google/go-containerregistry/cmd/crane ;;
  *) echo "[go-tool] unknown tool $name" >&2; exit 2 ;;
esac
cd "$dir"
CACHE=${UWSGI_IT_CACHE:-$HOME/.cache/uwsgi-it-operator}
shopt -s nullglob
sources=(go.mod go.sum ./*.go)
key=$( (echo "$package"; cat "${sources[@]}") | sha256sum | cut -c1-16)
out=$CACHE/go-tools/$name-$key/$name
if [ ! -x "$out" ]; then
  command -v go >/dev/null || { echo "[go-tool] go is required to build $name" >&2; exit 1; }
  echo "[go-tool] building $name ($package, pinned by hack/$dir/go.mod)" >&2
  mkdir -p "$(dirname "$out")"
  CGO_ENABLED=0 go build -trimpath -o "$out.tmp" "$package"
  mv "$out.tmp" "$out"
  # Older builds of this tool are of no use any more.
  find "$CACHE/go-tools" -maxdepth 1 -name "$name-*" ! -name "$name-$key" -exec rm -rf {} + 2>/dev/null || true
fi
echo "$out"
