//! `PortMapping`: a public port of a server forwarded to a container's private port.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Forwards `<server address>:<publicPort>/<proto>` to `<container ip>:<privatePort>`.
/// On each server a (proto, publicPort) pair has one owner across all customers: first come
/// keeps it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "uwsgi.it",
    version = "v1alpha1",
    kind = "PortMapping",
    namespaced,
    status = "PortMappingStatus",
    shortname = "upm",
    category = "uwsgi",
    doc = "A public port of a Server forwarded to a private port of one of the customer's containers.",
    selectable = ".status.server",
    printcolumn(name = "Container", type_ = "string", json_path = ".spec.container"),
    printcolumn(name = "Proto", type_ = "string", json_path = ".spec.proto"),
    printcolumn(name = "Public", type_ = "integer", json_path = ".spec.publicPort"),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.target"),
    printcolumn(name = "Address", type_ = "string", json_path = ".status.address"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Programmed",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Programmed\")].status"
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
pub struct PortMappingSpec {
    /// Name of the Container (same namespace) that receives the traffic.
    #[schemars(length(min = 1, max = 253))]
    pub container: String,

    /// Transport protocol: tcp or udp.
    #[serde(default)]
    pub proto: Protocol,

    /// Port on the server's public address, 1025-65535. Ports reserved by the operator (by
    /// default the NodePort range and the kubelet/kube-proxy ports) are refused.
    #[schemars(range(min = 1025, max = 65535))]
    pub public_port: i32,

    /// Port the container listens on, on its private address (never 127.0.0.1), 1-65535.
    #[schemars(range(min = 1, max = 65535))]
    pub private_port: i32,
}

/// Transport protocol of a port mapping.
// Variants carry no doc comments on purpose: schemars would turn them into a `oneOf` instead of
// the plain `enum: [tcp, udp]` whose refusal message lists the supported values.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

/// What the controller and the agent observed for a PortMapping.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortMappingStatus {
    /// Name of the server node the mapping lives on (the container's server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,

    /// Public IPv4 address the mapping listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,

    /// Where the traffic goes: <container ip>:<privatePort>.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,

    /// The metadata.generation the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Accepted (controller), Programmed (agent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
