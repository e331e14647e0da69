//! `Ready` and `Stalled` of Containers, PortMappings and CustomDistros.
//!
//! Their conditions come from several writers (the admission pass, the workload reconciler, the
//! port pass, the agent on the object's server); the summary of them all has one writer: this
//! reconciler, under a field manager of its own, run on every change of the object. It reads
//! the object as cached, decides with the pure [`uwsgi_it_api::readiness`] rules, and writes only
//! when the summary changed: a write of any other condition brings the object back here, so the
//! summary follows within one watch event. It alone writes `status.observedGeneration` of these
//! kinds, in the same apply as the summary.
//!
//! Servers and Customers write their own `Ready` (and `Stalled`) where they decide it.

use std::sync::Arc;

use kube::api::Api;
use kube::core::NamespaceResourceScope;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use uwsgi_it_api::condition::{self, Condition, READY};
use uwsgi_it_api::readiness::{STALLED, Summarised, Summary, Verdict};

use crate::Error;
use crate::context::Context;
use crate::status::{Desired, apply_status};

/// Field manager of `Ready` and `Stalled` on Containers, PortMappings and CustomDistros.
pub const READINESS_MANAGER: &str = "uwsgi-it-controller-readiness";

/// Reconciles the summary of one object.
pub async fn reconcile<K>(object: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error>
where
    K: Summarised
        + Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let _timer = ctx.metrics.reconcile_started("readiness");
    let summary = object.summary();
    let generation = object.meta().generation;
    if shows(object.conditions(), &summary, generation)
        && object.observed_generation() == generation
    {
        return Ok(Action::await_change());
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    // The top-level observedGeneration goes with the summary, never before it: kstatus trusts
    // `Ready` as soon as it matches the generation.
    let body = json!({
        "observedGeneration": generation,
        "conditions": conditions(object.conditions(), &summary, generation),
    });
    match apply_status(&api, object.as_ref(), READINESS_MANAGER, body).await {
        Ok(_) => {}
        // Deleted in between: nothing left to summarise.
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Action::await_change()),
        Err(e) => return Err(e.into()),
    }
    ctx.metrics.status_written();
    Ok(Action::await_change())
}

/// Whether `current` already says what `summary` says, for this generation.
pub fn shows(current: &[Condition], summary: &Summary, generation: Option<i64>) -> bool {
    desired(READY, &summary.ready).matches(current, generation)
        && match &summary.stalled {
            Some(stalled) => desired(STALLED, stalled).matches(current, generation),
            None => condition::find(current, STALLED).is_none(),
        }
}

/// The conditions this manager owns: `Ready`, and `Stalled` only while stalled (an apply that
/// leaves it out removes it).
pub fn conditions(
    current: &[Condition],
    summary: &Summary,
    generation: Option<i64>,
) -> Vec<Condition> {
    let mut conditions = vec![desired(READY, &summary.ready).to_condition(current, generation)];
    if let Some(stalled) = &summary.stalled {
        conditions.push(desired(STALLED, stalled).to_condition(current, generation));
    }
    conditions
}

/// The summary of a kind that decides its own `Ready` (Servers, Customers): that `Ready`, and
/// `Stalled` when its reason is one only a person can fix.
pub fn own(ready: &Desired, stalled: fn(&Verdict) -> Option<Verdict>) -> Summary {
    let ready = Verdict {
        status: ready.status,
        reason: ready.reason.clone(),
        message: ready.message.clone(),
    };
    // kstatus and Argo CD show only the message of `Stalled`: it names the reason.
    let stalled = stalled(&ready).map(|s| Verdict {
        message: format!("{}: {}", s.reason, s.message),
        ..s
    });
    Summary { stalled, ready }
}

fn desired(type_: &'static str, verdict: &Verdict) -> Desired {
    Desired {
        type_,
        status: verdict.status,
        reason: verdict.reason.clone(),
        message: verdict.message.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use uwsgi_it_api::{Container, CustomDistro, PortMapping};
    use uwsgi_it_domain::capacity::{PlacementError, Refusal, Resource as Kind, Shortfall};
    use uwsgi_it_domain::distro::{DistroPathError, DistroRefusal, DistroUseRefusal};
    use uwsgi_it_domain::identity::ObjectKey;
    use uwsgi_it_domain::ports::{MappingRefusal, PortRange, Proto};

    /// An object of `kind` whose only condition is `type_=False` with `reason`.
    fn refused<K: serde::de::DeserializeOwned>(kind: &str, type_: &str, reason: &str) -> K {
        serde_json::from_value(json!({
            "apiVersion": "uwsgi.it/v1alpha1", "kind": kind,
            "metadata": {"name": "x", "namespace": "acme", "generation": 1},
            "spec": match kind {
                "Container" => json!({"server": "s1", "memory": 1, "storage": 1, "distro": "bookworm"}),
                "PortMapping" => json!({"container": "c", "proto": "tcp", "publicPort": 9000, "privatePort": 8000}),
                _ => json!({"storageContainer": "store", "path": "deb"}),
            },
            "status": {"conditions": [{
                "type": type_, "status": "False", "reason": reason, "message": "m",
                "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z",
            }]},
        }))
        .unwrap()
    }

    fn stalls<K: Summarised>(object: &K) -> bool {
        object.summary().stalled.is_some()
    }

    // Whether a refusal needs a person, decided once per variant: an exhaustive match, so a
    // new variant of a domain refusal does not compile until it is classified here.
    fn admission_needs_a_person(refusal: &Refusal) -> bool {
        match refusal {
            Refusal::InsufficientMemory { .. } | Refusal::InsufficientStorage { .. } => true,
            Refusal::Placement(p) => match p {
                PlacementError::UnknownServer { .. }
                | PlacementError::AmbiguousAddress { .. }
                | PlacementError::NotOwner { .. } => true,
                // The Node may be joining; the other customer's read access is being withdrawn.
                PlacementError::NoNode { .. } | PlacementError::ReaderNotWithdrawn { .. } => false,
            },
        }
    }

    fn mapping_needs_a_person(refusal: &MappingRefusal) -> bool {
        match refusal {
            // The customer may be creating the container, the controller admitting it.
            MappingRefusal::ContainerNotFound { .. }
            | MappingRefusal::ContainerNotAdmitted { .. } => false,
            MappingRefusal::ServerNotOwned { .. }
            | MappingRefusal::OutOfRange { .. }
            | MappingRefusal::ReservedPort { .. }
            | MappingRefusal::PortInUse { .. } => true,
        }
    }

    fn distro_needs_a_person(refusal: &DistroRefusal) -> bool {
        match refusal {
            DistroRefusal::InvalidPath(_) | DistroRefusal::NotAStorageContainer { .. } => true,
            DistroRefusal::StorageContainerNotFound { .. }
            | DistroRefusal::StorageContainerNotAdmitted { .. } => false,
        }
    }

    fn distro_use_needs_a_person(refusal: &DistroUseRefusal) -> bool {
        match refusal {
            DistroUseRefusal::StorageContainer { .. }
            | DistroUseRefusal::OtherCustomer { .. }
            | DistroUseRefusal::OtherServer { .. } => true,
            // Waiting for the distro to be made, accepted, or the container placed.
            DistroUseRefusal::DistroNotFound { .. }
            | DistroUseRefusal::DistroNotAccepted { .. }
            | DistroUseRefusal::ServerUnknown { .. } => false,
        }
    }

    #[test]
    fn every_domain_refusal_stalls_exactly_when_only_a_person_can_fix_it() {
        let short = |resource| Shortfall {
            resource,
            free_mb: 0,
            requested_mb: 1,
            overcommitted: None,
        };
        let s = || "s".to_string();
        let admissions = [
            Refusal::InsufficientMemory {
                server: s(),
                memory: short(Kind::Memory),
                storage: None,
                kept: None,
            },
            Refusal::InsufficientStorage {
                server: s(),
                storage: short(Kind::Storage),
                kept: None,
            },
            Refusal::Placement(PlacementError::UnknownServer { server: s() }),
            Refusal::Placement(PlacementError::NoNode { server: s() }),
            Refusal::Placement(PlacementError::AmbiguousAddress {
                address: s(),
                servers: vec![],
            }),
            Refusal::Placement(PlacementError::NotOwner {
                customer: s(),
                server: s(),
            }),
            Refusal::Placement(PlacementError::ReaderNotWithdrawn {
                server: s(),
                reader: s(),
            }),
        ];
        for refusal in &admissions {
            let container: Container = refused("Container", "Admitted", refusal.reason());
            assert_eq!(
                stalls(&container),
                admission_needs_a_person(refusal),
                "Admitted=False ({})",
                refusal.reason()
            );
        }
        let range = PortRange::single(9000).unwrap();
        let mappings = [
            MappingRefusal::ContainerNotFound { container: s() },
            MappingRefusal::ContainerNotAdmitted { container: s() },
            MappingRefusal::ServerNotOwned {
                namespace: s(),
                server: s(),
            },
            MappingRefusal::OutOfRange {
                port: 80,
                allowed: range,
            },
            MappingRefusal::ReservedPort {
                port: 9000,
                entry: range,
            },
            MappingRefusal::PortInUse {
                server: s(),
                proto: Proto::Tcp,
                port: 9000,
                holder: ObjectKey::new(0, "acme", "web"),
                same_customer: false,
            },
        ];
        for refusal in &mappings {
            let mapping: PortMapping = refused("PortMapping", "Accepted", refusal.reason());
            assert_eq!(
                stalls(&mapping),
                mapping_needs_a_person(refusal),
                "Accepted=False ({})",
                refusal.reason()
            );
        }
        let distros = [
            DistroRefusal::InvalidPath(DistroPathError::Empty),
            DistroRefusal::StorageContainerNotFound { container: s() },
            DistroRefusal::NotAStorageContainer { container: s() },
            DistroRefusal::StorageContainerNotAdmitted { container: s() },
        ];
        for refusal in &distros {
            let distro: CustomDistro = refused("CustomDistro", "Accepted", refusal.reason());
            assert_eq!(
                stalls(&distro),
                distro_needs_a_person(refusal),
                "Accepted=False ({})",
                refusal.reason()
            );
        }
        let uses = [
            DistroUseRefusal::StorageContainer { container: s() },
            DistroUseRefusal::DistroNotFound { distro: s() },
            DistroUseRefusal::OtherCustomer { distro: s() },
            DistroUseRefusal::DistroNotAccepted {
                distro: s(),
                why: DistroRefusal::StorageContainerNotFound { container: s() },
            },
            DistroUseRefusal::ServerUnknown { container: s() },
            DistroUseRefusal::OtherServer {
                distro: s(),
                distro_server: s(),
                container: s(),
                container_server: s(),
            },
        ];
        for refusal in &uses {
            // The Running condition of a container (Admitted and the home fine, as they are
            // before a workload is built).
            let mut container: Container = refused("Container", "Running", refusal.reason());
            let status = container.status.as_mut().unwrap();
            for fine in ["Admitted", "HomeReady"] {
                let mut c = status.conditions[0].clone();
                c.type_ = fine.into();
                c.status = "True".into();
                status.conditions.push(c);
            }
            assert_eq!(
                stalls(&container),
                distro_use_needs_a_person(refusal),
                "Running=False ({})",
                refusal.reason()
            );
        }
    }

    fn summary(ready: bool, stalled: bool) -> Summary {
        let verdict = |status| Verdict {
            status,
            reason: "R".into(),
            message: "m".into(),
        };
        Summary {
            ready: verdict(ready),
            stalled: stalled.then(|| verdict(true)),
        }
    }

    #[test]
    fn written_conditions_are_shown_and_a_new_generation_is_not() {
        let s = summary(false, true);
        let written = conditions(&[], &s, Some(3));
        assert_eq!(written.len(), 2);
        assert!(shows(&written, &s, Some(3)));
        assert!(
            !shows(&written, &s, Some(4)),
            "a new generation is written again"
        );
    }

    #[test]
    fn a_stall_that_ended_is_removed() {
        let stalled = conditions(&[], &summary(false, true), Some(1));
        let fine = summary(true, false);
        assert!(!shows(&stalled, &fine, Some(1)));
        let written = conditions(&stalled, &fine, Some(1));
        assert!(written.iter().all(|c| c.type_ != STALLED), "{written:?}");
    }

    #[test]
    fn the_transition_time_stays_while_the_status_does() {
        let mut first = conditions(&[], &summary(false, false), Some(1));
        first[0].last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut other_reason = summary(false, false);
        other_reason.ready.reason = "Other".into();
        let second = conditions(&first, &other_reason, Some(1));
        assert_eq!(
            second[0].last_transition_time,
            first[0].last_transition_time
        );
    }
}
