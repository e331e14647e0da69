//! The controller: admits containers without ever overselling a server, allocates their
//! identities, runs their workloads and reports everything in status, conditions and Events.
//!
//! One active replica (Lease leader election) runs four reconcilers over shared caches:
//! Containers (admission, workload, deletion), PortMappings (port ownership), CustomDistros and
//! Customers (namespace, RoleBinding, usage). Decisions come from the pure `uwsgi-it-domain`.

pub mod admission;
pub mod container;
pub mod context;
pub mod custom_distro;
pub mod customer;
pub mod facts;
pub mod metrics;
pub mod overlay;
pub mod port_mapping;
pub mod status;
pub mod uids;
pub mod workload;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::Api;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{error, info, warn};
use uwsgi_it_api::{Container, CustomDistro, Customer, PortMapping};
use uwsgi_it_domain::config::OperatorConfig;

use crate::context::{Context, Stores};
use crate::facts::node_facts;
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
            identity: format!("uwsgi-it-controller-{}", std::process::id()),
            listen: None,
            leader_election: false,
            concurrency: 16,
        }
    }
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
            if let Err(e) = uwsgi_it_telemetry::serve(listener, registry, ready_rx, shutdown).await
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

/// The four controllers and the caches they share.
struct Controllers {
    containers: Controller<Container>,
    mappings: Controller<PortMapping>,
    distros: Controller<CustomDistro>,
    customers: Controller<Customer>,
    nodes: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    context: Arc<Context>,
    concurrency: u16,
}

fn same_namespace<K: ResourceExt>(object: &K) -> Option<String> {
    object.namespace()
}

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

impl Controllers {
    fn new(client: Client, options: &Options, metrics: Metrics) -> Self {
        let all = watcher::Config::default().any_semantic();
        let (nodes_store, nodes_writer) = reflector::store::<Node>();
        let nodes = reflector::reflector(
            nodes_writer,
            watcher(Api::<Node>::all(client.clone()), all.clone()),
        )
        .default_backoff()
        .for_each(|_| futures::future::ready(()));
        let nodes = Box::pin(nodes);

        let containers = Controller::new(Api::<Container>::all(client.clone()), all.clone());
        let container_store = containers.store();
        let mappings = Controller::new(Api::<PortMapping>::all(client.clone()), all.clone());
        let mapping_store = mappings.store();
        let distros = Controller::new(Api::<CustomDistro>::all(client.clone()), all.clone());
        let distro_store = distros.store();
        let customers = Controller::new(Api::<Customer>::all(client.clone()), all.clone());
        let customer_store = customers.store();

        let in_namespace = |store: reflector::Store<Container>| {
            move |namespace: Option<String>| -> Vec<ObjectRef<Container>> {
                store
                    .state()
                    .iter()
                    .filter(|c| c.namespace() == namespace)
                    .map(|c| ObjectRef::from_obj(c.as_ref()))
                    .collect()
            }
        };
        let containers = {
            let by_distro = in_namespace(container_store.clone());
            let by_customer = in_namespace(container_store.clone());
            let seen_generations = Generations::default();
            let by_node = container_store.clone();
            containers
                .owns(
                    Api::<Pod>::all(client.clone()),
                    watcher::Config::default().labels(&format!(
                        "{}={}",
                        workload::MANAGED_BY.0,
                        workload::MANAGED_BY.1
                    )),
                )
                .watches(
                    Api::<CustomDistro>::all(client.clone()),
                    all.clone(),
                    move |d| by_distro(same_namespace(&d)),
                )
                // Only what a Customer says (its servers, its deletion) matters to admission, not
                // its status: the status changes with every admission (usage), and reconciling
                // every container of the customer on each of those would grow as N².
                .watches(
                    Api::<Customer>::all(client.clone()),
                    all.clone(),
                    move |c| {
                        if !seen_generations.changed(&c) {
                            return Vec::new();
                        }
                        by_customer(Some(c.namespace_name()))
                    },
                )
                .watches(Api::<Node>::all(client.clone()), all.clone(), move |node| {
                    let facts = node_facts(&node);
                    by_node
                        .state()
                        .iter()
                        .filter(|c| container::names_node(c, &facts))
                        .map(|c| ObjectRef::from_obj(c.as_ref()))
                        .collect::<Vec<_>>()
                })
        };
        let mappings = {
            let store = mapping_store.clone();
            mappings.watches(
                Api::<Container>::all(client.clone()),
                all.clone(),
                move |c| {
                    let namespace = c.namespace();
                    store
                        .state()
                        .iter()
                        .filter(|m| m.namespace() == namespace && m.spec.container == c.name_any())
                        .map(|m| ObjectRef::from_obj(m.as_ref()))
                        .collect::<Vec<_>>()
                },
            )
        };
        let distros = {
            let store = distro_store.clone();
            distros.watches(
                Api::<Container>::all(client.clone()),
                all.clone(),
                move |c| {
                    let namespace = c.namespace();
                    store
                        .state()
                        .iter()
                        .filter(|d| d.namespace() == namespace)
                        .map(|d| ObjectRef::from_obj(d.as_ref()))
                        .collect::<Vec<_>>()
                },
            )
        };
        let customers = {
            let by_container = customer_store.clone();
            let by_node = customer_store.clone();
            customers
                .watches(
                    Api::<Container>::all(client.clone()),
                    all.clone(),
                    move |c| {
                        let namespace = c.namespace().unwrap_or_default();
                        by_container
                            .state()
                            .iter()
                            .filter(|cu| cu.namespace_name() == namespace)
                            .map(|cu| ObjectRef::from_obj(cu.as_ref()))
                            .collect::<Vec<_>>()
                    },
                )
                .watches(Api::<Node>::all(client.clone()), all.clone(), move |node| {
                    by_node
                        .state()
                        .iter()
                        .filter(|cu| cu.spec.servers.contains(&node.name_any()))
                        .map(|cu| ObjectRef::from_obj(cu.as_ref()))
                        .collect::<Vec<_>>()
                })
        };

        let reporter = Reporter {
            controller: "uwsgi-it-controller".into(),
            instance: Some(options.identity.clone()),
        };
        let context = Arc::new(Context::new(
            client.clone(),
            Arc::new(options.config.clone()),
            Stores {
                containers: container_store,
                nodes: nodes_store,
                customers: customer_store,
                mappings: mapping_store,
                distros: distro_store,
            },
            Recorder::new(client.clone(), reporter),
            UidStore::new(
                Api::<ConfigMap>::namespaced(client, &options.namespace),
                options.config.uid_store.clone(),
            ),
            metrics,
        ));
        Controllers {
            containers,
            mappings,
            distros,
            customers,
            nodes,
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
                ready_store(&ctx.customers).await?;
                ready_store(&ctx.mappings).await?;
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
        let ctx = self.context;
        let containers = drive(self.containers, &config, container::reconcile, &ctx);
        let mappings = drive(self.mappings, &config, port_mapping::reconcile, &ctx);
        let distros = drive(self.distros, &config, custom_distro::reconcile, &ctx);
        let customers = drive(self.customers, &config, customer::reconcile, &ctx);
        tokio::join!(containers, mappings, distros, customers, self.nodes);
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
