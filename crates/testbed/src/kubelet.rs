//! A kubelet stand-in for end-to-end tests: it "runs" the Pods bound to the simulated server
//! nodes the way a kubelet with a bridge CNI would, with network namespaces instead of
//! containers.
//!
//! Node `i` (a network namespace, see [`KubeletNode`]) gets a bridge `cbr0` holding
//! `10.244.<i>.1/24`; each Pod bound to it (`spec.nodeName`) gets a network namespace of its
//! own, a veth into that bridge with the next free address of `10.244.<i>.0/24`, a default route
//! through the node, and TCP and UDP echo listeners on the container ports the Pod declares, or
//! when it declares none, on the ports the test asked for (the PortMappings' private ports). The Pod's status is then patched as a kubelet would: phase
//! `Running`, condition `Ready=True`, `podIP`. A Pod being deleted is torn down and removed
//! (grace period 0), as a kubelet confirms a termination.
//!
//! Everything runs in one tokio task; dropping the [`Kubelet`] stops it and deletes every Pod
//! namespace it made (and with them the veths), also while a failed test unwinds.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::netns::{EchoServer, Netns, tcp_echo_server, udp_echo_server};

/// A simulated server node the stand-in runs Pods on.
#[derive(Debug, Clone)]
pub struct KubeletNode {
    /// The Node's name (`spec.nodeName` of its Pods).
    pub name: String,
    /// The node's network namespace (its `ip netns` name).
    pub netns: String,
    /// Pod range `10.244.<index>.0/24`; the node is `.1`.
    pub index: u8,
}

impl KubeletNode {
    /// The node's address on its pod network (the Pods' gateway).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index, 1)
    }

    /// The node's pod CIDR.
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }
}

/// One running Pod: its listeners (dropped first) and its namespace.
struct Sandbox {
    _servers: Vec<EchoServer>,
    netns: Arc<Netns>,
    address: Ipv4Addr,
}

#[derive(Default)]
struct State {
    /// By Pod uid.
    sandboxes: HashMap<String, Sandbox>,
    /// `namespace/name` → Pod uid, for [`Kubelet::pod_address`].
    names: BTreeMap<String, String>,
    /// Next host number per node index.
    next_host: HashMap<u8, u8>,
}

/// The running stand-in; see the module documentation.
pub struct Kubelet {
    task: JoinHandle<()>,
    state: Arc<Mutex<State>>,
}

impl Kubelet {
    /// Prepares the nodes' bridges and starts watching Pods. `ports` are listened on, over TCP
    /// and UDP, in every Pod that declares no container port of its own.
    pub fn start(client: Client, nodes: Vec<KubeletNode>, ports: Vec<u16>) -> Result<Kubelet> {
        for node in &nodes {
            let ip = |args: &[&str]| run(Command::new("ip").args(["-n", &node.netns]).args(args));
            ip(&["link", "add", "cbr0", "type", "bridge"])?;
            ip(&[
                "address",
                "add",
                &format!("{}/24", node.gateway()),
                "dev",
                "cbr0",
            ])?;
            ip(&["link", "set", "cbr0", "up"])?;
            run(Command::new("ip").args([
                "netns",
                "exec",
                &node.netns,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
            ]))?;
        }
        let state = Arc::new(Mutex::new(State::default()));
        let task = tokio::spawn(watch_pods(client, nodes, ports, state.clone()));
        Ok(Kubelet { task, state })
    }

    /// The address the stand-in gave Pod `namespace/name`, once it runs.
    pub fn pod_address(&self, namespace: &str, name: &str) -> Option<Ipv4Addr> {
        let state = self.state.lock().expect("kubelet state");
        let uid = state.names.get(&format!("{namespace}/{name}"))?;
        state.sandboxes.get(uid).map(|s| s.address)
    }

    /// The network namespace of Pod `namespace/name`, once it runs (e.g. for a hairpin client).
    pub fn pod_netns(&self, namespace: &str, name: &str) -> Option<Arc<Netns>> {
        let state = self.state.lock().expect("kubelet state");
        let uid = state.names.get(&format!("{namespace}/{name}"))?;
        state.sandboxes.get(uid).map(|s| s.netns.clone())
    }

    /// How many Pods run right now.
    pub fn running(&self) -> usize {
        self.state.lock().expect("kubelet state").sandboxes.len()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
        // Dropping the sandboxes stops the listeners and deletes the namespaces.
        if let Ok(mut state) = self.state.lock() {
            state.sandboxes.clear();
        }
    }
}

async fn watch_pods(
    client: Client,
    nodes: Vec<KubeletNode>,
    ports: Vec<u16>,
    state: Arc<Mutex<State>>,
) {
    let api: Api<Pod> = Api::all(client);
    // With backoff: while the API server is down (outage tests) the watch retries calmly
    // instead of spinning on connection errors.
    let mut events =
        std::pin::pin!(watcher(api.clone(), watcher::Config::default()).default_backoff());
    while let Some(event) = events.next().await {
        let pods = match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => vec![pod],
            Ok(watcher::Event::Delete(pod)) => {
                tear_down(&state, &pod);
                continue;
            }
            Ok(_) => continue,
            Err(error) => {
                tracing::warn!(%error, "kubelet stand-in: pod watch failed");
                continue;
            }
        };
        for pod in pods {
            let Some(node) = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .and_then(|name| nodes.iter().find(|n| n.name == name))
            else {
                continue;
            };
            if let Err(error) = handle(&api, node, &ports, &state, &pod).await {
                tracing::warn!(pod = %pod.name_any(), error = %format!("{error:#}"), "kubelet stand-in");
            }
        }
    }
}

async fn handle(
    api: &Api<Pod>,
    node: &KubeletNode,
    ports: &[u16],
    state: &Arc<Mutex<State>>,
    pod: &Pod,
) -> Result<()> {
    let namespace = pod.namespace().unwrap_or_default();
    let pod_api: Api<Pod> = Api::namespaced(api.clone().into_client(), &namespace);
    if pod.metadata.deletion_timestamp.is_some() {
        tear_down(state, pod);
        pod_api
            .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
            .await
            .map(|_| ())
            .or_else(|e| match e {
                kube::Error::Api(status) if status.code == 404 => Ok(()),
                e => Err(e),
            })?;
        return Ok(());
    }
    let uid = pod.uid().context("pod without uid")?;
    let known = state
        .lock()
        .expect("kubelet state")
        .sandboxes
        .get(&uid)
        .map(|s| s.address);
    let address = match known {
        Some(address) => address,
        None => {
            let host = {
                let mut state = state.lock().expect("kubelet state");
                let next = state.next_host.entry(node.index).or_insert(2);
                let host = *next;
                *next = next.checked_add(1).context("pod range exhausted")?;
                host
            };
            let address = Ipv4Addr::new(10, 244, node.index, host);
            let node = node.clone();
            let ports = declared_ports(pod).unwrap_or_else(|| ports.to_vec());
            let sandbox =
                tokio::task::spawn_blocking(move || create_sandbox(&node, address, host, &ports))
                    .await??;
            let mut state = state.lock().expect("kubelet state");
            state
                .names
                .insert(format!("{namespace}/{}", pod.name_any()), uid.clone());
            state.sandboxes.insert(uid, sandbox);
            address
        }
    };
    let status = pod.status.as_ref();
    let reported = status.and_then(|s| s.pod_ip.as_deref()) == Some(&address.to_string())
        && status.and_then(|s| s.phase.as_deref()) == Some("Running");
    if reported {
        return Ok(());
    }
    let now = jiff_now();
    let patch = json!({"status": {
        "phase": "Running",
        "hostIP": node.gateway().to_string(),
        "podIP": address.to_string(),
        "podIPs": [{"ip": address.to_string()}],
        "startTime": now,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "lastTransitionTime": now},
        ],
    }});
    pod_api
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

fn jiff_now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn create_sandbox(
    node: &KubeletNode,
    address: Ipv4Addr,
    host: u8,
    ports: &[u16],
) -> Result<Sandbox> {
    let netns = Netns::create("pod")?;
    let host_side = format!("veth{}x{host}", node.index);
    run(Command::new("ip").args([
        "-n",
        &node.netns,
        "link",
        "add",
        &host_side,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        netns.name(),
    ]))?;
    run(Command::new("ip").args([
        "-n",
        &node.netns,
        "link",
        "set",
        &host_side,
        "master",
        "cbr0",
        "up",
    ]))?;
    // What the bridge CNI's `hairpinMode` does: with br_netfilter loaded, a Pod reaching its
    // own public port is DNATed on the bridge and must be sent back out of the port it came in.
    run(Command::new("ip").args([
        "-n",
        &node.netns,
        "link",
        "set",
        &host_side,
        "type",
        "bridge_slave",
        "hairpin",
        "on",
    ]))?;
    netns.add_address("eth0", &format!("{address}/24"))?;
    netns.add_route(&["default", "via", &node.gateway().to_string()])?;
    let mut servers = Vec::new();
    for &port in ports {
        let listen = SocketAddrV4::new(address, port);
        servers.push(tcp_echo_server(&netns, listen)?);
        servers.push(udp_echo_server(&netns, listen)?);
    }
    Ok(Sandbox {
        _servers: servers,
        netns: Arc::new(netns),
        address,
    })
}

/// The container ports the Pod declares, if it declares any.
fn declared_ports(pod: &Pod) -> Option<Vec<u16>> {
    let ports: Vec<u16> = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    (!ports.is_empty()).then_some(ports)
}

fn tear_down(state: &Arc<Mutex<State>>, pod: &Pod) {
    let Some(uid) = pod.uid() else { return };
    let mut state = state.lock().expect("kubelet state");
    state.sandboxes.remove(&uid);
    state.names.retain(|_, known| *known != uid);
}

fn run(command: &mut Command) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
