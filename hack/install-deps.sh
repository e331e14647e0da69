#!/usr/bin/env bash
# Installs the Debian packages the agent and its tests need (nft, iptables, ip, conntrack), and
# those of the real cluster (hack/cluster.sh: runc, the CNI plugins, openssl, curl) and of the
# image builder (hack/images.sh: mmdebstrap), and Lua 5.1 for the Argo CD health checks' tests
# (Argo CD runs them with gopher-lua, a Lua 5.1).
# A no-op when they are already there, so the warm path costs nothing.
set -euo pipefail
need=()
command -v nft >/dev/null || need+=(nftables)
command -v iptables-restore >/dev/null || need+=(iptables)
command -v ip >/dev/null || need+=(iproute2)
command -v conntrack >/dev/null || need+=(conntrack)
command -v runc >/dev/null || need+=(runc)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
command -v nsenter >/dev/null || need+=(util-linux)
command -v lua5.1 >/dev/null || need+=(lua5.1)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "[deps] installing ${need[*]}" >&2
if [ "$(id -u)" -ne 0 ]; then
  echo "[deps] root is needed to install ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
