//! The controller: admits containers without ever overselling a server, allocates their
//! identities, runs their workloads and reports everything in status, conditions and Events.
//!
//! One active replica (Lease leader election) runs five reconcilers over shared caches: Servers
//! (admission, committed to each Server's ledger with optimistic concurrency, so even two
//! replicas that both believe they lead cannot oversell), Containers (workload, deletion),
//! PortMappings (port ownership), CustomDistros and Customers (namespace, RoleBinding, usage).
//! Decisions come from the pure `uwsgi-it-domain`.

pub mod admission;
pub mod container;
pub mod context;
pub mod custom_distro;
pub mod customer;
pub mod directory;
pub mod events;
pub mod facts;
pub mod index;
pub mod metrics;
pub mod overlay;
pub mod port_mapping;
pub mod readiness;
pub mod status;
pub mod uids;
pub mod workload;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::Api;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{error, info, warn};
use uwsgi_it_api::{Container, CustomDistro, Customer, PortMapping, Server};
use uwsgi_it_domain::config::OperatorConfig;

use crate::context::{Context, Stores};
use crate::metrics::Metrics;
use crate::uids::UidStore;

/// Name of the Lease the replicas compete for.
pub const LEASE_NAME: &str = "uwsgi-it-controller";

/// Errors of a reconciliation; all are retried with per-object backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The uid store failed.
    #[error(transparent)]
    Uids(#[from] uids::UidStoreError),
}

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The operator configuration.
    pub config: OperatorConfig,
    /// Namespace of the controller (Lease and uid store live here).
    pub namespace: String,
    /// This replica's identity in the Lease (the Pod name).
    pub identity: String,
    /// Where `/healthz`, `/readyz` and `/metrics` are served; `None` serves nothing.
    pub listen: Option<SocketAddr>,
    /// Whether to take part in leader election (off for a single replica or tests).
    pub leader_election: bool,
    /// How many reconciliations of one kind may run at once.
    pub concurrency: u16,
}

impl Options {
    /// Defaults for a single replica in `namespace`.
    pub fn new(config: OperatorConfig, namespace: impl Into<String>) -> Self {
        Options {
            config,
            namespace: namespace.into(),
            identity: default_identity(),
            listen: None,
            leader_election: false,
            concurrency: 16,
        }
    }
}

/// An identity no other process shares: the host name, the process id and the start time (a
/// pid alone is 1 in every container).
fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "uwsgi-it-controller".into());
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{host}-{}-{started:x}", std::process::id())
}

/// Runs the controller until `shutdown` resolves or leadership is lost.
pub async fn run(
    client: Client,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let (ready_tx, ready_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = {
        let stop_rx = stop_rx.clone();
        move || {
            let mut stop_rx = stop_rx.clone();
            async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            }
        }
    };

    if let Some(address) = options.listen {
        let listener = uwsgi_it_telemetry::bind(address).await?;
        let registry = Arc::new(registry);
        let shutdown = stopped();
        tokio::spawn(async move {
            if let Err(e) = uwsgi_it_telemetry::serve(
                listener,
                registry,
                ready_rx,
                uwsgi_it_telemetry::alive(),
                shutdown,
            )
            .await
            {
                error!(error = %e, "the health and metrics server failed");
            }
        });
    }

    let mut leadership = None;
    if options.leader_election {
        // A standby replica is healthy and ready to take over; it reports ready so rolling
        // updates proceed while the leader keeps working.
        let _ = ready_tx.send(true);
        let manager = LeaseManagerBuilder::new(client.clone(), LEASE_NAME)
            .with_namespace(&options.namespace)
            .with_identity(&options.identity)
            .with_duration(15)
            .with_grace(5)
            .build()
            .await?;
        let (mut leader, task) = manager.watch().await;
        info!(identity = %options.identity, "waiting for leadership");
        let mut stop = stop_rx.clone();
        tokio::select! {
            result = leader.wait_for(|l| *l) => { result?; }
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        info!(identity = %options.identity, "leading");
        let _ = ready_tx.send(false);
        leadership = Some((leader, task));
    }

    metrics.set_leading();
    let controllers = Controllers::new(client.clone(), &options, metrics);
    let ready = controllers.wait_until_ready(ready_tx);
    tokio::spawn(ready);

    let mut stop = stop_rx.clone();
    let lost = async move {
        match leadership {
            Some((mut leader, _task)) => {
                let _ = leader.wait_for(|l| !*l).await;
                true
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = controllers.run() => {}
        _ = stop.wait_for(|s| *s) => {}
        lost = lost => if lost {
            // Another replica may be writing already: stop at once rather than race it.
            anyhow::bail!("leadership lost");
        },
    }
    info!("controller stopped");
    Ok(())
}

/// The controllers, the shared watches that feed them and the caches they share.
struct Controllers {
    servers: Controller<Server>,
    containers: Controller<Container>,
    mappings: Controller<PortMapping>,
    distros: Controller<CustomDistro>,
    customers: Controller<Customer>,
    /// `Ready` and `Stalled` of the kinds whose conditions several writers share.
    summaries: Summaries,
    /// The shared reflectors: each kind is watched once, whoever reads it.
    watches: Vec<Task>,
    context: Arc<Context>,
    concurrency: u16,
}

/// The readiness reconcilers (see [`readiness`]), one per summarised kind.
struct Summaries {
    containers: Controller<Container>,
    mappings: Controller<PortMapping>,
    distros: Controller<CustomDistro>,
}

/// How many events a slow subscriber of a shared watch may lag behind before the watch waits.
const SUBSCRIBER_BUFFER: usize = 4096;

/// The last generation seen of each object (by uid): a filter that lets through what an object
/// says (spec changes and the start of its deletion both bump the generation) and drops
/// status-only updates.
#[derive(Default)]
struct Generations(std::sync::Mutex<std::collections::HashMap<String, Option<i64>>>);

impl Generations {
    /// True when `object` is new or its generation changed since the last call.
    fn changed<K: ResourceExt>(&self, object: &K) -> bool {
        let uid = object.uid().unwrap_or_default();
        let generation = object.meta().generation;
        let mut seen = self.0.lock().expect("generations");
        seen.insert(uid, generation) != Some(generation)
    }
}

/// Drops what no reconciler reads from cached objects: managed fields (often larger than the
/// object) and, for Nodes, everything but their name and addresses.
fn trim<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

fn trim_node(node: &mut Node) {
    trim(node);
    node.metadata.annotations = None;
    node.metadata.labels = None;
    node.spec = None;
    if let Some(status) = node.status.as_mut() {
        *status = k8s_openapi::api::core::v1::NodeStatus {
            addresses: status.addresses.take(),
            ..Default::default()
        };
    }
}

/// A future that runs until the controller stops.
type Task = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// One watch of every object of kind `K`, reflected into a store that every controller shares
/// (and into an optional index), fanned out to the controllers it triggers.
///
/// The fan-out sends the objects themselves. kube-runtime's own shared streams send references
/// and look them up in the store when polled; a reference whose object was deleted in between
/// (a create and a quick delete, or a relist that brought back an object a replayed event then
/// deletes) leaves that subscriber pending with no waker, and its controller never hears of
/// anything again.
struct SharedWatch<K: kube::Resource<DynamicType = ()> + Clone + 'static> {
    api: Api<K>,
    modify: fn(&mut K),
    index: Option<Arc<index::Index<K>>>,
    store: reflector::Store<K>,
    writer: reflector::store::Writer<K>,
    subscribers: Vec<futures::channel::mpsc::Sender<Arc<K>>>,
    config: watcher::Config,
}

impl<K> SharedWatch<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    fn new(api: Api<K>, modify: fn(&mut K), index: Option<Arc<index::Index<K>>>) -> Self {
        let (store, writer) = reflector::store();
        SharedWatch {
            api,
            modify,
            index,
            store,
            writer,
            subscribers: Vec::new(),
            config: watcher::Config::default(),
        }
    }

    /// Watches only the objects with these labels.
    fn labelled(mut self, selector: &str) -> Self {
        self.config = self.config.labels(selector);
        self
    }

    /// A stream of the objects the watch sees (applied or relisted), for one controller. A
    /// subscriber that lags by more than [`SUBSCRIBER_BUFFER`] objects slows the watch down.
    fn subscribe(&mut self) -> futures::channel::mpsc::Receiver<Arc<K>> {
        let (sender, receiver) = futures::channel::mpsc::channel(SUBSCRIBER_BUFFER);
        self.subscribers.push(sender);
        receiver
    }

    /// A controller of this watch's objects, each of them triggering its own reconcile. It is
    /// handed bare references (no uid, no resourceVersion: neither is part of the identity
    /// its scheduler keys on), the smallest entries its queue can hold — one per container for
    /// the Container controller's periodic resync.
    fn controller(&mut self) -> Controller<K> {
        let references = self
            .subscribe()
            .map(|object| index::bare_ref(object.as_ref()));
        Controller::for_shared_stream(futures::stream::pending(), self.store.clone())
            .reconcile_on(references)
    }

    /// The watch itself: (consistent) list, then watch, reflected into the store and index,
    /// then handed to every subscriber (a relist's objects once it is complete).
    fn run(self) -> Task {
        let index = self.index;
        let subscribers = self.subscribers;
        let stream = reflector::reflector(
            self.writer,
            watcher(self.api, self.config)
                .default_backoff()
                .modify(self.modify),
        );
        // Subscribers are handed the store's own copy of each object, not a second one: at a
        // relist of 50,000 containers, or behind a lagging subscriber, a copy per event would
        // double the cache. The reflector has updated the store before it yields an event;
        // a relist's objects are in it once the relist is done.
        let store = self.store;
        let relisted: Vec<ObjectRef<K>> = Vec::new();
        let task = stream.fold(
            (subscribers, relisted),
            move |(mut subscribers, mut relisted), event| {
                let index = index.clone();
                let store = store.clone();
                async move {
                    let Ok(event) = event else {
                        return (subscribers, relisted);
                    };
                    if let Some(index) = &index {
                        index.observe(&event);
                    }
                    let ready = match event {
                        watcher::Event::Apply(object) => vec![
                            store
                                .get(&ObjectRef::from_obj(&object))
                                .unwrap_or_else(|| Arc::new(object)),
                        ],
                        watcher::Event::Init => {
                            relisted.clear();
                            Vec::new()
                        }
                        watcher::Event::InitApply(object) => {
                            relisted.push(index::bare_ref(&object));
                            Vec::new()
                        }
                        watcher::Event::InitDone => std::mem::take(&mut relisted)
                            .iter()
                            .filter_map(|reference| store.get(reference))
                            .collect(),
                        watcher::Event::Delete(_) => Vec::new(),
                    };
                    for object in ready {
                        for subscriber in &mut subscribers {
                            use futures::SinkExt;
                            let _ = subscriber.send(Arc::clone(&object)).await;
                        }
                    }
                    (subscribers, relisted)
                }
            },
        );
        Box::pin(async move {
            task.await;
        })
    }
}

/// Which Servers a container event concerns: the one it holds a reservation on, else the one
/// its `spec.server` names (every Server of an ambiguous address).
struct ServerRefs {
    directory: directory::ServerDirectory,
}

impl ServerRefs {
    /// Whether a container's change can change its server's decision: a new generation not
    /// decided yet, the finalizer, the start of its deletion. Its status alone cannot (the
    /// ledger is the truth), so the projection a pass writes, and the agent's reports, do not
    /// start another pass.
    fn concerns_admission(container: &Container) -> bool {
        let status = container.status.as_ref();
        container.metadata.deletion_timestamp.is_some()
            || !container
                .finalizers()
                .iter()
                .any(|f| f == uwsgi_it_api::well_known::CONTROLLER_FINALIZER)
            || status.is_none_or(|s| {
                uwsgi_it_api::condition::find(&s.conditions, uwsgi_it_api::condition::ADMITTED)
                    .is_none_or(|c| c.observed_generation != container.metadata.generation)
            })
    }

    fn of_container(&self, container: &Container) -> Vec<ObjectRef<Server>> {
        if !Self::concerns_admission(container) {
            return Vec::new();
        }
        match self.directory.named_by(container) {
            Ok(server) => vec![ObjectRef::new(&server)],
            Err(uwsgi_it_domain::capacity::PlacementError::AmbiguousAddress {
                servers, ..
            }) => servers.iter().map(|s| ObjectRef::new(s)).collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Controllers {
    fn new(client: Client, options: &Options, metrics: Metrics) -> Self {
        let container_index = Arc::new(index::Index::new(context::container_keys));
        let mut container_watch = SharedWatch::new(
            Api::<Container>::all(client.clone()),
            trim,
            Some(Arc::clone(&container_index)),
        );
        let server_index = Arc::new(index::Index::new(context::server_keys));
        let mut server_watch = SharedWatch::new(
            Api::<Server>::all(client.clone()),
            trim,
            Some(Arc::clone(&server_index)),
        );
        let mut customer_watch = SharedWatch::new(Api::<Customer>::all(client.clone()), trim, None);
        let mut node_watch = SharedWatch::new(Api::<Node>::all(client.clone()), trim_node, None);
        // The Customers' reader ClusterRoles: a Server another customer may still read gets
        // nothing new of this customer's (see admission).
        let reader_index = Arc::new(index::Index::new(context::reader_keys));
        let reader_watch = SharedWatch::new(
            Api::<ClusterRole>::all(client.clone()),
            trim,
            Some(Arc::clone(&reader_index)),
        )
        .labelled(&format!(
            "{}={},{}",
            workload::MANAGED_BY.0,
            workload::MANAGED_BY.1,
            uwsgi_it_api::well_known::CUSTOMER_LABEL
        ));
        let mapping_index = Arc::new(index::Index::new(context::mapping_keys));
        let mut mapping_watch = SharedWatch::new(
            Api::<PortMapping>::all(client.clone()),
            trim,
            Some(Arc::clone(&mapping_index)),
        );
        let distro_index = Arc::new(index::Index::new(context::distro_keys));
        let mut distro_watch = SharedWatch::new(
            Api::<CustomDistro>::all(client.clone()),
            trim,
            Some(Arc::clone(&distro_index)),
        );
        let directory = directory::ServerDirectory::new(
            server_watch.store.clone(),
            node_watch.store.clone(),
            Arc::clone(&server_index),
        );
        let mapping_store = mapping_watch.store.clone();
        let distro_store = distro_watch.store.clone();
        let container_store = container_watch.store.clone();
        let server_store = server_watch.store.clone();
        let customer_store = customer_watch.store.clone();
        let node_store = node_watch.store.clone();

        let pods = watcher::Config::default().labels(&format!(
            "{}={}",
            workload::MANAGED_BY.0,
            workload::MANAGED_BY.1
        ));

        // Servers: admission. A container, a Customer's spec or a Node concerns the servers
        // they name, nothing else.
        let servers = {
            let by_container = ServerRefs {
                directory: directory.clone(),
            };
            let seen_generations = Generations::default();
            server_watch
                .controller()
                .watches_shared_stream(container_watch.subscribe(), move |c| {
                    by_container.of_container(&c)
                })
                .watches_shared_stream(customer_watch.subscribe(), move |c| {
                    if !seen_generations.changed(c.as_ref()) {
                        return Vec::new();
                    }
                    c.spec
                        .servers
                        .iter()
                        .map(|s| ObjectRef::<Server>::new(s))
                        .collect::<Vec<_>>()
                })
                .watches_shared_stream(node_watch.subscribe(), |n| {
                    Some(ObjectRef::<Server>::new(&n.name_any()))
                })
        };

        // Containers: finalizer, workload, deletion.
        let containers = {
            let by_distro = Arc::clone(&container_index);
            let by_customer = Arc::clone(&container_index);
            let seen_generations = Generations::default();
            container_watch
                .controller()
                .owns(Api::<Pod>::all(client.clone()), pods)
                .watches_shared_stream(distro_watch.subscribe(), move |d| {
                    by_distro.get(&context::namespace_key(&d.namespace().unwrap_or_default()))
                })
                // Only what a Customer says (its servers, its deletion) matters here, not its
                // status (usage), which changes with every admission.
                .watches_shared_stream(customer_watch.subscribe(), move |c| {
                    if !seen_generations.changed(c.as_ref()) {
                        return Vec::new();
                    }
                    by_customer.get(&context::namespace_key(&c.namespace_name()))
                })
        };

        // PortMappings: port ownership, decided per server.
        let mappings = {
            let by_container = Arc::clone(&mapping_index);
            mapping_watch.controller().watches_shared_stream(
                container_watch.subscribe(),
                move |c| {
                    by_container.get(&context::mapping_key(
                        &c.namespace().unwrap_or_default(),
                        &c.name_any(),
                    ))
                },
            )
        };
        // CustomDistros: acceptance and usage, from their namespace's containers.
        let distros = {
            let by_namespace = Arc::clone(&distro_index);
            distro_watch
                .controller()
                .watches_shared_stream(container_watch.subscribe(), move |c| {
                    by_namespace.get(&context::namespace_key(&c.namespace().unwrap_or_default()))
                })
        };
        // Customers: namespace, RoleBinding, usage (from the Servers' ledgers).
        let customers = {
            let by_container = customer_store.clone();
            let by_server = customer_store.clone();
            let by_customer = customer_store.clone();
            customer_watch
                .controller()
                // A Customer listing a server makes it shared: its other owners lose read access
                // to that Server at once.
                .watches_shared_stream(customer_watch.subscribe(), move |c| {
                    by_customer
                        .state()
                        .iter()
                        .filter(|other| other.metadata.uid != c.metadata.uid)
                        .filter(|other| {
                            other
                                .spec
                                .servers
                                .iter()
                                .any(|s| c.spec.servers.contains(s))
                        })
                        .map(|other| ObjectRef::from_obj(other.as_ref()))
                        .collect::<Vec<_>>()
                })
                .watches_shared_stream(container_watch.subscribe(), move |c| {
                    let namespace = c.namespace().unwrap_or_default();
                    by_container
                        .state()
                        .iter()
                        .filter(|cu| cu.namespace_name() == namespace)
                        .map(|cu| ObjectRef::from_obj(cu.as_ref()))
                        .collect::<Vec<_>>()
                })
                .watches_shared_stream(server_watch.subscribe(), move |server| {
                    let name = server.name_any();
                    by_server
                        .state()
                        .iter()
                        .filter(|cu| cu.spec.servers.contains(&name))
                        .map(|cu| ObjectRef::from_obj(cu.as_ref()))
                        .collect::<Vec<_>>()
                })
        };

        // Every change of a summarised object, whoever wrote it, may change its summary.
        let summaries = Summaries {
            containers: container_watch.controller(),
            mappings: mapping_watch.controller(),
            distros: distro_watch.controller(),
        };

        let context = Arc::new(Context::new(
            client.clone(),
            Arc::new(options.config.clone()),
            Stores {
                containers: container_store,
                container_index,
                mapping_index,
                distro_index,
                directory,
                nodes: node_store,
                servers: server_store,
                customers: customer_store,
                mappings: mapping_store,
                distros: distro_store,
                readers: reader_watch.store.clone(),
                reader_index,
            },
            events::Publisher::new(
                client.clone(),
                "uwsgi-it-controller",
                options.identity.clone(),
            ),
            UidStore::new(
                Api::<ConfigMap>::namespaced(client, &options.namespace),
                options.config.uid_store.clone(),
            ),
            metrics,
        ));
        Controllers {
            servers,
            containers,
            mappings,
            distros,
            customers,
            summaries,
            watches: vec![
                container_watch.run(),
                mapping_watch.run(),
                distro_watch.run(),
                server_watch.run(),
                customer_watch.run(),
                node_watch.run(),
                reader_watch.run(),
            ],
            context,
            concurrency: options.concurrency,
        }
    }

    /// Flips readiness once every cache has its first complete list.
    fn wait_until_ready(&self, ready: watch::Sender<bool>) -> impl Future<Output = ()> + use<> {
        let ctx = Arc::clone(&self.context);
        async move {
            let synced = async {
                ready_store(&ctx.containers).await?;
                ready_store(&ctx.nodes).await?;
                ready_store(&ctx.servers).await?;
                ready_store(&ctx.customers).await?;
                ready_store(&ctx.mappings).await?;
                ready_store(&ctx.readers).await?;
                ready_store(&ctx.distros).await
            };
            match synced.await {
                Ok(()) => {
                    info!("caches synced");
                    ctx.mark_synced();
                    let _ = ready.send(true);
                }
                Err(e) => warn!(error = %e, "a cache never synced"),
            }
        }
    }

    /// Runs every controller; dropping the returned future stops them all.
    async fn run(self) {
        let config = ControllerConfig::default().concurrency(self.concurrency);
        // A Customer's usage moves with every admission on its servers: coalesce those.
        let customer_config = config.clone().debounce(Duration::from_secs(1));
        let ctx = self.context;
        let servers = drive(self.servers, &config, admission::reconcile, &ctx);
        let containers = drive(self.containers, &config, container::reconcile, &ctx);
        let mappings = drive(self.mappings, &config, port_mapping::reconcile, &ctx);
        let distros = drive(self.distros, &config, custom_distro::reconcile, &ctx);
        let customers = drive(self.customers, &customer_config, customer::reconcile, &ctx);
        // A new object is admitted (or refused) within milliseconds of its creation: a short
        // debounce makes that one summary write instead of two.
        let summary_config = config.clone().debounce(Duration::from_millis(500));
        let summaries = {
            let s = self.summaries;
            let config = &summary_config;
            let containers = drive(
                s.containers,
                config,
                readiness::reconcile::<Container>,
                &ctx,
            );
            let mappings = drive(
                s.mappings,
                config,
                readiness::reconcile::<PortMapping>,
                &ctx,
            );
            let distros = drive(
                s.distros,
                config,
                readiness::reconcile::<CustomDistro>,
                &ctx,
            );
            async move {
                tokio::join!(containers, mappings, distros);
            }
        };
        let watches = futures::future::join_all(self.watches);
        tokio::join!(
            servers, containers, mappings, distros, customers, summaries, watches
        );
    }
}

/// Waits for a store's first complete list. A store's readiness wakes only the last task that
/// polled it (kube-runtime keeps a single waker), and the controllers poll it too, so the wait is
/// re-polled on a short tick instead of trusting one wake-up.
async fn ready_store<K>(store: &reflector::Store<K>) -> Result<(), reflector::store::WriterDropped>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(result) =
            tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await
        {
            return result;
        }
    }
}

/// Runs one controller with the shared configuration, backoff and context until it ends.
fn drive<K, Fut>(
    controller: Controller<K>,
    config: &ControllerConfig,
    reconcile: fn(Arc<K>, Arc<Context>) -> Fut,
    ctx: &Arc<Context>,
) -> impl Future<Output = ()> + Send + use<K, Fut>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    controller
        .with_config(config.clone())
        .run(
            move |object, ctx| tracked(object, ctx, reconcile),
            error_policy,
            Arc::clone(ctx),
        )
        .for_each(|_| futures::future::ready(()))
}

/// The key of an object in the backoff table: kind, namespace and name.
fn backoff_key<K: kube::Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// The `controller` label of a kind in the metrics.
fn controller_label<K: kube::Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "Server" => "server",
        "Container" => "container",
        "PortMapping" => "portmapping",
        "CustomDistro" => "customdistro",
        "Customer" => "customer",
        _ => "other",
    }
}

/// Runs a reconciliation and forgets the object's past failures when it succeeds, so the
/// next failure starts again from the shortest backoff.
async fn tracked<K, F, Fut>(
    object: Arc<K>,
    ctx: Arc<Context>,
    reconcile: F,
) -> Result<Action, Error>
where
    K: kube::Resource<DynamicType = ()>,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, Error>>,
{
    let key = backoff_key(object.as_ref());
    let result = reconcile(object, Arc::clone(&ctx)).await;
    if result.is_ok() {
        ctx.succeeded(&key);
    }
    result
}

fn error_policy<K: kube::Resource<DynamicType = ()>>(
    object: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let key = backoff_key(object.as_ref());
    warn!(object = %key, %error, "reconciliation failed; retrying with backoff");
    ctx.metrics.reconcile_failed(controller_label::<K>());
    ctx.backoff(&key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_identity_differs_per_process_start() {
        let a = default_identity();
        std::thread::sleep(Duration::from_millis(1));
        let b = default_identity();
        assert_ne!(
            a, b,
            "two replicas started apart must not share an identity"
        );
        assert!(a.contains(&std::process::id().to_string()), "{a}");
        assert_ne!(a, format!("uwsgi-it-controller-{}", std::process::id()));
    }
}
