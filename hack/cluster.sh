#!/usr/bin/env bash
# A real Kubernetes cluster on this machine, for the end-to-end tests, the benchmarks and the
# local run (tier 3 of DESIGN.md: How it is tested):
#
#   hack/cluster.sh up      control plane + two real server nodes; prints KUBECONFIG=...
#   hack/cluster.sh down    removes everything `up` made (also what a killed run left behind)
#   hack/cluster.sh status  says whether a cluster is up and who owns it
#
# Topology: every part lives in a network namespace of its own, joined by one bridge:
#
#   uitc-cp      bridge br0 198.18.0.1/24; etcd (its loopback only), kube-apiserver :6443,
#                kube-controller-manager, kube-scheduler
#   uitc-server-1  server node 198.18.0.11, public address 203.0.113.10: containerd,
#                kubelet, kube-proxy (nftables), CNI bridge cni0 with Pods in 10.244.1.0/24
#   uitc-server-2  server node 198.18.0.12, public address 203.0.113.20, Pods in 10.244.2.0/24
#   uitc-client  198.18.0.100: where test traffic to the servers' public addresses comes from
#   this host    198.18.0.254 on veth uitc-host, so tests and kubectl reach the API server;
#                the OCI registry (CNCF distribution) on 127.0.0.1:5000, where `up` releases
#                the project (hack/release.sh: images and chart, pinned by digest)
#
# Nothing is imported into the nodes: their containerd pulls every image, the Pod sandbox
# included, by digest from a read-only instance of that registry in uitc-cp (198.18.0.1:5000,
# the same storage), which each node's registry configuration (certs.d/hosts.toml) puts in place
# of 127.0.0.1:5000, as a mirror would be in production.
#
# 198.18.0.0/15 is the range set aside for network tests (RFC 2544). No node has a default
# route (a Pod's default route ends at its node), so nothing in the cluster can reach the
# machine's uplink, and nothing listens on it; the host end of uitc-host takes no connection
# from the cluster (nft table inet uitc_host_guard), only replies to its own.
#
# One cluster per machine: `up` refuses while another one is wanted (its owner, the pid in
# UWSGI_IT_CLUSTER_OWNER, is alive; or it was brought up by hand, without an owner, and not taken
# down), and sweeps the leftovers of one that is not. With an owner, a watchdog in a session of
# its own runs `down` when the owner exits, however it exits (panic, SIGKILL, Ctrl-C). Every
# process is
# started in the cgroup /uwsgi-it-cluster (containers too: it is the kubelets' cgroupRoot), so
# `down` finds them all, Pods and containerd shims included.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER_DIR=${UWSGI_IT_CLUSTER_DIR:-/var/lib/uwsgi-it-cluster}
CGROUP=uwsgi-it-cluster
LOCK=/run/lock/uwsgi-it-cluster.lock
NODES=(server-1 server-2)
declare -A NODE_IP=([server-1]=198.18.0.11 [server-2]=198.18.0.12)
# The servers' public addresses (TEST-NET-3, as in examples/): a second address on the node.
declare -A PUBLIC_IP=([server-1]=203.0.113.10 [server-2]=203.0.113.20)
declare -A POD_CIDR=([server-1]=10.244.1.0/24 [server-2]=10.244.2.0/24)
API_IP=198.18.0.1
REGISTRY_PORT=${UWSGI_IT_REGISTRY_PORT:-5000}
REGISTRY=127.0.0.1:$REGISTRY_PORT
MIRROR=$API_IP:5000
HOST_IP=198.18.0.254
CLIENT_IP=198.18.0.100
SERVICE_CIDR=10.96.0.0/16
CLUSTER_CIDR=10.244.0.0/16

say() { printf '[cluster] %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

run=$CLUSTER_DIR/run
logs=$CLUSTER_DIR/logs
pki=$CLUSTER_DIR/pki

# --- cleanup -------------------------------------------------------------------------------
# What the cluster changes outside its directory is recorded under /run (gone after a reboot,
# with what it describes): host sysctls the kubelets set, host paths it made.
markers=/run/uwsgi-it-cluster
HOST_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

kill_cgroup() {
  local root=/sys/fs/cgroup/pids/$CGROUP freezer=/sys/fs/cgroup/freezer/$CGROUP i pids
  [ -d "$root" ] || return 0
  # Frozen first, so nothing forks or exits (and frees its pid for reuse) while it is killed.
  [ -d "$freezer" ] && echo FROZEN >"$freezer/freezer.state" 2>/dev/null
  for i in $(seq 1 50); do
    pids=$(find "$root" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
    if [ -z "$pids" ]; then
      [ -d "$freezer" ] && echo THAWED >"$freezer/freezer.state" 2>/dev/null
      return 0
    fi
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    [ -d "$freezer" ] && echo THAWED >"$freezer/freezer.state" 2>/dev/null
    sleep 0.2
  done
  say "processes still alive in $root: $pids"
}

remove_cgroups() {
  local hierarchy
  for hierarchy in /sys/fs/cgroup/*/; do
    [ -d "$hierarchy$CGROUP" ] || continue
    # Depth first: a cgroup can only be removed once its children are.
    find "$hierarchy$CGROUP" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    [ -d "$hierarchy$CGROUP" ] && say "could not remove cgroup $hierarchy$CGROUP"
  done
  return 0
}

unmount_all() {
  local m
  # Mount points at or under the cluster directory, deepest first (mountinfo field 5, with
  # its octal escapes undone).
  awk -v d="$CLUSTER_DIR" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo |
    sort -r | while read -r m; do
      m=$(printf '%b' "$m")
      umount -l "$m" 2>/dev/null || say "could not unmount $m"
    done
}

down() {
  # Finish even when interrupted again: a half-done cleanup is what must never happen.
  trap '' INT TERM HUP
  kill_cgroup
  unmount_all
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^uitc-/ {print $1}'); do
    ip netns delete "$ns" 2>/dev/null || say "could not delete netns $ns"
  done
  ip link delete uitc-host 2>/dev/null || true
  nft delete table inet uitc_host_guard 2>/dev/null || true
  remove_cgroups
  if [ -d "$markers" ]; then
    [ -f "$markers/made-run-containerd" ] && rm -rf /run/containerd
    [ -f "$markers/made-var-lib-cni" ] && rm -rf /var/lib/cni
    [ -f "$markers/made-xtables-lock" ] && rm -f /run/xtables.lock
    [ -f "$markers/sysctls" ] && sysctl -q -p "$markers/sysctls" >/dev/null 2>&1
  fi
  # The kubelets link every container's log into /var/log/containers, whatever podLogsDir says.
  find /var/log/containers -maxdepth 1 -type l -lname "$CLUSTER_DIR/*" -delete 2>/dev/null || true
  unmount_all
  if [ -e "$CLUSTER_DIR" ] && [ ! -e "$CLUSTER_DIR/.uwsgi-it-cluster" ]; then
    say "not removing $CLUSTER_DIR: it was not made by this script"
  else
    rm -rf --one-file-system "$CLUSTER_DIR"
  fi
  # The watchdog last: if this is it, everything is done by now.
  if [ -f "$markers/watchdog.pid" ]; then
    local w
    w=$(cat "$markers/watchdog.pid")
    # Only if that pid is still the watchdog (a pid can be reused).
    if [ "$w" != "${WATCHDOG_SELF:-}" ] &&
      [[ "$(tr '\0' ' ' <"/proc/$w/cmdline" 2>/dev/null)" == *"cluster.sh watchdog"* ]]; then
      kill -9 "$w" 2>/dev/null || true
    fi
  fi
  rm -rf "$markers"
  return 0
}

# Whether a cluster is up and someone still wants it: its owner process lives, or it was
# brought up by hand (no owner) and not taken down yet.
owner_alive() {
  local owner
  [ -f "$markers/owner" ] || return 1
  owner=$(cat "$markers/owner")
  [ "$owner" = manual ] && return 0
  [ -n "$owner" ] && kill -0 "$owner" 2>/dev/null
}

# --- certificates --------------------------------------------------------------------------
cert() { # name, subject, [subjectAltName]
  local name=$1 subject=$2 san=${3:-}
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "$subject" \
    -keyout "$pki/$name.key" -out "$pki/$name.csr" 2>/dev/null
  local ext=$pki/$name.ext
  echo "basicConstraints=CA:FALSE" >"$ext"
  if [ -n "$san" ]; then
    { echo "extendedKeyUsage=serverAuth,clientAuth"; echo "subjectAltName=$san"; } >>"$ext"
  else
    echo "extendedKeyUsage=clientAuth" >>"$ext"
  fi
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 30 -extfile "$ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$ext"
}

kubeconfig() { # name (cert), output
  cat >"$2" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: uwsgi-it
  cluster:
    server: https://$API_IP:6443
    certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
- name: $1
  user:
    client-certificate-data: $(base64 -w0 <"$pki/$1.crt")
    client-key-data: $(base64 -w0 <"$pki/$1.key")
contexts:
- name: uwsgi-it
  context: {cluster: uwsgi-it, user: $1}
current-context: uwsgi-it
EOF
}

make_pki() {
  mkdir -p "$pki"
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj "/CN=uwsgi-it-cluster-ca" -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  cert apiserver "/CN=kube-apiserver" \
    "IP:$API_IP,IP:10.96.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert admin "/O=system:masters/CN=admin"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  cert kube-proxy "/CN=system:kube-proxy"
  local node
  for node in "${NODES[@]}"; do
    cert "kubelet-$node" "/O=system:nodes/CN=system:node:$node"
    cert "kubelet-serving-$node" "/CN=$node" "IP:${NODE_IP[$node]},DNS:$node"
  done
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  kubeconfig admin "$CLUSTER_DIR/kubeconfig"
  kubeconfig kube-proxy "$pki/kube-proxy.kubeconfig"
  for node in "${NODES[@]}"; do kubeconfig "kubelet-$node" "$pki/kubelet-$node.kubeconfig"; done
}

# --- network -------------------------------------------------------------------------------
make_network() {
  ip netns add uitc-cp
  ip -n uitc-cp link set lo up
  ip -n uitc-cp link add br0 type bridge
  ip -n uitc-cp addr add "$API_IP/24" dev br0
  ip -n uitc-cp link set br0 up
  attach() { # netns, interface in it, address
    local peer="v-${1#uitc-}"
    ip link add "$peer" netns uitc-cp type veth peer name "$2" netns "$1"
    ip -n uitc-cp link set "$peer" master br0 up
    ip -n "$1" addr add "$3/24" dev "$2"
    ip -n "$1" link set "$2" up
  }
  local node
  for node in "${NODES[@]}"; do
    ip netns add "uitc-$node"
    ip -n "uitc-$node" link set lo up
    attach "uitc-$node" eth0 "${NODE_IP[$node]}"
    ip -n "uitc-$node" addr add "${PUBLIC_IP[$node]}/32" dev eth0
    ip netns exec "uitc-$node" sysctl -q -w net.ipv4.ip_forward=1
    # The other nodes' Pods are behind their nodes; the control plane reaches Pods the same way.
    local other
    for other in "${NODES[@]}"; do
      [ "$other" = "$node" ] && continue
      ip -n "uitc-$node" route add "${POD_CIDR[$other]}" via "${NODE_IP[$other]}"
    done
    ip -n uitc-cp route add "${POD_CIDR[$node]}" via "${NODE_IP[$node]}"
    # Host-network clients (the agent) need a route to the Service range for kube-proxy's DNAT
    # to see their packets; a node normally has it through its default route.
    ip -n "uitc-$node" route add "$SERVICE_CIDR" dev eth0
  done
  ip netns add uitc-client
  ip -n uitc-client link set lo up
  attach uitc-client eth0 "$CLIENT_IP"
  ip -n uitc-client route add 203.0.113.0/24 dev eth0
  # This host's end: only the cluster's /24, no forwarding through it.
  ip link add uitc-host type veth peer name host netns uitc-cp
  ip -n uitc-cp link set host master br0 up
  ip addr add "$HOST_IP/24" dev uitc-host
  ip link set uitc-host up
  # The cluster may answer this host, never open connections to it: a Pod or a node must not
  # reach services of the machine through this link.
  nft -f - <<'NFT'
table inet uitc_host_guard {
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "uitc-host" ct state established,related accept
    iifname "uitc-host" drop
  }
}
NFT
}

# --- processes -----------------------------------------------------------------------------
make_cgroups() {
  local hierarchy
  for hierarchy in /sys/fs/cgroup/*/; do
    case $hierarchy in */unified/) continue ;; esac
    mkdir -p "$hierarchy$CGROUP/daemons"
    for node in "${NODES[@]}"; do mkdir -p "$hierarchy$CGROUP/$node"; done
    if [ -f "$hierarchy/cpuset.cpus" ]; then
      local d
      for d in "$hierarchy$CGROUP" "$hierarchy$CGROUP"/*/; do
        cat "$hierarchy/cpuset.cpus" >"$d/cpuset.cpus"
        cat "$hierarchy/cpuset.mems" >"$d/cpuset.mems"
      done
    fi
  done
}

# daemon NAME NETNS PROGRAM ARGS...: started in the cluster's cgroup, in NETNS's network
# namespace only (nsenter, not `ip netns exec`, which would also unshare the mount namespace:
# the kubelet and containerd must see each other's mounts); NETNS "" is this host's.
daemon() {
  local name=$1 ns=$2
  shift 2
  (
    echo "$BASHPID" >"/sys/fs/cgroup/pids/$CGROUP/daemons/cgroup.procs"
    if [ -n "$ns" ]; then
      exec setsid nsenter --net="/run/netns/$ns" -- "$@"
    else
      exec setsid "$@"
    fi
  ) </dev/null >"$logs/$name.log" 2>&1 9>&- &
  echo "$!" >"$run/$name.pid"
}

# registry_config ADDRESS READONLY: a distribution registry on the cluster's registry storage.
registry_config() {
  cat <<EOF
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $CLUSTER_DIR/registry}
  delete: {enabled: false}
  maintenance:
    uploadpurging: {enabled: false}
    readonly: {enabled: $2}
http:
  addr: $1
EOF
}

# The registry on this host's loopback (the release is pushed there) and its read-only twin in
# uitc-cp that the nodes pull from; then the release itself.
start_registry() {
  local bin
  bin=${UWSGI_IT_REGISTRY_BIN:-$(bash hack/go-tool.sh registry 9>&-)}
  if curl -s -o /dev/null --max-time 2 "http://$REGISTRY/v2/" 9>&-; then
    die "something already listens on $REGISTRY; set UWSGI_IT_REGISTRY_PORT to another port"
  fi
  mkdir -p "$CLUSTER_DIR/registry"
  registry_config "$REGISTRY" false >"$run/registry.yaml"
  registry_config "$MIRROR" true >"$run/registry-mirror.yaml"
  # No tracing exporter: nothing to send spans to.
  daemon registry "" env OTEL_TRACES_EXPORTER=none "$bin" serve "$run/registry.yaml"
  daemon registry-mirror uitc-cp env OTEL_TRACES_EXPORTER=none "$bin" serve "$run/registry-mirror.yaml"
  wait_for "the registry on $REGISTRY" 30 curl -sf "http://$REGISTRY/v2/"
  wait_for "its read-only mirror on $MIRROR" 30 nsenter --net=/run/netns/uitc-cp curl -sf "http://$MIRROR/v2/"
  say "release: images and chart to $REGISTRY (hack/release.sh)"
  RELEASE_SOURCE_URL=${RELEASE_SOURCE_URL:-file://$PWD} bash hack/release.sh "$REGISTRY" \
    >"$CLUSTER_DIR/release.env" 9>&- || die "hack/release.sh $REGISTRY failed"
  # shellcheck disable=SC1091
  source "$CLUSTER_DIR/release.env"
}

wait_for() { # description, seconds, command...
  local what=$1 seconds=$2 i
  shift 2
  for i in $(seq 1 $((seconds * 5))); do
    "$@" >/dev/null 2>&1 9>&- && return 0
    sleep 0.2
  done
  die "$what not ready after ${seconds}s; logs in $logs"
}

start_control_plane() {
  local cp=$UWSGI_IT_CONTROL_PLANE_BIN
  daemon etcd uitc-cp "$cp/etcd" --name=uwsgi-it --data-dir="$CLUSTER_DIR/etcd" \
    --listen-client-urls=http://127.0.0.1:2379 --advertise-client-urls=http://127.0.0.1:2379 \
    --listen-peer-urls=http://127.0.0.1:2380 --initial-advertise-peer-urls=http://127.0.0.1:2380 \
    --initial-cluster=uwsgi-it=http://127.0.0.1:2380 --unsafe-no-fsync=true --log-level=warn
  daemon kube-apiserver uitc-cp "$cp/kube-apiserver" \
    --advertise-address="$API_IP" --bind-address="$API_IP" --secure-port=6443 \
    --etcd-servers=http://127.0.0.1:2379 \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range="$SERVICE_CIDR" --allow-privileged=true \
    --kubelet-preferred-address-types=InternalIP --v=0
  wait_for kube-apiserver 120 curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" \
    --key "$pki/admin.key" "https://$API_IP:6443/readyz"
  daemon kube-controller-manager uitc-cp "$cp/kube-controller-manager" \
    --kubeconfig="$CLUSTER_DIR/kubeconfig" --root-ca-file="$pki/ca.crt" \
    --service-account-private-key-file="$pki/sa.key" --use-service-account-credentials=false \
    --leader-elect=false --secure-port=0 --cluster-cidr="$CLUSTER_CIDR" \
    --service-cluster-ip-range="$SERVICE_CIDR" --v=0
  daemon kube-scheduler uitc-cp "$NODE_BIN/kube-scheduler" \
    --kubeconfig="$CLUSTER_DIR/kubeconfig" --leader-elect=false --secure-port=0 --v=0
}

start_node() {
  local node=$1 ip=${NODE_IP[$1]} dir=$CLUSTER_DIR/nodes/$1
  mkdir -p "$dir/cni/net.d" "$dir/containerd" "$dir/kubelet" "$dir/pod-logs"
  cat >"$dir/cni/net.d/10-uwsgi-it.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "uwsgi-it",
  "plugins": [
    {
      "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$dir/cni/ipam",
        "ranges": [[{"subnet": "${POD_CIDR[$node]}"}]], "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
  # The registry is reached through its read-only mirror, over plain HTTP inside the cluster.
  mkdir -p "$dir/certs.d/$REGISTRY"
  cat >"$dir/certs.d/$REGISTRY/hosts.toml" <<EOF
server = "http://$MIRROR"
[host."http://$MIRROR"]
  capabilities = ["pull", "resolve"]
EOF
  cat >"$dir/containerd.toml" <<EOF
version = 3
root = '$dir/containerd/root'
state = '$dir/containerd/state'
temp = '$dir/containerd/tmp'
imports = []
[grpc]
  address = '$dir/containerd.sock'
[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '$PAUSE_IMAGE'
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = '$dir/certs.d'
  [plugins.'io.containerd.cri.v1.runtime']
    enable_cdi = false
    # No CAP_SYS_RESOURCE here: without this every sandbox fails to start.
    restrict_oom_score_adj = true
    # The Pods' network namespaces under this node's state directory, not in /run/netns: they
    # are this cluster's and go with it.
    netns_mounts_under_state_dir = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = '$(command -v runc)'
        SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['/usr/lib/cni']
      conf_dir = '$dir/cni/net.d'
  [plugins.'io.containerd.internal.v1.opt']
    path = '$dir/containerd/opt'
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
EOF
  daemon "containerd-$node" "uitc-$node" env "PATH=$NODE_BIN:$PATH" "$NODE_BIN/containerd" \
    --config "$dir/containerd.toml"
  wait_for "containerd on $node" 60 "$NODE_BIN/ctr" --address "$dir/containerd.sock" version

  cat >"$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This host is cgroup v1; its kubelets share one cgroupfs, each under a root of its own.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP/$node
containerRuntimeEndpoint: unix://$dir/containerd.sock
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: $pki/kubelet-serving-$node.crt
tlsPrivateKeyFile: $pki/kubelet-serving-$node.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: AlwaysAllow}
podLogsDir: $dir/pod-logs
failSwapOn: false
oomScoreAdj: 0
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
maxPods: 60
resolvConf: /etc/resolv.conf
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
fileCheckFrequency: 10s
EOF
  daemon "kubelet-$node" "uitc-$node" env "PATH=$NODE_BIN:$PATH" "$NODE_BIN/kubelet" \
    --config="$dir/kubelet.yaml" --kubeconfig="$pki/kubelet-$node.kubeconfig" \
    --root-dir="$dir/kubelet" --cert-dir="$dir/kubelet/pki" --hostname-override="$node" \
    --node-ip="$ip" --v=0

  cat >"$dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: $pki/kube-proxy.kubeconfig}
hostnameOverride: $node
clusterCIDR: $CLUSTER_CIDR
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
nodePortAddresses: [$ip/32]
# A network namespace has no conntrack sysctls of its own to raise: leave them alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  daemon "kube-proxy-$node" "uitc-$node" "$NODE_BIN/kube-proxy" --config="$dir/kube-proxy.yaml" --v=0
}

up() {
  [ -d /sys/fs/cgroup/pids ] && [ -d /sys/fs/cgroup/freezer ] ||
    die "this script needs cgroup v1 (pids and freezer hierarchies); this host has none"
  exec 9>"$LOCK"
  flock -w 600 9 || die "another hack/cluster.sh has held $LOCK for 10 minutes"
  # The owner: a process whose end takes the cluster down (the tests, the local run). Without
  # one the cluster stays until `hack/cluster.sh down`.
  local owner=${UWSGI_IT_CLUSTER_OWNER:-manual}
  if owner_alive; then
    die "a cluster is already up, owned by $(cat "$markers/owner"); one per machine ($0 down removes it)"
  fi
  if [ -e "$CLUSTER_DIR" ] && [ ! -e "$CLUSTER_DIR/.uwsgi-it-cluster" ]; then
    die "$CLUSTER_DIR exists and was not made by this script; choose another UWSGI_IT_CLUSTER_DIR"
  fi
  local leftovers
  leftovers=$(ip netns list 2>/dev/null | awk '$1 ~ /^uitc-/' || true)
  if [ -e "$CLUSTER_DIR" ] || [ -d "$markers" ] || [ -n "$leftovers" ]; then
    say "removing the leftovers of an earlier cluster"
    down
    trap - INT TERM HUP
  fi
  # The builds and waits below must not hold the lock if this script is killed: 9>&-.
  [ -n "${UWSGI_IT_CONTROL_PLANE_BIN:-}" ] || UWSGI_IT_CONTROL_PLANE_BIN=$(bash hack/control-plane.sh 9>&-)
  NODE_BIN=${UWSGI_IT_NODE_BIN:-$(bash hack/node-binaries.sh 9>&-)}
  command -v runc >/dev/null || die "runc is missing: run hack/install-deps.sh"

  mkdir -p "$markers"
  echo "$owner" >"$markers/owner"
  [ -e /run/containerd ] || touch "$markers/made-run-containerd"
  [ -e /var/lib/cni ] || touch "$markers/made-var-lib-cni"
  [ -e /run/xtables.lock ] || touch "$markers/made-xtables-lock"
  # The kubelets set these host-wide (they are not per network namespace); `down` puts them back.
  local key
  for key in "${HOST_SYSCTLS[@]}"; do
    echo "$key = $(sysctl -n "$key")" >>"$markers/sysctls"
  done
  mkdir -p "$CLUSTER_DIR"
  touch "$CLUSTER_DIR/.uwsgi-it-cluster"
  # A shared mount, as / is on a systemd host: the agent mounts the homes with
  # HostToContainer propagation, which the runtime refuses on a private mount.
  mount --bind "$CLUSTER_DIR" "$CLUSTER_DIR"
  mount --make-rshared "$CLUSTER_DIR"
  mkdir -p "$run" "$logs" "$CLUSTER_DIR/homes"
  # From here on a failure leaves nothing behind (the logs are kept for a look).
  ok=0
  trap 'if [ "$ok" != 1 ]; then
    kept=$(mktemp -d /tmp/uwsgi-it-cluster-logs.XXXXXX)
    cp -r "$logs" "$kept" 2>/dev/null
    say "bring-up failed; removing what it made (logs kept in $kept)"
    down
  fi' EXIT

  # The watchdog: when the owner is gone, so is the cluster. A session of its own, deaf to the
  # signals a terminal or a CI job sends its process group, outside the cluster's cgroup.
  if [ "$owner" != manual ]; then
    setsid bash "$0" watchdog "$owner" </dev/null >/dev/null 2>&1 9>&- &
    echo "$!" >"$markers/watchdog.pid"
  fi

  say "network namespaces and bridge"
  make_network
  make_cgroups
  start_registry
  say "certificates"
  (umask 077 && make_pki)
  say "control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)"
  start_control_plane
  local node
  for node in "${NODES[@]}"; do
    say "server node $node (${NODE_IP[$node]}): containerd, kubelet, kube-proxy"
    start_node "$node"
  done
  local kubectl="$UWSGI_IT_CONTROL_PLANE_BIN/kubectl --kubeconfig=$CLUSTER_DIR/kubeconfig"
  for node in "${NODES[@]}"; do
    wait_for "node $node registered" 120 $kubectl get node "$node"
  done
  $kubectl wait --for=condition=Ready node --all --timeout=180s >&2 9>&- ||
    die "nodes not Ready; logs in $logs"
  ok=1
  {
    echo "KUBECONFIG=$CLUSTER_DIR/kubeconfig"
    echo "HOME_ROOT=$CLUSTER_DIR/homes"
    echo "CLIENT_NETNS=uitc-client"
    for node in "${NODES[@]}"; do
      local key=${node^^}
      echo "NODE_${key//-/_}=${NODE_IP[$node]}"
      echo "PUBLIC_${key//-/_}=${PUBLIC_IP[$node]}"
    done
    echo "REGISTRY=$REGISTRY"
    cat "$CLUSTER_DIR/release.env"
  } | tee "$CLUSTER_DIR/cluster.env"
  say "up: export KUBECONFIG=$CLUSTER_DIR/kubeconfig"
}

# Runs `down` once the owner process is gone (started by `up`, in a session of its own).
watchdog() {
  local owner=$1
  trap '' INT TERM HUP
  export WATCHDOG_SELF=$$
  while kill -0 "$owner" 2>/dev/null; do sleep 1; done
  exec 9>"$LOCK"
  flock 9
  # Only the cluster this watchdog was made for: a new one has another owner.
  [ "$(cat "$markers/owner" 2>/dev/null)" = "$owner" ] && down
  return 0
}

case ${1:-} in
  up) up ;;
  down)
    exec 9>"$LOCK"
    flock -w 600 9 || die "another hack/cluster.sh has held $LOCK for 10 minutes"
    down
    ;;
  watchdog)
    [ -n "${2:-}" ] || die "usage: $0 watchdog OWNER-PID"
    watchdog "$2"
    ;;
  status)
    if owner_alive; then echo "up, owned by $(cat "$markers/owner")"; else echo "down"; fi
    ;;
  *) die "usage: $0 up|down|status" ;;
esac
