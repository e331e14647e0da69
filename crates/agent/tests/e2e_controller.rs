//! The whole system end to end, with the REAL controller: a real control plane of its own per
//! test, the controller on a thread and runtime of its own, one agent per simulated server node
//! (each node a network namespace with a public address on a segment shared with a client
//! namespace), and the kubelet stand-in giving Pods addresses and listeners.
//!
//! Every file in `examples/` is applied with `kubectl apply -f`, exactly as a supplier and a
//! customer would, and each object reaches its state with statuses written by the controller and
//! the agents only: nothing in this file writes a status. Traffic from the client namespace to
//! `<server-1's public address>:9000` reaches hydra's listener on its private port 8000, with both
//! netfilter backends; and the forward keeps carrying traffic while the API server is down.
//!
//! ```text
//! client (203.0.113.100, br0) ── public0 (203.0.113.10) server-1 (10.244.1.1, cbr0) ── pods
//!                             └─ public0 (203.0.113.11) server-2 (10.244.2.1, cbr0) ── pods
//! ```
//!
//! Each test owns its control plane, so the examples' fixed names (Customer `acme`, Node
//! `server-1`, address `203.0.113.10`) are used as they are; the second server node is the Node
//! example with its name and address substituted. Everything is removed on drop, also while a
//! failed test unwinds: agents, the kubelet stand-in's Pod namespaces, the controller, the node
//! and client namespaces, the homes, and the control plane's processes and files. Needs root.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use uwsgi_it_agent::metrics::Metrics;
use uwsgi_it_agent::{Agent, AgentOptions, NetworkNamespace};
use uwsgi_it_api::condition::{
    self, ACCEPTED, ADMITTED, AVAILABLE, Condition, HOME_READY, PROGRAMMED, READY, RUNNING,
};
use uwsgi_it_api::{Container, CustomDistro, Customer, PortMapping};
use uwsgi_it_domain::config::OperatorConfig;
use uwsgi_it_testbed::control_plane::OwnedControlPlane;
use uwsgi_it_testbed::kubelet::{Kubelet, KubeletNode};
use uwsgi_it_testbed::netns::{Netns, tcp_exchange};

/// Bound for anything the controller and the agents must do; it only matters when a test fails.
const PATIENCE: Duration = Duration::from_secs(90);
/// Bound for one network exchange that must succeed.
const NET_PATIENCE: Duration = Duration::from_secs(2);
/// The client's address on the public segment.
const CLIENT_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
/// The node and address the examples name.
const EXAMPLE_NODE: &str = "server-1";
const EXAMPLE_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The second server node of these tests.
const SECOND_NODE: &str = "server-2";
const SECOND_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
/// The quickstart's mapping (examples/03-portmapping-hydra.yaml).
const PUBLIC_PORT: u16 = 9000;
const PRIVATE_PORT: u16 = 8000;
/// The customer namespace of the examples.
const CUSTOMER_NAMESPACE: &str = "acme";
/// Where the controller keeps its Lease and uid store.
const CONTROLLER_NAMESPACE: &str = "uwsgi-it-system";

#[derive(Debug, Clone, Copy)]
enum Backend {
    Nftables,
    Iptables,
}

impl Backend {
    fn config_name(self) -> &'static str {
        match self {
            Backend::Nftables => "nftables",
            Backend::Iptables => "iptables",
        }
    }
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn example(file: &str) -> PathBuf {
    examples_dir().join(file)
}

/// The real controller on a thread and runtime of its own, stopped when dropped.
struct RunningController {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningController {
    fn start(config: kube::Config, operator: OperatorConfig) -> RunningController {
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("controller".into())
            .spawn(move || {
                let runtime = tokio::runtime::Runtime::new().expect("controller runtime");
                runtime.block_on(async move {
                    let client = Client::try_from(config).expect("controller client");
                    let options = uwsgi_it_controller::Options::new(operator, CONTROLLER_NAMESPACE);
                    let shutdown = async move {
                        let _ = stopped.await;
                    };
                    if let Err(e) = uwsgi_it_controller::run(client, options, shutdown).await {
                        eprintln!("controller stopped with an error: {e:#}");
                    }
                });
            })
            .expect("spawning the controller thread");
        RunningController {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for RunningController {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One node's agent, running in-process as a task of the test's runtime.
struct RunningAgent {
    task: Option<JoinHandle<anyhow::Result<()>>>,
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
}

impl RunningAgent {
    async fn wait_ready(&mut self) {
        tokio::time::timeout(PATIENCE, self.ready.wait_for(|r| *r))
            .await
            .expect("agent ready in time")
            .expect("agent alive");
    }

    fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A simulated server node: a network namespace with a public address.
struct SimNode {
    name: &'static str,
    public: Ipv4Addr,
    netns: Netns,
}

impl SimNode {
    fn public(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.public, port)
    }
}

/// One test's whole system. Fields drop in declaration order after [`Drop::drop`] stopped the
/// programs: network namespaces, homes, then the control plane last.
struct Cluster {
    agents: Vec<RunningAgent>,
    kubelet: Option<Kubelet>,
    controller: Option<RunningController>,
    nodes: Vec<SimNode>,
    client_netns: Arc<Netns>,
    home: tempfile::TempDir,
    client: Client,
    plane: OwnedControlPlane,
}

/// Release name the chart's RBAC is rendered with.
const RELEASE: &str = "uwsgi-it";

/// A client with a token of the chart's `<release>-<program>` ServiceAccount, returned once its
/// RBAC reaches the authorizer (it can list Containers cluster-wide).
async fn service_account_client(plane: &OwnedControlPlane, program: &str) -> Client {
    let client = plane
        .service_account_client(CONTROLLER_NAMESPACE, &format!("{RELEASE}-{program}"))
        .await
        .expect("ServiceAccount token");
    let containers: Api<uwsgi_it_api::Container> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Err(error) = containers.list(&Default::default()).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{program} ServiceAccount still cannot list Containers: {error}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
}

impl Cluster {
    /// A fresh control plane with the CRDs, the controller, the network topology, the server
    /// Servers from `examples/00-server.yaml` (server-1 exactly as written, server-2 with
    /// its name and address substituted), the kubelet stand-in and one agent per node.
    async fn start(backend: Backend, nodes: &[(&'static str, Ipv4Addr)]) -> Cluster {
        uwsgi_it_telemetry::init_tracing("warn", false);
        let plane = tokio::task::spawn_blocking(OwnedControlPlane::start)
            .await
            .expect("control-plane thread")
            .unwrap_or_else(|e| panic!("starting the control plane: {e:#}"));
        plane
            .install_crds(&uwsgi_it_api::crds())
            .await
            .expect("CRDs install");
        let client = plane.client().await.expect("admin client");
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": CONTROLLER_NAMESPACE}}))
                    .unwrap(),
            )
            .await
            .expect("controller namespace");
        // The controller and the agents run with real tokens of the chart's ServiceAccounts,
        // so everything below also proves the chart's RBAC is enough for their whole job.
        let rbac = uwsgi_it_testbed::chart::render_rbac(RELEASE, CONTROLLER_NAMESPACE)
            .expect("the chart's RBAC renders");
        plane.apply_yaml(&rbac).expect("the chart's RBAC applies");
        let agent_client = service_account_client(&plane, "agent").await;

        let home = tempfile::tempdir().expect("home root");
        let config = operator_config(&home.path().join("containers"), backend);
        service_account_client(&plane, "controller").await;
        let controller = RunningController::start(
            plane
                .service_account_config(CONTROLLER_NAMESPACE, &format!("{RELEASE}-controller"))
                .await
                .expect("controller config"),
            config.clone(),
        );

        let client_netns = uwsgi_it_testbed::netns::public_client().unwrap();
        let mut cluster = Cluster {
            agents: Vec::new(),
            kubelet: None,
            controller: Some(controller),
            nodes: Vec::new(),
            client_netns: Arc::new(client_netns),
            home,
            client: client.clone(),
            plane,
        };
        for (index, &(name, public)) in nodes.iter().enumerate() {
            let netns = Netns::create("node").unwrap();
            let peer = format!("p{}", index + 1);
            uwsgi_it_testbed::netns::attach_public_node(
                &cluster.client_netns,
                &netns,
                &peer,
                public,
            )
            .unwrap();
            cluster.nodes.push(SimNode {
                name,
                public,
                netns,
            });
            cluster.apply_server_node(name, public).await;
        }
        let kubelet_nodes = cluster
            .nodes
            .iter()
            .enumerate()
            .map(|(index, node)| KubeletNode {
                name: node.name.to_owned(),
                netns: node.netns.name().to_owned(),
                index: u8::try_from(index + 1).unwrap(),
            })
            .collect();
        cluster.kubelet =
            Some(Kubelet::start(client.clone(), kubelet_nodes, vec![PRIVATE_PORT]).unwrap());
        for node in &cluster.nodes {
            let agent = Agent::new(
                agent_client.clone(),
                AgentOptions {
                    node_name: node.name.to_owned(),
                    config: config.clone(),
                    netns: NetworkNamespace::Named(node.netns.name().to_owned()),
                    container_networks: Vec::new(),
                },
            )
            .expect("agent options");
            let metrics = agent.metrics();
            let ready = agent.ready();
            let task = tokio::spawn(agent.run(std::future::pending()));
            cluster.agents.push(RunningAgent {
                task: Some(task),
                metrics,
                ready,
            });
        }
        cluster
    }

    /// The Node (as a kubelet registers it), then `kubectl apply -f examples/00-server.yaml`,
    /// adapted to this node when it is not the example's own.
    async fn apply_server_node(&self, name: &str, address: Ipv4Addr) {
        uwsgi_it_testbed::servers::register_node(&self.client, name, None)
            .await
            .unwrap();
        let path = example("00-server.yaml");
        let original = std::fs::read_to_string(&path).unwrap();
        let adapted = original
            .replace(EXAMPLE_NODE, name)
            .replace(&EXAMPLE_ADDRESS.to_string(), &address.to_string());
        if adapted == original {
            self.apply_example("00-server.yaml");
        } else {
            self.kubectl_apply_stdin(&adapted);
        }
    }

    /// `kubectl apply -f examples/<file>`.
    fn apply_example(&self, file: &str) {
        let output = self
            .plane
            .kubectl()
            .arg("apply")
            .arg("-f")
            .arg(example(file))
            .output()
            .expect("kubectl runs");
        assert!(
            output.status.success(),
            "kubectl apply -f examples/{file} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn kubectl_apply_stdin(&self, manifest: &str) {
        let mut child = self
            .plane
            .kubectl()
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(manifest.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "kubectl apply of\n{manifest}\nfailed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let output = self.plane.kubectl().args(args).output().unwrap();
        assert!(
            output.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn home_root(&self) -> PathBuf {
        self.home.path().join("containers")
    }

    fn kubelet(&self) -> &Kubelet {
        self.kubelet.as_ref().unwrap()
    }

    fn customers(&self) -> Api<Customer> {
        Api::all(self.client.clone())
    }

    fn containers(&self) -> Api<Container> {
        Api::namespaced(self.client.clone(), CUSTOMER_NAMESPACE)
    }

    fn mappings(&self) -> Api<PortMapping> {
        Api::namespaced(self.client.clone(), CUSTOMER_NAMESPACE)
    }

    fn distros(&self) -> Api<CustomDistro> {
        Api::namespaced(self.client.clone(), CUSTOMER_NAMESPACE)
    }

    async fn wait_agents_ready(&mut self) {
        for agent in &mut self.agents {
            agent.wait_ready().await;
        }
    }

    /// Customer `acme` (examples/01) applied and Ready: its namespace exists for what follows.
    async fn customer_ready(&self) -> Customer {
        self.apply_example("01-customer.yaml");
        wait_for(&self.customers(), "acme", "Customer Ready", |c| {
            has(c, READY, "True")
        })
        .await
    }

    /// Containers `hydra` (examples/02) and mapping `hydra-web` (examples/03) applied, admitted,
    /// running, programmed. Returns hydra's Pod address.
    async fn quickstart(&self) -> Ipv4Addr {
        self.apply_example("02-container-hydra.yaml");
        let hydra = wait_for(
            &self.containers(),
            "hydra",
            "hydra Admitted, HomeReady and Running",
            |c| has(c, ADMITTED, "True") && has(c, HOME_READY, "True") && has(c, RUNNING, "True"),
        )
        .await;
        let pod = self
            .kubelet()
            .pod_address(CUSTOMER_NAMESPACE, "hydra")
            .expect("the kubelet stand-in runs hydra's Pod");
        let status = hydra.status.unwrap();
        assert_eq!(status.ip, Some(pod.to_string()), "hydra's status.ip");
        self.apply_example("03-portmapping-hydra.yaml");
        let mapping = wait_for(
            &self.mappings(),
            "hydra-web",
            "hydra-web Accepted and Programmed",
            |m| has(m, ACCEPTED, "True") && has(m, PROGRAMMED, "True"),
        )
        .await;
        let status = mapping.status.unwrap();
        assert_eq!(
            status.target,
            Some(SocketAddrV4::new(pod, PRIVATE_PORT).to_string())
        );
        assert_eq!(status.server.as_deref(), Some(EXAMPLE_NODE));
        assert_eq!(status.address, Some(EXAMPLE_ADDRESS.to_string()));
        pod
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Programs first (agents never touch rules or homes when stopped), then the Pods'
        // namespaces (their veths hang off the nodes); the fields follow.
        self.agents.clear();
        self.kubelet.take();
        self.controller.take();
    }
}

fn operator_config(home_root: &Path, backend: Backend) -> OperatorConfig {
    OperatorConfig::from_yaml(&format!(
        "homeRoot: {}
distros:
  bookworm: docker.io/library/debian:bookworm-slim
customDistroImage: uwsgi-it.local/distro-root:test
portForward:
  backend: {}
  resyncPeriod: 1s
",
        home_root.display(),
        backend.config_name()
    ))
    .expect("test configuration")
}

/// The object's condition `type_`, read from its JSON so it works for every kind.
fn condition_of<K: Serialize>(object: &K, type_: &str) -> Option<Condition> {
    let value = serde_json::to_value(object).ok()?;
    let conditions: Vec<Condition> =
        serde_json::from_value(value["status"]["conditions"].clone()).ok()?;
    condition::find(&conditions, type_).cloned()
}

fn has<K: Serialize>(object: &K, type_: &str, status: &str) -> bool {
    condition_of(object, type_).is_some_and(|c| c.status == status)
}

/// Polls `name` until `check` holds; fails the test after [`PATIENCE`] showing the object.
async fn wait_for<K>(api: &Api<K>, name: &str, what: &str, check: impl Fn(&K) -> bool) -> K
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        let current = api.get_opt(name).await;
        if let Ok(Some(object)) = &current
            && check(object)
        {
            return object.clone();
        }
        if Instant::now() > deadline {
            let shown = match current {
                Ok(Some(object)) => serde_json::to_string_pretty(&object).unwrap_or_default(),
                other => format!("{other:?}"),
            };
            panic!("timed out after {PATIENCE:?} waiting for {what}; {name} is:\n{shown}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One request/reply from the client namespace, on a blocking thread.
async fn exchange(
    client: &Arc<Netns>,
    to: SocketAddrV4,
    message: &str,
    timeout: Duration,
) -> std::io::Result<String> {
    let client = client.clone();
    let message = message.to_owned();
    tokio::task::spawn_blocking(move || tcp_exchange(&client, to, &message, timeout))
        .await
        .expect("exchange thread")
}

async fn every_example_reaches_its_state_and_traffic_flows(backend: Backend) {
    let mut cluster = Cluster::start(
        backend,
        &[
            (EXAMPLE_NODE, EXAMPLE_ADDRESS),
            (SECOND_NODE, SECOND_ADDRESS),
        ],
    )
    .await;

    // 00: both Servers are declared with the example's capacity and address (read by kubectl).
    let servers = cluster.kubectl(&[
        "get",
        "servers",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.spec.address} {end}",
    ]);
    assert_eq!(
        servers.trim(),
        format!("{EXAMPLE_NODE}={EXAMPLE_ADDRESS} {SECOND_NODE}={SECOND_ADDRESS}")
    );

    // 01: the Customer, its namespace.
    let acme = cluster.customer_ready().await;
    assert_eq!(
        acme.status.unwrap().namespace.as_deref(),
        Some(CUSTOMER_NAMESPACE)
    );

    // 02 + 03: hydra runs on server-1 and its public port 9000 is programmed.
    let pod = cluster.quickstart().await;
    let hydra = cluster.containers().get("hydra").await.unwrap();
    let status = hydra.status.clone().unwrap();
    let uid = status.uid.expect("hydra's uid");
    assert!(uid >= 30001, "uid {uid}");
    assert_eq!(status.server.as_deref(), Some(EXAMPLE_NODE));
    assert_eq!(status.address, Some(EXAMPLE_ADDRESS.to_string()));
    let hydra_home = cluster.home_root().join(uid.to_string());
    assert_eq!(status.home, Some(hydra_home.display().to_string()));
    let keys = std::fs::read_to_string(hydra_home.join(".ssh/authorized_keys"))
        .expect("hydra's authorized_keys written by the agent");
    assert!(keys.contains("alice@example"), "{keys}");

    // The real exchange: the client reaches hydra's listener on 8000 through 203.0.113.10:9000,
    // with its own address preserved (no masquerade for outside clients).
    let reply = exchange(
        &cluster.client_netns,
        cluster.nodes[0].public(PUBLIC_PORT),
        "hello hydra",
        NET_PATIENCE,
    )
    .await
    .unwrap_or_else(|e| panic!("tcp to {EXAMPLE_ADDRESS}:{PUBLIC_PORT} (pod {pod}): {e}"));
    assert_eq!(reply, format!("hello hydra from {CLIENT_ADDRESS}"));
    // server-2 does not forward server-1's port.
    assert!(
        exchange(
            &cluster.client_netns,
            cluster.nodes[1].public(PUBLIC_PORT),
            "wrong node",
            Duration::from_millis(500),
        )
        .await
        .is_err()
    );
    cluster.wait_agents_ready().await;
    assert_eq!(cluster.agents[0].metrics.forwards_programmed(), 1);
    assert_eq!(cluster.agents[1].metrics.forwards_programmed(), 0);

    // 04: the storage container gets a home, the CustomDistro is accepted and the agent makes its
    // (empty) tree, which is not available until the customer fills it.
    cluster.apply_example("04-custom-distro-storage.yaml");
    let store = wait_for(
        &cluster.containers(),
        "distro-store",
        "distro-store Admitted and HomeReady",
        |c| has(c, ADMITTED, "True") && has(c, HOME_READY, "True"),
    )
    .await;
    let distro = wait_for(
        &cluster.distros(),
        "ubuntu0001",
        "ubuntu0001 Accepted, Available=False",
        |d| has(d, ACCEPTED, "True") && has(d, AVAILABLE, "False"),
    )
    .await;
    let store_uid = store.status.unwrap().uid.expect("distro-store's uid");
    let tree = cluster
        .home_root()
        .join(".distros")
        .join(store_uid.to_string())
        .join("ubuntu0001");
    let unavailable = condition_of(&distro, AVAILABLE).unwrap();
    assert_eq!(unavailable.reason, "Empty", "{distro:?}");
    assert!(
        unavailable.message.contains("/distros/ubuntu0001"),
        "{}",
        unavailable.message
    );
    assert!(tree.is_dir(), "{} made by the agent", tree.display());
    // What the customer does through the storage container: fill in the root filesystem, here
    // the smallest one the agent accepts (a uWSGI every user may run).
    let owner = u32::try_from(store_uid).unwrap();
    for dir in ["etc", "usr/bin"] {
        std::fs::create_dir_all(tree.join(dir)).unwrap();
    }
    std::fs::write(tree.join("etc/os-release"), "ID=ubuntu\n").unwrap();
    std::fs::write(tree.join("usr/bin/uwsgi"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        tree.join("usr/bin/uwsgi"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::process::Command::new("chown")
        .args([
            "-R",
            &format!("{owner}:{owner}"),
            &tree.display().to_string(),
        ])
        .status()
        .unwrap();
    let distro = wait_for(
        &cluster.distros(),
        "ubuntu0001",
        "ubuntu0001 Available",
        |d| has(d, ACCEPTED, "True") && has(d, AVAILABLE, "True"),
    )
    .await;
    let status = distro.status.unwrap();
    assert_eq!(status.host_path, Some(tree.display().to_string()));
    let root = status.root.expect("the agent's survey of the tree");
    assert_eq!(root.directories, ["etc", "usr"]);
    assert_eq!(root.emperor, "/usr/bin/uwsgi");

    // 05: a container running on the custom distro.
    cluster.apply_example("05-container-custom-distro.yaml");
    wait_for(
        &cluster.containers(),
        "legacy-app",
        "legacy-app Admitted, HomeReady and Running",
        |c| has(c, ADMITTED, "True") && has(c, HOME_READY, "True") && has(c, RUNNING, "True"),
    )
    .await;
    assert!(
        cluster
            .kubelet()
            .pod_address(CUSTOMER_NAMESPACE, "legacy-app")
            .is_some()
    );
    wait_for(
        &cluster.distros(),
        "ubuntu0001",
        "ubuntu0001 used by legacy-app",
        |d| d.status.as_ref().is_some_and(|s| s.used_by == 1),
    )
    .await;

    // What a person sees.
    let listing = cluster.kubectl(&["get", "uwsgi", "-A"]);
    for name in [
        "acme",
        "hydra",
        "distro-store",
        "legacy-app",
        "hydra-web",
        "ubuntu0001",
    ] {
        assert!(listing.contains(name), "{name} missing from:\n{listing}");
    }
    // Still forwarding after everything else was applied.
    let reply = exchange(
        &cluster.client_netns,
        cluster.nodes[0].public(PUBLIC_PORT),
        "again",
        NET_PATIENCE,
    )
    .await
    .unwrap();
    assert_eq!(reply, format!("again from {CLIENT_ADDRESS}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_reaches_its_state_and_traffic_flows_nftables() {
    every_example_reaches_its_state_and_traffic_flows(Backend::Nftables).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_reaches_its_state_and_traffic_flows_iptables() {
    every_example_reaches_its_state_and_traffic_flows(Backend::Iptables).await;
}

/// How long the API server stays down while the forward is probed: several resync periods.
const OUTAGE: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forward_keeps_carrying_traffic_while_the_api_server_is_down() {
    let mut cluster = Cluster::start(Backend::Nftables, &[(EXAMPLE_NODE, EXAMPLE_ADDRESS)]).await;
    cluster.customer_ready().await;
    cluster.quickstart().await;
    cluster.wait_agents_ready().await;
    let public = cluster.nodes[0].public(PUBLIC_PORT);
    let reply = exchange(&cluster.client_netns, public, "before", NET_PATIENCE)
        .await
        .unwrap();
    assert_eq!(reply, format!("before from {CLIENT_ADDRESS}"));
    let node = &cluster.nodes[0];
    let rules_before = node
        .netns
        .run("nft", &["list", "table", "ip", "uwsgi_it"])
        .unwrap();
    assert!(
        rules_before.contains(&format!("{PUBLIC_PORT}")),
        "{rules_before}"
    );
    let failures_before = cluster.agents[0].metrics.sync_failures();

    cluster.plane.stop();
    assert!(
        cluster.customers().get("acme").await.is_err(),
        "the API server is still answering"
    );

    // A fresh connection every 100 ms for the whole outage; every one must get through.
    let client = cluster.client_netns.clone();
    let probes = tokio::task::spawn_blocking(move || {
        let until = Instant::now() + OUTAGE;
        let mut probes = 0u32;
        while Instant::now() < until {
            let message = format!("probe {probes}");
            let reply = tcp_exchange(&client, public, &message, NET_PATIENCE)
                .unwrap_or_else(|e| panic!("{message} during the outage: {e}"));
            assert_eq!(reply, format!("{message} from {CLIENT_ADDRESS}"));
            probes += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        probes
    })
    .await
    .expect("probes");
    assert!(probes >= 20, "only {probes} probes ran");

    // The agent neither flushed nor rewrote anything into something else, and is still there.
    let rules_after = node
        .netns
        .run("nft", &["list", "table", "ip", "uwsgi_it"])
        .unwrap();
    assert_eq!(rules_before, rules_after);
    assert_eq!(cluster.agents[0].metrics.forwards_programmed(), 1);
    assert_eq!(cluster.agents[0].metrics.sync_failures(), failures_before);
    assert!(
        cluster.agents[0].is_running(),
        "the agent gave up during the outage"
    );
}

/// What kstatus (Flux, Helm 4's `--wait`) and the shipped Argo CD check say of one object.
struct Health {
    kstatus: uwsgi_it_testbed::health::KStatus,
    argo: uwsgi_it_testbed::health::ArgoHealth,
    object: serde_json::Value,
}

impl Cluster {
    /// `kubectl get <resource> <name> -o json`, then both health computations on it.
    fn health(&self, resource: &str, name: &str) -> Health {
        let mut args = vec!["get", resource, name, "-o", "json"];
        if !matches!(resource, "servers" | "customers") {
            args.extend(["-n", CUSTOMER_NAMESPACE]);
        }
        let object: serde_json::Value = serde_json::from_str(&self.kubectl(&args)).unwrap();
        let kstatus = uwsgi_it_testbed::health::kstatus(std::slice::from_ref(&object))
            .unwrap_or_else(|e| panic!("kstatus: {e:#}"))
            .remove(0);
        let argo = uwsgi_it_testbed::health::argo_health(&object)
            .unwrap_or_else(|e| panic!("the Argo CD check: {e:#}"));
        Health {
            kstatus,
            argo,
            object,
        }
    }

    /// Waits until kstatus says `kstatus` and Argo CD `argo` of the object, both messages
    /// naming `reason`; fails after [`PATIENCE`] showing the object.
    async fn wait_health(
        &self,
        resource: &str,
        name: &str,
        kstatus: &str,
        argo: &str,
        reason: &str,
    ) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let health = self.health(resource, name);
            if health.kstatus.status == kstatus
                && health.argo.status == argo
                && health.kstatus.message.contains(reason)
                && health.argo.message.contains(reason)
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{resource}/{name}: expected kstatus {kstatus} and Argo CD {argo} naming {reason:?}, \
                     got kstatus {:?} and Argo CD {:?}; the object:\n{}",
                    health.kstatus,
                    health.argo,
                    serde_json::to_string_pretty(&health.object["status"]).unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `kubectl wait --for=condition=<condition>` on a Container; true when it returned in time.
    fn kubectl_wait(&self, container: &str, condition: &str) -> bool {
        self.plane
            .kubectl()
            .args([
                "wait",
                "-n",
                CUSTOMER_NAMESPACE,
                &format!("--for=condition={condition}"),
                "--timeout=60s",
                &format!("containers/{container}"),
            ])
            .output()
            .unwrap()
            .status
            .success()
    }
}

/// Every kind, healthy and refused, as the GitOps tools read it: kstatus (run from
/// `sigs.k8s.io/cli-utils` itself) and the shipped Argo CD health check must both say what a
/// person would: Current/Healthy when it works, InProgress/Progressing while the system is
/// still at it, Failed/Degraded when only a person can help; and `kubectl wait` returns after
/// an edit that does not restart the Pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitops_tools_read_every_kind_as_a_person_would() {
    let cluster = Cluster::start(
        Backend::Nftables,
        &[
            (EXAMPLE_NODE, EXAMPLE_ADDRESS),
            (SECOND_NODE, SECOND_ADDRESS),
        ],
    )
    .await;
    cluster.customer_ready().await;
    cluster.quickstart().await;

    // Everything the quickstart made works.
    for (resource, name) in [
        ("servers", EXAMPLE_NODE),
        ("customers", "acme"),
        ("containers", "hydra"),
        ("portmappings", "hydra-web"),
    ] {
        cluster
            .wait_health(resource, name, "Current", "Healthy", "")
            .await;
    }
    let hydra = cluster.health("containers", "hydra");
    assert_eq!(
        hydra.argo.message, "Admitted, HomeReady, Running, KeysReady are True",
        "{:?}",
        hydra.object["status"]
    );

    // An edit that restarts nothing (keys, tags, note): every condition follows the new
    // generation, `kubectl wait` returns for Ready and for Running, and the Pod stays.
    let pod_before = cluster.kubelet().pod_address(CUSTOMER_NAMESPACE, "hydra");
    let pod_uid = |object: &serde_json::Value| object["metadata"]["uid"].clone();
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(cluster.client.clone(), CUSTOMER_NAMESPACE);
    let uid_before = pod_uid(&serde_json::to_value(pods.get("hydra").await.unwrap()).unwrap());
    cluster.kubectl(&[
        "patch",
        "containers/hydra",
        "-n",
        CUSTOMER_NAMESPACE,
        "--type=merge",
        "-p",
        r#"{"spec": {"tags": ["web"], "note": "edited", "sshKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICBJy87T4rXwutpbt5EAm1SyM1P14L4c/TMDBDkemCJl bob@example"]}}"#,
    ]);
    assert!(
        cluster.kubectl_wait("hydra", "Ready"),
        "kubectl wait --for=condition=Ready"
    );
    assert!(
        cluster.kubectl_wait("hydra", "Running"),
        "kubectl wait --for=condition=Running"
    );
    let edited = cluster.containers().get("hydra").await.unwrap();
    let generation = edited.metadata.generation;
    assert_eq!(generation, Some(2));
    let status = edited.status.clone().unwrap();
    assert_eq!(status.observed_generation, generation);
    for condition in &status.conditions {
        assert_eq!(
            condition.observed_generation, generation,
            "{} after the edit: {condition:?}",
            condition.type_
        );
    }
    let keys = std::fs::read_to_string(
        cluster
            .home_root()
            .join(status.uid.unwrap().to_string())
            .join(".ssh/authorized_keys"),
    )
    .unwrap();
    assert!(
        keys.contains("bob@example") && !keys.contains("alice@example"),
        "{keys}"
    );
    assert_eq!(
        cluster.kubelet().pod_address(CUSTOMER_NAMESPACE, "hydra"),
        pod_before
    );
    assert_eq!(
        pod_uid(&serde_json::to_value(pods.get("hydra").await.unwrap()).unwrap()),
        uid_before,
        "the edit restarted the Pod"
    );
    cluster
        .wait_health("containers", "hydra", "Current", "Healthy", "")
        .await;

    // Refusals only a person can fix: Failed and Degraded, with the reason.
    cluster.kubectl_apply_stdin(&format!(
        r#"
apiVersion: uwsgi.it/v1alpha1
kind: Container
metadata: {{name: too-big, namespace: {CUSTOMER_NAMESPACE}}}
spec: {{server: {EXAMPLE_NODE}, memory: 64000, storage: 1000}}
---
apiVersion: uwsgi.it/v1alpha1
kind: Container
metadata: {{name: elsewhere, namespace: {CUSTOMER_NAMESPACE}}}
spec: {{server: {SECOND_NODE}, memory: 100, storage: 1000}}
---
apiVersion: uwsgi.it/v1alpha1
kind: PortMapping
metadata: {{name: api-port, namespace: {CUSTOMER_NAMESPACE}}}
spec: {{container: hydra, proto: tcp, publicPort: 6443, privatePort: 8000}}
---
apiVersion: uwsgi.it/v1alpha1
kind: PortMapping
metadata: {{name: taken, namespace: {CUSTOMER_NAMESPACE}}}
spec: {{container: hydra, proto: tcp, publicPort: {PUBLIC_PORT}, privatePort: 8001}}
---
apiVersion: uwsgi.it/v1alpha1
kind: PortMapping
metadata: {{name: for-later, namespace: {CUSTOMER_NAMESPACE}}}
spec: {{container: not-yet, proto: udp, publicPort: 9001, privatePort: 8000}}
---
apiVersion: uwsgi.it/v1alpha1
kind: Customer
metadata: {{name: intruder}}
spec: {{namespace: kube-system, servers: [{SECOND_NODE}]}}
"#
    ));
    for (resource, name, reason) in [
        ("containers", "too-big", "InsufficientMemory"),
        ("containers", "elsewhere", "ServerNotOwned"),
        ("portmappings", "api-port", "ReservedPort"),
        ("portmappings", "taken", "PortInUse"),
        ("customers", "intruder", "NamespaceNotCustomers"),
    ] {
        cluster
            .wait_health(resource, name, "Failed", "Degraded", reason)
            .await;
    }
    // Waiting for what the system (or the customer's next apply) brings: in progress.
    cluster
        .wait_health(
            "portmappings",
            "for-later",
            "InProgress",
            "Progressing",
            "ContainerNotFound",
        )
        .await;
    cluster.apply_example("04-custom-distro-storage.yaml");
    cluster
        .wait_health(
            "customdistros",
            "ubuntu0001",
            "InProgress",
            "Progressing",
            "Empty",
        )
        .await;
    // The first owner of port 9000 is unaffected.
    cluster
        .wait_health("portmappings", "hydra-web", "Current", "Healthy", "")
        .await;

    // The supplier lowers server-1 under what is reserved: the Server is Failed until fixed.
    cluster.kubectl(&[
        "patch",
        "servers/server-1",
        "--type=merge",
        "-p",
        r#"{"spec": {"memory": 500}}"#,
    ]);
    cluster
        .wait_health(
            "servers",
            EXAMPLE_NODE,
            "Failed",
            "Degraded",
            "Overcommitted",
        )
        .await;
    cluster.kubectl(&[
        "patch",
        "servers/server-1",
        "--type=merge",
        "-p",
        r#"{"spec": {"memory": 16000}}"#,
    ]);
    cluster
        .wait_health("servers", EXAMPLE_NODE, "Current", "Healthy", "")
        .await;
}
