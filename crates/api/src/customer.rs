//! `Customer`: a hosting customer, managed by the supplier.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A hosting customer. The controller gives it a namespace of its own, binds its users and
/// groups to the customer role there, and reports its usage of each server it owns.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "uwsgi.it",
    version = "v1alpha1",
    kind = "Customer",
    status = "CustomerStatus",
    shortname = "cust",
    category = "uwsgi",
    doc = "A customer of the supplier: its namespace, the Servers it owns and the people who may manage its containers.",
    printcolumn(name = "Namespace", type_ = "string", json_path = ".status.namespace"),
    printcolumn(name = "Servers", type_ = "string", json_path = ".spec.servers"),
    printcolumn(name = "Company", type_ = "string", json_path = ".spec.company"),
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
// Immutability is two rules: the field-level one compares values, and this one stops setting or
// removing the field later (a field-level rule does not run when the field is absent on either
// side). One combined spec-level rule would be simpler to read, but the API server's cost
// estimator prices a spec-level string comparison far beyond its budget.
#[x_kube(validation = Rule::new("has(self.namespace) == has(oldSelf.namespace)").message("namespace is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct CustomerSpec {
    /// Namespace holding the customer's Containers, PortMappings and CustomDistros. Defaults
    /// to the Customer's name. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("namespace is immutable"))]
    pub namespace: Option<String>,

    /// Names of the Servers this customer owns; its containers may only live there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), inner(length(min = 1, max = 253)))]
    pub servers: Vec<String>,

    /// Kubernetes users who act as this customer (bound to the customer role in its namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253)))]
    #[x_kube(validation = Rule::new("self.all(u, !u.startsWith('system:') || u.startsWith('system:serviceaccount:'))").message("users: system: names belong to Kubernetes itself; of them only a service account (system:serviceaccount:<namespace>:<name>) may act as a customer"))]
    pub users: Vec<String>,

    /// Kubernetes groups whose members act as this customer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253)))]
    #[x_kube(validation = Rule::new("self.all(g, !g.startsWith('system:'))").message("groups: system: groups belong to Kubernetes itself (system:authenticated would make every user of the cluster this customer)"))]
    pub groups: Vec<String>,

    /// Company name, for the supplier's records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub company: Option<String>,

    /// VAT number, for the supplier's records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub vat: Option<String>,

    /// Free-form note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub note: Option<String>,
}

/// Capacity, reservations and what is left of one resource on a server, in MB.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceUsage {
    /// The Server's capacity (spec), in MB.
    pub capacity: i64,
    /// Sum of all admitted reservations on the server (every customer), in MB.
    pub used: i64,
    /// Capacity minus used (never below zero), in MB.
    pub free: i64,
}

/// Usage of one server the customer owns.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServerUsage {
    /// Server node name.
    pub name: String,
    /// Public IPv4 address of the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Memory capacity and reservations of the server, in MB.
    pub memory: ResourceUsage,
    /// Storage capacity and reservations of the server, in MB.
    pub storage: ResourceUsage,
    /// Number of this customer's containers on the server.
    pub containers: i64,
}

/// What the controller observed for a Customer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CustomerStatus {
    /// The customer's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,

    /// Usage of each server the customer owns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<ServerUsage>,

    /// The metadata.generation the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready: the namespace and role bindings exist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

impl Customer {
    /// The namespace this customer's objects live in: `spec.namespace`, else its name.
    pub fn namespace_name(&self) -> String {
        self.spec
            .namespace
            .clone()
            .unwrap_or_else(|| self.metadata.name.clone().unwrap_or_default())
    }
}
