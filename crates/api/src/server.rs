//! `Server`: a dedicated server the supplier sells room on, and its reservation ledger.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A server the supplier sells memory and storage on, named after its Node. Its status is the
/// reservation ledger: the single source of truth for what is reserved on it, committed by the
/// controller with optimistic concurrency so the server is never oversold.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "uwsgi.it",
    version = "v1alpha1",
    kind = "Server",
    status = "ServerStatus",
    shortname = "srv",
    category = "uwsgi",
    doc = "A server the supplier sells memory and storage on, named after its Node; its status is the reservation ledger.",
    printcolumn(name = "Address", type_ = "string", json_path = ".status.address"),
    printcolumn(
        name = "Memory",
        type_ = "integer",
        json_path = ".spec.memory",
        description = "Memory capacity, MB"
    ),
    printcolumn(
        name = "Mem-Reserved",
        type_ = "integer",
        json_path = ".status.memory.reserved",
        description = "Memory reserved by admitted containers, MB"
    ),
    printcolumn(
        name = "Mem-Free",
        type_ = "integer",
        json_path = ".status.memory.free",
        description = "Memory left, MB"
    ),
    printcolumn(
        name = "Storage",
        type_ = "integer",
        json_path = ".spec.storage",
        description = "Storage capacity, MB"
    ),
    printcolumn(
        name = "Sto-Reserved",
        type_ = "integer",
        json_path = ".status.storage.reserved",
        description = "Storage reserved by admitted containers, MB"
    ),
    printcolumn(
        name = "Sto-Free",
        type_ = "integer",
        json_path = ".status.storage.free",
        description = "Storage left, MB"
    ),
    printcolumn(
        name = "Containers",
        type_ = "integer",
        json_path = ".status.containers"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// Memory capacity sold on this server, in MB (1 MB = 1 MiB). Lowering it below what is
    /// reserved evicts nothing: it blocks admissions and growth, and is reported.
    #[schemars(range(min = 1))]
    pub memory: i64,

    /// Storage capacity sold on this server for homes, in MB (1 MB = 1 MiB).
    #[schemars(range(min = 1))]
    pub storage: i64,

    /// Public IPv4 address customers' port forwards listen on. Optional: without it the Node's
    /// ExternalIP is used, else its InternalIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 7, max = 15))]
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4").message("address must be an IPv4 address such as 203.0.113.10"))]
    pub address: Option<String>,

    /// Free-form note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub note: Option<String>,
}

/// One admitted container's reservation on the server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    /// The Container's metadata.uid: the entry belongs to that object alone, not to a later
    /// Container of the same name.
    #[schemars(length(min = 1, max = 64))]
    pub object_uid: String,
    /// The Container's namespace.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// The Container's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The container's uid (its Unix identity and home directory), never reused.
    #[schemars(range(min = 30001))]
    pub uid: i64,
    /// Memory reserved, in MB.
    #[schemars(range(min = 0))]
    pub memory: i64,
    /// Storage reserved, in MB.
    #[schemars(range(min = 0))]
    pub storage: i64,
}

/// Capacity, reservations and what is left of one resource on a server, in MB.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// Capacity (spec), in MB.
    pub capacity: i64,
    /// Sum of the ledger's reservations, in MB.
    pub reserved: i64,
    /// Capacity minus reserved (never below zero), in MB.
    pub free: i64,
}

/// The reservation ledger and what the controller observed for a Server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!has(oldSelf.highestUid) || (has(self.highestUid) && self.highestUid >= oldSelf.highestUid)").message("status.highestUid never goes down: uids are never reused"))]
#[serde(rename_all = "camelCase")]
pub struct ServerStatus {
    /// One entry per admitted container. Only the controller writes it, always with a
    /// resourceVersion precondition: every revision was computed from the one it replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10000))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["objectUid".into()]))]
    pub ledger: Vec<LedgerEntry>,

    /// The highest container uid ever admitted on this server. Only grows: with the uid record
    /// it keeps uids from being handed out twice, even after the containers are gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub highest_uid: Option<i64>,

    /// Memory capacity, reserved and free, in MB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Capacity>,

    /// Storage capacity, reserved and free, in MB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<Capacity>,

    /// Number of containers holding a reservation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<i64>,

    /// The public IPv4 address in effect (spec.address, else the Node's ExternalIP, else its
    /// InternalIP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,

    /// The metadata.generation the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready: the Node exists, the capacity covers the reservations and admission runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

impl Server {
    /// The ledger (empty before the first commit).
    pub fn ledger(&self) -> &[LedgerEntry] {
        self.status
            .as_ref()
            .map(|s| s.ledger.as_slice())
            .unwrap_or_default()
    }
}

/// A Node's addresses as `(type, address)` pairs, in the Node's order (none without a Node):
/// the input of the one rule that picks a server's public address.
pub fn node_addresses(
    node: Option<&k8s_openapi::api::core::v1::Node>,
) -> impl Iterator<Item = (&str, &str)> + Clone {
    node.and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .map(|a| (a.type_.as_str(), a.address.as_str()))
}
