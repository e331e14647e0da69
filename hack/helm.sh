#!/usr/bin/env bash
# Installs the pinned Helm CLI from the Go module proxy (the only download source the CI machines
# have) and caches it under ~/.cache, so only the first run pays for the build.
#
# Prints the path of the helm binary on stdout (progress goes to stderr), so callers can do
#   export UWSGI_IT_HELM=$(hack/helm.sh)
set -euo pipefail

HELM_VERSION=${HELM_VERSION:-v3.22.0}
CACHE=${UWSGI_IT_CACHE:-$HOME/.cache/uwsgi-it-operator}
bin=$CACHE/helm-$HELM_VERSION/bin
helm=$bin/helm

say() { printf '[helm] %s\n' "$*" >&2; }

if [ -x "$helm" ]; then
  echo "$helm"
  exit 0
fi

command -v go >/dev/null || { say "go is required to build helm"; exit 1; }
mkdir -p "$bin"
say "building helm $HELM_VERSION from the Go module proxy (first run only; later runs use the cache)"
# `go install pkg@version` builds in module mode outside any module, so the repository's own
# environment does not leak in. A temporary GOBIN + rename keeps a half-built binary from ever
# being taken for a complete one.
tmp=$(mktemp -d "$CACHE/helm-build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# The release binaries are stamped (helm's Makefile) with their version and with the Kubernetes
# version of their client-go, which `helm template` and `helm lint` assume when no cluster is
# asked; unstamped, they would assume Kubernetes v1.20 and refuse charts needing a newer one.
gomod=$(cd "$tmp" && go mod download -json "helm.sh/helm/v3@$HELM_VERSION" |
  sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
client_go=$(sed -n 's#^[[:space:]]*k8s.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$gomod")
[ -n "$client_go" ] || { say "cannot find the client-go version in $gomod"; exit 1; }
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags="$ldflags -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$client_go"
done
(cd "$tmp" && CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-mod=mod \
  go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2)
mv "$tmp/helm" "$helm"
say "helm ready at $helm"
echo "$helm"
