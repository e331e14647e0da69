//! Condition types and reasons of this API.
//!
//! Conditions are standard `metav1.Condition`s in a list-map keyed by `type`, so the controller
//! and the agent can each own theirs with server-side apply.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// Customer: its namespace and role bindings exist. Server: its Node exists and admission runs.
pub const READY: &str = "Ready";
/// Container: the controller reserved memory and storage on the server (controller).
pub const ADMITTED: &str = "Admitted";
/// Container: the home directory exists on the server (agent).
pub const HOME_READY: &str = "HomeReady";
/// Container: `.ssh/authorized_keys` holds the `sshKeys` (agent). Separate from `HomeReady`:
/// a key problem never stops the container.
pub const KEYS_READY: &str = "KeysReady";
/// Container: the workload Pod is running (controller).
pub const RUNNING: &str = "Running";
/// PortMapping and CustomDistro: the controller accepted it.
pub const ACCEPTED: &str = "Accepted";
/// PortMapping: the forward is programmed on the server (agent).
pub const PROGRAMMED: &str = "Programmed";
/// CustomDistro: its directory exists on the server and is not a symlink (agent).
pub const AVAILABLE: &str = "Available";

/// Finds the condition of the given type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition of the given type is present with status `"True"`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// Read access to an object's `status.conditions` (empty while it has no status), so the
/// controller and the agent need not unwrap each kind's status themselves.
pub trait HasConditions {
    /// The object's conditions.
    fn conditions(&self) -> &[Condition];
}

macro_rules! has_conditions {
    ($($kind:ty),*) => {$(
        impl HasConditions for $kind {
            fn conditions(&self) -> &[Condition] {
                self.status
                    .as_ref()
                    .map(|s| s.conditions.as_slice())
                    .unwrap_or_default()
            }
        }
    )*};
}

has_conditions!(
    crate::Container,
    crate::PortMapping,
    crate::CustomDistro,
    crate::Customer,
    crate::Server
);
