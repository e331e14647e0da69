//! Labels, annotations, finalizers and field managers shared by the supplier, the controller and
//! the agent. Kept in one place because a typo in any of them silently breaks the contract.

/// Label a supplier puts on a Node to make it a uwsgi.it server (value `"true"`).
pub const SERVER_LABEL: &str = "uwsgi.it/server";
/// Node annotation: memory capacity of the server in MB.
pub const MEMORY_ANNOTATION: &str = "uwsgi.it/memory";
/// Node annotation: storage capacity of the server in MB.
pub const STORAGE_ANNOTATION: &str = "uwsgi.it/storage";
/// Node annotation: the server's public IPv4 address (else ExternalIP, else InternalIP).
pub const ADDRESS_ANNOTATION: &str = "uwsgi.it/address";
/// Label on a customer's namespace naming the Customer that owns it.
pub const CUSTOMER_LABEL: &str = "uwsgi.it/customer";
/// Label the controller sets on namespaced objects naming the server (node) they live on, so
/// each agent can watch only its own node's objects.
pub const NODE_LABEL: &str = "uwsgi.it/node";
/// Finalizer held by the controller on Customers, Containers and CustomDistros.
pub const CONTROLLER_FINALIZER: &str = "uwsgi.it/controller";
/// Field manager of the controller's server-side-apply writes.
pub const CONTROLLER_MANAGER: &str = "uwsgi-it-controller";
/// Field manager of the agent's server-side-apply writes.
pub const AGENT_MANAGER: &str = "uwsgi-it-agent";
/// First uid handed to a container (uwsgi.it's convention).
pub const FIRST_UID: i64 = 30001;
