//! The node agent: makes the node match the containers and port mappings assigned to it.

pub mod forwarding;
pub mod homes;

pub mod address;
mod distro_sync;
pub mod health;
pub mod home_sync;
pub mod listeners;
pub mod metrics;
pub mod reporter;
pub mod scope;
pub mod sync;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};
use uwsgi_it_domain::config::{self, OperatorConfig};
use uwsgi_it_domain::forwarding::Ipv4Cidr;
use uwsgi_it_telemetry::prometheus_client::registry::Registry;

pub use address::NetworkNamespace;
use forwarding::{
    CommandScope, ForwardAccept, ForwardingBackend, ForwardingError, IptablesBackend, NftBackend,
    Tools,
};
use health::SyncHealth;
use homes::Homes;
use metrics::Metrics;
use reporter::Reporter;
use scope::{Caches, Triggers};

/// What one agent needs to know besides its API client.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The Node this agent serves (`NODE_NAME`, from the downward API).
    pub node_name: String,
    /// The operator configuration (`homeRoot`, `homeRetention`, `portForward`).
    pub config: OperatorConfig,
    /// Where the node's netfilter rules and network interfaces live.
    pub netns: NetworkNamespace,
    /// Networks whose DNATed traffic is masqueraded so hairpin connections work, besides the
    /// Node's pod CIDRs and the forward targets (which are always included).
    pub container_networks: Vec<Ipv4Cidr>,
}

/// Shared by the agent's loops.
pub(crate) struct Context {
    pub node: String,
    pub config: OperatorConfig,
    pub netns: NetworkNamespace,
    pub container_networks: Vec<Ipv4Cidr>,
    pub caches: Caches,
    pub triggers: Arc<Triggers>,
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    pub homes: Homes,
    pub backend: Arc<dyn ForwardingBackend>,
    pub forward_accept: Arc<ForwardAccept>,
    pub ready: watch::Sender<bool>,
    pub health: Arc<SyncHealth>,
}

/// The backend `choice` names, and the other one (whose rules must not stay behind).
fn backends(
    choice: config::ForwardingBackend,
    tools: Tools,
) -> (Arc<dyn ForwardingBackend>, Box<dyn ForwardingBackend>) {
    match choice {
        config::ForwardingBackend::Nftables => (
            Arc::new(NftBackend::new(tools.clone())),
            Box::new(IptablesBackend::new(tools)),
        ),
        config::ForwardingBackend::Iptables => (
            Arc::new(IptablesBackend::new(tools.clone())),
            Box::new(NftBackend::new(tools)),
        ),
    }
}

/// What a backend switch leaves behind: the other backend's rules, which would still DNAT the
/// old forwards (and, if they come first, shadow the new ones). Removed at start; a host
/// without the other tool has nothing of it to remove.
fn remove_leftovers(unused: &dyn ForwardingBackend) {
    match unused.remove_all() {
        Ok(true) => info!(
            backend = unused.name(),
            "removed the rules of the backend no longer in use"
        ),
        Ok(false) => {}
        Err(ForwardingError::Spawn { .. }) => {}
        Err(error) => {
            warn!(%error, backend = unused.name(), "could not remove the rules of the backend no longer in use")
        }
    }
}

/// `agent --cleanup`: removes every rule of both backends from the namespace (a node that
/// stops being a server, like kube-proxy's `--cleanup`), in both iptables flavours; homes are
/// left alone. Returns what was removed.
pub fn cleanup(
    netns: &NetworkNamespace,
    timeout: std::time::Duration,
) -> anyhow::Result<Vec<String>> {
    let scope = match netns {
        NetworkNamespace::Current => CommandScope::CurrentNamespace,
        NetworkNamespace::Named(name) => CommandScope::Netns(name.clone()),
    };
    let tools = Tools::new(scope, timeout);
    let mut removed = Vec::new();
    let mut note = |what: String, result: Result<bool, ForwardingError>| match result {
        Ok(true) => {
            removed.push(what);
            Ok(())
        }
        // A host without that tool has nothing of it to remove.
        Ok(false) | Err(ForwardingError::Spawn { .. }) => Ok(()),
        Err(error) => Err(anyhow::anyhow!("{what}: {error}")),
    };
    note(
        "nftables table".into(),
        NftBackend::new(tools.clone()).remove_all(),
    )?;
    for (flavour, mode) in [
        ("iptables-nft", config::IptablesMode::Nft),
        ("iptables-legacy", config::IptablesMode::Legacy),
    ] {
        let flavoured = tools.clone().with_iptables(mode);
        note(
            format!("{flavour} FORWARD accept"),
            ForwardAccept::new(flavoured.clone()).remove(),
        )?;
        note(
            format!("{flavour} chains"),
            IptablesBackend::new(flavoured).remove_all(),
        )?;
    }
    Ok(removed)
}

/// One node's agent. Build it, serve its [`Agent::registry`] and [`Agent::ready`] on the health
/// endpoints, then [`Agent::run`] it.
pub struct Agent {
    client: Client,
    options: AgentOptions,
    homes: Homes,
    backend: Arc<dyn ForwardingBackend>,
    forward_accept: Arc<ForwardAccept>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    ready: watch::Sender<bool>,
    health: Arc<SyncHealth>,
}

impl Agent {
    /// Checks the options (a bad `homeRoot` fails here, at start) and registers the metrics.
    pub fn new(client: Client, options: AgentOptions) -> anyhow::Result<Agent> {
        anyhow::ensure!(
            !options.node_name.is_empty(),
            "the node name must not be empty"
        );
        let homes = Homes::new(options.config.home_root.clone())
            .with_context(|| format!("homeRoot {}", options.config.home_root.display()))?;
        let scope = match &options.netns {
            NetworkNamespace::Current => CommandScope::CurrentNamespace,
            NetworkNamespace::Named(name) => CommandScope::Netns(name.clone()),
        };
        let tools = Tools::new(scope, options.config.port_forward.command_timeout)
            .with_iptables(options.config.port_forward.iptables_mode);
        if let Some(mode) = tools.iptables {
            info!(?mode, "iptables flavour");
        }
        let forward_accept = Arc::new(ForwardAccept::new(tools.clone()));
        let (backend, unused) = backends(options.config.port_forward.backend, tools);
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::register(&mut registry));
        remove_leftovers(unused.as_ref());
        let health = Arc::new(SyncHealth::new(options.config.port_forward.max_sync_age));
        Ok(Agent {
            client,
            options,
            homes,
            backend,
            forward_accept,
            registry: Arc::new(registry),
            metrics,
            ready: watch::Sender::new(false),
            health,
        })
    }

    /// The metrics to serve on `/metrics`.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The agent's counters, for tests and benchmarks.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// `/healthz`: fails once no forwarding sync has succeeded for `portForward.maxSyncAge`.
    pub fn health(&self) -> uwsgi_it_telemetry::Health {
        let health = self.health.clone();
        Arc::new(move || health.check())
    }

    /// True once the caches have synced and the first forwarding sync succeeded (`/readyz`).
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Runs until `shutdown` resolves (then returns `Ok` without touching any rule or home) or
    /// until a part of the agent fails for good.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let node = self.options.node_name.clone();
        let selector = tokio::select! {
            () = &mut shutdown => return Ok(()),
            selector = scope::choose_selector(&self.client, &node) => selector?,
        };
        let triggers = Arc::new(Triggers::default());
        // Dropping the set aborts every task, so a cancelled `run` leaves nothing behind.
        let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
        let caches = Caches::start(&self.client, &node, selector, &triggers, &mut tasks);
        info!(%node, ?selector, backend = self.backend.name(), "waiting for the caches to sync");
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            synced = caches.wait_until_ready() => synced?,
        }
        info!(%node, "caches synced");

        let ctx = Arc::new(Context {
            node,
            config: self.options.config,
            netns: self.options.netns,
            container_networks: self.options.container_networks,
            caches,
            triggers,
            reporter: Reporter::new(self.client.clone(), &self.options.node_name),
            metrics: self.metrics,
            homes: self.homes,
            backend: self.backend,
            forward_accept: self.forward_accept,
            ready: self.ready,
            health: self.health,
        });
        tasks.spawn(sync::forwarding_loop(ctx.clone()));
        tasks.spawn(home_sync::homes_loop(ctx.clone()));
        tasks.spawn(distro_sync::distros_loop(ctx.clone()));
        let watcher_ctx = ctx.clone();
        tasks.spawn(async move {
            let triggers = watcher_ctx.triggers.clone();
            let watched = address::watch_changes(&watcher_ctx.netns, move || {
                triggers.forwarding.notify_one();
            })
            .await;
            if let Err(error) = watched {
                // Not fatal: the periodic resync still notices address changes.
                warn!(%error, "cannot watch the node's addresses through rtnetlink");
            }
            Ok(())
        });

        loop {
            tokio::select! {
                () = &mut shutdown => {
                    info!("shutting down; the forwarding rules and homes stay as they are");
                    return Ok(());
                }
                finished = tasks.join_next() => match finished {
                    Some(Ok(Ok(()))) => continue,
                    Some(Ok(Err(error))) => return Err(error),
                    Some(Err(error)) => return Err(anyhow::anyhow!("an agent task failed: {error}")),
                    None => return Ok(()),
                },
            }
        }
    }
}
