//! A simulated cluster for the agent's end-to-end tests: the real API server, server nodes as
//! network namespaces behind one public segment, a client namespace on that segment, the
//! kubelet stand-in, and agents running in-process inside the nodes' namespaces.
//!
//! ```text
//! client (203.0.113.100, bridge br0) ── public0 (203.0.113.1<i>) node i (10.244.<i>.1, cbr0) ── pods
//! ```
//!
//! Everything is removed on drop, also while a failed test unwinds: agents are aborted, the
//! kubelet stand-in deletes its Pod namespaces, the node and client namespaces go, and the
//! cluster-scoped objects (Nodes, Customers) are deleted from a thread of their own (a test's
//! client cannot be used once its runtime is unwinding).

#![allow(dead_code)]

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use uwsgi_it_agent::metrics::Metrics;
use uwsgi_it_agent::{Agent, AgentOptions, NetworkNamespace};
use uwsgi_it_api::condition::{self, Condition};
use uwsgi_it_api::well_known::CONTROLLER_MANAGER;
use uwsgi_it_api::{Container, PortMapping};
use uwsgi_it_domain::config::OperatorConfig;
use uwsgi_it_testbed::control_plane::ControlPlane;
use uwsgi_it_testbed::kubelet::{Kubelet, KubeletNode};
use uwsgi_it_testbed::netns::Netns;

/// Bound for anything that must happen; it only matters when a test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);
/// Bound for one network exchange that must succeed.
pub const NET_PATIENCE: Duration = Duration::from_secs(2);
/// The client's address on the public segment.
pub const CLIENT_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
/// The period of the agents' full resync in these tests.
pub const RESYNC: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nftables,
    Iptables,
}

impl Backend {
    pub fn config_name(self) -> &'static str {
        match self {
            Backend::Nftables => "nftables",
            Backend::Iptables => "iptables",
        }
    }

    /// What an administrator (or a bad script) runs to wipe the rules.
    pub fn flush(self, netns: &Netns) {
        match self {
            Backend::Nftables => netns.run("nft", &["flush", "ruleset"]).unwrap(),
            Backend::Iptables => netns.run("iptables", &["-t", "nat", "-F"]).unwrap(),
        };
    }
}

pub async fn plane_with_crds() -> &'static ControlPlane {
    let plane = tokio::task::spawn_blocking(ControlPlane::shared)
        .await
        .expect("control plane starts");
    plane
        .install_crds(&uwsgi_it_api::crds())
        .await
        .expect("CRDs install");
    plane
}

/// A simulated server node.
pub struct SimNode {
    pub name: String,
    pub index: u8,
    pub public: Ipv4Addr,
    pub home_root: PathBuf,
    _home_dir: tempfile::TempDir,
    pub netns: Netns,
}

impl SimNode {
    pub fn public(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.public, port)
    }
}

/// An agent running in-process as a tokio task.
pub struct AgentHandle {
    task: Option<JoinHandle<anyhow::Result<()>>>,
    stop: Option<oneshot::Sender<()>>,
    pub metrics: Arc<Metrics>,
    pub ready: watch::Receiver<bool>,
    /// What the agent's `/healthz` answers.
    pub health: uwsgi_it_telemetry::Health,
    /// What the agent's `/metrics` serves.
    pub registry: Arc<uwsgi_it_telemetry::prometheus_client::registry::Registry>,
}

impl AgentHandle {
    /// Kills the agent as a crash would: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// SIGTERM-like stop; returns the agent's result.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("agent task"),
            None => Ok(()),
        }
    }

    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    pub async fn wait_ready(&mut self) {
        tokio::time::timeout(PATIENCE, self.ready.wait_for(|r| *r))
            .await
            .expect("agent ready in time")
            .expect("agent alive");
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The simulated cluster of one test.
pub struct World {
    pub client: Client,
    pub namespace: String,
    pub backend: Backend,
    pub kubelet: Option<Kubelet>,
    pub nodes: Vec<SimNode>,
    pub client_netns: Arc<Netns>,
    kubeconfig: PathBuf,
    cluster_objects: Vec<(&'static str, String)>,
}

static NEXT_WORLD: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl World {
    /// `nodes` server nodes, each with a Node object, and the kubelet stand-in listening on
    /// `ports` in every Pod that declares none.
    pub async fn new(plane: &ControlPlane, backend: Backend, nodes: u8, ports: Vec<u16>) -> World {
        // Logs go through the test writer, so a failing test shows what its agents did.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "uwsgi_it_agent=info".into()),
            )
            .try_init();
        let client = plane.client().await.unwrap();
        let namespace = plane.namespace("agent-e2e").await.unwrap();
        let world_id = NEXT_WORLD.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let client_netns = uwsgi_it_testbed::netns::public_client().unwrap();
        let mut world = World {
            client: client.clone(),
            namespace,
            backend,
            kubelet: None,
            nodes: Vec::new(),
            client_netns: Arc::new(client_netns),
            kubeconfig: plane.kubeconfig_path().to_owned(),
            cluster_objects: Vec::new(),
        };
        for index in 1..=nodes {
            let name = format!("srv{index}-{}-{world_id}", std::process::id());
            let netns = Netns::create("node").unwrap();
            let public = Ipv4Addr::new(203, 0, 113, 10 + index);
            let peer = format!("p{index}");
            uwsgi_it_testbed::netns::attach_public_node(&world.client_netns, &netns, &peer, public)
                .unwrap();
            let home_dir = tempfile::tempdir().unwrap();
            let home_root = home_dir.path().join("containers");
            world.nodes.push(SimNode {
                name: name.clone(),
                index,
                public,
                home_root,
                _home_dir: home_dir,
                netns,
            });
            let cidr = format!("10.244.{index}.0/24");
            let public_text = public.to_string();
            uwsgi_it_testbed::servers::declare(
                &client,
                &name,
                &uwsgi_it_testbed::servers::ServerSpec {
                    memory: 16000,
                    storage: 500000,
                    address: Some(&public_text),
                    pod_cidr: Some(&cidr),
                },
                true,
            )
            .await
            .unwrap();
            world.cluster_objects.push(("node", name));
        }
        let kubelet_nodes = world
            .nodes
            .iter()
            .map(|n| KubeletNode {
                name: n.name.clone(),
                netns: n.netns.name().to_owned(),
                index: n.index,
            })
            .collect();
        world.kubelet = Some(Kubelet::start(client, kubelet_nodes, ports).unwrap());
        world
    }

    pub fn node(&self, index: u8) -> &SimNode {
        &self.nodes[usize::from(index - 1)]
    }

    pub fn kubelet(&self) -> &Kubelet {
        self.kubelet.as_ref().unwrap()
    }

    /// Remembers a cluster-scoped object to delete on drop.
    pub fn owns_cluster_object(&mut self, kind: &'static str, name: &str) {
        self.cluster_objects.push((kind, name.to_owned()));
    }

    pub fn config(&self, node: &SimNode, extra: &str) -> OperatorConfig {
        OperatorConfig::from_yaml(&format!(
            "homeRoot: {}\nportForward:\n  backend: {}\n  resyncPeriod: {}s\n{extra}",
            node.home_root.display(),
            self.backend.config_name(),
            RESYNC.as_secs(),
        ))
        .unwrap()
    }

    pub fn start_agent(&self, index: u8) -> AgentHandle {
        let node = self.node(index);
        start_agent(self.client.clone(), node, self.config(node, ""))
    }

    pub fn start_agent_with(&self, index: u8, extra_config: &str) -> AgentHandle {
        let node = self.node(index);
        start_agent(self.client.clone(), node, self.config(node, extra_config))
    }

    pub fn containers(&self) -> Api<Container> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn mappings(&self) -> Api<PortMapping> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Pods' namespaces first (their veths hang off the nodes), then the nodes' and client's
        // namespaces (fields), then the cluster-scoped objects.
        self.kubelet.take();
        let objects = std::mem::take(&mut self.cluster_objects);
        let kubeconfig = self.kubeconfig.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let Ok(yaml) = std::fs::read_to_string(&kubeconfig) else {
                    return;
                };
                let Ok(kubeconfig) = kube::config::Kubeconfig::from_yaml(&yaml) else {
                    return;
                };
                let Ok(config) = kube::Config::from_custom_kubeconfig(
                    kubeconfig,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                else {
                    return;
                };
                let Ok(client) = Client::try_from(config) else {
                    return;
                };
                for (kind, name) in objects {
                    let params = DeleteParams::default();
                    let _ = match kind {
                        "node" => {
                            uwsgi_it_testbed::servers::remove(&client, &name).await;
                            Ok(())
                        }
                        _ => Api::<uwsgi_it_api::Customer>::all(client.clone())
                            .delete(&name, &params)
                            .await
                            .map(|_| ()),
                    };
                }
            });
        })
        .join();
    }
}

pub fn start_agent(client: Client, node: &SimNode, config: OperatorConfig) -> AgentHandle {
    let agent = Agent::new(
        client,
        AgentOptions {
            node_name: node.name.clone(),
            config,
            netns: NetworkNamespace::Named(node.netns.name().to_owned()),
            container_networks: Vec::new(),
        },
    )
    .unwrap();
    let metrics = agent.metrics();
    let ready = agent.ready();
    let health = agent.health();
    let registry = agent.registry();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async move {
        let _ = stopped.await;
    }));
    AgentHandle {
        task: Some(task),
        stop: Some(stop),
        metrics,
        ready,
        health,
        registry,
    }
}

/// Polls `check` until it returns `Some`, failing the test after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the object's condition `type_` satisfies `pred`; returns it.
pub async fn condition_where<K>(
    api: &Api<K>,
    name: &str,
    type_: &str,
    pred: impl Fn(&Condition) -> bool,
) -> Condition
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    eventually(&format!("{name}: condition {type_}"), || async {
        let object = api.get(name).await.ok()?;
        let value = serde_json::to_value(&object).ok()?;
        let conditions: Vec<Condition> =
            serde_json::from_value(value["status"]["conditions"].clone()).ok()?;
        condition::find(&conditions, type_)
            .filter(|c| pred(c))
            .cloned()
    })
    .await
}

/// Creates an object from JSON in the world's namespace.
pub async fn create<K>(api: &Api<K>, value: Value) -> K
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    let object: K = serde_json::from_value(value).unwrap();
    api.create(&PostParams::default(), &object).await.unwrap()
}

fn condition_json(type_: &str, status: bool, reason: &str) -> Value {
    json!({
        "type": type_,
        "status": if status { "True" } else { "False" },
        "reason": reason,
        "message": format!("written by the test in the controller's place"),
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    })
}

/// Writes, as the controller would, the status of an admitted Container.
pub async fn write_container_status_as_controller(
    world: &World,
    name: &str,
    node: &SimNode,
    uid: u32,
    extra_conditions: Vec<Value>,
) {
    let container = world.containers().get(name).await.unwrap();
    let mut conditions = vec![condition_json("Admitted", true, "Admitted")];
    conditions.extend(extra_conditions);
    let body = json!({
        "apiVersion": "uwsgi.it/v1alpha1",
        "kind": "Container",
        "metadata": {"name": name},
        "status": {
            "uid": uid,
            "server": node.name,
            "address": node.public.to_string(),
            "home": node.home_root.join(uid.to_string()).display().to_string(),
            "reserved": {"memory": container.spec.memory, "storage": container.spec.storage},
            "conditions": conditions,
        },
    });
    world
        .containers()
        .patch_status(
            name,
            &PatchParams::apply(CONTROLLER_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .unwrap();
}

/// Writes, as the controller would, a PortMapping's status.
pub async fn write_mapping_status_as_controller(
    world: &World,
    name: &str,
    node: &SimNode,
    accepted: bool,
    target: Option<SocketAddrV4>,
) {
    let mut status = json!({
        "server": node.name,
        "address": node.public.to_string(),
        "conditions": [condition_json("Accepted", accepted, if accepted { "Accepted" } else { "PortTaken" })],
    });
    if let Some(target) = target {
        status["target"] = json!(target.to_string());
    }
    let body = json!({
        "apiVersion": "uwsgi.it/v1alpha1",
        "kind": "PortMapping",
        "metadata": {"name": name},
        "status": status,
    });
    world
        .mappings()
        .patch_status(
            name,
            &PatchParams::apply(CONTROLLER_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .unwrap();
}

/// Creates a Pod bound to `node` (what the controller's workload would be) and waits for the
/// kubelet stand-in to run it; returns its address.
pub async fn run_pod(
    world: &World,
    name: &str,
    node: &SimNode,
    declared_ports: &[u16],
) -> Ipv4Addr {
    let ports: Vec<Value> = declared_ports
        .iter()
        .map(|p| json!({"containerPort": p}))
        .collect();
    // Owned by its Container, as the controller's workload Pods are: the agent forwards only to
    // a container's own Pod.
    let container = world.containers().get(name).await.unwrap();
    create(
        &world.pods(),
        json!({
            "metadata": {"name": name, "namespace": world.namespace, "ownerReferences": [{
                "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container", "name": name,
                "uid": container.metadata.uid, "controller": true}]},
            "spec": {
                "nodeName": node.name,
                "containers": [{"name": "main", "image": "example.invalid/distro", "ports": ports}],
            },
        }),
    )
    .await;
    let namespace = world.namespace.clone();
    eventually(&format!("pod {name} running"), || async {
        world.kubelet().pod_address(&namespace, name)
    })
    .await
}
