# Sourced by hack/control-plane.sh and hack/node-binaries.sh: builds Kubernetes commands from the
# pinned k8s.io/kubernetes wrapper module, stamped with their version as a release build is.
#
#   build_k8s_commands WRAPPER-DIR OUT-BIN-DIR VERSION COMMAND...
# A command already in OUT-BIN-DIR is kept; each is built to a temporary name and renamed, so an
# interrupted build never leaves a half-written binary behind.
build_k8s_commands() {
  local wrapper=$1 out=$2 version=$3
  shift 3
  local minor=${version#v1.}
  minor=${minor%%.*}
  local stamp="" pkg cmd
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp="$stamp -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    stamp="$stamp -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for cmd in "$@"; do
    [ -x "$out/$cmd" ] && continue
    printf '[k8s-build] building %s %s\n' "$cmd" "$version" >&2
    (cd "$wrapper" && go build -trimpath -ldflags "-s -w $stamp" -o "$out/$cmd.tmp" \
      "k8s.io/kubernetes/cmd/$cmd")
    mv "$out/$cmd.tmp" "$out/$cmd"
  done
}
