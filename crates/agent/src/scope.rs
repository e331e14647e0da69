//! Which objects are this node's, and the caches of them.
//!
//! The agent watches only its own node's Containers, PortMappings and CustomDistros: the CRDs
//! declare `.status.server` a selectable field, so the API server filters by
//! `status.server=<node>` and a node never downloads the rest of the cluster. An API server too
//! old for selectable fields (before Kubernetes 1.31) refuses that selector; the agent then falls
//! back to the `uwsgi.it/node` label the controller sets. Either way every object is checked
//! again against its status before anything is done with it ([`on_node`]), because a selector is
//! an optimisation, not a guarantee the agent may rely on to touch a host.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Node, Pod, PodSpec, PodStatus};
use kube::api::{Api, ListParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{debug, warn};
use uwsgi_it_api::condition::HasConditions;
use uwsgi_it_api::well_known::NODE_LABEL;
use uwsgi_it_api::{Container, CustomDistro, PortMapping, Server};

/// How the API server is asked for this node's objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeSelector {
    /// `status.server=<node>` (CRD selectable field, Kubernetes ≥ 1.31).
    StatusField,
    /// `uwsgi.it/node=<node>` (label set by the controller).
    NodeLabel,
}

impl NodeSelector {
    pub fn watcher_config(self, node: &str) -> watcher::Config {
        match self {
            NodeSelector::StatusField => {
                watcher::Config::default().fields(&format!("status.server={node}"))
            }
            NodeSelector::NodeLabel => {
                watcher::Config::default().labels(&format!("{NODE_LABEL}={node}"))
            }
        }
    }
}

/// Asks the API server whether it filters Containers by `status.server`; falls back to the node
/// label when it refuses the selector (400 Bad Request: "field label not supported").
pub async fn choose_selector(client: &Client, node: &str) -> anyhow::Result<NodeSelector> {
    let api: Api<Container> = Api::all(client.clone());
    let params = ListParams::default()
        .fields(&format!("status.server={node}"))
        .limit(1);
    match api.list_metadata(&params).await {
        Ok(_) => Ok(NodeSelector::StatusField),
        Err(kube::Error::Api(status)) if status.code == 400 => {
            warn!(
                error = %status.message,
                "the API server cannot select Containers by status.server; watching the {NODE_LABEL} label instead"
            );
            Ok(NodeSelector::NodeLabel)
        }
        Err(error) => Err(anyhow::anyhow!(
            "listing Containers of node {node}: {error}"
        )),
    }
}

/// The objects the agent acts on, with the status the controller and the agent write.
pub trait NodeObject:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + HasConditions
    + Clone
    + Debug
    + Send
    + Sync
    + 'static
{
    /// `status.server`: the node the controller placed the object on.
    fn server(&self) -> Option<&str>;
}

impl NodeObject for Container {
    fn server(&self) -> Option<&str> {
        self.status.as_ref()?.server.as_deref()
    }
}

impl NodeObject for PortMapping {
    fn server(&self) -> Option<&str> {
        self.status.as_ref()?.server.as_deref()
    }
}

impl NodeObject for CustomDistro {
    fn server(&self) -> Option<&str> {
        self.status.as_ref()?.server.as_deref()
    }
}

/// True when the object's status places it on `node`.
pub fn on_node<K: NodeObject>(object: &K, node: &str) -> bool {
    object.server() == Some(node)
}

/// What a cache change should wake up. `Notify` keeps one pending wake-up when nobody waits,
/// so a change that arrives while a loop is busy is handled by its next round.
#[derive(Debug, Default)]
pub(crate) struct Triggers {
    pub forwarding: Notify,
    pub homes: Notify,
    pub distros: Notify,
}

/// Caches of this node's objects, kept up to date by watches.
#[derive(Clone)]
pub(crate) struct Caches {
    pub containers: Store<Container>,
    pub mappings: Store<PortMapping>,
    pub distros: Store<CustomDistro>,
    pub node: Store<Node>,
    pub server: Store<Server>,
    /// The Pods on this node (`spec.nodeName`), trimmed to what checking a forward target
    /// needs: name, owner, node and address.
    pub pods: Store<Pod>,
}

impl Caches {
    /// Starts the watches as tasks of `tasks`. A watch error is logged and retried with backoff;
    /// the cache keeps its last known state meanwhile, so an API outage never looks like "no
    /// objects" to the loops that read it.
    pub fn start(
        client: &Client,
        node: &str,
        selector: NodeSelector,
        triggers: &Arc<Triggers>,
        tasks: &mut JoinSet<anyhow::Result<()>>,
    ) -> Caches {
        let config = selector.watcher_config(node);
        let containers = watch(
            Api::all(client.clone()),
            config.clone(),
            triggers,
            |t| {
                t.homes.notify_one();
                // A CustomDistro's directory lives in its storage container's home.
                t.distros.notify_one();
            },
            tasks,
        );
        let mappings = watch(
            Api::all(client.clone()),
            config.clone(),
            triggers,
            |t| t.forwarding.notify_one(),
            tasks,
        );
        let distros = watch(
            Api::all(client.clone()),
            config,
            triggers,
            |t| t.distros.notify_one(),
            tasks,
        );
        let server = watch(
            Api::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            triggers,
            |t| t.forwarding.notify_one(),
            tasks,
        );
        let pods = watch_trimmed(
            Api::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            trim_pod,
            triggers,
            |t| t.forwarding.notify_one(),
            tasks,
        );
        let node = watch(
            Api::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            triggers,
            |t| t.forwarding.notify_one(),
            tasks,
        );
        Caches {
            containers,
            mappings,
            distros,
            node,
            server,
            pods,
        }
    }

    /// Resolves once every cache has listed its objects once.
    pub async fn wait_until_ready(&self) -> anyhow::Result<()> {
        let (a, b, c, d, e, f) = tokio::join!(
            self.containers.wait_until_ready(),
            self.mappings.wait_until_ready(),
            self.distros.wait_until_ready(),
            self.node.wait_until_ready(),
            self.server.wait_until_ready(),
            self.pods.wait_until_ready(),
        );
        a.and(b)
            .and(c)
            .and(d)
            .and(e)
            .and(f)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// This node's objects of one kind, re-checked against their status.
    pub fn mine<K: NodeObject>(store: &Store<K>, node: &str) -> Vec<Arc<K>> {
        store.state_filter(|object| on_node(object, node))
    }
}

/// Keeps of a Pod only its name, namespace, uid, owners, node, phase and address.
fn trim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.metadata.labels = None;
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    pod.spec = Some(PodSpec {
        node_name,
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        ..PodStatus::default()
    });
}

fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    triggers: &Arc<Triggers>,
    on_change: fn(&Triggers),
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    watch_trimmed(api, config, |_| {}, triggers, on_change, tasks)
}

/// [`watch`], with `trim` applied to every object before it is cached.
fn watch_trimmed<K>(
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    triggers: &Arc<Triggers>,
    on_change: fn(&Triggers),
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff().modify(trim));
    let triggers = triggers.clone();
    let kind = K::kind(&()).into_owned();
    tasks.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => on_change(&triggers),
                Err(error) => warn!(%kind, %error, "watch failed; keeping the last known state"),
            }
        }
        debug!(%kind, "watch ended");
        Ok(())
    });
    store
}
