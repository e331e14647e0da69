//! Admission passes: the reservations of one server decided together, one pass at a time.
//!
//! A pass reads every container placed on the server (what this controller last wrote for
//! each, ahead of the watch cache), runs the pure [`admit`] decision, hands uids to newly
//! admitted containers (persisting the high-water mark first), and writes only the statuses
//! that changed — releases before grants, so a failed write can never leave the server oversold.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};

use k8s_openapi::jiff::Timestamp;

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::api::Api;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info};
use uwsgi_it_api::condition::HasConditions;
use uwsgi_it_api::condition::{self, ADMITTED};
use uwsgi_it_api::{Container, Customer, Reservation};
use uwsgi_it_domain::capacity::{
    Admission, Candidate, Change, NodeFacts, Outcome, PlacementError, Resources, admit,
    check_owner, resolve_server,
};
use uwsgi_it_domain::identity::ObjectKey;

use crate::Error;
use crate::context::Context;
use crate::facts::{key_of, node_facts, requested};
use crate::status::{ADMISSION_MANAGER, Desired, apply_status};

/// The admission fields of a container's status, as written by this controller.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AdmissionRecord {
    /// `status.uid`.
    pub uid: Option<i64>,
    /// `status.server`: set while the container holds a reservation.
    pub server: Option<String>,
    /// `status.address`.
    pub address: Option<String>,
    /// `status.home`.
    pub home: Option<String>,
    /// `status.reserved`.
    pub reserved: Option<Reservation>,
    /// The `Admitted` condition (status, reason, message).
    pub admitted: Option<(bool, String, String)>,
    /// `status.observedGeneration`.
    pub observed_generation: Option<i64>,
}

impl AdmissionRecord {
    /// The record the cached status shows.
    pub fn cached(container: &Container) -> Self {
        let Some(status) = container.status.as_ref() else {
            return AdmissionRecord::default();
        };
        AdmissionRecord {
            uid: status.uid,
            server: status.server.clone(),
            address: status.address.clone(),
            home: status.home.clone(),
            reserved: status.reserved.clone(),
            admitted: condition::find(&status.conditions, ADMITTED)
                .map(|c| (c.status == "True", c.reason.clone(), c.message.clone())),
            observed_generation: status.observed_generation,
        }
    }

    /// Whether the container holds an admitted reservation (the agent acts only on those).
    pub fn is_admitted(&self) -> bool {
        self.uid.is_some() && self.reserved.is_some() && self.server.is_some()
    }

    fn reserved_resources(&self) -> Option<Resources> {
        self.reserved
            .as_ref()
            .map(|r| Resources::new(r.memory.max(0) as u64, r.storage.max(0) as u64))
    }
}

/// How many admission status writes of one pass are in flight at once. Releases all complete
/// before any grant is sent, so the order that keeps a server from being oversold holds.
const WRITES_IN_FLIGHT: usize = 16;

/// One server's passes: serialised by `last`, and coalesced. A request takes a ticket; a pass
/// covers every ticket taken before it started reading the caches, so a request whose ticket a
/// finished pass covers has nothing left to decide (that pass read everything the request saw).
#[derive(Default)]
struct ServerPasses {
    requested: AtomicU64,
    last: tokio::sync::Mutex<LastPass>,
}

#[derive(Default)]
struct LastPass {
    /// The highest ticket the last successful pass covers.
    covered: u64,
    /// When the last pass wants to run again (a container too young to decide).
    again_at: Option<Instant>,
}

/// Per-server serialisation and the controller's view of its own admission writes.
#[derive(Default)]
pub struct AdmissionState {
    locks: Mutex<HashMap<String, Arc<ServerPasses>>>,
    overlay: crate::overlay::Overlay<AdmissionRecord>,
    /// Containers whose finalizer this controller removed: their reservation is free even
    /// while the watch cache still shows them.
    released: Mutex<HashSet<String>>,
}

impl AdmissionState {
    fn lock_for(&self, server: &str) -> Arc<ServerPasses> {
        self.locks
            .lock()
            .expect("admission locks")
            .entry(server.to_string())
            .or_default()
            .clone()
    }

    /// The admission record of a container as this controller last decided it.
    pub fn effective(&self, container: &Container) -> AdmissionRecord {
        self.overlay
            .effective(&uid_of(container), AdmissionRecord::cached(container))
    }

    fn is_released(&self, container: &Container) -> bool {
        self.released
            .lock()
            .expect("released set")
            .contains(&uid_of(container))
    }

    /// Marks a container's reservation as free (its finalizer is being removed).
    pub fn release(&self, container: &Container) {
        self.released
            .lock()
            .expect("released set")
            .insert(uid_of(container));
    }

    fn forget_dead(&self, live: &HashSet<String>) {
        self.overlay.retain_live(live);
        self.released
            .lock()
            .expect("released set")
            .retain(|uid| live.contains(uid));
    }
}

fn uid_of(container: &Container) -> String {
    container.metadata.uid.clone().unwrap_or_default()
}

/// Where a container is (or would be) placed: the server it holds a reservation on, else the
/// server its `spec.server` names.
pub fn placement(
    record: &AdmissionRecord,
    container: &Container,
    nodes: &[NodeFacts],
) -> Result<String, PlacementError> {
    match &record.server {
        Some(server) => Ok(server.clone()),
        None => resolve_server(&container.spec.server, nodes).map(|s| s.name),
    }
}

/// The Customer whose namespace holds the container, and whether it owns `server`.
fn ownership(customers: &[Arc<Customer>], namespace: &str, server: &str) -> Option<PlacementError> {
    let mut owners: Vec<&Arc<Customer>> = customers
        .iter()
        .filter(|c| c.namespace_name() == namespace && c.metadata.deletion_timestamp.is_none())
        .collect();
    owners.sort_by_key(|c| key_of(c.as_ref()));
    match owners.first() {
        Some(customer) => check_owner(&customer.name_any(), &customer.spec.servers, server).err(),
        None => Some(PlacementError::NotOwner {
            customer: format!("(no Customer has namespace {namespace})"),
            server: server.to_string(),
        }),
    }
}

/// How long after its creation second a new container waits before it may be admitted.
///
/// `creationTimestamp` has one-second resolution and containers created in the same second can
/// reach the watch cache in any order. Admitting one as soon as it is seen would let a later
/// name win over an earlier one that is still on its way, and an admitted container is never
/// evicted. Waiting until its creation second is over (plus the time the watch needs to
/// deliver) makes every container of that second part of the same pass, so the order of
/// creationTimestamp, then namespace/name decides, not the order of arrival. Clock skew between
/// the API server and the controller only weakens that ordering, never the capacity invariant.
pub const ADMISSION_SETTLE: Duration = Duration::from_secs(2);

/// Makes sure an admission pass for `server` runs after this call: runs one, or waits for one
/// that started after this call and covers it (a burst of reconciles of one server's containers
/// shares a few passes instead of running one each). Returns when the pass should run again
/// because a new container was too young to be decided.
pub async fn admit_server(ctx: &Context, server: &str) -> Result<Option<Duration>, Error> {
    let passes = ctx.admission.lock_for(server);
    let ticket = passes.requested.fetch_add(1, Ordering::SeqCst) + 1;
    let mut last = passes.last.lock().await;
    if last.covered >= ticket {
        return Ok(last
            .again_at
            .map(|at| at.saturating_duration_since(Instant::now())));
    }
    // Every ticket taken so far is covered: the caches are read after this point.
    let covering = passes.requested.load(Ordering::SeqCst);
    let (again, events) = admission_pass(ctx, server).await?;
    last.covered = covering;
    last.again_at = again.map(|wait| Instant::now() + wait);
    drop(last);
    // Events are published outside the server's critical section.
    stream::iter(events)
        .for_each_concurrent(WRITES_IN_FLIGHT, |(reference, event)| async move {
            ctx.publish(&reference, event).await;
        })
        .await;
    Ok(again)
}

/// Events an admission pass wants published.
type Events = Vec<(ObjectReference, Event)>;

/// How long until a container created in second `created` may be decided (`None`: now).
/// Millisecond-exact, so a burst is decided right when its creation second has settled.
fn settle_wait(created: i64, now_ms: i64) -> Option<Duration> {
    let settled_at_ms = created
        .saturating_add(ADMISSION_SETTLE.as_secs() as i64)
        .saturating_mul(1000);
    // A few milliseconds late rather than early: an early wake-up finds it still young.
    (settled_at_ms > now_ms)
        .then(|| Duration::from_millis(u64::try_from(settled_at_ms - now_ms).unwrap_or(0) + 5))
}

/// One admission pass for `server` (the caller holds the server's lock).
async fn admission_pass(ctx: &Context, server: &str) -> Result<(Option<Duration>, Events), Error> {
    let timer = ctx.metrics.admission_pass_started();

    let nodes: Vec<Arc<Node>> = ctx.nodes.state();
    let node_facts: Vec<NodeFacts> = nodes.iter().map(|n| node_facts(n)).collect();
    let customers = ctx.customers.state();
    let containers = ctx.containers.state();
    ctx.admission
        .forget_dead(&containers.iter().map(|c| uid_of(c)).collect());

    let now_ms = Timestamp::now().as_millisecond();
    let mut again: Option<Duration> = None;
    let mut records: HashMap<String, AdmissionRecord> = HashMap::new();
    let mut on_server: Vec<(&Arc<Container>, ObjectKey)> = Vec::new();
    let mut candidates = Vec::new();
    for container in &containers {
        let record = ctx.admission.effective(container);
        if !ctx.admission.is_released(container)
            && placement(&record, container, &node_facts).as_deref() == Ok(server)
        {
            let held = record.reserved_resources();
            let deleting = container.metadata.deletion_timestamp.is_some();
            // A container being deleted keeps what it holds until its finalizer is gone, and
            // asks for nothing new.
            let key = key_of(container.as_ref());
            let wait = settle_wait(key.created, now_ms).filter(|_| held.is_none() && !deleting);
            let young = wait.is_some();
            if let Some(wait) = wait {
                again = Some(again.map_or(wait, |w| w.min(wait)));
            }
            if !young && (held.is_some() || !deleting) {
                let namespace = container.namespace().unwrap_or_default();
                candidates.push(Candidate {
                    key: key.clone(),
                    requested: if deleting {
                        held.unwrap_or(Resources::ZERO)
                    } else {
                        requested(container)
                    },
                    reserved: held,
                    blocked: ownership(&customers, &namespace, server),
                });
                on_server.push((container, key));
            }
        }
        records.insert(uid_of(container), record);
    }

    let resolved = resolve_server(server, &node_facts);
    let address = nodes
        .iter()
        .find(|n| n.name_any() == server)
        .and_then(|n| crate::facts::node_address(n));
    let admission = match resolved {
        Ok(server) => admit(&server, &candidates),
        Err(problem) => {
            // The node stopped being a usable server (label or annotations removed). Nothing
            // is evicted: holders keep their reservations; the rest are told why.
            let events = refuse_all_new(ctx, &on_server, &records, &problem).await?;
            return Ok((again, events));
        }
    };
    ctx.metrics.record_usage(&admission.usage);

    let by_key: HashMap<&ObjectKey, &Arc<Container>> =
        on_server.iter().map(|(c, k)| (k, *c)).collect();
    let needing: Vec<ObjectKey> = admission
        .decisions
        .iter()
        .filter(|d| d.is_admitted())
        .filter(|d| {
            by_key
                .get(&d.key)
                .is_some_and(|c| records[&uid_of(c)].uid.is_none())
        })
        .map(|d| d.key.clone())
        .collect();
    let mut new_uids: HashMap<ObjectKey, u32> = HashMap::new();
    if !needing.is_empty() {
        let in_use: Vec<u32> = records
            .values()
            .filter_map(|r| r.uid)
            .filter_map(|uid| u32::try_from(uid).ok())
            .collect();
        let allocation = ctx.uids.allocate(&in_use, &needing).await?;
        new_uids.extend(allocation.assignments);
    }

    let mut releases = Vec::new();
    let mut grants = Vec::new();
    for decision in &admission.decisions {
        let Some(container) = by_key.get(&decision.key) else {
            continue;
        };
        let current = &records[&uid_of(container)];
        let uid = current
            .uid
            .or_else(|| new_uids.get(&decision.key).map(|u| i64::from(*u)));
        let reserved = decision.reserved.map(|r| Reservation {
            memory: r.memory_mb as i64,
            storage: r.storage_mb as i64,
        });
        let holds = reserved.is_some() && uid.is_some();
        let (status, reason, message) = match &decision.outcome {
            Outcome::Admitted(_) => (
                true,
                "Admitted".to_string(),
                format!(
                    "server {server}: reserved {} MB memory and {} MB storage",
                    decision.reserved.map_or(0, |r| r.memory_mb),
                    decision.reserved.map_or(0, |r| r.storage_mb)
                ),
            ),
            Outcome::Refused(refusal) => (false, refusal.reason().to_string(), refusal.to_string()),
        };
        let desired = AdmissionRecord {
            uid,
            server: holds.then(|| server.to_string()),
            address: if holds { address.clone() } else { None },
            home: match (holds, uid) {
                (true, Some(uid)) => home_of(ctx, uid),
                _ => None,
            },
            reserved,
            admitted: Some((status, reason, message)),
            observed_generation: container.metadata.generation,
        };
        if desired == *current {
            continue;
        }
        let shrinks = match (current.reserved_resources(), decision.reserved) {
            (Some(old), Some(new)) => !old.fits_within(&new),
            (Some(_), None) => true,
            _ => false,
        };
        let change = match &decision.outcome {
            Outcome::Admitted(change) => Some(*change),
            Outcome::Refused(_) => None,
        };
        let write = (Arc::clone(container), desired, change);
        if shrinks {
            releases.push(write);
        } else {
            grants.push(write);
        }
    }
    // Releases first: if one fails, nothing is granted on top of a reservation still held.
    // Within each group the writes are independent and go out together.
    let mut events = Vec::new();
    for group in [releases, grants] {
        let written: Vec<Option<(ObjectReference, Event)>> = stream::iter(group)
            .map(|(container, desired, change)| {
                let current = &records[&uid_of(&container)];
                async move { write_admission(ctx, &container, current, desired, change).await }
            })
            .buffer_unordered(WRITES_IN_FLIGHT)
            .try_collect()
            .await?;
        events.extend(written.into_iter().flatten());
    }
    debug!(
        server,
        containers = admission.decisions.len(),
        "admission pass"
    );
    drop(timer);
    report_overcommit(ctx, server, &admission, &nodes).await;
    Ok((again, events))
}

fn home_of(ctx: &Context, uid: i64) -> Option<String> {
    let uid = u32::try_from(uid).ok()?;
    uwsgi_it_domain::paths::home_dir(&ctx.config.home_root, uid)
        .ok()
        .map(|p| p.display().to_string())
}

async fn refuse_all_new(
    ctx: &Context,
    on_server: &[(&Arc<Container>, ObjectKey)],
    records: &HashMap<String, AdmissionRecord>,
    problem: &PlacementError,
) -> Result<Events, Error> {
    let mut events = Vec::new();
    for (container, _) in on_server {
        let current = &records[&uid_of(container)];
        if current.reserved.is_some() {
            continue;
        }
        events.extend(refuse(ctx, container, current, problem).await?);
    }
    Ok(events)
}

/// Writes `Admitted=False` for a container that cannot be placed at all (unknown server, not
/// a server, no capacity, not owned) and holds nothing.
pub async fn refuse_unplaced(
    ctx: &Context,
    container: &Container,
    problem: &PlacementError,
) -> Result<(), Error> {
    let passes = ctx.admission.lock_for("");
    let serialised = passes.last.lock().await;
    let current = ctx.admission.effective(container);
    let event = refuse(ctx, container, &current, problem).await?;
    drop(serialised);
    if let Some((reference, event)) = event {
        ctx.publish(&reference, event).await;
    }
    Ok(())
}

async fn refuse(
    ctx: &Context,
    container: &Container,
    current: &AdmissionRecord,
    problem: &PlacementError,
) -> Result<Option<(ObjectReference, Event)>, Error> {
    let desired = AdmissionRecord {
        uid: current.uid,
        server: None,
        address: None,
        home: None,
        reserved: None,
        admitted: Some((false, problem.reason().to_string(), problem.to_string())),
        observed_generation: container.metadata.generation,
    };
    if desired == *current {
        return Ok(None);
    }
    write_admission(ctx, container, current, desired, None).await
}

async fn write_admission(
    ctx: &Context,
    container: &Container,
    current: &AdmissionRecord,
    desired: AdmissionRecord,
    change: Option<Change>,
) -> Result<Option<(ObjectReference, Event)>, Error> {
    let (status, reason, message) = desired.admitted.clone().unwrap_or_default();
    let condition = Desired {
        type_: ADMITTED,
        status,
        reason: reason.clone(),
        message: message.clone(),
    };
    let existing = container.conditions();
    let mut body = json!({
        "conditions": [condition.to_condition(existing, container.metadata.generation)],
        "observedGeneration": desired.observed_generation,
    });
    for (field, value) in [
        ("uid", json!(desired.uid)),
        ("server", json!(desired.server)),
        ("address", json!(desired.address)),
        ("home", json!(desired.home)),
        ("reserved", json!(desired.reserved)),
    ] {
        if !value.is_null() {
            body[field] = value;
        }
    }
    let api: Api<Container> = Api::namespaced(
        ctx.client.clone(),
        &container.namespace().unwrap_or_default(),
    );
    apply_status(&api, container, ADMISSION_MANAGER, body).await?;
    ctx.admission
        .overlay
        .record(&uid_of(container), desired.clone());
    ctx.metrics.status_written();

    let was = current
        .admitted
        .as_ref()
        .map(|(s, r, m)| (*s, r.clone(), m.clone()));
    if was.as_ref() != Some(&(status, reason.clone(), message.clone())) {
        let (type_, action) = match (status, change) {
            (true, Some(Change::Resized { .. })) => (EventType::Normal, "Resize"),
            (true, _) => (EventType::Normal, "Admit"),
            (false, _) => (EventType::Warning, "Refuse"),
        };
        let reason = match (status, change) {
            (true, Some(Change::Resized { .. })) => "Resized".to_string(),
            _ => reason,
        };
        info!(
            container = %container.name_any(),
            namespace = %container.namespace().unwrap_or_default(),
            admitted = status,
            %reason,
            %message,
            "admission decision"
        );
        return Ok(Some((
            container.object_ref(&()),
            Event {
                type_,
                reason,
                note: Some(message),
                action: action.into(),
                secondary: None,
            },
        )));
    }
    Ok(None)
}

async fn report_overcommit(
    ctx: &Context,
    server: &str,
    admission: &Admission,
    nodes: &[Arc<Node>],
) {
    let Some(message) = admission.usage.overcommit_message() else {
        return;
    };
    let Some(node) = nodes.iter().find(|n| n.name_any() == server) else {
        return;
    };
    if ctx.note_overcommit(server, &message) {
        ctx.publish(
            &node.object_ref(&()),
            Event {
                type_: EventType::Warning,
                reason: "Overcommitted".into(),
                note: Some(message),
                action: "Admit".into(),
                secondary: None,
            },
        )
        .await;
    }
}
