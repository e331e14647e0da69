//! Writing what the agent did: its conditions (server-side apply under its own field manager)
//! and Events.
//!
//! Conditions are a list-map keyed by `type`, so applying only the agent's condition types
//! leaves the controller's (`Admitted`, `Accepted`, `Running`) alone. An apply replaces *every*
//! field the manager owned before, so each write carries all the agent's condition types of that
//! kind, not only the one that changed; the others are copied from the object as it is.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter as EventReporter};
use kube::{Client, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{debug, warn};
use uwsgi_it_api::condition::{self, Condition};
use uwsgi_it_api::well_known::AGENT_MANAGER;

use crate::scope::NodeObject;

/// A condition as the agent wants it; the timestamps are filled in when it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredCondition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl DesiredCondition {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        DesiredCondition {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }

    fn status_text(&self) -> &'static str {
        if self.status { "True" } else { "False" }
    }

    /// True when `existing` already says this (for this generation).
    fn matches(&self, existing: &Condition, generation: Option<i64>) -> bool {
        existing.status == self.status_text()
            && existing.reason == self.reason
            && existing.message == self.message
            && existing.observed_generation == generation
    }

    fn to_condition(&self, existing: Option<&Condition>, generation: Option<i64>) -> Condition {
        // The transition time says when the status last flipped, not when the agent last wrote.
        let last_transition_time = existing
            .filter(|c| c.status == self.status_text())
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| Time(Timestamp::now()));
        Condition {
            type_: self.type_.to_owned(),
            status: self.status_text().to_owned(),
            reason: self.reason.clone(),
            message: self.message.clone(),
            observed_generation: generation,
            last_transition_time,
        }
    }
}

/// Writes conditions and Events for one node.
#[derive(Clone)]
pub struct Reporter {
    client: Client,
    recorder: Recorder,
}

impl Reporter {
    pub fn new(client: Client, node: &str) -> Reporter {
        let recorder = Recorder::new(
            client.clone(),
            EventReporter {
                controller: AGENT_MANAGER.to_owned(),
                instance: Some(node.to_owned()),
            },
        );
        Reporter { client, recorder }
    }

    /// Writes `desired` into `object`'s status unless it already says exactly that.
    /// `owned_types` are all the condition types the agent writes on this kind of object.
    /// Returns whether it wrote.
    pub async fn conditions<K>(
        &self,
        object: &K,
        owned_types: &[&str],
        desired: &[DesiredCondition],
    ) -> Result<bool, kube::Error>
    where
        K: NodeObject + DeserializeOwned,
    {
        self.status(object, owned_types, desired, serde_json::Map::new(), true)
            .await
    }

    /// Like [`Reporter::conditions`], with more status `fields` the agent owns. `fields_unchanged`
    /// says whether the object already shows them; a field the agent wrote before and leaves
    /// out now is removed (server-side apply: it is the agent's alone).
    pub async fn status<K>(
        &self,
        object: &K,
        owned_types: &[&str],
        desired: &[DesiredCondition],
        fields: serde_json::Map<String, serde_json::Value>,
        fields_unchanged: bool,
    ) -> Result<bool, kube::Error>
    where
        K: NodeObject + DeserializeOwned,
    {
        let current = object.conditions();
        let generation = object.meta().generation;
        let unchanged = desired.iter().all(|want| {
            condition::find(current, want.type_).is_some_and(|c| want.matches(c, generation))
        });
        if unchanged && fields_unchanged {
            return Ok(false);
        }
        let mut conditions: Vec<Condition> = desired
            .iter()
            .map(|want| want.to_condition(condition::find(current, want.type_), generation))
            .collect();
        // Keep the agent's other conditions: leaving them out of the apply would delete them.
        conditions.extend(
            current
                .iter()
                .filter(|c| owned_types.contains(&c.type_.as_str()))
                .filter(|c| desired.iter().all(|want| want.type_ != c.type_))
                .cloned(),
        );
        let mut status = fields;
        status.insert("conditions".into(), json!(conditions));
        let body = json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "metadata": {"name": object.name_any()},
            "status": status,
        });
        let api: Api<K> =
            Api::namespaced(self.client.clone(), &object.namespace().unwrap_or_default());
        api.patch_status(
            &object.name_any(),
            &PatchParams::apply(AGENT_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await?;
        debug!(
            kind = %K::kind(&()),
            name = %object.name_any(),
            namespace = object.namespace().unwrap_or_default(),
            "conditions written"
        );
        Ok(true)
    }

    /// Publishes a Warning Event about `regarding`; a failure is logged, never fatal (Events
    /// are best effort, the conditions carry the state).
    pub async fn warning(
        &self,
        regarding: &ObjectReference,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.publish(regarding, EventType::Warning, reason, action, note)
            .await;
    }

    /// Publishes a Normal Event about `regarding`.
    pub async fn normal(
        &self,
        regarding: &ObjectReference,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.publish(regarding, EventType::Normal, reason, action, note)
            .await;
    }

    async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, regarding).await {
            warn!(%error, reason, "could not publish an Event");
        }
    }
}
