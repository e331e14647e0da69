//! `CustomDistro`: a root filesystem kept in a storage container's `distros/` directory.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A custom distribution: one directory under a storage container's `distros/`, usable as a
/// read-only root by the customer's other containers on the same server.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "uwsgi.it",
    version = "v1alpha1",
    kind = "CustomDistro",
    namespaced,
    status = "CustomDistroStatus",
    shortname = "ucd",
    category = "uwsgi",
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
    /// and '-', starting with a letter or digit, at most 64 characters.
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

    /// Directory on the server: <homeRoot>/<storage uid>/distros/<path>.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,

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
