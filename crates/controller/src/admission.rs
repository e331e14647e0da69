//! The Server reconciler: admission as commits to the Server's reservation ledger.
//!
//! A pass reads the Server from the API (not from a cache), takes that server's containers from
//! the index, decides with the pure [`admit`], allocates uids for new reservations, and replaces
//! `Server.status` with the result under a `resourceVersion` precondition. On a conflict the
//! pass starts again from the new revision. Only after the commit are the Containers' statuses
//! written, as a projection of the ledger. So whatever races it — a second controller that
//! believes it leads, a stale cache, a lost response, a crash — every ledger revision was
//! computed from the revision it replaced, and Σ reserved never exceeds the capacity.
//!
//! Pipeline: [`resolve`] (Server, Node, containers, owners) → [`decide`] (pure) → uids →
//! [`commit`] → [`project`] → [`report`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};
use uwsgi_it_api::condition::{self, ADMITTED, HasConditions, READY};
use uwsgi_it_api::well_known::{CONTROLLER_FINALIZER, CUSTOMER_LABEL};
use uwsgi_it_api::{Capacity, Container, Customer, LedgerEntry, Reservation, Server, ServerStatus};
use uwsgi_it_domain::capacity::{
    Admission, Candidate, Change, Outcome, PlacementError, Resources, ServerFacts, Usage, admit,
    check_owner,
};
use uwsgi_it_domain::identity::ObjectKey;

use crate::Error;
use crate::context::Context;
use crate::facts::{key_of, requested, server_facts};
use crate::status::{ADMISSION_MANAGER, Desired, apply_status};
use crate::uids::UidStoreError;

/// The admission fields of a container's status: the projection of its ledger entry.
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
    /// The generation the `Admitted` condition was decided for.
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
            observed_generation: condition::find(&status.conditions, ADMITTED)
                .and_then(|c| c.observed_generation),
        }
    }

    /// Whether the container holds an admitted reservation (the agent acts only on those).
    pub fn is_admitted(&self) -> bool {
        self.uid.is_some() && self.reserved.is_some() && self.server.is_some()
    }
}

/// How many Container status writes of one pass are in flight at once.
const WRITES_IN_FLIGHT: usize = 16;

/// How often a Server is passed again without any event (repairs what a lost event missed).
const RESYNC: Duration = Duration::from_secs(300);

/// Containers whose reservation this controller released, by server: a watch cache that still
/// shows one of them alive must not get it admitted again. Only an optimisation — a ghost
/// admitted anyway is an orphan entry that the next pass drops after asking the API — so memory
/// is fine here. A server's pass forgets those its cache no longer shows.
#[derive(Default)]
pub struct Released(Mutex<HashMap<String, HashSet<String>>>);

impl Released {
    fn insert(&self, server: &str, object_uid: &str) {
        self.0
            .lock()
            .expect("released set")
            .entry(server.to_string())
            .or_default()
            .insert(object_uid.to_string());
    }

    fn contains(&self, server: &str, object_uid: &str) -> bool {
        self.0
            .lock()
            .expect("released set")
            .get(server)
            .is_some_and(|uids| uids.contains(object_uid))
    }

    /// Keeps, for `server`, only the containers its cache still shows.
    fn retain_cached(&self, server: &str, cached: &BTreeMap<String, Arc<Container>>) {
        let mut released = self.0.lock().expect("released set");
        if let Some(uids) = released.get_mut(server) {
            uids.retain(|uid| cached.contains_key(uid));
            if uids.is_empty() {
                released.remove(server);
            }
        }
    }
}

fn object_uid(container: &Container) -> String {
    container.metadata.uid.clone().unwrap_or_default()
}

fn has_finalizer(container: &Container) -> bool {
    container
        .finalizers()
        .iter()
        .any(|f| f == CONTROLLER_FINALIZER)
}

/// The Customer a namespace belongs to: the earliest live one claiming it.
fn owner_of<'a>(customers: &'a [Arc<Customer>], namespace: &str) -> Option<&'a Arc<Customer>> {
    customers
        .iter()
        .filter(|c| c.namespace_name() == namespace && c.metadata.deletion_timestamp.is_none())
        .min_by_key(|c| key_of(c.as_ref()))
}

/// Whether the Customer whose namespace holds the container owns `server`. Several Customers
/// claiming one namespace: the earliest keeps it (the Customer reconciler refuses the others).
pub fn ownership(
    customers: &[Arc<Customer>],
    namespace: &str,
    server: &str,
) -> Option<PlacementError> {
    match owner_of(customers, namespace) {
        Some(customer) => check_owner(&customer.name_any(), &customer.spec.servers, server).err(),
        None => Some(PlacementError::NotOwner {
            customer: format!("(no Customer has namespace {namespace})"),
            server: server.to_string(),
        }),
    }
}

/// Everything one pass decides from: the Server as read from the API and what the caches say
/// about its containers.
struct Resolved {
    server: Server,
    facts: ServerFacts,
    node: Option<Arc<Node>>,
    /// The containers placed on the server or named by its ledger, by object uid.
    containers: BTreeMap<String, Arc<Container>>,
    /// Why a container may get nothing new (ownership, missing Node, another customer's read
    /// access), by object uid.
    blocked: HashMap<String, PlacementError>,
    /// Some container waits for another customer's read access to this Server to be withdrawn
    /// (the pass runs again soon: that withdrawal is not an event it watches).
    waiting_for_readers: bool,
}

/// Reconciles one Server: one admission pass, committed, projected and reported.
pub async fn reconcile(server: Arc<Server>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started("server");
    ctx.wait_synced().await;
    let Some(pass) = commit(&ctx, &server.name_any()).await? else {
        return Ok(Action::await_change());
    };
    project(&ctx, &pass).await?;
    report(&ctx, &pass).await;
    // Containers that could get no uid are decided again soon: restoring the uid record is not
    // an event this reconciler sees.
    if pass.waiting_for_uids {
        return Ok(Action::requeue(UID_RETRY));
    }
    if pass.waiting_for_readers {
        return Ok(Action::requeue(READER_RETRY));
    }
    Ok(Action::requeue(RESYNC))
}

/// How soon a pass that could hand out no uid runs again.
const UID_RETRY: Duration = Duration::from_secs(5);

/// How soon a pass that waits for another customer's read access to be withdrawn runs again.
const READER_RETRY: Duration = Duration::from_millis(500);

/// A committed pass: the ledger revision written (or found current) and what each container's
/// status should say about it.
pub struct Committed {
    server: Server,
    admission: Admission,
    projections: Vec<(Arc<Container>, AdmissionRecord, Option<Change>)>,
    waiting_for_uids: bool,
    waiting_for_readers: bool,
}

/// Runs read → decide → compare-and-swap until a revision is committed (or found current).
async fn commit(ctx: &Context, name: &str) -> Result<Option<Committed>, Error> {
    let api: Api<Server> = Api::all(ctx.client.clone());
    let timer = ctx.metrics.admission_pass_started();
    // uids allocated by this pass but not committed yet (a conflict retries with them, so a
    // burst of conflicts does not burn the uid space).
    let mut allocated: HashMap<String, i64> = HashMap::new();
    loop {
        // A quorum read: never decide on a stale revision of the ledger.
        let Some(server) = api.get_opt(name).await? else {
            return Ok(None);
        };
        let mut resolved = resolve(ctx, server).await?;
        // A container granted a reservation it does not hold is read from the API first, after
        // the Server: a cache that lags (a frozen or slow replica) may show it alive and without
        // a uid when another controller admitted it, and it was deleted and released since; a
        // grant from that view would give it a second identity. Reads of this revision only: a
        // conflict reads again.
        let mut fresh: HashMap<String, Option<Arc<Container>>> = HashMap::new();
        let mut plan = loop {
            let plan = decide(ctx, &resolved, &allocated);
            let unverified: Vec<Arc<Container>> = new_grants(&resolved, &plan)
                .filter(|uid| !fresh.contains_key(*uid))
                .filter_map(|uid| resolved.containers.get(uid).cloned())
                .collect();
            if unverified.is_empty() {
                break plan;
            }
            for (uid, current) in read_fresh(ctx, &unverified).await? {
                // `spec.server` is immutable, but the name is checked again all the same: a
                // grant goes only to a container that names this Server as the API has it.
                let current = current.filter(|container| {
                    ctx.directory
                        .named_by(container)
                        .is_ok_and(|server| server == name)
                });
                match &current {
                    Some(container) => resolved.containers.insert(uid.clone(), container.clone()),
                    None => resolved.containers.remove(&uid),
                };
                fresh.insert(uid, current);
            }
        };
        if !plan.needing.is_empty() {
            allocate(ctx, &resolved, &mut plan, &mut allocated).await?;
        }
        let status = build_status(&resolved, &plan);
        let server = resolved.server.clone();
        if server.status.as_ref() == Some(&status) {
            drop(timer);
            return Ok(Some(plan.into_committed(server, &ctx.config.home_root)));
        }
        let mut next = server.clone();
        next.status = Some(status);
        match api
            .replace_status(name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                ctx.metrics.status_written();
                debug!(server = name, revision = ?written.resource_version(), "ledger committed");
                drop(timer);
                return Ok(Some(plan.into_committed(written, &ctx.config.home_root)));
            }
            // Someone else committed first (or our own earlier write landed and its reply was
            // lost): decide again on the new revision.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                debug!(server = name, "ledger conflict; deciding again");
                ctx.metrics.ledger_conflict();
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The containers (by object uid) the plan reserves for that the ledger has no entry for.
fn new_grants<'a>(resolved: &'a Resolved, plan: &'a Plan) -> impl Iterator<Item = &'a String> {
    let held: HashSet<&str> = resolved
        .server
        .ledger()
        .iter()
        .map(|e| e.object_uid.as_str())
        .collect();
    let by_key: HashMap<&ObjectKey, &String> = plan.keys.iter().map(|(u, k)| (k, u)).collect();
    plan.admission
        .decisions
        .iter()
        .filter(|d| d.reserved.is_some())
        .filter_map(move |d| by_key.get(&d.key).copied())
        .filter(move |uid| !held.contains(uid.as_str()))
}

/// The containers as the API has them now (`None`: gone, or another object of that name).
async fn read_fresh(
    ctx: &Context,
    containers: &[Arc<Container>],
) -> Result<Vec<(String, Option<Arc<Container>>)>, Error> {
    let reads: Vec<_> = containers
        .iter()
        .map(|cached| {
            let cached = Arc::clone(cached);
            let client = ctx.client.clone();
            async move {
                let uid = object_uid(&cached);
                let api: Api<Container> =
                    Api::namespaced(client, &cached.namespace().unwrap_or_default());
                let current = api
                    .get_opt(&cached.name_any())
                    .await?
                    .filter(|c| c.metadata.uid == cached.metadata.uid)
                    .map(|mut c| {
                        c.metadata.managed_fields = None;
                        Arc::new(c)
                    });
                Ok::<_, Error>((uid, current))
            }
        })
        .collect();
    stream::iter(reads)
        .buffer_unordered(WRITES_IN_FLIGHT)
        .try_collect()
        .await
}

/// Reads what the decision needs besides the Server: its Node, its containers (from the index;
/// ledger entries the cache does not know are looked up in the API) and their owners.
async fn resolve(ctx: &Context, server: Server) -> Result<Resolved, Error> {
    let name = server.name_any();
    let node = ctx.nodes.get(&ObjectRef::new(&name));
    let facts = server_facts(&server, node.as_deref());

    let mut containers: BTreeMap<String, Arc<Container>> = BTreeMap::new();
    let mut keys = vec![crate::context::server_key(&name)];
    if let Some(address) = &facts.address {
        keys.push(crate::context::server_key(address));
    }
    for key in keys {
        for reference in ctx.container_index.get(&key) {
            let Some(container) = ctx.containers.get(&reference) else {
                continue;
            };
            // Indexed under this name or address; ours only if it names this Server (an
            // address may belong to several).
            let ours = ctx
                .directory
                .named_by(&container)
                .is_ok_and(|server| server == name);
            if ours {
                containers.insert(object_uid(&container), container);
            }
        }
    }
    ctx.released.retain_cached(&name, &containers);
    // A ledger entry whose container the cache does not show (yet, or any more) is looked up:
    // it stays until the API says its container is gone.
    for entry in server.ledger() {
        if containers.contains_key(&entry.object_uid) {
            continue;
        }
        let api: Api<Container> = Api::namespaced(ctx.client.clone(), &entry.namespace);
        if let Some(container) = api.get_opt(&entry.name).await?
            && container.metadata.uid.as_deref() == Some(entry.object_uid.as_str())
        {
            containers.insert(entry.object_uid.clone(), Arc::new(container));
        }
    }

    let customers = ctx.customers.state();
    // The customers whose reader ClusterRole lets them read this Server (the Server was only
    // theirs): the ledger would show them another customer's containers, so nothing of anyone
    // else's is placed here until their access is withdrawn (the Customer reconciler does that
    // once the Server is shared). Ordered this way, a customer never reads another's entry.
    let readers: Vec<String> = ctx
        .reader_index
        .get(&crate::context::server_key(&name))
        .iter()
        .filter_map(|role| ctx.readers.get(role))
        .filter_map(|role| role.labels().get(CUSTOMER_LABEL).cloned())
        .collect();
    let mut blocked = HashMap::new();
    let mut waiting_for_readers = false;
    for (uid, container) in &containers {
        let namespace = container.namespace().unwrap_or_default();
        let problem = ownership(&customers, &namespace, &name)
            .or_else(|| {
                node.is_none().then(|| PlacementError::NoNode {
                    server: name.clone(),
                })
            })
            .or_else(|| {
                // The common case, no reader of this Server: no second walk of the Customers.
                if readers.is_empty() {
                    return None;
                }
                let owner = owner_of(&customers, &namespace)?.name_any();
                let reader = readers.iter().find(|reader| **reader != owner)?;
                waiting_for_readers = true;
                Some(PlacementError::ReaderNotWithdrawn {
                    server: name.clone(),
                    reader: reader.clone(),
                })
            });
        if let Some(problem) = problem {
            blocked.insert(uid.clone(), problem);
        }
    }
    Ok(Resolved {
        server,
        facts,
        node,
        containers,
        blocked,
        waiting_for_readers,
    })
}

/// One pass's decision before its uids are known.
struct Plan {
    admission: Admission,
    /// The candidates, by object uid, with their ordering key.
    keys: HashMap<String, ObjectKey>,
    /// uid of each container that holds or gets a reservation, when known.
    uids: HashMap<String, i64>,
    /// Admitted containers that have no uid yet.
    needing: Vec<String>,
    /// Why containers admitted by the decision still get nothing (no uid could be had).
    unassigned: HashMap<String, String>,
    containers: BTreeMap<String, Arc<Container>>,
    /// Carried from [`Resolved`]: the pass runs again soon.
    waiting_for_readers: bool,
}

/// The pure part: candidates from the ledger and the containers, decided by [`admit`].
fn decide(ctx: &Context, resolved: &Resolved, allocated: &HashMap<String, i64>) -> Plan {
    let ledger: HashMap<&str, &LedgerEntry> = resolved
        .server
        .ledger()
        .iter()
        .map(|e| (e.object_uid.as_str(), e))
        .collect();
    let mut candidates = Vec::new();
    let mut keys = HashMap::new();
    let mut uids = HashMap::new();
    let mut containers = BTreeMap::new();
    for (uid, container) in &resolved.containers {
        let entry = ledger.get(uid.as_str());
        let held = entry.map(|e| Resources::new(e.memory.max(0) as u64, e.storage.max(0) as u64));
        let deleting = container.metadata.deletion_timestamp.is_some();
        // Nothing new for a container being deleted, one this controller released (a stale
        // cache may still show it), or one not yet holding the finalizer (its release could
        // otherwise be skipped).
        let released = ctx.released.contains(&resolved.facts.name, uid);
        if held.is_none() && (deleting || !has_finalizer(container) || released) {
            continue;
        }
        let key = key_of(container.as_ref());
        candidates.push(Candidate {
            key: key.clone(),
            requested: if deleting {
                held.unwrap_or(Resources::ZERO)
            } else {
                requested(container)
            },
            reserved: held,
            blocked: resolved.blocked.get(uid).cloned(),
        });
        keys.insert(uid.clone(), key);
        // The identity a container has is its own for ever: the ledger's, else its status'
        // (a ledger that lost its entry), else one allocated by this pass.
        let known = entry
            .map(|e| e.uid)
            .or_else(|| own_status_uid(ctx, uid, container))
            .or_else(|| allocated.get(uid).copied());
        if let Some(known) = known {
            uids.insert(uid.clone(), known);
        }
        containers.insert(uid.clone(), Arc::clone(container));
    }
    let admission = admit(&resolved.facts.server(), &candidates);
    let by_key: HashMap<&ObjectKey, &String> = keys.iter().map(|(u, k)| (k, u)).collect();
    let needing = admission
        .decisions
        .iter()
        .filter(|d| d.reserved.is_some())
        .filter_map(|d| by_key.get(&d.key).copied())
        .filter(|uid| !uids.contains_key(*uid))
        .cloned()
        .collect();
    Plan {
        admission,
        keys,
        uids,
        needing,
        unassigned: HashMap::new(),
        containers,
        waiting_for_readers: resolved.waiting_for_readers,
    }
}

/// A container's `status.uid` when no ledger has an entry for it (a Server deleted and declared
/// again): it is kept, as the schema wants, unless another container's ledger entry holds it.
fn own_status_uid(ctx: &Context, object: &str, container: &Container) -> Option<i64> {
    let uid = container.status.as_ref()?.uid?;
    let taken = ctx.servers.state().iter().any(|s| {
        s.ledger()
            .iter()
            .any(|e| e.uid == uid && e.object_uid != object)
    });
    (!taken).then_some(uid)
}

/// The highest uid recorded anywhere the controller can see: every Server's `highestUid` and
/// ledger, and this pass's containers. Allocation starts above it whatever the record says.
fn uid_floor(ctx: &Context, resolved: &Resolved) -> u32 {
    // Every commit keeps `highestUid` at or above its ledger's uids, so the other Servers are
    // read by that one field (O(servers)); this pass's own ledger is read whole.
    let servers = ctx.servers.state();
    let recorded = servers
        .iter()
        .filter_map(|s| s.status.as_ref().and_then(|st| st.highest_uid))
        .chain(
            resolved
                .server
                .status
                .as_ref()
                .and_then(|st| st.highest_uid),
        )
        .chain(resolved.server.ledger().iter().map(|e| e.uid));
    let seen = resolved
        .containers
        .values()
        .filter_map(|c| c.status.as_ref().and_then(|s| s.uid));
    recorded
        .chain(seen)
        .filter_map(|uid| u32::try_from(uid).ok())
        .max()
        .unwrap_or(0)
}

/// Allocates uids for the plan's new reservations; when none can be had (the uid record is
/// missing), those containers get nothing and are told why.
async fn allocate(
    ctx: &Context,
    resolved: &Resolved,
    plan: &mut Plan,
    allocated: &mut HashMap<String, i64>,
) -> Result<(), Error> {
    let needing: Vec<ObjectKey> = plan.needing.iter().map(|u| plan.keys[u].clone()).collect();
    match ctx.uids.allocate(uid_floor(ctx, resolved), &needing).await {
        Ok(allocation) => {
            let by_key: HashMap<&ObjectKey, &String> =
                plan.keys.iter().map(|(u, k)| (k, u)).collect();
            for (key, uid) in allocation.assignments {
                if let Some(object) = by_key.get(&key) {
                    allocated.insert((*object).clone(), i64::from(uid));
                    plan.uids.insert((*object).clone(), i64::from(uid));
                }
            }
            Ok(())
        }
        Err(e @ (UidStoreError::RecordMissing { .. } | UidStoreError::Corrupt { .. })) => {
            warn!(error = %e, "no uid can be handed out");
            ctx.metrics.admission_failed();
            for uid in &plan.needing {
                plan.unassigned.insert(uid.clone(), e.to_string());
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn mb(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn capacity(capacity: u64, reserved: u64) -> Capacity {
    Capacity {
        capacity: mb(capacity),
        reserved: mb(reserved),
        free: mb(capacity.saturating_sub(reserved)),
    }
}

/// The ledger a plan commits: one entry per container holding a reservation and a uid, in
/// namespace/name order so that an unchanged decision writes an identical status.
fn ledger_of(plan: &Plan) -> Vec<LedgerEntry> {
    let by_key: HashMap<&ObjectKey, &String> = plan.keys.iter().map(|(u, k)| (k, u)).collect();
    let mut ledger: Vec<LedgerEntry> = plan
        .admission
        .decisions
        .iter()
        .filter_map(|d| {
            let reserved = d.reserved?;
            let object = *by_key.get(&d.key)?;
            let uid = *plan.uids.get(object)?;
            if plan.unassigned.contains_key(object) {
                return None;
            }
            Some(LedgerEntry {
                object_uid: object.clone(),
                namespace: d.key.namespace.clone(),
                name: d.key.name.clone(),
                uid,
                memory: mb(reserved.memory_mb),
                storage: mb(reserved.storage_mb),
            })
        })
        .collect();
    ledger.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    ledger
}

/// The Server status of a ledger: capacity, reservations and what is free, the highest uid,
/// the address and `Ready`.
pub fn summarise(
    server: &Server,
    facts: &ServerFacts,
    node_exists: bool,
    ledger: Vec<LedgerEntry>,
) -> ServerStatus {
    let current = server.status.clone().unwrap_or_default();
    let (memory, storage) = ledger.iter().fold((0u64, 0u64), |(m, s), e| {
        (
            m.saturating_add(e.memory.max(0) as u64),
            s.saturating_add(e.storage.max(0) as u64),
        )
    });
    let highest = ledger
        .iter()
        .map(|e| e.uid)
        .chain(current.highest_uid)
        .max();
    let usage = Usage {
        server: facts.name.clone(),
        capacity: facts.capacity,
        used: Resources::new(memory, storage),
        free: Resources::new(
            facts.capacity.memory_mb.saturating_sub(memory),
            facts.capacity.storage_mb.saturating_sub(storage),
        ),
        containers: ledger.len(),
    };
    let ready = match (node_exists, usage.overcommit_message()) {
        (false, _) => Desired::no(
            READY,
            "NodeMissing",
            format!(
                "no Node named {} exists: nothing runs here and nothing new is admitted",
                facts.name
            ),
        ),
        (true, Some(message)) => Desired::no(READY, "Overcommitted", message),
        (true, None) => Desired::yes(READY, "Admitting", "the ledger is current"),
    };
    ServerStatus {
        containers: Some(ledger.len() as i64),
        ledger,
        highest_uid: highest,
        memory: Some(capacity(facts.capacity.memory_mb, memory)),
        storage: Some(capacity(facts.capacity.storage_mb, storage)),
        address: facts.address.clone(),
        observed_generation: server.metadata.generation,
        conditions: crate::readiness::conditions(
            &current.conditions,
            &crate::readiness::own(&ready, uwsgi_it_api::readiness::server_stalled),
            server.metadata.generation,
        ),
    }
}

fn build_status(resolved: &Resolved, plan: &Plan) -> ServerStatus {
    summarise(
        &resolved.server,
        &resolved.facts,
        resolved.node.is_some(),
        ledger_of(plan),
    )
}

impl Plan {
    /// What each container's status says once `server` (the committed revision) is current.
    fn into_committed(self, server: Server, home_root: &std::path::Path) -> Committed {
        let name = server.name_any();
        let address = server.status.as_ref().and_then(|s| s.address.clone());
        let ledger: HashMap<&str, &LedgerEntry> = server
            .ledger()
            .iter()
            .map(|e| (e.object_uid.as_str(), e))
            .collect();
        let by_key: HashMap<&ObjectKey, &String> = self.keys.iter().map(|(u, k)| (k, u)).collect();
        let mut projections = Vec::new();
        for decision in &self.admission.decisions {
            let Some(object) = by_key.get(&decision.key).copied() else {
                continue;
            };
            let container = &self.containers[object];
            if container.metadata.deletion_timestamp.is_some() {
                // Its status no longer matters to anyone but the finalizer.
                continue;
            }
            let current = AdmissionRecord::cached(container);
            let entry = ledger.get(object.as_str());
            let (status, reason, message) = match (&decision.outcome, self.unassigned.get(object)) {
                (_, Some(why)) => (false, "UidUnavailable".to_string(), why.clone()),
                (Outcome::Admitted(_), None) if entry.is_some() => (
                    true,
                    "Admitted".to_string(),
                    format!(
                        "server {name}: reserved {} MB memory and {} MB storage",
                        entry.map_or(0, |e| e.memory),
                        entry.map_or(0, |e| e.storage)
                    ),
                ),
                (Outcome::Admitted(_), None) => continue,
                (Outcome::Refused(refusal), None) => {
                    (false, refusal.reason().to_string(), refusal.to_string())
                }
            };
            let uid = entry.map(|e| e.uid).or(current.uid);
            let desired = AdmissionRecord {
                uid,
                // While it held a reservation the server stays (the schema refuses a change).
                server: match entry {
                    Some(_) => Some(name.clone()),
                    None => current
                        .server
                        .clone()
                        .filter(|_| current.reserved.is_some()),
                },
                address: entry.and(address.clone()),
                home: entry
                    .and_then(|e| u32::try_from(e.uid).ok())
                    .and_then(|uid| uwsgi_it_domain::paths::home_dir(home_root, uid).ok())
                    .map(|p| p.display().to_string()),
                reserved: entry.map(|e| Reservation {
                    memory: e.memory,
                    storage: e.storage,
                }),
                admitted: Some((status, reason, message)),
                observed_generation: container.metadata.generation,
            };
            let change = match &decision.outcome {
                Outcome::Admitted(change) => Some(*change),
                Outcome::Refused(_) => None,
            };
            if desired != current {
                projections.push((Arc::clone(container), desired, change));
            }
        }
        Committed {
            server,
            admission: self.admission,
            projections,
            waiting_for_uids: !self.unassigned.is_empty(),
            waiting_for_readers: self.waiting_for_readers,
        }
    }
}

/// Writes the containers' statuses the committed ledger implies; Events for changed reasons.
async fn project(ctx: &Context, pass: &Committed) -> Result<(), Error> {
    let results: Vec<Result<Option<(ObjectReference, Event)>, Error>> =
        stream::iter(pass.projections.iter().cloned())
            .map(|(container, desired, change)| async move {
                write_admission(ctx, &container, &desired, change).await
            })
            .buffer_unordered(WRITES_IN_FLIGHT)
            .collect()
            .await;
    let mut first_error = None;
    let mut events = Vec::new();
    for result in results {
        match result {
            Ok(event) => events.extend(event),
            // One container that cannot be written never holds back the others.
            Err(e) => {
                warn!(error = %e, "writing a container's admission status failed");
                first_error.get_or_insert(e);
            }
        }
    }
    stream::iter(events)
        .for_each_concurrent(WRITES_IN_FLIGHT, |(reference, event)| async move {
            ctx.publish(&reference, event).await;
        })
        .await;
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Writes `Admitted=False` for a container that cannot be placed at all (no Server of that
/// name or address, or an ambiguous address) and holds nothing.
pub async fn refuse_unplaced(
    ctx: &Context,
    container: &Container,
    problem: &PlacementError,
) -> Result<(), Error> {
    let current = AdmissionRecord::cached(container);
    let desired = AdmissionRecord {
        uid: current.uid,
        server: current
            .server
            .clone()
            .filter(|_| current.reserved.is_some()),
        address: None,
        home: None,
        reserved: None,
        admitted: Some((false, problem.reason().to_string(), problem.to_string())),
        observed_generation: container.metadata.generation,
    };
    if desired == current {
        return Ok(());
    }
    if let Some((reference, event)) = write_admission(ctx, container, &desired, None).await? {
        ctx.publish(&reference, event).await;
    }
    Ok(())
}

async fn write_admission(
    ctx: &Context,
    container: &Container,
    desired: &AdmissionRecord,
    change: Option<Change>,
) -> Result<Option<(ObjectReference, Event)>, Error> {
    let current = AdmissionRecord::cached(container);
    let (status, reason, message) = desired.admitted.clone().unwrap_or_default();
    let condition = Desired {
        type_: ADMITTED,
        status,
        reason: reason.clone(),
        message: message.clone(),
    };
    let mut body = json!({
        "conditions": [condition.to_condition(container.conditions(), desired.observed_generation)],
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
    ctx.metrics.status_written();

    let was = current.admitted.as_ref().map(|(s, r, _)| (*s, r.clone()));
    if was == Some((status, reason.clone())) {
        return Ok(None);
    }
    let (type_, action, reason) = match (status, change) {
        (true, Some(Change::Resized { .. })) => (EventType::Normal, "Resize", "Resized".into()),
        (true, _) => (EventType::Normal, "Admit", reason),
        (false, _) => (EventType::Warning, "Refuse", reason),
    };
    info!(
        container = %container.name_any(),
        namespace = %container.namespace().unwrap_or_default(),
        admitted = status,
        %reason,
        %message,
        "admission decision"
    );
    Ok(Some((
        container.object_ref(&()),
        Event {
            type_,
            reason,
            note: Some(message),
            action: action.into(),
            secondary: None,
        },
    )))
}

/// Usage metrics, and a Warning Event on the Server when its `Ready` reason changes.
async fn report(ctx: &Context, pass: &Committed) {
    ctx.metrics.record_usage(&pass.admission.usage);
    let Some(ready) = condition::find(pass.server.conditions(), READY) else {
        return;
    };
    let name = pass.server.name_any();
    if !ctx.note_server_reason(&name, &ready.reason) || ready.status == "True" {
        return;
    }
    ctx.publish(
        &pass.server.object_ref(&()),
        Event {
            type_: EventType::Warning,
            reason: ready.reason.clone(),
            note: Some(ready.message.clone()),
            action: "Admit".into(),
            secondary: None,
        },
    )
    .await;
}

/// Removes a container's entry from its Server's ledger (compare-and-swap, retried on
/// conflict). Done before the finalizer goes: a reservation is never freed in memory only.
pub async fn release(ctx: &Context, server: &str, container: &Container) -> Result<(), Error> {
    let api: Api<Server> = Api::all(ctx.client.clone());
    let uid = object_uid(container);
    loop {
        let Some(current) = api.get_opt(server).await? else {
            break;
        };
        if !current.ledger().iter().any(|e| e.object_uid == uid) {
            break;
        }
        let node = ctx.nodes.get(&ObjectRef::new(server));
        let facts = server_facts(&current, node.as_deref());
        let ledger = current
            .ledger()
            .iter()
            .filter(|e| e.object_uid != uid)
            .cloned()
            .collect();
        let mut next = current.clone();
        next.status = Some(summarise(&current, &facts, node.is_some(), ledger));
        match api
            .replace_status(server, &PostParams::default(), &next)
            .await
        {
            Ok(_) => {
                ctx.metrics.status_written();
                info!(container = %container.name_any(), server, "released the reservation");
                break;
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                ctx.metrics.ledger_conflict();
            }
            Err(e) => return Err(e.into()),
        }
    }
    ctx.released.insert(server, &uid);
    Ok(())
}
