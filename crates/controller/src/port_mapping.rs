//! The PortMapping reconciler: one owner per (server, proto, public port), first come keeps it.
//!
//! Ownership is decided per server: a pass covers every mapping whose container is placed on
//! the same server (found through the indexes, never by a cluster-wide scan), one pass at a
//! time, on what this controller last wrote (see [`crate::overlay`]), so two mappings can never
//! both be told they own a port.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::info;
use uwsgi_it_api::condition::HasConditions;
use uwsgi_it_api::condition::{self, ACCEPTED};
use uwsgi_it_api::{Container, PortMapping, Protocol};
use uwsgi_it_domain::capacity::check_owner;
use uwsgi_it_domain::ports::{MappingCandidate, MappingTarget, Proto, decide_mappings};

use crate::Error;
use crate::admission::AdmissionRecord;
use crate::context::{Context, mapping_key, server_key};
use crate::facts::key_of;
use crate::overlay::Overlay;
use crate::status::{ADMISSION_MANAGER, Desired, apply_status};
use kube::runtime::reflector::ObjectRef;

/// The controller's fields of a PortMapping's status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MappingRecord {
    server: Option<String>,
    address: Option<String>,
    target: Option<String>,
    accepted: Option<(bool, String, String)>,
    observed_generation: Option<i64>,
}

impl MappingRecord {
    fn cached(mapping: &PortMapping) -> Self {
        let Some(status) = mapping.status.as_ref() else {
            return MappingRecord::default();
        };
        MappingRecord {
            server: status.server.clone(),
            address: status.address.clone(),
            target: status.target.clone(),
            accepted: condition::find(&status.conditions, ACCEPTED)
                .map(|c| (c.status == "True", c.reason.clone(), c.message.clone())),
            observed_generation: condition::find(&status.conditions, ACCEPTED)
                .and_then(|c| c.observed_generation),
        }
    }

    fn is_accepted(&self) -> bool {
        self.accepted.as_ref().is_some_and(|(s, _, _)| *s)
    }
}

/// Serialisation of ownership passes and the last acceptance writes.
#[derive(Default)]
pub struct PortState {
    lock: tokio::sync::Mutex<()>,
    overlay: Overlay<MappingRecord>,
    passes: std::sync::atomic::AtomicU64,
}

impl PortState {
    /// Every 256 passes, forgets what was written for mappings that are gone (O(mappings),
    /// so not on every pass).
    fn forget_deleted(&self, ctx: &Context) {
        let pass = self
            .passes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if pass.is_multiple_of(256) {
            self.overlay.retain_live(
                &ctx.mappings
                    .state()
                    .iter()
                    .filter_map(|m| m.metadata.uid.clone())
                    .collect::<HashSet<_>>(),
            );
        }
    }
}

fn proto(protocol: Protocol) -> Proto {
    match protocol {
        Protocol::Tcp => Proto::Tcp,
        Protocol::Udp => Proto::Udp,
    }
}

/// The mappings one decision covers, with their containers: every mapping whose container is
/// placed on the same server as this mapping's (the only ones that can compete for its public
/// ports), found through the indexes; a mapping whose container holds no reservation competes
/// with nobody and is decided alone.
#[allow(clippy::type_complexity)]
fn competitors(
    ctx: &Context,
    mapping: &PortMapping,
) -> (
    Vec<Arc<PortMapping>>,
    HashMap<(String, String), Arc<Container>>,
) {
    let namespace = mapping.namespace().unwrap_or_default();
    let own = ctx
        .containers
        .get(&ObjectRef::new(&mapping.spec.container).within(&namespace));
    let server = own.as_ref().and_then(|c| AdmissionRecord::cached(c).server);
    let mut containers: HashMap<(String, String), Arc<Container>> = HashMap::new();
    let mut mappings: HashMap<ObjectRef<PortMapping>, Arc<PortMapping>> = HashMap::new();
    match server {
        Some(server) => {
            for reference in ctx.container_index.get(&server_key(&server)) {
                let Some(container) = ctx.containers.get(&reference) else {
                    continue;
                };
                if AdmissionRecord::cached(&container).server.as_deref() != Some(server.as_str()) {
                    continue;
                }
                let namespace = container.namespace().unwrap_or_default();
                for m in ctx
                    .mapping_index
                    .get(&mapping_key(&namespace, &container.name_any()))
                {
                    if let Some(m) = ctx.mappings.get(&m) {
                        mappings.insert(ObjectRef::from_obj(m.as_ref()), m);
                    }
                }
                containers.insert((namespace, container.name_any()), container);
            }
        }
        None => {
            if let Some(container) = own {
                containers.insert((namespace.clone(), container.name_any()), container);
            }
        }
    }
    for m in ctx
        .mapping_index
        .get(&mapping_key(&namespace, &mapping.spec.container))
    {
        if let Some(m) = ctx.mappings.get(&m) {
            mappings.insert(ObjectRef::from_obj(m.as_ref()), m);
        }
    }
    let mut mappings: Vec<Arc<PortMapping>> = mappings.into_values().collect();
    mappings.sort_by_key(|m| key_of(m.as_ref()));
    (mappings, containers)
}

/// Reconciles a PortMapping: one pass decides every mapping of its server.
pub async fn reconcile(mapping: Arc<PortMapping>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started("portmapping");
    ctx.wait_synced().await;
    let _serialised = ctx.ports.lock.lock().await;
    ctx.ports.forget_deleted(&ctx);
    let (mappings, containers) = competitors(&ctx, &mapping);
    let customers = ctx.customers.state();

    let mut records = HashMap::new();
    let mut candidates = Vec::new();
    for mapping in &mappings {
        let uid = mapping.metadata.uid.clone().unwrap_or_default();
        let record = ctx
            .ports
            .overlay
            .effective(&uid, MappingRecord::cached(mapping));
        let namespace = mapping.namespace().unwrap_or_default();
        let container = containers.get(&(namespace.clone(), mapping.spec.container.clone()));
        let target = match container {
            None => MappingTarget::NotFound,
            Some(c) if c.metadata.deletion_timestamp.is_some() => MappingTarget::NotFound,
            Some(c) => {
                let admission = AdmissionRecord::cached(c);
                match (admission.is_admitted(), admission.server) {
                    (true, Some(server)) => {
                        let owner = customers
                            .iter()
                            .find(|cu| cu.namespace_name() == namespace)
                            .map(|cu| {
                                check_owner(&cu.name_any(), &cu.spec.servers, &server).is_ok()
                            })
                            .unwrap_or(false);
                        if owner {
                            MappingTarget::Admitted { server }
                        } else {
                            MappingTarget::ServerNotOwned { server }
                        }
                    }
                    _ => MappingTarget::NotAdmitted,
                }
            }
        };
        candidates.push(MappingCandidate {
            key: key_of(mapping.as_ref()),
            container: mapping.spec.container.clone(),
            target,
            proto: proto(mapping.spec.proto),
            public_port: u16::try_from(mapping.spec.public_port).unwrap_or(0),
            accepted: record.is_accepted(),
        });
        records.insert(uid, record);
    }
    let decisions = decide_mappings(&ctx.config.port_policy, &candidates);

    let by_key: HashMap<_, _> = mappings.iter().map(|m| (key_of(m.as_ref()), m)).collect();
    let mut releases = Vec::new();
    let mut grants = Vec::new();
    for decision in decisions {
        let Some(mapping) = by_key.get(&decision.key) else {
            continue;
        };
        let uid = mapping.metadata.uid.clone().unwrap_or_default();
        let current = &records[&uid];
        let namespace = mapping.namespace().unwrap_or_default();
        let container = containers.get(&(namespace, mapping.spec.container.clone()));
        let container_status = container.and_then(|c| c.status.clone()).unwrap_or_default();
        let admission = container
            .map(|c| AdmissionRecord::cached(c))
            .unwrap_or_default();
        let accepted = decision.is_accepted();
        let (reason, message) = match &decision.result {
            Ok(()) => (
                "Accepted".to_string(),
                format!(
                    "{}:{}/{} forwards to container {} port {}",
                    admission.address.clone().unwrap_or_default(),
                    mapping.spec.public_port,
                    proto(mapping.spec.proto),
                    mapping.spec.container,
                    mapping.spec.private_port
                ),
            ),
            Err(refusal) => (refusal.reason().to_string(), refusal.to_string()),
        };
        let desired = MappingRecord {
            server: decision.server.clone(),
            address: if accepted {
                admission.address.clone()
            } else {
                None
            },
            target: match (accepted, &container_status.ip) {
                (true, Some(ip)) => Some(format!("{ip}:{}", mapping.spec.private_port)),
                _ => None,
            },
            accepted: Some((accepted, reason, message)),
            observed_generation: mapping.metadata.generation,
        };
        if desired == *current {
            continue;
        }
        let write = (Arc::clone(mapping), desired);
        if current.is_accepted() && !accepted {
            releases.push(write);
        } else {
            grants.push(write);
        }
    }
    // A port is taken from its old owner before anyone else is told they own it.
    for (mapping, desired) in releases.into_iter().chain(grants) {
        let uid = mapping.metadata.uid.clone().unwrap_or_default();
        write(&ctx, &mapping, &records[&uid], desired).await?;
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

async fn write(
    ctx: &Context,
    mapping: &PortMapping,
    current: &MappingRecord,
    desired: MappingRecord,
) -> Result<(), Error> {
    let (status, reason, message) = desired.accepted.clone().unwrap_or_default();
    let condition = Desired {
        type_: ACCEPTED,
        status,
        reason: reason.clone(),
        message: message.clone(),
    };
    let existing = mapping.conditions();
    let mut body = json!({
        "conditions": [condition.to_condition(existing, desired.observed_generation)],
    });
    for (field, value) in [
        ("server", &desired.server),
        ("address", &desired.address),
        ("target", &desired.target),
    ] {
        if let Some(value) = value {
            body[field] = json!(value);
        }
    }
    let api: Api<PortMapping> =
        Api::namespaced(ctx.client.clone(), &mapping.namespace().unwrap_or_default());
    apply_status(&api, mapping, ADMISSION_MANAGER, body).await?;
    ctx.ports.overlay.record(
        &mapping.metadata.uid.clone().unwrap_or_default(),
        desired.clone(),
    );
    if current.accepted.as_ref().map(|(s, r, _)| (*s, r.clone())) != Some((status, reason.clone()))
    {
        info!(mapping = %mapping.name_any(), accepted = status, %reason, %message, "port mapping decision");
        ctx.publish(
            &mapping.object_ref(&()),
            Event {
                type_: if status {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason,
                note: Some(message),
                action: "Accept".into(),
                secondary: None,
            },
        )
        .await;
    }
    Ok(())
}
