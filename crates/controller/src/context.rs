//! What every reconciler shares: the client, the caches, the configuration and the state that
//! serialises cross-object decisions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, Recorder};
use kube::runtime::reflector::Store;
use tracing::warn;
use uwsgi_it_api::{Container, CustomDistro, Customer, PortMapping};
use uwsgi_it_domain::config::OperatorConfig;

use crate::admission::AdmissionState;
use crate::metrics::Metrics;
use crate::port_mapping::PortState;
use crate::uids::UidStore;

/// Shared state of the controller's reconcilers.
pub struct Context {
    /// API client (the controller's own ServiceAccount in a cluster).
    pub client: Client,
    /// The operator configuration.
    pub config: Arc<OperatorConfig>,
    /// Cache of Containers.
    pub containers: Store<Container>,
    /// Cache of Nodes.
    pub nodes: Store<Node>,
    /// Cache of Customers.
    pub customers: Store<Customer>,
    /// Cache of PortMappings.
    pub mappings: Store<PortMapping>,
    /// Cache of CustomDistros.
    pub distros: Store<CustomDistro>,
    /// Event recorder (events.k8s.io).
    pub recorder: Recorder,
    /// Per-server admission serialisation and the last admission writes.
    pub admission: AdmissionState,
    /// Port ownership serialisation and the last acceptance writes.
    pub ports: PortState,
    /// The uid high-water mark.
    pub uids: UidStore,
    /// Metrics.
    pub metrics: Metrics,
    /// Customers (by uid) whose namespace and RoleBinding were applied, with the generation
    /// applied and when.
    pub customer_applied: Mutex<HashMap<String, (Option<i64>, std::time::Instant)>>,
    synced: tokio::sync::watch::Sender<bool>,
    backoff: Mutex<HashMap<String, u32>>,
    overcommit_reported: Mutex<HashMap<String, String>>,
}

impl Context {
    /// Assembles the context from the caches the controllers built.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        config: Arc<OperatorConfig>,
        stores: Stores,
        recorder: Recorder,
        uids: UidStore,
        metrics: Metrics,
    ) -> Self {
        Context {
            client,
            config,
            containers: stores.containers,
            nodes: stores.nodes,
            customers: stores.customers,
            mappings: stores.mappings,
            distros: stores.distros,
            recorder,
            admission: AdmissionState::default(),
            ports: PortState::default(),
            uids,
            metrics,
            customer_applied: Mutex::new(HashMap::new()),
            synced: tokio::sync::watch::Sender::new(false),
            backoff: Mutex::new(HashMap::new()),
            overcommit_reported: Mutex::new(HashMap::new()),
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

    /// True when this overcommit message is new for the server (so it is reported once).
    pub fn note_overcommit(&self, server: &str, message: &str) -> bool {
        let mut reported = self.overcommit_reported.lock().expect("overcommit map");
        reported.insert(server.to_string(), message.to_string()) != Some(message.to_string())
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
    /// Customers.
    pub customers: Store<Customer>,
    /// PortMappings.
    pub mappings: Store<PortMapping>,
    /// CustomDistros.
    pub distros: Store<CustomDistro>,
}
