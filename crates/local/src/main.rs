//! `uwsgi-it-local`: the whole uwsgi-it-operator system on one machine (`hack/run-local.sh`).
//!
//! It starts the real control plane (etcd + kube-apiserver on loopback), installs the CRDs and
//! the chart's RBAC, runs the controller and one agent on each of two simulated server nodes
//! (network namespaces with public addresses 203.0.113.11 and .12, reachable from a client
//! namespace), runs the kubelet stand-in, applies `examples/` (adapted to those nodes), shows
//! `kubectl get uwsgi -A`, makes a real TCP connection to 203.0.113.11:9000 from the client
//! namespace, and then keeps everything running until Ctrl-C or SIGTERM. Then it removes
//! everything it created: programs, Pod and node namespaces (their nft tables go with them),
//! the control plane's processes and files, its work directory.
//!
//! ```text
//! client (203.0.113.100, br0) ── public0 (203.0.113.11) server-1 (10.244.1.1, cbr0) ── pods
//!                             └─ public0 (203.0.113.12) server-2 (10.244.2.1, cbr0) ── pods
//! ```
//!
//! Needs root (network namespaces, nftables, homes owned by container uids).

mod netns;

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, Resource};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uwsgi_it_api::condition::{self, Condition};
use uwsgi_it_api::{Container, CustomDistro, Customer, PortMapping};
use uwsgi_it_domain::config::OperatorConfig;
use uwsgi_it_testbed::control_plane::{ControlPlane, OwnedControlPlane};
use uwsgi_it_testbed::kubelet::{Kubelet, KubeletNode};

use crate::netns::NamedNetns;

/// The client's address on the public segment.
const CLIENT_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
/// The simulated server nodes: name, public address.
const NODES: [(&str, Ipv4Addr); 2] = [
    ("server-1", Ipv4Addr::new(203, 0, 113, 11)),
    ("server-2", Ipv4Addr::new(203, 0, 113, 12)),
];
/// What the examples name (adapted to [`NODES`]).
const EXAMPLE_NODE: &str = "server-1";
const EXAMPLE_ADDRESS: &str = "203.0.113.10";
/// The quickstart mapping of examples/03.
const PUBLIC_PORT: u16 = 9000;
const PRIVATE_PORT: u16 = 8000;
const CUSTOMER_NAMESPACE: &str = "acme";
/// Namespace and release name of the chart's objects (RBAC), where the controller keeps its Lease
/// and uid store.
const SYSTEM_NAMESPACE: &str = "uwsgi-it-system";
const RELEASE: &str = "uwsgi-it";
/// Bound of every wait for the system to reach a state.
const PATIENCE: Duration = Duration::from_secs(120);
/// Bound of a program's graceful stop.
const STOP_PATIENCE: Duration = Duration::from_secs(10);

/// The line that proves the forwarded port answered (the local-run test waits for it).
pub const PORT_ANSWERED: &str = "[local] port answered:";

fn say(message: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "[local] {message}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    uwsgi_it_telemetry::init_tracing("warn", false);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("[local] cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run());
    // Programs stopped, namespaces and files removed by now; the runtime's leftovers go here.
    runtime.shutdown_timeout(STOP_PATIENCE);
    match outcome {
        Ok(()) => {
            say("everything removed; bye");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("[local] failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    // Registered before anything starts, so an early Ctrl-C is handled, never fatal.
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run me as root (network namespaces, nftables): sudo bash hack/run-local.sh");
    }
    let started = Instant::now();
    for name in netns::remove_stale() {
        say(format!("removed {name}, left by a run that was killed"));
    }
    remove_stale_work_dirs();
    let mut local = Local::new()?;
    say(format!("work directory: {}", local.work_dir.display()));
    let outcome = tokio::select! {
        outcome = local.start(started) => outcome,
        _ = interrupt.recv() => Err(anyhow::anyhow!("interrupted while starting")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated while starting")),
    };
    if outcome.is_ok() {
        tokio::select! {
            _ = interrupt.recv() => say("SIGINT: stopping"),
            _ = terminate.recv() => say("SIGTERM: stopping"),
        }
    }
    local.stop().await;
    outcome
}

/// Work directories of runs that no longer exist, removed.
fn remove_stale_work_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(netns::PREFIX)
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The controller or an agent, running as a task.
struct Program {
    name: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

impl Program {
    fn spawn<F>(name: String, run: impl FnOnce(oneshot::Receiver<()>) -> F) -> Program
    where
        F: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        Program {
            name,
            stop: Some(stop),
            task: Some(tokio::spawn(run(stopped))),
        }
    }

    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            match tokio::time::timeout(STOP_PATIENCE, task).await {
                Ok(Ok(Ok(()))) => say(format!("{} stopped", self.name)),
                Ok(Ok(Err(error))) => say(format!("{} had stopped: {error:#}", self.name)),
                Ok(Err(error)) => say(format!("{} failed: {error}", self.name)),
                Err(_) => {
                    abort.abort();
                    say(format!("{} did not stop in time; aborted", self.name));
                }
            }
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Everything one run created. Whatever exists is removed by [`Local::stop`] or, after a panic,
/// by `Drop`.
struct Local {
    agents: Vec<Program>,
    controller: Option<Program>,
    kubelet: Option<Kubelet>,
    /// Nodes first, the client last (the nodes' veths end in the client's bridge).
    namespaces: Vec<NamedNetns>,
    plane: Option<OwnedControlPlane>,
    work_dir: PathBuf,
}

impl Local {
    fn new() -> Result<Local> {
        let work_dir =
            std::env::temp_dir().join(format!("{}{}", netns::PREFIX, std::process::id()));
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("creating {}", work_dir.display()))?;
        Ok(Local {
            agents: Vec::new(),
            controller: None,
            kubelet: None,
            namespaces: Vec::new(),
            plane: None,
            work_dir,
        })
    }

    fn plane(&self) -> &ControlPlane {
        self.plane.as_ref().expect("the control plane is running")
    }

    fn home_root(&self) -> PathBuf {
        self.work_dir.join("containers")
    }

    async fn start(&mut self, started: Instant) -> Result<()> {
        say("starting etcd and kube-apiserver (built by hack/control-plane.sh, cached)");
        let plane = tokio::task::spawn_blocking(OwnedControlPlane::start).await??;
        say(format!("API server ready at {}", plane.server_url()));
        self.plane = Some(plane);
        let admin = self.plane().client().await?;

        say("installing the CRDs");
        self.plane().install_crds(&uwsgi_it_api::crds()).await?;
        Api::<Namespace>::all(admin.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": SYSTEM_NAMESPACE}}))?,
            )
            .await
            .context("creating the system namespace")?;
        let (controller_client, agent_client) = match self.apply_chart_rbac() {
            Ok(()) => {
                let controller = self.service_account_client("controller").await?;
                let agent = self.service_account_client("agent").await?;
                say(format!(
                    "the controller and the agents act as their ServiceAccounts \
                     {SYSTEM_NAMESPACE}/{RELEASE}-controller and {SYSTEM_NAMESPACE}/{RELEASE}-agent"
                ));
                (controller, agent)
            }
            Err(error) => {
                say(format!(
                    "note: skipping the chart's RBAC ({error:#}); the programs act as cluster-admin"
                ));
                (admin.clone(), admin.clone())
            }
        };

        let config = self.operator_config()?;
        say("starting the controller");
        let options = uwsgi_it_controller::Options::new(config.clone(), SYSTEM_NAMESPACE);
        self.controller = Some(Program::spawn("controller".into(), move |stopped| {
            uwsgi_it_controller::run(controller_client, options, async move {
                let _ = stopped.await;
            })
        }));

        say("creating the network: a client namespace and two server nodes");
        self.create_network()?;
        for (name, address) in NODES {
            let manifest = self.adapt_node(name, address)?;
            self.kubectl_apply(&manifest)?;
        }
        let kubelet_nodes = NODES
            .iter()
            .zip(&self.namespaces)
            .enumerate()
            .map(|(index, ((name, _), netns))| KubeletNode {
                name: (*name).to_owned(),
                netns: netns.name().to_owned(),
                index: u8::try_from(index + 1).expect("two nodes"),
            })
            .collect();
        say("starting the kubelet stand-in (Pods become network namespaces with listeners)");
        self.kubelet = Some(Kubelet::start(
            admin.clone(),
            kubelet_nodes,
            vec![PRIVATE_PORT],
        )?);
        for ((name, address), netns) in NODES.iter().zip(&self.namespaces) {
            say(format!(
                "starting the agent of {name} ({address}) in network namespace {}",
                netns.name()
            ));
            let agent = uwsgi_it_agent::Agent::new(
                agent_client.clone(),
                uwsgi_it_agent::AgentOptions {
                    node_name: (*name).to_owned(),
                    config: config.clone(),
                    netns: uwsgi_it_agent::NetworkNamespace::Named(netns.name().to_owned()),
                    container_networks: Vec::new(),
                },
            )?;
            self.agents
                .push(Program::spawn(format!("agent of {name}"), move |stopped| {
                    agent.run(async move {
                        let _ = stopped.await;
                    })
                }));
        }

        self.apply_examples(&admin).await?;

        say("kubectl get uwsgi -A");
        let listing = self.kubectl(&["get", "uwsgi", "-A"])?;
        for line in listing.lines() {
            println!("    {line}");
        }

        let public = SocketAddrV4::new(NODES[0].1, PUBLIC_PORT);
        let client = self.namespaces.last().expect("the client namespace");
        let message = "hello hydra";
        let deadline = Instant::now() + Duration::from_secs(10);
        let reply = loop {
            match client.tcp_exchange(public, message, Duration::from_secs(2)) {
                Ok(reply) => break reply,
                Err(error) if Instant::now() > deadline => {
                    bail!("no answer from {public} in {}: {error}", client.name())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let target = Api::<PortMapping>::namespaced(admin.clone(), CUSTOMER_NAMESPACE)
            .get("hydra-web")
            .await?
            .status
            .and_then(|s| s.target)
            .unwrap_or_default();
        println!(
            "{PORT_ANSWERED} tcp {public} from {} -> hydra {target}: sent {message:?}, got {reply:?} ({:.1}s after start)",
            client.name(),
            started.elapsed().as_secs_f64()
        );

        say("the system is running. To use it:");
        println!(
            "    export KUBECONFIG={}",
            self.plane().kubeconfig_path().display()
        );
        println!(
            "    {} get uwsgi -A",
            self.plane().bin_dir().join("kubectl").display()
        );
        println!(
            "    ip netns exec {} nc {} {PUBLIC_PORT}      # type a line, hydra echoes it",
            client.name(),
            NODES[0].1
        );
        println!(
            "    ip netns exec {} nft list table ip uwsgi_it",
            self.namespaces[0].name()
        );
        say("Ctrl-C (or SIGTERM) stops everything and removes what this run created");
        Ok(())
    }

    fn operator_config(&self) -> Result<OperatorConfig> {
        let text = format!(
            "homeRoot: {}
distros:
  bookworm: docker.io/library/debian:bookworm-slim
portForward:
  backend: nftables
  resyncPeriod: 2s
",
            self.home_root().display()
        );
        std::fs::write(self.work_dir.join("config.yaml"), &text)?;
        Ok(OperatorConfig::from_yaml(&text)?)
    }

    /// The chart's ServiceAccounts and RBAC (`helm template`, hack/helm.sh's helm), applied.
    fn apply_chart_rbac(&self) -> Result<()> {
        say("rendering the chart's RBAC (hack/helm.sh builds helm on the first run)");
        let rbac = uwsgi_it_testbed::chart::render_rbac(RELEASE, SYSTEM_NAMESPACE)?;
        let path = self.work_dir.join("rbac.yaml");
        std::fs::write(&path, rbac)?;
        say(format!(
            "applying the chart's ServiceAccounts and RBAC ({})",
            path.display()
        ));
        self.kubectl_apply(&path)
    }

    /// A client with a real token of the chart's ServiceAccount `<release>-<program>`, once
    /// RBAC lets it list what it watches (bindings reach the authorizer a moment after they are
    /// stored).
    async fn service_account_client(&self, program: &str) -> Result<Client> {
        let account = format!("{RELEASE}-{program}");
        let user = format!("system:serviceaccount:{SYSTEM_NAMESPACE}:{account}");
        let client = self
            .plane()
            .service_account_client(SYSTEM_NAMESPACE, &account)
            .await?;
        let containers: Api<Container> = Api::all(client.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match containers.list(&ListParams::default().limit(1)).await {
                Ok(_) => return Ok(client),
                Err(error) if Instant::now() > deadline => {
                    bail!("{user} still cannot list containers: {error}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// client (br0, 203.0.113.100) with one veth to each node's `public0`.
    fn create_network(&mut self) -> Result<()> {
        let mut nodes = Vec::new();
        for (index, _) in NODES.iter().enumerate() {
            nodes.push(NamedNetns::create(&format!("node-{}", index + 1))?);
        }
        self.namespaces.extend(nodes);
        let client = NamedNetns::create("client")?;
        client.ip(&["link", "add", "br0", "type", "bridge"])?;
        client.ip(&[
            "address",
            "add",
            &format!("{CLIENT_ADDRESS}/24"),
            "dev",
            "br0",
        ])?;
        client.ip(&["link", "set", "br0", "up"])?;
        for (index, ((_, address), node)) in NODES.iter().zip(&self.namespaces).enumerate() {
            let peer = format!("p{}", index + 1);
            node.ip(&[
                "link",
                "add",
                "public0",
                "type",
                "veth",
                "peer",
                "name",
                &peer,
                "netns",
                client.name(),
            ])?;
            client.ip(&["link", "set", &peer, "master", "br0", "up"])?;
            node.ip(&["address", "add", &format!("{address}/24"), "dev", "public0"])?;
            node.ip(&["link", "set", "public0", "up"])?;
            node.ip(&[
                "route",
                "add",
                "default",
                "via",
                &CLIENT_ADDRESS.to_string(),
            ])?;
        }
        self.namespaces.push(client);
        Ok(())
    }

    /// The Node (which a kubelet would register; the stand-in does not) and
    /// examples/00-server.yaml for one of [`NODES`], written into the work directory.
    fn adapt_node(&self, name: &str, address: Ipv4Addr) -> Result<PathBuf> {
        let server = std::fs::read_to_string(uwsgi_it_testbed::chart::repo_path(
            "examples/00-server.yaml",
        ))?
        .replace(EXAMPLE_NODE, name)
        .replace(EXAMPLE_ADDRESS, &address.to_string());
        let text = format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n---\n{server}");
        let path = self
            .work_dir
            .join("examples")
            .join(format!("00-server-{name}.yaml"));
        std::fs::create_dir_all(path.parent().expect("a parent"))?;
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Every other example, with the example's address replaced by server-1's, applied in order,
    /// each waited for until it reaches its state.
    async fn apply_examples(&self, admin: &Client) -> Result<()> {
        let dir = uwsgi_it_testbed::chart::repo_path("examples");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .filter(|p| !p.ends_with("00-server.yaml"))
            .collect();
        files.sort();
        let customers: Api<Customer> = Api::all(admin.clone());
        let containers: Api<Container> = Api::namespaced(admin.clone(), CUSTOMER_NAMESPACE);
        let mappings: Api<PortMapping> = Api::namespaced(admin.clone(), CUSTOMER_NAMESPACE);
        let distros: Api<CustomDistro> = Api::namespaced(admin.clone(), CUSTOMER_NAMESPACE);
        for file in files {
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            let text =
                std::fs::read_to_string(&file)?.replace(EXAMPLE_ADDRESS, &NODES[0].1.to_string());
            let adapted = self.work_dir.join("examples").join(&*name);
            std::fs::write(&adapted, text)?;
            say(format!("kubectl apply -f {}", adapted.display()));
            self.kubectl_apply(&adapted)?;
            match &*name {
                "01-customer.yaml" => {
                    wait_for(&customers, "acme", &["Ready"]).await?;
                }
                "02-container-hydra.yaml" => {
                    wait_for(&containers, "hydra", &["Admitted", "HomeReady", "Running"]).await?;
                }
                "03-portmapping-hydra.yaml" => {
                    wait_for(&mappings, "hydra-web", &["Accepted", "Programmed"]).await?;
                }
                "04-custom-distro-storage.yaml" => {
                    let store =
                        wait_for(&containers, "distro-store", &["Admitted", "HomeReady"]).await?;
                    wait_for(&distros, "ubuntu0001", &["Accepted"]).await?;
                    self.upload_distro(&store)?;
                    wait_for(&distros, "ubuntu0001", &["Accepted", "Available"]).await?;
                }
                "05-container-custom-distro.yaml" => {
                    wait_for(
                        &containers,
                        "legacy-app",
                        &["Admitted", "HomeReady", "Running"],
                    )
                    .await?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// What a customer does through the storage container: creates `distros/ubuntu0001`.
    fn upload_distro(&self, store: &Container) -> Result<()> {
        let uid = store
            .status
            .as_ref()
            .and_then(|s| s.uid)
            .context("distro-store has no uid")?;
        let uid = u32::try_from(uid)?;
        let dir = self
            .home_root()
            .join(uid.to_string())
            .join("distros/ubuntu0001");
        say(format!(
            "uploading the custom distro, as the customer would: mkdir {}",
            dir.display()
        ));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid))?;
        Ok(())
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        let output = self.plane().kubectl().args(args).output()?;
        if !output.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn kubectl_apply(&self, path: &Path) -> Result<()> {
        let path = path.to_str().context("manifest path")?;
        for line in self.kubectl(&["apply", "-f", path])?.lines() {
            println!("    {line}");
        }
        Ok(())
    }

    /// Stops the programs gracefully, then removes everything.
    async fn stop(&mut self) {
        for agent in &mut self.agents {
            agent.stop().await;
        }
        if let Some(controller) = &mut self.controller {
            controller.stop().await;
        }
        self.tear_down();
    }

    /// Removes whatever exists; also run by `Drop` after a panic.
    fn tear_down(&mut self) {
        self.agents.clear();
        self.controller.take();
        if self.kubelet.take().is_some() {
            say("removed the Pods' network namespaces");
        }
        // Nodes, then the client; the nft tables live inside the node namespaces.
        for netns in self.namespaces.drain(..) {
            let name = netns.name().to_owned();
            drop(netns);
            say(format!("deleted network namespace {name}"));
        }
        if self.plane.take().is_some() {
            say("stopped etcd and kube-apiserver and removed their files");
        }
        if self.work_dir.exists() {
            match std::fs::remove_dir_all(&self.work_dir) {
                Ok(()) => say(format!("removed {}", self.work_dir.display())),
                Err(error) => say(format!(
                    "could not remove {}: {error}",
                    self.work_dir.display()
                )),
            }
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.tear_down();
    }
}

/// Waits until every condition in `types` is True on `name`; says which and how long.
async fn wait_for<K>(api: &Api<K>, name: &str, types: &[&str]) -> Result<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let since = Instant::now();
    loop {
        let current = api.get_opt(name).await;
        if let Ok(Some(object)) = &current {
            let conditions = conditions_of(object);
            if types.iter().all(|t| condition::is_true(&conditions, t)) {
                say(format!(
                    "{name}: {} ({:.1}s)",
                    types.join(" + "),
                    since.elapsed().as_secs_f64()
                ));
                return Ok(object.clone());
            }
        }
        if since.elapsed() > PATIENCE {
            let shown = match current {
                Ok(Some(object)) => serde_json::to_string_pretty(&object).unwrap_or_default(),
                other => format!("{other:?}"),
            };
            bail!(
                "{name} did not become {} within {PATIENCE:?}; it is:\n{shown}",
                types.join(" + ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn conditions_of<K: serde::Serialize>(object: &K) -> Vec<Condition> {
    serde_json::to_value(object)
        .ok()
        .and_then(|v| serde_json::from_value(v["status"]["conditions"].clone()).ok())
        .unwrap_or_default()
}
