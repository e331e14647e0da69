//! Conditions and status writes.
//!
//! Every status write is a server-side apply on the status subresource under a field manager
//! of its own, so the controller's concerns (admission, workload) and the agent each own their
//! fields and conditions without overwriting the others'.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uwsgi_it_api::condition;

/// Field manager of admission decisions (Container uid/server/address/home/reserved/Admitted).
pub const ADMISSION_MANAGER: &str = "uwsgi-it-controller";
/// Field manager of workload state (Container ip/Running/usableCustomDistros).
pub const WORKLOAD_MANAGER: &str = "uwsgi-it-controller-workload";

/// A condition to set: its type, truth, reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Condition type.
    pub type_: &'static str,
    /// True or False.
    pub status: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

impl Desired {
    /// A condition with status True.
    pub fn yes(type_: &'static str, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Desired {
            type_,
            status: true,
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// A condition with status False.
    pub fn no(type_: &'static str, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Desired {
            type_,
            status: false,
            reason: reason.into(),
            message: message.into(),
        }
    }

    fn status_text(&self) -> &'static str {
        if self.status { "True" } else { "False" }
    }

    /// Whether `current` already says the same, for this `generation` of the object (a
    /// condition that describes an older generation is written again: `kubectl wait` and
    /// kstatus read its `observedGeneration`). Times are ignored.
    pub fn matches(&self, current: &[Condition], generation: Option<i64>) -> bool {
        condition::find(current, self.type_).is_some_and(|c| {
            c.status == self.status_text()
                && c.reason == self.reason
                && c.message == self.message
                && c.observed_generation == generation
        })
    }

    /// Whether `current` already gives the same verdict, whatever generation it describes:
    /// an Event is published only when the verdict changes.
    pub fn same_verdict(&self, current: &[Condition]) -> bool {
        condition::find(current, self.type_).is_some_and(|c| {
            c.status == self.status_text() && c.reason == self.reason && c.message == self.message
        })
    }

    /// The condition to write: the transition time is kept while the status stays the same,
    /// so `lastTransitionTime` means what Kubernetes says it means.
    pub fn to_condition(&self, current: &[Condition], generation: Option<i64>) -> Condition {
        let last_transition_time = condition::find(current, self.type_)
            .filter(|c| c.status == self.status_text())
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| Time(Timestamp::now()));
        Condition {
            type_: self.type_.to_string(),
            status: self.status_text().to_string(),
            reason: self.reason.clone(),
            message: self.message.clone(),
            observed_generation: generation,
            last_transition_time,
        }
    }
}

/// Server-side applies `status` (a JSON object holding only the fields `manager` owns) to the
/// object's status subresource.
pub async fn apply_status<K>(
    api: &Api<K>,
    object: &K,
    manager: &str,
    status: serde_json::Value,
) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": object.name_any()},
        "status": status,
    });
    api.patch_status(
        &object.name_any(),
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&body),
    )
    .await
}
