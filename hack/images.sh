#!/usr/bin/env bash
# Builds the project's images without a Docker daemon, from Debian packages and the release
# binary, reproducibly (SOURCE_DATE_EPOCH): mmdebstrap makes each root filesystem as a tar,
# hack/oci-image.py packs layers into an OCI image layout tar (what `ctr images import`,
# `skopeo copy oci-archive:` and registries take).
#
#   operator   Debian + nft, iptables, conntrack, CA certificates + the release binary
#              (controller and agent; `uwsgi-it-operator controller|agent`)
#   distro     the platform distro `bookworm`: Debian + uWSGI (uwsgi-core, python3 plugin) at
#              /opt/unbit/uwsgi/uwsgi, the seed's distro checklist
#   pause      the Pod sandbox: catatonit in pause mode, nothing else
#   distro-root  what a container on a custom distro starts from: empty mount points only
#
# Output: $UWSGI_IT_IMAGES (default ~/.cache/uwsgi-it-operator/images) holds <image>.tar and
# images.env (NAME_IMAGE=reference, NAME_DIGEST=sha256:...); the references and digests are
# printed at the end. The Debian root filesystems are cached by the hash of this script, so only
# the binary layer is rebuilt when the code changes.
set -euo pipefail
# `set -e` inside $(...) too: a failed build in a command substitution must stop the script.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

CACHE=${UWSGI_IT_CACHE:-$HOME/.cache/uwsgi-it-operator}
out=${UWSGI_IT_IMAGES:-$CACHE/images}
REGISTRY=${UWSGI_IT_IMAGE_REGISTRY:-uwsgi-it.local}
SUITE=bookworm
# The last change to the recipe, not the last commit: an unrelated commit gives the same digests.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct -- hack/images.sh hack/oci-image.py 2>/dev/null || echo 0)}
say() { printf '[images] %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { say "root is needed (mmdebstrap keeps file owners)"; exit 1; }
for tool in mmdebstrap python3; do
  command -v "$tool" >/dev/null || { say "$tool is missing: run hack/install-deps.sh"; exit 1; }
done
mkdir -p "$out" "$CACHE/rootfs"

# The apt sources of this host: the images get their packages from where the host gets its own.
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -s "$f" ] && sources+=("$f")
done
[ ${#sources[@]} -gt 0 ] || { say "no apt sources on this host"; exit 1; }

# The cache key: the recipe and the time stamped into everything it makes.
recipe=$( (cat "$0" hack/oci-image.py && echo "$SOURCE_DATE_EPOCH") | sha256sum | cut -c1-16)
# Docs, man pages and locales are not needed to run anything, and the apt lists are only a cache.
slim=(--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
  --aptopt='Acquire::Languages "none"'
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*'
  --customize-hook='rm -f "$1"/etc/machine-id "$1"/var/cache/ldconfig/aux-cache')

rootfs() { # name, then mmdebstrap arguments
  local name=$1
  shift
  local tar=$CACHE/rootfs/$name-$recipe.tar
  if [ ! -s "$tar" ]; then
    say "building the $name root filesystem with mmdebstrap (first run only: a minute or two)"
    mmdebstrap --quiet --mode=root --format=tar "${slim[@]}" "$@" "$SUITE" "$tar.tmp" "${sources[@]}" >&2
    mv "$tar.tmp" "$tar"
    find "$CACHE/rootfs" -name "$name-*.tar" ! -name "$name-$recipe.tar" -delete
  fi
  echo "$tar"
}

# One file in a layer tar, with fixed owner and time: a layer made of it depends only on the file.
file_layer() { # source, path in image, mode, output
  python3 - "$@" <<'PY'
import sys, tarfile, os
src, dest, mode, out = sys.argv[1], sys.argv[2].lstrip("/"), int(sys.argv[3], 8), sys.argv[4]
epoch = int(os.environ["SOURCE_DATE_EPOCH"])
with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
    parts = dest.split("/")
    for i in range(1, len(parts)):
        d = tarfile.TarInfo("/".join(parts[:i]))
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, epoch
        tar.addfile(d)
    info = tarfile.TarInfo(dest)
    info.size, info.mode, info.mtime = os.path.getsize(src), mode, epoch
    with open(src, "rb") as f:
        tar.addfile(info, f)
PY
}

image() { # var name, reference, then oci-image.py arguments
  local var=$1 ref=$2 file
  shift 2
  file=$out/$(echo "$var" | tr 'A-Z_' 'a-z-').tar
  local digest
  digest=$(python3 hack/oci-image.py --out "$file" --name "$ref" --created "$SOURCE_DATE_EPOCH" "$@")
  printf '%s_IMAGE=%s\n%s_DIGEST=%s\n%s_ARCHIVE=%s\n' "$var" "$ref" "$var" "$digest" "$var" "$file" >>"$out/images.env.tmp"
  say "$ref  $digest"
}

rm -f "$out/images.env.tmp"

# --- pause ----------------------------------------------------------------------------------
pause_tar=$CACHE/rootfs/pause-$recipe.tar
if [ ! -s "$pause_tar" ]; then
  work=$(mktemp -d)
  (cd "$work" && apt-get download catatonit >/dev/null 2>&1) || { say "apt-get download catatonit failed (apt-get update?)"; exit 1; }
  dpkg-deb -x "$work"/catatonit_*.deb "$work/x"
  file_layer "$work/x/usr/bin/catatonit" /catatonit 0755 "$pause_tar"
  rm -rf "$work"
fi
image PAUSE "$REGISTRY/pause:3.10-$recipe" --layer "$pause_tar" \
  --entrypoint '["/catatonit","-P"]' --user 65535:65535

# --- distro: bookworm with uWSGI ----------------------------------------------------------
distro_tar=$(rootfs distro-$SUITE --variant=minbase \
  --include=ca-certificates,uwsgi-core,uwsgi-plugin-python3 \
  --customize-hook='mkdir -p "$1"/opt/unbit/uwsgi && ln -s /usr/bin/uwsgi-core "$1"/opt/unbit/uwsgi/uwsgi' \
  --customize-hook='mkdir -p "$1"/containers')
image DISTRO "$REGISTRY/distro-$SUITE:$recipe" --layer "$distro_tar" \
  --cmd '["/opt/unbit/uwsgi/uwsgi","--help"]' \
  --label org.opencontainers.image.title="uwsgi-it platform distro $SUITE"

# --- distro-root: what a container on a custom distro starts from --------------------------
# Only mount points: the kubelet mounts the distro's top-level directories over it, so nothing
# of this image runs (see crates/controller/src/workload.rs).
root_tar=$CACHE/rootfs/distro-root-$recipe.tar
if [ ! -s "$root_tar" ]; then
  python3 - "$root_tar" <<'PY'
import sys, tarfile, os
epoch = int(os.environ["SOURCE_DATE_EPOCH"])
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tar:
    for name in ["containers", "dev", "proc", "run", "sys", "tmp"]:
        d = tarfile.TarInfo(name)
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755, epoch
        tar.addfile(d)
PY
fi
image DISTRO_ROOT "$REGISTRY/distro-root:$recipe" --layer "$root_tar" \
  --label org.opencontainers.image.title="uwsgi-it custom distro root (mount points only)"

# --- operator ------------------------------------------------------------------------------
base_tar=$(rootfs operator-base --variant=essential \
  --include=ca-certificates,nftables,iptables,conntrack)
target_dir=${CARGO_TARGET_DIR:-target}
say "building the release binary (cargo build --release)"
cargo build --release --locked --quiet --bin uwsgi-it-operator >&2
binary=$target_dir/release/uwsgi-it-operator
bin_layer=$out/operator-binary.layer.tar
file_layer "$binary" /usr/local/bin/uwsgi-it-operator 0755 "$bin_layer"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
bin_hash=$(sha256sum "$bin_layer" | cut -c1-12)
image OPERATOR "$REGISTRY/uwsgi-it-operator:$version-$bin_hash" --layer "$base_tar" --layer "$bin_layer" \
  --entrypoint '["/usr/local/bin/uwsgi-it-operator"]' --cmd '["--help"]' --user 65532:65532 \
  --label org.opencontainers.image.title=uwsgi-it-operator \
  --label org.opencontainers.image.licenses=Apache-2.0
rm -f "$bin_layer"

mv "$out/images.env.tmp" "$out/images.env"
cat "$out/images.env"
