//! Time to traffic: how long after the controller accepts a new PortMapping the first TCP
//! connection through the node's public port is echoed by the container. The promise
//! is "a new mapping carries traffic within 1 s of being Accepted (event-driven, not waiting for
//! resync)". Needs root (network namespaces, nftables).
//!
//! Run: `CARGO_TARGET_DIR=/tmp/target-ttt cargo bench -p uwsgi-it-agent --bench time_to_traffic`
//!
//! Set-up: a private etcd + kube-apiserver ([`OwnedControlPlane`]) with the CRDs; a
//! [`ForwardingTopology`] (client 203.0.113.100 ── 203.0.113.10 node 10.244.1.1 ── 10.244.1.2
//! container) with TCP line-echo listeners on the container's ports 8000..8003; a Server and Node
//! whose `uwsgi.it/address` annotation is the node's public address; the real agent in-process
//! for that Node, inside the node's namespace, with the nftables backend and a one-hour
//! `resyncPeriod`, so only the event path can deliver a mapping during the run; a Container
//! whose status is written as the controller writes it (server-side apply, field manager
//! `uwsgi-it-controller`). The controller itself does not run: the benchmark writes its
//! statuses, so T0 is exactly the moment the Accepted status is sent.
//!
//! For each K (background mappings already Accepted and Programmed, so the table is large) and
//! each round: a PortMapping on a fresh public port is created without status (the agent watches
//! `status.server=<node>`, so it does not see it yet); at T0 its status (server, address,
//! `target` = the container's ip:port, `Accepted=True`) is applied; meanwhile the client
//! namespace opens a fresh TCP connection to `<public>:<port>` and exchanges one line every
//! 2 ms (refused while the port is not forwarded), giving up 5 s after T0. T1 is when the first
//! echo reply arrives. After each round the mapping is deleted and the agent is let settle.
//!
//! Columns: K, rounds, median / p90 (nearest rank) / max of T1 − T0, and whether every round was
//! under 1 s. The detail lines split T1 − T0: `apply` is the round trip of the status write
//! (T0 → API server answered), `connect` is when the successful attempt was started (the
//! forward was in place by then; the echo listener polls `accept` every 20 ms, which the reply
//! time includes).
//!
//! Environment: `TTT_BACKGROUND` (comma-separated K values, default `0,1000`), `TTT_ROUNDS`
//! (default 20).
//!
//! Teardown runs on success, error and panic alike (drop order): the runtime and with it the
//! agent, then the echo listeners, the home directory, the three network namespaces (and with
//! them the node's nftables table), and last the control plane (etcd's data goes with it, and
//! with it the Node, namespace and objects).

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use uwsgi_it_agent::metrics::Metrics;
use uwsgi_it_agent::{Agent, AgentOptions, NetworkNamespace};
use uwsgi_it_api::condition::{self, PROGRAMMED};
use uwsgi_it_api::well_known::CONTROLLER_MANAGER;
use uwsgi_it_api::{Container, PortMapping};
use uwsgi_it_domain::config::OperatorConfig;
use uwsgi_it_testbed::control_plane::{ControlPlane, OwnedControlPlane};
use uwsgi_it_testbed::netns::{
    CLIENT_ADDRESS, CONTAINER_ADDRESS, CONTAINER_NETWORK, EchoServer, ForwardingTopology,
    NODE_PUBLIC_ADDRESS, tcp_echo_server, tcp_exchange,
};

/// The promise under test.
const TARGET: Duration = Duration::from_secs(1);
/// Long enough that no periodic resync falls inside the run: only events deliver mappings.
const RESYNC_PERIOD: &str = "1h";
/// Probe cadence (attempt start to attempt start) and when a round gives up.
const PROBE_EVERY: Duration = Duration::from_millis(2);
const PROBE_GIVE_UP: Duration = Duration::from_secs(5);
/// Bound of one connect and of one reply. A port that is not forwarded refuses at once.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(250);
/// Bound for set-up steps and for the agent settling between rounds.
const PATIENCE: Duration = Duration::from_secs(120);
/// Echo listeners on the container's ports `PRIVATE_BASE..PRIVATE_BASE + LISTENERS`.
const PRIVATE_BASE: u16 = 8000;
const LISTENERS: u16 = 4;
/// Public ports of the background mappings and of the measured ones; never reused in a run.
const BACKGROUND_PORT_BASE: u16 = 20_000;
const ROUND_PORT_BASE: u16 = 40_000;
/// The Container every mapping points at.
const CONTAINER: &str = "app";
const UID: u32 = 30001;

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("time_to_traffic needs root (network namespaces, nftables)");
        std::process::exit(1);
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "uwsgi_it_agent=warn".into()),
        )
        .try_init();
    // `run` returns only once everything it built has been dropped; exit skips no destructor.
    if let Err(error) = run() {
        eprintln!("time_to_traffic failed: {error:#}");
        std::process::exit(1);
    }
}

struct Plan {
    backgrounds: Vec<usize>,
    rounds: usize,
}

impl Plan {
    fn from_env() -> Result<Plan> {
        let mut backgrounds: Vec<usize> = match std::env::var("TTT_BACKGROUND") {
            Ok(text) => text
                .split(',')
                .map(|k| {
                    k.trim()
                        .parse()
                        .with_context(|| format!("TTT_BACKGROUND {k:?}"))
                })
                .collect::<Result<_>>()?,
            Err(_) => vec![0, 1_000],
        };
        // Phases share one agent and only ever add background mappings.
        backgrounds.sort_unstable();
        backgrounds.dedup();
        let rounds = match std::env::var("TTT_ROUNDS") {
            Ok(text) => text.trim().parse().context("TTT_ROUNDS")?,
            Err(_) => 20,
        };
        ensure!(rounds > 0, "TTT_ROUNDS must be at least 1");
        let largest = backgrounds.last().copied().unwrap_or(0);
        ensure!(
            usize::from(BACKGROUND_PORT_BASE) + largest <= usize::from(ROUND_PORT_BASE),
            "at most {} background mappings",
            ROUND_PORT_BASE - BACKGROUND_PORT_BASE
        );
        ensure!(
            usize::from(ROUND_PORT_BASE) + backgrounds.len() * rounds <= usize::from(u16::MAX),
            "too many rounds for the public port range"
        );
        Ok(Plan {
            backgrounds,
            rounds,
        })
    }
}

/// Builds everything, measures, prints. Locals drop in reverse order of declaration, so the
/// runtime (and the agent task in it) goes first and the control plane last, also on an early
/// return or a panic.
fn run() -> Result<()> {
    let plan = Plan::from_env()?;
    eprintln!("starting etcd and kube-apiserver ...");
    let plane = OwnedControlPlane::start()?;
    let topology = Arc::new(ForwardingTopology::create()?);
    let _listeners: Vec<EchoServer> = (0..LISTENERS)
        .map(|i| {
            tcp_echo_server(
                &topology.container,
                SocketAddrV4::new(CONTAINER_ADDRESS, PRIVATE_BASE + i),
            )
        })
        .collect::<Result<_>>()?;
    let home = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let bench_started = Instant::now();
    let phases = runtime.block_on(measure(
        &plane,
        &topology,
        &home.path().join("containers"),
        &plan,
    ))?;
    print_table(&phases, bench_started.elapsed());
    Ok(())
}

/// One round's figures; `None` fields when the round gave up.
struct Round {
    applied: Duration,
    connect: Option<Duration>,
    reply: Option<Duration>,
    attempts: u32,
}

struct Phase {
    background: usize,
    rounds: Vec<Round>,
    drift_repairs: u64,
    sync_failures: u64,
}

/// The cluster side of the benchmark: what the supplier and the controller would write.
struct Cluster {
    client: Client,
    namespace: String,
    node: String,
}

impl Cluster {
    fn mappings(&self) -> Api<PortMapping> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn containers(&self) -> Api<Container> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The server as a supplier declares it: its Node and its Server.
    async fn create_node(&self) -> Result<()> {
        let address = NODE_PUBLIC_ADDRESS.to_string();
        uwsgi_it_testbed::servers::declare(
            &self.client,
            &self.node,
            &uwsgi_it_testbed::servers::ServerSpec {
                memory: 16000,
                storage: 500000,
                address: Some(&address),
                pod_cidr: Some(CONTAINER_NETWORK),
            },
            true,
        )
        .await?;
        Ok(())
    }

    /// The Container, then its status as the controller writes it once admitted.
    async fn create_container(&self, home_root: &Path) -> Result<()> {
        let container: Container = serde_json::from_value(json!({
            "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container",
            "metadata": {"name": CONTAINER, "namespace": self.namespace},
            "spec": {"server": self.node, "memory": 1000, "storage": 20000},
        }))?;
        self.containers()
            .create(&PostParams::default(), &container)
            .await?;
        let status = json!({
            "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container",
            "metadata": {"name": CONTAINER},
            "status": {
                "uid": UID,
                "server": self.node,
                "address": NODE_PUBLIC_ADDRESS.to_string(),
                "home": home_root.join(UID.to_string()).display().to_string(),
                "reserved": {"memory": 1000, "storage": 20000},
                "ip": CONTAINER_ADDRESS.to_string(),
                "conditions": [condition_json("Admitted")],
            },
        });
        let created = self
            .containers()
            .patch_status(CONTAINER, &controller_apply(), &Patch::Apply(status))
            .await?;
        // Its workload Pod, as the controller makes it and a kubelet reports it: the agent
        // forwards only to a container's own Pod on its node. (The container's address is a
        // veth in the benchmark's topology; no kubelet runs here.)
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.client.clone(), &self.namespace);
        let pod = serde_json::from_value(json!({
            "metadata": {"name": CONTAINER, "ownerReferences": [{
                "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container", "name": CONTAINER,
                "uid": created.metadata.uid, "controller": true}]},
            "spec": {"nodeName": self.node, "containers": [{"name": "main", "image": "none"}]},
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
        pods.patch_status(
            CONTAINER,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Running", "podIP": CONTAINER_ADDRESS.to_string()}}),
            ),
        )
        .await?;
        Ok(())
    }

    /// A PortMapping as a customer creates it: no status, so not yet the agent's.
    async fn create_mapping(&self, name: &str, public_port: u16, private_port: u16) -> Result<()> {
        let mapping: PortMapping = serde_json::from_value(json!({
            "apiVersion": "uwsgi.it/v1alpha1", "kind": "PortMapping",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "container": CONTAINER, "proto": "tcp",
                "publicPort": public_port, "privatePort": private_port,
            },
        }))?;
        self.mappings()
            .create(&PostParams::default(), &mapping)
            .await
            .with_context(|| format!("creating PortMapping {name}"))?;
        Ok(())
    }

    /// The controller's verdict on a mapping: Accepted, with the container's ip:port as target.
    async fn accept_mapping(&self, name: &str, private_port: u16) -> Result<()> {
        let status = json!({
            "apiVersion": "uwsgi.it/v1alpha1", "kind": "PortMapping",
            "metadata": {"name": name},
            "status": {
                "server": self.node,
                "address": NODE_PUBLIC_ADDRESS.to_string(),
                "target": SocketAddrV4::new(CONTAINER_ADDRESS, private_port).to_string(),
                "conditions": [condition_json("Accepted")],
            },
        });
        self.mappings()
            .patch_status(name, &controller_apply(), &Patch::Apply(status))
            .await
            .with_context(|| format!("accepting PortMapping {name}"))?;
        Ok(())
    }

    /// How many of the namespace's mappings the agent reports `Programmed=True`.
    async fn programmed_count(&self) -> Result<usize> {
        let list = self.mappings().list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .filter(|m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| condition::is_true(&s.conditions, PROGRAMMED))
            })
            .count())
    }

    async fn is_programmed(&self, name: &str) -> Result<bool> {
        let mapping = self.mappings().get(name).await?;
        Ok(mapping
            .status
            .is_some_and(|s| condition::is_true(&s.conditions, PROGRAMMED)))
    }
}

fn controller_apply() -> PatchParams {
    PatchParams::apply(CONTROLLER_MANAGER).force()
}

fn condition_json(type_: &str) -> Value {
    json!({
        "type": type_,
        "status": "True",
        "reason": type_,
        "message": "written by the time_to_traffic benchmark in the controller's place",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    })
}

/// Polls `check` every 20 ms until it is true; fails after [`PATIENCE`].
async fn wait_until<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {PATIENCE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn measure(
    plane: &ControlPlane,
    topology: &Arc<ForwardingTopology>,
    home_root: &Path,
    plan: &Plan,
) -> Result<Vec<Phase>> {
    plane.install_crds(&uwsgi_it_api::crds()).await?;
    let cluster = Cluster {
        client: plane.client().await?,
        namespace: plane.namespace("ttt").await?,
        node: format!("ttt-{}", std::process::id()),
    };
    cluster.create_node().await?;
    cluster.create_container(home_root).await?;

    let agent = start_agent(&cluster, topology, home_root.to_owned())?;
    let mut ready = agent.ready.clone();
    tokio::time::timeout(PATIENCE, ready.wait_for(|r| *r))
        .await
        .map_err(|_| anyhow!("the agent was not ready within {PATIENCE:?}"))??;

    let mut phases = Vec::new();
    let mut installed = 0;
    let mut next_port = ROUND_PORT_BASE;
    for &background in &plan.backgrounds {
        if background > installed {
            eprintln!(
                "installing {} background mappings ...",
                background - installed
            );
            add_background(&cluster, installed..background).await?;
            installed = background;
        }
        settle(&cluster, &agent.metrics, background).await?;
        eprintln!("K = {background}: {} rounds ...", plan.rounds);
        let mut rounds = Vec::new();
        for round in 0..plan.rounds {
            let port = next_port;
            next_port += 1;
            let private = PRIVATE_BASE + (round as u16 % LISTENERS);
            let name = format!("ttt-k{background}-r{round}");
            rounds.push(
                one_round(
                    &cluster,
                    topology,
                    &agent.metrics,
                    background,
                    &name,
                    port,
                    private,
                )
                .await?,
            );
        }
        phases.push(Phase {
            background,
            rounds,
            drift_repairs: agent.metrics.drift_repairs(),
            sync_failures: agent.metrics.sync_failures(),
        });
    }
    agent.stop().await?;
    Ok(phases)
}

/// Creates and accepts the background mappings `range`, 16 at a time.
async fn add_background(cluster: &Cluster, range: std::ops::Range<usize>) -> Result<()> {
    futures::stream::iter(range)
        .map(|i| async move {
            let name = format!("bg-{i}");
            let private = PRIVATE_BASE + (i % usize::from(LISTENERS)) as u16;
            cluster
                .create_mapping(&name, BACKGROUND_PORT_BASE + i as u16, private)
                .await?;
            cluster.accept_mapping(&name, private).await
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Waits until the agent forwards exactly the `background` mappings and has reported all of
/// them, then a little longer, so no write of set-up is still in flight when a round starts.
async fn settle(cluster: &Cluster, metrics: &Metrics, background: usize) -> Result<()> {
    let want = i64::try_from(background)?;
    wait_until(&format!("{background} forwards programmed"), || async {
        Ok(metrics.forwards_programmed() == want)
    })
    .await?;
    wait_until(
        &format!("{background} mappings reported Programmed"),
        || async { Ok(cluster.programmed_count().await? == background) },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(())
}

async fn one_round(
    cluster: &Cluster,
    topology: &Arc<ForwardingTopology>,
    metrics: &Metrics,
    background: usize,
    name: &str,
    port: u16,
    private: u16,
) -> Result<Round> {
    cluster.create_mapping(name, port, private).await?;
    let to = SocketAddrV4::new(NODE_PUBLIC_ADDRESS, port);
    let probing = topology.clone();
    let t0 = Instant::now();
    let prober = tokio::task::spawn_blocking(move || probe(&probing, to, t0));
    cluster.accept_mapping(name, private).await?;
    let applied = t0.elapsed();
    let probe = prober.await?;

    // The agent reports what it did; then the mapping goes and the agent settles back to K.
    wait_until(&format!("{name} reported Programmed"), || async {
        cluster.is_programmed(name).await
    })
    .await?;
    cluster
        .mappings()
        .delete(name, &DeleteParams::default())
        .await?;
    let want = i64::try_from(background)?;
    wait_until(&format!("{name}'s forward removed"), || async {
        Ok(metrics.forwards_programmed() == want)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(Round {
        applied,
        connect: probe.connect.map(|at| at - t0),
        reply: probe.reply.map(|at| at - t0),
        attempts: probe.attempts,
    })
}

struct Probe {
    connect: Option<Instant>,
    reply: Option<Instant>,
    attempts: u32,
}

/// From the client namespace: a fresh TCP connection and one echoed line every
/// [`PROBE_EVERY`] until the container answers or [`PROBE_GIVE_UP`] after `t0`.
fn probe(topology: &ForwardingTopology, to: SocketAddrV4, t0: Instant) -> Probe {
    let expected = format!("ttt from {CLIENT_ADDRESS}");
    let mut attempts = 0;
    loop {
        let started = Instant::now();
        attempts += 1;
        if let Ok(reply) = tcp_exchange(&topology.client, to, "ttt", ATTEMPT_TIMEOUT)
            && reply == expected
        {
            return Probe {
                connect: Some(started),
                reply: Some(Instant::now()),
                attempts,
            };
        }
        if started - t0 >= PROBE_GIVE_UP {
            return Probe {
                connect: None,
                reply: None,
                attempts,
            };
        }
        std::thread::sleep(PROBE_EVERY.saturating_sub(started.elapsed()));
    }
}

/// The agent running in-process as a task, inside the node's network namespace.
struct AgentTask {
    task: tokio::task::JoinHandle<Result<()>>,
    stop: oneshot::Sender<()>,
    metrics: Arc<Metrics>,
    ready: tokio::sync::watch::Receiver<bool>,
}

impl AgentTask {
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

fn start_agent(
    cluster: &Cluster,
    topology: &ForwardingTopology,
    home_root: PathBuf,
) -> Result<AgentTask> {
    let config = OperatorConfig::from_yaml(&format!(
        "homeRoot: {}\nportForward:\n  backend: nftables\n  resyncPeriod: {RESYNC_PERIOD}\n",
        home_root.display()
    ))?;
    let agent = Agent::new(
        cluster.client.clone(),
        AgentOptions {
            node_name: cluster.node.clone(),
            config,
            netns: NetworkNamespace::Named(topology.node.name().to_owned()),
            container_networks: Vec::new(),
        },
    )?;
    let metrics = agent.metrics();
    let ready = agent.ready();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async move {
        let _ = stopped.await;
    }));
    Ok(AgentTask {
        task,
        stop,
        metrics,
        ready,
    })
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn print_table(phases: &[Phase], elapsed: Duration) {
    println!();
    println!("time to traffic: PortMapping Accepted (T0) -> first echoed TCP exchange (T1)");
    println!(
        "agent: nftables backend, resyncPeriod {RESYNC_PERIOD}; probe every {} ms, give up after {} s",
        PROBE_EVERY.as_millis(),
        PROBE_GIVE_UP.as_secs()
    );
    println!();
    println!(
        "{:>6} {:>7} {:>12} {:>12} {:>12} {:>9}",
        "K", "rounds", "median", "p90", "max", "all < 1 s"
    );
    for phase in phases {
        let mut replies: Vec<Duration> = phase
            .rounds
            .iter()
            .map(|r| r.reply.unwrap_or(PROBE_GIVE_UP))
            .collect();
        replies.sort();
        let timeouts = phase.rounds.iter().filter(|r| r.reply.is_none()).count();
        let all_under = timeouts == 0 && replies.iter().all(|d| *d < TARGET);
        let max = if timeouts > 0 {
            format!(">{} s ({timeouts}x)", PROBE_GIVE_UP.as_secs())
        } else {
            ms(*replies.last().expect("at least one round"))
        };
        println!(
            "{:>6} {:>7} {:>12} {:>12} {:>12} {:>9}",
            phase.background,
            phase.rounds.len(),
            ms(percentile(&replies, 50.0)),
            ms(percentile(&replies, 90.0)),
            max,
            if all_under { "yes" } else { "NO" }
        );
    }
    println!();
    println!(
        "detail (medians): apply = status write answered, connect = successful attempt started"
    );
    for phase in phases {
        let median_of = |pick: &dyn Fn(&Round) -> Option<Duration>| {
            let mut samples: Vec<Duration> = phase.rounds.iter().filter_map(pick).collect();
            samples.sort();
            if samples.is_empty() {
                "-".to_owned()
            } else {
                ms(percentile(&samples, 50.0))
            }
        };
        let mut attempts: Vec<u32> = phase.rounds.iter().map(|r| r.attempts).collect();
        attempts.sort_unstable();
        println!(
            "  K={:<5} apply {:>9}  connect {:>9}  attempts {:>4}  drift repairs {}  sync failures {}",
            phase.background,
            median_of(&|r| Some(r.applied)),
            median_of(&|r| r.connect),
            attempts[attempts.len() / 2],
            phase.drift_repairs,
            phase.sync_failures,
        );
    }
    println!("  whole run: {:.1} s", elapsed.as_secs_f64());
}
