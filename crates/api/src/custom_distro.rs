//! `CustomDistro`: a root filesystem a storage container fills at `<home>/distros/<path>`, run as
//! the root filesystem of the customer's other containers on the same server.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A custom distribution: a root filesystem the storage container fills at
/// <home>/distros/<path>. The customer's other containers on the same server that name it in
/// customDistro run their uWSGI Emperor with it as their root filesystem (its files are read-only
/// to them except directories the customer made world-writable). The agent creates the directory
/// when the distro is accepted; the storage container cannot create or replace it, only fill it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "uwsgi.it",
    version = "v1alpha1",
    kind = "CustomDistro",
    namespaced,
    status = "CustomDistroStatus",
    shortname = "ucd",
    category = "uwsgi",
    doc = "A customer's own root filesystem, kept in a storage container's home and usable by its containers on the same Server.",
    selectable = ".status.server",
    printcolumn(
        name = "Storage",
        type_ = "string",
        json_path = ".spec.storageContainer"
    ),
    printcolumn(name = "Path", type_ = "string", json_path = ".spec.path"),
    printcolumn(name = "Server", type_ = "string", json_path = ".status.server"),
    printcolumn(name = "Used By", type_ = "integer", json_path = ".status.usedBy"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Available",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Available\")].status"
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
pub struct CustomDistroSpec {
    /// Name of the storage Container (customDistrosStorage: true, same namespace) whose
    /// distros/ directory holds this distribution.
    #[schemars(length(min = 1, max = 253))]
    pub storage_container: String,

    /// One directory name under the storage container's distros/: letters, digits, '.', '_'
    /// and '-', starting with a letter or digit, at most 64 characters. The agent creates the
    /// directory (owned by the storage container's uid); changing the path makes the
    /// distro's users restart on the new directory.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._-]*$')").message(
        "path must be a single directory name: letters, digits, '.', '_' or '-', starting with a letter or digit (no '/', '.' or '..')"
    ))]
    pub path: String,

    /// Free-form note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub note: Option<String>,

    /// Free-form tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63)))]
    pub tags: Vec<String>,
}

/// What the controller and the agent observed for a CustomDistro.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CustomDistroStatus {
    /// Server node of the storage container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,

    /// Directory on the server: <homeRoot>/.distros/<storage uid>/<path>, under a root-owned
    /// parent so that no component of it can be replaced by the customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,

    /// What the agent found in the tree, set while it is usable as a root filesystem
    /// (condition Available).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<DistroRoot>,

    /// Number of containers using this distribution.
    #[serde(default)]
    pub used_by: i64,

    /// The metadata.generation the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Accepted (controller), Available (agent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// The agent's survey of a custom distro's tree: what a container running on it mounts and
/// starts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DistroRoot {
    /// Top-level directories of the tree (or relative links to directories inside it, such as
    /// a merged-/usr bin -> usr/bin), each mounted at /<name> in the containers using it.
    /// /proc, /dev and /sys come from the runtime, /tmp and /run are private to each container,
    /// /containers holds its home.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 64)))]
    pub directories: Vec<String>,

    /// The uWSGI binary the Emperor runs, as a path inside the tree: /opt/unbit/uwsgi/uwsgi
    /// (the seed's distro checklist) or else uwsgi in /usr/local/bin, /usr/bin or /bin.
    #[schemars(length(min = 1, max = 256))]
    pub emperor: String,
}
