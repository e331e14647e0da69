#!/usr/bin/env bash
# A release, in one command: builds the images (hack/images.sh: no Docker daemon, reproducible),
# pushes them to an OCI registry, packages the chart with every default image reference pinned
# by the digest just pushed, and pushes the chart there too.
#
#   hack/release.sh REGISTRY [VERSION]
#
#   REGISTRY  host[:port][/path] of an OCI registry, e.g. ghcr.io/acme or 127.0.0.1:5000.
#             Loopback registries are spoken to over plain HTTP, others over HTTPS; log in
#             first where it needs it (`crane auth login`, `helm registry login`).
#   VERSION   the chart's version and appVersion, and the images' tag (default: Cargo.toml's).
#
# Environment:
#   RELEASE_SOURCE_URL  the repository the release is made from, for the chart's home and
#                       sources (default: `git remote get-url origin`; one of them is required)
#   RELEASE_CHART_DIR   the chart to package (default charts/uwsgi-it-operator)
#
# Prints, as KEY=value lines: CHART (oci://…), CHART_VERSION, CHART_DIGEST, and for each image
# (OPERATOR, DISTRO, DISTRO_ROOT, PAUSE) NAME_IMAGE=repository@sha256:… .
# Install what it printed:  helm install uwsgi-it "$CHART" --version "$CHART_VERSION"
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
say() { printf '[release] %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

registry=${1:?usage: hack/release.sh REGISTRY [VERSION]}
registry=${registry%/}
version=${2:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$ ]] ||
  die "version $version is not a semantic version (Helm requires one)"
chart_src=${RELEASE_CHART_DIR:-charts/uwsgi-it-operator}
source_url=${RELEASE_SOURCE_URL:-$(git remote get-url origin 2>/dev/null || true)}
[ -n "$source_url" ] ||
  die "no source URL: set RELEASE_SOURCE_URL (or a git remote origin) to the repository released from"

host=${registry%%/*}
plain_http=()
insecure=()
case $host in
  127.* | localhost | localhost:* | \[::1\]*)
    plain_http=(--plain-http)
    insecure=(--insecure)
    ;;
esac

CACHE=${UWSGI_IT_CACHE:-$HOME/.cache/uwsgi-it-operator}
images=${UWSGI_IT_IMAGES:-$CACHE/images}
crane=$(bash hack/go-tool.sh crane)
helm=${UWSGI_IT_HELM:-$(bash hack/helm.sh)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say "building the images (hack/images.sh)"
bash hack/images.sh >/dev/null
# shellcheck disable=SC1091
. "$images/images.env"

# push NAME REPOSITORY: the image of images.env's NAME_ARCHIVE as REPOSITORY:VERSION; prints its
# reference by digest, after checking the registry serves exactly the digest that was built.
push() {
  local name=$1 repository=$registry/$2 archive digest served
  archive=$(eval echo "\$${name}_ARCHIVE")
  digest=$(eval echo "\$${name}_DIGEST")
  mkdir -p "$work/$name"
  tar -xf "$archive" -C "$work/$name"
  "$crane" push "${insecure[@]}" "$work/$name" "$repository:$version" >/dev/null 2>"$work/$name.log" ||
    { cat "$work/$name.log" >&2; die "pushing $repository:$version failed"; }
  served=$("$crane" digest "${insecure[@]}" "$repository:$version")
  [ "$served" = "$digest" ] || die "$repository:$version is $served in the registry, $digest as built"
  say "pushed $repository:$version  $digest"
  echo "$repository@$digest"
}
operator=$(push OPERATOR uwsgi-it-operator)
distro=$(push DISTRO uwsgi-it-distro-bookworm)
distro_root=$(push DISTRO_ROOT uwsgi-it-distro-root)
pause=$(push PAUSE uwsgi-it-pause)

say "packaging the chart $version from $chart_src"
chart=$work/chart/uwsgi-it-operator
mkdir -p "$work/chart"
cp -r "$chart_src" "$chart"
python3 - "$chart" "$version" "$source_url" "$operator" "$distro" "$distro_root" <<'PY'
import re, sys
chart, version, source, operator, distro, distro_root = sys.argv[1:]
repository, digest = operator.split("@")

def edit(path, replacements):
    with open(path) as f:
        text = f.read()
    for pattern, value in replacements:
        text, n = re.subn(pattern, lambda m: m.group(1) + value, text, count=1, flags=re.M)
        if n != 1:
            sys.exit(f"{path}: no line matches {pattern!r}")
    with open(path, "w") as f:
        f.write(text)

# The defaults of values.yaml: the images this release pushed, by digest.
edit(f"{chart}/values.yaml", [
    (r"^(image:\n(?:  #.*\n)*  repository: ).*$", repository),
    (r"^(  tag: ).*$", f'"{version}"'),
    (r"^(  digest: ).*$", f'"{digest}"'),
    (r"^(    bookworm: ).*$", distro),
    (r"^(  customDistroImage: ).*$", distro_root),
])
images = "\n".join(f"    - name: {name}\n      image: {ref}" for name, ref in
                   [("uwsgi-it-operator", operator), ("uwsgi-it-distro-bookworm", distro),
                    ("uwsgi-it-distro-root", distro_root)])
edit(f"{chart}/Chart.yaml", [
    (r"^(version: ).*$", version),
    (r'^(appVersion: ).*$', f'"{version}"'),
    (r"^(annotations:\n)", f"  artifacthub.io/images: |\n{images}\n"),
])
with open(f"{chart}/Chart.yaml", "a") as f:
    f.write(f"home: {source}\nsources:\n  - {source}\n")
PY
"$helm" lint --strict "$chart" >/dev/null || { "$helm" lint --strict "$chart" >&2; die "helm lint failed"; }
"$helm" package "$chart" --destination "$work" >/dev/null
package=$work/uwsgi-it-operator-$version.tgz
pushed=$("$helm" push "$package" "oci://$registry/charts" "${plain_http[@]}" 2>&1) ||
  die "helm push failed: $pushed"
chart_digest=$(sed -n 's/^Digest: //p' <<<"$pushed")
[ -n "$chart_digest" ] || die "helm push printed no digest: $pushed"
say "pushed oci://$registry/charts/uwsgi-it-operator:$version  $chart_digest"

cat <<EOF
CHART=oci://$registry/charts/uwsgi-it-operator
CHART_VERSION=$version
CHART_DIGEST=$chart_digest
OPERATOR_IMAGE=$operator
DISTRO_IMAGE=$distro
DISTRO_ROOT_IMAGE=$distro_root
PAUSE_IMAGE=$pause
EOF
