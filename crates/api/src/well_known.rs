//! Labels, annotations, finalizers and field managers shared by the supplier, the controller and
//! the agent. Kept in one place because a typo in any of them silently breaks the contract.

/// Label on a customer's namespace naming the Customer that owns it.
pub const CUSTOMER_LABEL: &str = "uwsgi.it/customer";
/// Label the controller sets on namespaced objects naming the server (node) they live on, so
/// each agent can watch only its own node's objects.
pub const NODE_LABEL: &str = "uwsgi.it/node";
/// Annotation a supplier sets on a Container being deleted to release it without waiting for
/// its server's agent (the server or its Node is gone for good): its home is left as it is.
pub const FORCE_RELEASE_ANNOTATION: &str = "uwsgi.it/force-release";
/// Finalizer held by the controller on Customers, Containers and CustomDistros.
pub const CONTROLLER_FINALIZER: &str = "uwsgi.it/controller";
/// Field manager of the controller's server-side-apply writes.
pub const CONTROLLER_MANAGER: &str = "uwsgi-it-controller";
/// Field manager of the agent's server-side-apply writes.
pub const AGENT_MANAGER: &str = "uwsgi-it-agent";
/// First uid handed to a container (uwsgi.it's convention).
pub const FIRST_UID: i64 = 30001;
