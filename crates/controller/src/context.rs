//! What every reconciler shares: the client, the caches, the configuration and the state that
//! serialises cross-object decisions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::runtime::controller::Action;
use kube::runtime::events::Event;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use tracing::warn;
use uwsgi_it_api::{Container, CustomDistro, Customer, PortMapping, Server};
use uwsgi_it_domain::config::OperatorConfig;

use crate::admission::Released;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::port_mapping::PortState;
use crate::uids::UidStore;

/// What was applied for a Customer, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerApplied {
    /// The Customer's generation.
    pub generation: Option<i64>,
    /// The servers only it owns (its reader ClusterRole's).
    pub sole_owned: Vec<String>,
    /// When.
    pub at: std::time::Instant,
}

/// Shared state of the controller's reconcilers.
pub struct Context {
    /// API client (the controller's own ServiceAccount in a cluster).
    pub client: Client,
    /// The operator configuration.
    pub config: Arc<OperatorConfig>,
    /// Cache of Containers.
    pub containers: Store<Container>,
    /// Cache of Nodes (trimmed to what the controller reads).
    pub nodes: Store<Node>,
    /// Cache of Servers.
    pub servers: Store<Server>,
    /// Containers by the server they name ([`server_key`]) and by namespace
    /// ([`namespace_key`]).
    pub container_index: Arc<Index<Container>>,
    /// PortMappings by the container they forward to ([`mapping_key`]).
    pub mapping_index: Arc<Index<PortMapping>>,
    /// Which Server a container names (Servers, Nodes, Servers by address).
    pub directory: crate::directory::ServerDirectory,
    /// CustomDistros by namespace ([`namespace_key`]).
    pub distro_index: Arc<Index<CustomDistro>>,
    /// Cache of Customers.
    pub customers: Store<Customer>,
    /// Cache of PortMappings.
    pub mappings: Store<PortMapping>,
    /// Cache of CustomDistros.
    pub distros: Store<CustomDistro>,
    /// Cache of the Customers' reader ClusterRoles (`uwsgi-it-customer-<name>`).
    pub readers: Store<ClusterRole>,
    /// Reader ClusterRoles by the Servers they let read ([`server_key`]).
    pub reader_index: Arc<Index<ClusterRole>>,
    /// Event recorder (events.k8s.io).
    pub recorder: crate::events::Publisher,
    /// Containers whose reservation this controller released.
    pub released: Released,
    /// Port ownership serialisation and the last acceptance writes.
    pub ports: PortState,
    /// The uid high-water mark.
    pub uids: UidStore,
    /// Metrics.
    pub metrics: Metrics,
    /// Customers (by uid) whose namespace, RoleBinding and reader ClusterRole were applied.
    pub customer_applied: Mutex<HashMap<String, CustomerApplied>>,
    synced: tokio::sync::watch::Sender<bool>,
    backoff: Mutex<HashMap<String, u32>>,
    server_reasons: Mutex<HashMap<String, String>>,
}

/// The index key of the containers that name `server` (a Server name or an address) in
/// `status.server` or `spec.server`.
pub fn server_key(server: &str) -> String {
    format!("server:{server}")
}

/// The index key of the PortMappings of one container.
pub fn mapping_key(namespace: &str, container: &str) -> String {
    format!("container:{namespace}/{container}")
}

/// The index keys of a PortMapping: the container it forwards to.
pub fn mapping_keys(mapping: &PortMapping) -> Vec<String> {
    vec![mapping_key(
        &mapping.namespace().unwrap_or_default(),
        &mapping.spec.container,
    )]
}

/// The index key of the Servers that declare `address`.
pub fn address_key(address: &str) -> String {
    format!("address:{address}")
}

/// The index keys of a Server: its declared address.
pub fn server_keys(server: &Server) -> Vec<String> {
    server
        .spec
        .address
        .as_deref()
        .map(address_key)
        .into_iter()
        .collect()
}

/// The index keys of a Customer's reader ClusterRole: the Servers it lets read.
pub fn reader_keys(role: &ClusterRole) -> Vec<String> {
    role.rules
        .iter()
        .flatten()
        .filter(|rule| {
            rule.resources
                .as_ref()
                .is_some_and(|r| r.iter().any(|r| r == "servers"))
        })
        .flat_map(|rule| rule.resource_names.iter().flatten())
        .map(|server| server_key(server))
        .collect()
}

/// The index keys of a CustomDistro: its namespace.
pub fn distro_keys(distro: &CustomDistro) -> Vec<String> {
    vec![namespace_key(&distro.namespace().unwrap_or_default())]
}

/// The index key of the containers of one namespace.
pub fn namespace_key(namespace: &str) -> String {
    format!("namespace:{namespace}")
}

/// The index keys of a container: its namespace, the server it names and the one it holds a
/// reservation on.
pub fn container_keys(container: &Container) -> Vec<String> {
    let mut keys = vec![
        namespace_key(&container.namespace().unwrap_or_default()),
        server_key(&container.spec.server),
    ];
    if let Some(server) = container.status.as_ref().and_then(|s| s.server.as_deref())
        && server != container.spec.server
    {
        keys.push(server_key(server));
    }
    keys
}

impl Context {
    /// Assembles the context from the caches the controllers built.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        config: Arc<OperatorConfig>,
        stores: Stores,
        recorder: crate::events::Publisher,
        uids: UidStore,
        metrics: Metrics,
    ) -> Self {
        Context {
            client,
            config,
            containers: stores.containers,
            nodes: stores.nodes,
            servers: stores.servers,
            container_index: stores.container_index,
            mapping_index: stores.mapping_index,
            directory: stores.directory,
            distro_index: stores.distro_index,
            customers: stores.customers,
            mappings: stores.mappings,
            distros: stores.distros,
            readers: stores.readers,
            reader_index: stores.reader_index,
            recorder,
            released: Released::default(),
            ports: PortState::default(),
            uids,
            metrics,
            customer_applied: Mutex::new(HashMap::new()),
            synced: tokio::sync::watch::Sender::new(false),
            backoff: Mutex::new(HashMap::new()),
            server_reasons: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until every cache has its first complete list. Reconcilers start on their own
    /// kind's events, but decide with the others' caches too: deciding on a half-filled cache
    /// (no Customer yet, say) would refuse what should be admitted.
    pub async fn wait_synced(&self) {
        let mut synced = self.synced.subscribe();
        let _ = synced.wait_for(|s| *s).await;
    }

    /// Marks the caches synced.
    pub fn mark_synced(&self) {
        self.synced.send_replace(true);
    }

    /// Publishes an Event; failing to publish is logged, never fatal.
    pub async fn publish(&self, reference: &ObjectReference, event: Event) {
        if let Err(error) = self.recorder.publish(&event, reference).await {
            warn!(%error, reason = %event.reason, "publishing an Event failed");
        }
    }

    /// True when `reason` is new for the server's `Ready` (so an Event is published once per
    /// change of reason, not on every pass).
    pub fn note_server_reason(&self, server: &str, reason: &str) -> bool {
        let mut reported = self.server_reasons.lock().expect("server reasons");
        reported.insert(server.to_string(), reason.to_string()) != Some(reason.to_string())
    }

    /// The containers of one namespace.
    pub fn containers_in(&self, namespace: &str) -> Vec<Arc<Container>> {
        self.container_index
            .get(&namespace_key(namespace))
            .iter()
            .filter_map(|r| self.containers.get(r))
            .collect()
    }

    /// The CustomDistros of one namespace.
    pub fn distros_in(&self, namespace: &str) -> Vec<Arc<CustomDistro>> {
        self.distro_index
            .get(&namespace_key(namespace))
            .iter()
            .filter_map(|r| self.distros.get(r))
            .collect()
    }

    /// The retry delay after another failure of `object`: 1s, 2s, 4s, ... up to 5 minutes.
    pub fn backoff(&self, object: &str) -> Action {
        let mut failures = self.backoff.lock().expect("backoff map");
        let count = failures.entry(object.to_string()).or_insert(0);
        *count = count.saturating_add(1);
        let seconds = 1u64 << (*count - 1).min(8);
        Action::requeue(Duration::from_secs(seconds.min(300)))
    }

    /// Forgets the failures of `object` after a success.
    pub fn succeeded(&self, object: &str) {
        self.backoff.lock().expect("backoff map").remove(object);
    }
}

/// The caches the context reads.
pub struct Stores {
    /// Containers.
    pub containers: Store<Container>,
    /// Nodes.
    pub nodes: Store<Node>,
    /// Servers.
    pub servers: Store<Server>,
    /// The index of Containers.
    pub container_index: Arc<Index<Container>>,
    /// The index of PortMappings.
    pub mapping_index: Arc<Index<PortMapping>>,
    /// Which Server a container names.
    pub directory: crate::directory::ServerDirectory,
    /// The index of CustomDistros.
    pub distro_index: Arc<Index<CustomDistro>>,
    /// Customers.
    pub customers: Store<Customer>,
    /// PortMappings.
    pub mappings: Store<PortMapping>,
    /// CustomDistros.
    pub distros: Store<CustomDistro>,
    /// The Customers' reader ClusterRoles.
    pub readers: Store<ClusterRole>,
    /// The index of reader ClusterRoles.
    pub reader_index: Arc<Index<ClusterRole>>,
}
