//! `Container`: a customer's container on one server, with its memory and storage reservation.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A customer's container: a reservation of memory and storage on one server, a home directory
/// on that server, and (with a `distro`) a workload running as the container's own uid.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "uwsgi.it",
    version = "v1alpha1",
    kind = "Container",
    namespaced,
    status = "ContainerStatus",
    shortname = "uc",
    category = "uwsgi",
    doc = "A customer's container: memory and storage reserved on one Server, a home directory there, and its uWSGI Emperor.",
    selectable = ".status.server",
    printcolumn(name = "Server", type_ = "string", json_path = ".spec.server"),
    printcolumn(
        name = "Memory",
        type_ = "integer",
        json_path = ".spec.memory",
        description = "MB"
    ),
    printcolumn(
        name = "Storage",
        type_ = "integer",
        json_path = ".spec.storage",
        description = "MB"
    ),
    printcolumn(name = "UID", type_ = "integer", json_path = ".status.uid"),
    printcolumn(
        name = "Admitted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Admitted\")].status"
    ),
    printcolumn(
        name = "Running",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Running\")].status"
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
#[x_kube(validation = Rule::new("!(self.customDistrosStorage && has(self.customDistro))").message(
    "a storage container (customDistrosStorage: true) cannot set customDistro"
))]
#[serde(rename_all = "camelCase")]
pub struct ContainerSpec {
    /// The server this container lives on: a Server's name or its public address, as in
    /// the uwsgi.it API. The customer must own the server. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("server is immutable"))]
    #[schemars(length(min = 1, max = 253))]
    pub server: String,

    /// Memory reserved on the server, in MB (1 MB = 1 MiB). Never oversold: the sum of the
    /// reservations on a server never exceeds its capacity.
    #[schemars(range(min = 1))]
    pub memory: i64,

    /// Storage reserved on the server for the home directory, in MB (1 MB = 1 MiB).
    #[schemars(range(min = 1))]
    pub storage: i64,

    /// Platform distribution to run, by name from the operator's distro table. Without a
    /// distro and without a customDistro the container has a home but no workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub distro: Option<String>,

    /// Name of a CustomDistro in the same namespace to run on: the distro is the container's
    /// root filesystem (its uWSGI, its /etc; read-only except directories the customer made
    /// world-writable) and distro is then not used. It must live on the same server. Not
    /// allowed for storage containers. Changing it restarts the container on the new root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub custom_distro: Option<String>,

    /// When true this is a storage container: it sees the customer's custom distributions at
    /// <home>/distros (one directory per CustomDistro naming it, created by the agent) and fills
    /// them; it cannot itself use a customDistro.
    #[serde(default)]
    pub custom_distros_storage: bool,

    /// SSH public keys written to the home's .ssh/authorized_keys; applied without a restart.
    /// Each entry is one public key line as ssh-keygen prints it: "<type> <base64> [comment]",
    /// with no authorized_keys options and no line break.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 8192)))]
    #[x_kube(validation = Rule::new(r#"self.all(k, k.matches(r'^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com|ssh-dss) [A-Za-z0-9+/]+={0,2}( [^\x00-\x1f\x7f]*)?$'))"#).message(
        "each sshKeys entry must be one SSH public key line: a key type (ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256/384/521, sk-ssh-ed25519@openssh.com, sk-ecdsa-sha2-nistp256@openssh.com, ssh-dss), one space, the base64 key, optionally a comment; no options, no line breaks"
    ))]
    pub ssh_keys: Vec<String>,

    /// Free-form tags for the customer's own bookkeeping.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63)))]
    pub tags: Vec<String>,

    /// Free-form note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub note: Option<String>,

    /// Percentage of storage use at which the agent warns (condition and Event), 0-100.
    #[serde(default = "default_quota_threshold")]
    #[schemars(range(min = 0, max = 100))]
    pub quota_threshold: i32,

    /// Restart on request, as `kubectl rollout restart` does for a Deployment: setting this to
    /// a new value (the time of the request, say) replaces the running Pod once; the same
    /// value again changes nothing. E.g.
    /// `kubectl patch container web --type merge -p "{\"spec\":{\"restartedAt\":\"$(date -Is)\"}}"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub restarted_at: Option<String>,
}

fn default_quota_threshold() -> i32 {
    90
}

/// Memory and storage actually reserved for a container on its server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    /// Reserved memory in MB.
    pub memory: i64,
    /// Reserved storage in MB.
    pub storage: i64,
}

/// What the controller and the agent observed and decided for a Container.
///
/// The admission fields are a projection of the Server's ledger. The uid, and the server while a
/// reservation is held, never change once set: a lost response retried, a second controller or
/// a stale cache cannot move a container or give it another identity (and another home).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!has(oldSelf.uid) || (has(self.uid) && self.uid == oldSelf.uid)").message("status.uid never changes once set"))]
#[x_kube(validation = Rule::new("!has(oldSelf.server) || !has(oldSelf.reserved) || (has(self.server) && self.server == oldSelf.server)").message("status.server never changes while the container holds a reservation"))]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    /// The container's uid (>= 30001), unique in the cluster and never reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<i64>,

    /// Name of the Server the container holds its reservation on (a projection of its ledger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,

    /// Public IPv4 address of the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,

    /// Home directory on the server: <homeRoot>/<uid>.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,

    /// Memory and storage admitted on the server. A resize that does not fit keeps this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved: Option<Reservation>,

    /// Private IP address of the running workload; port mappings forward to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,

    /// CustomDistros this container may use (same customer, same server), by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usable_custom_distros: Vec<String>,

    /// Storage the home uses on the server, in MB, as the agent last measured it (a lower
    /// bound when the walk was cut short; the StorageWithinQuota message says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_used: Option<i64>,

    /// The metadata.generation the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Admitted (controller), HomeReady (agent), Running (controller).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
