//! Admission: **the system never oversells a server**.
//!
//! Every server (a `Server` resource, named after its Node) has a memory and a storage capacity
//! in MB, set by the supplier in its spec. Each admitted container holds a *reservation*; the
//! sum of the reservations on a server never exceeds its capacity, with one exception the
//! supplier causes: lowering the capacity below what is already reserved evicts nothing. The
//! server is then *overcommitted* — reported, and closed to new admissions and growth until
//! enough is freed.
//!
//! [`admit`] decides every container of one server at once, from scratch, so the controller can
//! re-run it on any event and get the same answer: the result depends only on the set of
//! candidates, never on their order or on the order events arrived in.
//!
//! Where a container goes is decided before admission: [`resolve_server`] turns the `server`
//! field (a Server's name or a public address) into the [`ServerFacts`] of one Server, and
//! [`check_owner`] checks the customer owns it. Their errors ([`PlacementError`]) are refusals
//! too; a container that holds a reservation but fails them later (the customer lost the
//! server) is still passed to [`admit`] with [`Candidate::blocked`] set, so its reservation keeps
//! being counted.

use std::fmt;

use crate::identity::ObjectKey;

/// An amount of memory and storage, in MB (1 MB = 1 MiB, as in uwsgi.it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Resources {
    /// Memory in MB.
    pub memory_mb: u64,
    /// Storage in MB.
    pub storage_mb: u64,
}

impl Resources {
    /// Nothing: what a container that was never admitted holds.
    pub const ZERO: Self = Self::new(0, 0);

    /// `memory_mb` MB of memory and `storage_mb` MB of storage.
    pub const fn new(memory_mb: u64, storage_mb: u64) -> Self {
        Self {
            memory_mb,
            storage_mb,
        }
    }

    /// Whether `self` is no larger than `other` in both dimensions.
    pub fn fits_within(&self, other: &Self) -> bool {
        self.memory_mb <= other.memory_mb && self.storage_mb <= other.storage_mb
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} MB memory and {} MB storage",
            self.memory_mb, self.storage_mb
        )
    }
}

/// A server as admission sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// The Node's name (what `status.server` and Customer `spec.servers` hold).
    pub name: String,
    /// Capacity from the Server's spec; the supplier may lower it at any time.
    pub capacity: Resources,
}

/// One container placed on the server being decided.
///
/// Pass **every** container placed on the server, including those being deleted until their
/// finalizer frees the reservation: a reservation missing from the input is not counted, and
/// the server could be oversold.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Candidate {
    /// Ordering key: earlier containers win. Keys are expected to be unique; duplicates are
    /// still decided deterministically (ties broken by the other fields).
    pub key: ObjectKey,
    /// What the container asks for now (`spec.memory`, `spec.storage`).
    pub requested: Resources,
    /// What it was admitted with before (`status.reserved`); `None` = never admitted.
    pub reserved: Option<Resources>,
    /// A placement rule the container fails now (for example the customer no longer owns the
    /// server). It gets nothing new, but keeps what it already holds: admission never evicts.
    pub blocked: Option<PlacementError>,
}

impl Candidate {
    /// A container asking for `requested`, holding `reserved`, not blocked.
    pub fn new(key: ObjectKey, requested: Resources, reserved: Option<Resources>) -> Self {
        Self {
            key,
            requested,
            reserved,
            blocked: None,
        }
    }
}

/// The decision for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Which container.
    pub key: ObjectKey,
    /// What it holds after the decision (the new `status.reserved`): the request when admitted,
    /// the previous reservation (or nothing) when refused.
    pub reserved: Option<Resources>,
    /// Admitted (with what changed) or refused (with why).
    pub outcome: Outcome,
}

impl Decision {
    /// Whether the request is admitted as asked (condition `Admitted=True`).
    pub fn is_admitted(&self) -> bool {
        matches!(self.outcome, Outcome::Admitted(_))
    }
}

/// Admitted or refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The reservation now equals the request.
    Admitted(Change),
    /// The request is not admitted; the container keeps [`Decision::reserved`], if any.
    Refused(Refusal),
}

/// What an admission changed, for Events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// First admission.
    New,
    /// The reservation already equalled the request.
    Unchanged,
    /// An admitted container's reservation was changed to its new request.
    Resized {
        /// The reservation before.
        from: Resources,
    },
}

/// Which resource a [`Shortfall`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Memory.
    Memory,
    /// Storage.
    Storage,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Memory => "memory",
            Resource::Storage => "storage",
        })
    }
}

/// The numbers behind an insufficient-capacity refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    /// Memory or storage.
    pub resource: Resource,
    /// MB free for this container: capacity minus every *other* container's reservation (so a
    /// resize counts the container's own old reservation as free).
    pub free_mb: u64,
    /// MB requested.
    pub requested_mb: u64,
    /// Set when the other containers alone already hold more than the capacity (the supplier
    /// lowered it): then even a request of 0 MB does not fit.
    pub overcommitted: Option<Overcommit>,
}

/// The numbers of an overcommitted resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overcommit {
    /// The server's capacity in MB.
    pub capacity_mb: u64,
    /// MB held by the other containers (saturating at `u64::MAX`).
    pub reserved_mb: u64,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} MB {} free, {} MB requested",
            self.free_mb, self.resource, self.requested_mb
        )?;
        if let Some(o) = self.overcommitted {
            write!(
                f,
                " (overcommitted: {} MB reserved, capacity lowered to {} MB)",
                o.reserved_mb, o.capacity_mb
            )?;
        }
        Ok(())
    }
}

/// Why a container's request is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not enough memory (storage may be short as well; then it is in `storage`).
    #[error(
        "server {server}: {memory}{}{}",
        storage_part(storage),
        kept_part(kept)
    )]
    InsufficientMemory {
        /// The server's node name.
        server: String,
        /// The memory numbers.
        memory: Shortfall,
        /// The storage numbers, when storage is short too.
        storage: Option<Shortfall>,
        /// The reservation the container keeps (a refused resize), if any.
        kept: Option<Resources>,
    },
    /// Enough memory, not enough storage.
    #[error("server {server}: {storage}{}", kept_part(kept))]
    InsufficientStorage {
        /// The server's node name.
        server: String,
        /// The storage numbers.
        storage: Shortfall,
        /// The reservation the container keeps (a refused resize), if any.
        kept: Option<Resources>,
    },
    /// The container cannot be placed on the server at all.
    #[error(transparent)]
    Placement(#[from] PlacementError),
}

fn storage_part(storage: &Option<Shortfall>) -> String {
    storage.map(|s| format!("; {s}")).unwrap_or_default()
}

fn kept_part(kept: &Option<Resources>) -> String {
    kept.map(|k| format!("; keeping the current reservation of {k}"))
        .unwrap_or_default()
}

impl Refusal {
    /// The `reason` of the `Admitted=False` condition (CamelCase, as Kubernetes reasons are).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::InsufficientMemory { .. } => "InsufficientMemory",
            Refusal::InsufficientStorage { .. } => "InsufficientStorage",
            Refusal::Placement(p) => p.reason(),
        }
    }
}

/// Why a container cannot be placed on the server it names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub enum PlacementError {
    /// No Server has this name or public address.
    #[error("server {server}: no Server has this name or public address")]
    UnknownServer {
        /// What `spec.server` says.
        server: String,
    },
    /// The Server exists but no Node of its name does: nothing could run there.
    #[error("server {server}: no Node named {server} exists, so nothing can run there")]
    NoNode {
        /// The Server's name.
        server: String,
    },
    /// Several Servers share the public address `spec.server` names.
    #[error("address {address} belongs to several servers ({}); name the Server instead", servers.join(", "))]
    AmbiguousAddress {
        /// The address.
        address: String,
        /// The Servers having it, sorted.
        servers: Vec<String>,
    },
    /// The customer does not own the server (Customer `spec.servers`).
    #[error("customer {customer} does not own server {server}")]
    NotOwner {
        /// The Customer's name.
        customer: String,
        /// The Server's name.
        server: String,
    },
    /// The server was only another customer's and that customer may still read it (its ledger
    /// would name this container): nothing new is placed there until that read is withdrawn.
    #[error(
        "server {server} is becoming shared: customer {reader} can still read it; waiting until that read access is withdrawn"
    )]
    ReaderNotWithdrawn {
        /// The Server's name.
        server: String,
        /// The Customer that may still read it.
        reader: String,
    },
}

impl PlacementError {
    /// The condition `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            PlacementError::UnknownServer { .. } => "ServerUnknown",
            PlacementError::NoNode { .. } => "NodeMissing",
            PlacementError::AmbiguousAddress { .. } => "AmbiguousServer",
            PlacementError::NotOwner { .. } => "ServerNotOwned",
            PlacementError::ReaderNotWithdrawn { .. } => "WaitingForSharedServer",
        }
    }
}

/// What the controller knows about one Server, for [`resolve_server`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerFacts {
    /// The Server's name (the name of its Node).
    pub name: String,
    /// Its capacity (`spec.memory`, `spec.storage`).
    pub capacity: Resources,
    /// Its effective public address (see [`crate::address::public_address`]).
    pub address: Option<String>,
}

/// Finds the Server a container's `spec.server` names: a Server's name or, as in the uwsgi.it
/// API, a server's public address. A name wins over an address. Once a container is admitted
/// the controller uses `status.server` (a name) instead, so a moved address never moves a
/// container.
pub fn resolve_server<'a>(
    server: &str,
    servers: &'a [ServerFacts],
) -> Result<&'a ServerFacts, PlacementError> {
    if let Some(by_name) = servers.iter().find(|s| s.name == server) {
        return Ok(by_name);
    }
    let mut by_address: Vec<&ServerFacts> = servers
        .iter()
        .filter(|s| !server.is_empty() && s.address.as_deref() == Some(server))
        .collect();
    by_address.sort_by(|a, b| a.name.cmp(&b.name));
    match by_address.as_slice() {
        [one] => Ok(one),
        [] => Err(PlacementError::UnknownServer {
            server: server.to_owned(),
        }),
        many => Err(PlacementError::AmbiguousAddress {
            address: server.to_owned(),
            servers: many.iter().map(|s| s.name.clone()).collect(),
        }),
    }
}

impl ServerFacts {
    /// The server as admission sees it.
    pub fn server(&self) -> Server {
        Server {
            name: self.name.clone(),
            capacity: self.capacity,
        }
    }
}

/// Checks that `customer` owns `server` (a node name listed in the Customer's `spec.servers`).
pub fn check_owner(
    customer: &str,
    owned_servers: &[String],
    server: &str,
) -> Result<(), PlacementError> {
    if owned_servers.iter().any(|s| s == server) {
        Ok(())
    } else {
        Err(PlacementError::NotOwner {
            customer: customer.to_owned(),
            server: server.to_owned(),
        })
    }
}

/// A server's usage after admission, for the Customer status and the server's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The server's node name.
    pub server: String,
    /// Its capacity.
    pub capacity: Resources,
    /// Σ reservations (saturating at `u64::MAX`).
    pub used: Resources,
    /// Capacity minus used, never below zero.
    pub free: Resources,
    /// How many containers hold a reservation.
    pub containers: usize,
}

impl Usage {
    /// Whether reservations exceed the capacity (the supplier lowered it below them). Nothing
    /// was evicted; new admissions and growth are refused until enough is freed.
    pub fn is_overcommitted(&self) -> bool {
        !self.used.fits_within(&self.capacity)
    }

    /// A message for an Event or a condition when the server is overcommitted.
    pub fn overcommit_message(&self) -> Option<String> {
        self.is_overcommitted().then(|| {
            format!(
                "server {}: {} reserved exceeds the capacity of {}; nothing is evicted, \
                 new admissions and growth are refused until reservations fit again",
                self.server, self.used, self.capacity
            )
        })
    }
}

/// The decisions for one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// One decision per candidate, in key order.
    pub decisions: Vec<Decision>,
    /// The server's usage after the decisions.
    pub usage: Usage,
}

/// Decides every container on `server`.
///
/// 1. Reservations are kept: nothing admitted is ever evicted or shrunk unasked, whatever
///    arrives later and whatever the capacity is now.
/// 2. Shrinking (or unchanged) requests of admitted containers are applied at once: giving
///    back is always allowed, even on an overcommitted server.
/// 3. Then, in key order, growing resizes and new containers are admitted if the server stays
///    within capacity in **both** dimensions, counting a resized container's own old
///    reservation as free. A request that does not fit does not block later, smaller ones.
///    A refused resize keeps its old reservation.
/// 4. Step 3 is repeated while it admits something, because an admitted resize that grows one
///    dimension may shrink the other and make room for a container refused earlier in the
///    pass. This makes the result a fixed point: feeding the output reservations back in
///    changes nothing.
///
/// The result depends only on the set of candidates, not on their order.
pub fn admit(server: &Server, candidates: &[Candidate]) -> Admission {
    let mut ordered: Vec<&Candidate> = candidates.iter().collect();
    ordered.sort();

    let capacity = Wide::from(server.capacity);
    let mut held: Vec<Resources> = Vec::with_capacity(ordered.len());
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(ordered.len());
    for c in &ordered {
        let (now, outcome) = match (&c.blocked, c.reserved) {
            (Some(why), old) => (
                old.unwrap_or(Resources::ZERO),
                Some(Outcome::Refused(Refusal::Placement(why.clone()))),
            ),
            (None, Some(old)) if old == c.requested => {
                (old, Some(Outcome::Admitted(Change::Unchanged)))
            }
            (None, Some(old)) if c.requested.fits_within(&old) => (
                c.requested,
                Some(Outcome::Admitted(Change::Resized { from: old })),
            ),
            // Growing or new: decided below, holding the old reservation meanwhile.
            (None, old) => (old.unwrap_or(Resources::ZERO), None),
        };
        held.push(now);
        outcomes.push(outcome);
    }
    let mut used = held.iter().fold(Wide::default(), |acc, r| acc.add(*r));

    loop {
        let mut admitted_any = false;
        for (i, c) in ordered.iter().enumerate() {
            if outcomes[i].is_some() {
                continue;
            }
            let others = used.sub(held[i]);
            if others.add(c.requested).fits_within(&capacity) {
                used = others.add(c.requested);
                held[i] = c.requested;
                outcomes[i] = Some(Outcome::Admitted(match c.reserved {
                    Some(from) => Change::Resized { from },
                    None => Change::New,
                }));
                admitted_any = true;
            }
        }
        if !admitted_any {
            break;
        }
    }

    let decisions = ordered
        .iter()
        .zip(outcomes)
        .zip(&held)
        .map(|((c, outcome), held)| {
            let outcome = outcome.unwrap_or_else(|| {
                Outcome::Refused(shortage(server, c, capacity, used.sub(*held)))
            });
            let reserved = match outcome {
                Outcome::Admitted(_) => Some(*held),
                Outcome::Refused(_) => c.reserved,
            };
            Decision {
                key: c.key.clone(),
                reserved,
                outcome,
            }
        })
        .collect::<Vec<_>>();

    let used_narrow = used.saturate();
    Admission {
        usage: Usage {
            server: server.name.clone(),
            capacity: server.capacity,
            used: used_narrow,
            free: Resources::new(
                server
                    .capacity
                    .memory_mb
                    .saturating_sub(used_narrow.memory_mb),
                server
                    .capacity
                    .storage_mb
                    .saturating_sub(used_narrow.storage_mb),
            ),
            containers: decisions.iter().filter(|d| d.reserved.is_some()).count(),
        },
        decisions,
    }
}

/// The refusal of a request that does not fit next to the `others` reservations.
fn shortage(server: &Server, c: &Candidate, capacity: Wide, others: Wide) -> Refusal {
    let shortfall = |resource, capacity: u128, others: u128, requested_mb: u64| {
        // Compared in u128, not as "requested > free": when `others` alone exceeds the
        // capacity, free is 0 and even a 0 MB request does not fit.
        (others + u128::from(requested_mb) > capacity).then(|| Shortfall {
            resource,
            free_mb: narrow(capacity.saturating_sub(others)),
            requested_mb,
            overcommitted: (others > capacity).then(|| Overcommit {
                capacity_mb: narrow(capacity),
                reserved_mb: narrow(others),
            }),
        })
    };
    let memory = shortfall(
        Resource::Memory,
        capacity.memory,
        others.memory,
        c.requested.memory_mb,
    );
    let storage = shortfall(
        Resource::Storage,
        capacity.storage,
        others.storage,
        c.requested.storage_mb,
    );
    match (memory, storage) {
        (Some(memory), storage) => Refusal::InsufficientMemory {
            server: server.name.clone(),
            memory,
            storage,
            kept: c.reserved,
        },
        (None, Some(storage)) => Refusal::InsufficientStorage {
            server: server.name.clone(),
            storage,
            kept: c.reserved,
        },
        (None, None) => unreachable!("a request that fits in both dimensions is admitted"),
    }
}

/// Sums of reservations, wide enough that adding any number of `u64` MB never wraps (a wrapped
/// sum could look like it fits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Wide {
    memory: u128,
    storage: u128,
}

impl From<Resources> for Wide {
    fn from(r: Resources) -> Self {
        Self {
            memory: r.memory_mb.into(),
            storage: r.storage_mb.into(),
        }
    }
}

impl Wide {
    fn add(self, r: Resources) -> Self {
        Self {
            memory: self.memory + u128::from(r.memory_mb),
            storage: self.storage + u128::from(r.storage_mb),
        }
    }

    /// `self - r`, where `r` is known to be part of the sum.
    fn sub(self, r: Resources) -> Self {
        Self {
            memory: self.memory - u128::from(r.memory_mb),
            storage: self.storage - u128::from(r.storage_mb),
        }
    }

    fn fits_within(&self, other: &Self) -> bool {
        self.memory <= other.memory && self.storage <= other.storage
    }

    fn saturate(self) -> Resources {
        Resources::new(narrow(self.memory), narrow(self.storage))
    }
}

fn narrow(mb: u128) -> u64 {
    u64::try_from(mb).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node_a(memory: u64, storage: u64) -> Server {
        Server {
            name: "node-a".into(),
            capacity: Resources::new(memory, storage),
        }
    }

    fn key(created: i64, name: &str) -> ObjectKey {
        ObjectKey::new(created, "cust", name)
    }

    fn new(created: i64, name: &str, memory: u64, storage: u64) -> Candidate {
        Candidate::new(key(created, name), Resources::new(memory, storage), None)
    }

    fn admitted(
        created: i64,
        name: &str,
        requested: (u64, u64),
        reserved: (u64, u64),
    ) -> Candidate {
        Candidate::new(
            key(created, name),
            Resources::new(requested.0, requested.1),
            Some(Resources::new(reserved.0, reserved.1)),
        )
    }

    fn decision<'a>(out: &'a Admission, name: &str) -> &'a Decision {
        out.decisions
            .iter()
            .find(|d| d.key.name == name)
            .unwrap_or_else(|| panic!("no decision for {name}"))
    }

    fn refusal<'a>(out: &'a Admission, name: &str) -> &'a Refusal {
        match &decision(out, name).outcome {
            Outcome::Refused(r) => r,
            other => panic!("{name} was not refused: {other:?}"),
        }
    }

    #[test]
    fn new_containers_are_admitted_in_key_order_while_they_fit() {
        let out = admit(
            &node_a(1000, 1000),
            &[new(2, "second", 600, 10), new(1, "first", 600, 10)],
        );
        let first = decision(&out, "first");
        assert_eq!(first.outcome, Outcome::Admitted(Change::New));
        assert_eq!(first.reserved, Some(Resources::new(600, 10)));
        assert_eq!(
            refusal(&out, "second").to_string(),
            "server node-a: 400 MB memory free, 600 MB requested"
        );
        assert_eq!(decision(&out, "second").reserved, None);
    }

    #[test]
    fn refusal_message_has_the_server_the_free_and_the_requested_numbers() {
        let out = admit(
            &node_a(1000, 1000),
            &[new(1, "a", 500, 1), new(2, "b", 1000, 1)],
        );
        let r = refusal(&out, "b");
        assert_eq!(r.reason(), "InsufficientMemory");
        assert_eq!(
            r.to_string(),
            "server node-a: 500 MB memory free, 1000 MB requested"
        );
    }

    #[test]
    fn storage_shortage_is_insufficient_storage() {
        let out = admit(
            &node_a(1000, 100),
            &[new(1, "a", 10, 80), new(2, "b", 10, 30)],
        );
        let r = refusal(&out, "b");
        assert_eq!(r.reason(), "InsufficientStorage");
        assert_eq!(
            r.to_string(),
            "server node-a: 20 MB storage free, 30 MB requested"
        );
    }

    #[test]
    fn both_short_is_insufficient_memory_and_names_both() {
        let out = admit(&node_a(100, 100), &[new(1, "a", 200, 200)]);
        let r = refusal(&out, "a");
        assert_eq!(r.reason(), "InsufficientMemory");
        assert_eq!(
            r.to_string(),
            "server node-a: 100 MB memory free, 200 MB requested; \
             100 MB storage free, 200 MB requested"
        );
    }

    #[test]
    fn an_exact_fit_is_admitted() {
        let out = admit(
            &node_a(1000, 50),
            &[new(1, "a", 400, 20), new(2, "b", 600, 30)],
        );
        assert!(out.decisions.iter().all(Decision::is_admitted));
        assert_eq!(out.usage.free, Resources::ZERO);
        assert!(!out.usage.is_overcommitted());
    }

    #[test]
    fn a_container_that_does_not_fit_does_not_block_later_smaller_ones() {
        let out = admit(
            &node_a(1000, 1000),
            &[
                new(1, "a", 600, 1),
                new(2, "big", 600, 1),
                new(3, "small", 300, 1),
            ],
        );
        assert!(decision(&out, "a").is_admitted());
        assert!(!decision(&out, "big").is_admitted());
        assert!(decision(&out, "small").is_admitted());
    }

    #[test]
    fn an_admitted_container_keeps_its_reservation_when_an_earlier_keyed_one_arrives() {
        // "early" has the older creation time but was not admitted before (for instance the
        // node was not labelled yet): it must not take "late"'s place.
        let out = admit(
            &node_a(1000, 1000),
            &[
                new(1, "early", 800, 1),
                admitted(5, "late", (800, 1), (800, 1)),
            ],
        );
        assert_eq!(
            decision(&out, "late").outcome,
            Outcome::Admitted(Change::Unchanged)
        );
        assert_eq!(refusal(&out, "early").reason(), "InsufficientMemory");
    }

    #[test]
    fn lowering_capacity_evicts_nothing_and_reports_overcommit() {
        let out = admit(
            &node_a(500, 1000),
            &[
                admitted(1, "a", (400, 1), (400, 1)),
                admitted(2, "b", (400, 1), (400, 1)),
                new(3, "c", 1, 1),
            ],
        );
        assert_eq!(decision(&out, "a").reserved, Some(Resources::new(400, 1)));
        assert_eq!(decision(&out, "b").reserved, Some(Resources::new(400, 1)));
        assert!(decision(&out, "a").is_admitted() && decision(&out, "b").is_admitted());
        assert_eq!(
            refusal(&out, "c").to_string(),
            "server node-a: 0 MB memory free, 1 MB requested \
             (overcommitted: 800 MB reserved, capacity lowered to 500 MB)"
        );
        assert!(out.usage.is_overcommitted());
        assert_eq!(out.usage.used, Resources::new(800, 2));
        assert_eq!(out.usage.free, Resources::new(0, 998));
        assert_eq!(out.usage.containers, 2);
        assert_eq!(
            out.usage.overcommit_message().unwrap(),
            "server node-a: 800 MB memory and 2 MB storage reserved exceeds the capacity of \
             500 MB memory and 1000 MB storage; nothing is evicted, new admissions and growth \
             are refused until reservations fit again"
        );
    }

    #[test]
    fn on_an_overcommitted_server_shrinking_is_accepted_and_growing_is_refused() {
        let out = admit(
            &node_a(500, 1000),
            &[
                admitted(1, "shrinks", (300, 1), (400, 1)),
                admitted(2, "grows-storage", (400, 2), (400, 1)),
            ],
        );
        assert_eq!(
            decision(&out, "shrinks").outcome,
            Outcome::Admitted(Change::Resized {
                from: Resources::new(400, 1)
            })
        );
        assert_eq!(
            decision(&out, "shrinks").reserved,
            Some(Resources::new(300, 1))
        );
        // Even a storage-only growth is refused while memory is overcommitted.
        let grows = decision(&out, "grows-storage");
        assert_eq!(grows.reserved, Some(Resources::new(400, 1)));
        assert_eq!(
            refusal(&out, "grows-storage").to_string(),
            "server node-a: 200 MB memory free, 400 MB requested; \
             keeping the current reservation of 400 MB memory and 1 MB storage"
        );
    }

    #[test]
    fn shrinking_back_under_capacity_reopens_the_server() {
        let out = admit(
            &node_a(500, 1000),
            &[admitted(1, "a", (200, 1), (800, 1)), new(2, "b", 300, 1)],
        );
        assert!(decision(&out, "b").is_admitted());
        assert!(!out.usage.is_overcommitted());
    }

    #[test]
    fn a_resize_counts_its_own_old_reservation_as_free() {
        let out = admit(
            &node_a(1000, 1000),
            &[
                admitted(1, "a", (300, 1), (300, 1)),
                admitted(2, "b", (700, 1), (500, 1)),
            ],
        );
        let b = decision(&out, "b");
        assert_eq!(
            b.outcome,
            Outcome::Admitted(Change::Resized {
                from: Resources::new(500, 1)
            })
        );
        assert_eq!(b.reserved, Some(Resources::new(700, 1)));
        assert_eq!(out.usage.free, Resources::new(0, 998));
    }

    #[test]
    fn a_resize_that_does_not_fit_keeps_the_old_reservation_and_says_why() {
        let out = admit(
            &node_a(1000, 1000),
            &[
                admitted(1, "a", (300, 1), (300, 1)),
                admitted(2, "b", (800, 1), (500, 1)),
            ],
        );
        let b = decision(&out, "b");
        assert_eq!(b.reserved, Some(Resources::new(500, 1)));
        let r = refusal(&out, "b");
        assert_eq!(r.reason(), "InsufficientMemory");
        assert_eq!(
            r.to_string(),
            "server node-a: 700 MB memory free, 800 MB requested; \
             keeping the current reservation of 500 MB memory and 1 MB storage"
        );
        assert_eq!(out.usage.used, Resources::new(800, 2));
    }

    #[test]
    fn a_growing_resize_competes_in_key_order_with_new_containers() {
        // The older new container is served before the younger resize.
        let out = admit(
            &node_a(1000, 1000),
            &[
                new(1, "new-early", 400, 1),
                admitted(2, "resize", (700, 1), (500, 1)),
            ],
        );
        assert!(decision(&out, "new-early").is_admitted());
        assert!(!decision(&out, "resize").is_admitted());
        assert_eq!(
            decision(&out, "resize").reserved,
            Some(Resources::new(500, 1))
        );
    }

    #[test]
    fn memory_freed_by_a_later_mixed_resize_is_given_to_an_earlier_refused_container() {
        // "resize" grows storage but gives back memory; "early" only fits after that.
        let server = node_a(1000, 1000);
        let input = [
            new(1, "early", 300, 1),
            admitted(2, "resize", (200, 2), (800, 1)),
        ];
        let out = admit(&server, &input);
        assert!(decision(&out, "early").is_admitted());
        assert!(decision(&out, "resize").is_admitted());
        assert_eq!(out.usage.used, Resources::new(500, 3));
        assert_eq!(admit(&server, &rerun(&input, &out)).decisions, {
            let mut again = out.decisions.clone();
            for d in &mut again {
                d.outcome = Outcome::Admitted(Change::Unchanged);
            }
            again
        });
    }

    #[test]
    fn a_blocked_container_keeps_what_it_holds_and_gets_nothing_new() {
        let not_owner = PlacementError::NotOwner {
            customer: "cust".into(),
            server: "node-a".into(),
        };
        let mut holding = admitted(1, "holding", (900, 1), (400, 1));
        holding.blocked = Some(not_owner.clone());
        let mut fresh = new(2, "fresh", 1, 1);
        fresh.blocked = Some(not_owner.clone());
        let out = admit(
            &node_a(1000, 1000),
            &[holding, fresh, new(3, "other", 700, 1)],
        );

        assert_eq!(
            decision(&out, "holding").reserved,
            Some(Resources::new(400, 1))
        );
        assert_eq!(refusal(&out, "holding"), &Refusal::Placement(not_owner));
        assert_eq!(refusal(&out, "holding").reason(), "ServerNotOwned");
        assert_eq!(decision(&out, "fresh").reserved, None);
        // The blocked reservation is still counted.
        assert_eq!(
            refusal(&out, "other").to_string(),
            "server node-a: 600 MB memory free, 700 MB requested"
        );
    }

    #[test]
    fn usage_counts_only_containers_holding_a_reservation() {
        let out = admit(
            &node_a(1000, 100),
            &[
                new(1, "a", 100, 10),
                new(2, "b", 2000, 10),
                admitted(3, "c", (50, 5), (50, 5)),
            ],
        );
        assert_eq!(
            out.usage,
            Usage {
                server: "node-a".into(),
                capacity: Resources::new(1000, 100),
                used: Resources::new(150, 15),
                free: Resources::new(850, 85),
                containers: 2,
            }
        );
    }

    #[test]
    fn an_empty_server_has_all_capacity_free() {
        let out = admit(&node_a(64, 128), &[]);
        assert!(out.decisions.is_empty());
        assert_eq!(out.usage.free, Resources::new(64, 128));
        assert_eq!(out.usage.containers, 0);
        assert_eq!(out.usage.overcommit_message(), None);
    }

    #[test]
    fn huge_numbers_never_wrap_into_a_fit() {
        let out = admit(
            &node_a(u64::MAX, u64::MAX),
            &[
                admitted(1, "a", (u64::MAX, 1), (u64::MAX, 1)),
                new(2, "b", 1, 1),
            ],
        );
        assert!(decision(&out, "a").is_admitted());
        assert!(!decision(&out, "b").is_admitted());
    }

    #[test]
    fn even_a_zero_request_is_refused_on_an_overcommitted_server() {
        let out = admit(
            &node_a(100, 100),
            &[admitted(1, "a", (200, 1), (200, 1)), new(2, "b", 0, 0)],
        );
        let r = refusal(&out, "b");
        assert_eq!(r.reason(), "InsufficientMemory");
        assert_eq!(
            r.to_string(),
            "server node-a: 0 MB memory free, 0 MB requested \
             (overcommitted: 200 MB reserved, capacity lowered to 100 MB)"
        );
    }

    #[test]
    fn zero_capacity_admits_nothing_new() {
        let out = admit(&node_a(0, 0), &[new(1, "a", 1, 1)]);
        assert_eq!(refusal(&out, "a").reason(), "InsufficientMemory");
    }

    fn facts(name: &str, mem: u64, st: u64, addr: Option<&str>) -> ServerFacts {
        ServerFacts {
            name: name.into(),
            capacity: Resources::new(mem, st),
            address: addr.map(Into::into),
        }
    }

    fn cluster() -> Vec<ServerFacts> {
        vec![
            facts("node-a", 4096, 100000, Some("203.0.113.10")),
            facts("node-b", 2048, 1, Some("203.0.113.11")),
            facts("twin-1", 1, 1, Some("203.0.113.20")),
            facts("twin-2", 1, 1, Some("203.0.113.20")),
        ]
    }

    #[test]
    fn resolve_server_by_name() {
        let cluster = cluster();
        let found = resolve_server("node-a", &cluster).unwrap();
        assert_eq!(
            found.server(),
            Server {
                name: "node-a".into(),
                capacity: Resources::new(4096, 100000),
            }
        );
    }

    #[test]
    fn resolve_server_by_public_address() {
        assert_eq!(
            resolve_server("203.0.113.10", &cluster()).unwrap().name,
            "node-a"
        );
    }

    #[test]
    fn a_name_wins_over_an_address() {
        let mut cluster = cluster();
        cluster.push(facts("203.0.113.10", 1, 1, None));
        assert_eq!(
            resolve_server("203.0.113.10", &cluster).unwrap().name,
            "203.0.113.10"
        );
    }

    #[test]
    fn resolve_server_unknown() {
        let err = resolve_server("nowhere", &cluster()).unwrap_err();
        assert_eq!(err.reason(), "ServerUnknown");
        assert_eq!(
            err.to_string(),
            "server nowhere: no Server has this name or public address"
        );
        assert_eq!(
            resolve_server("", &cluster()).unwrap_err().reason(),
            "ServerUnknown"
        );
    }

    #[test]
    fn resolve_server_refuses_an_address_shared_by_two_servers() {
        let err = resolve_server("203.0.113.20", &cluster()).unwrap_err();
        assert_eq!(err.reason(), "AmbiguousServer");
        assert_eq!(
            err.to_string(),
            "address 203.0.113.20 belongs to several servers (twin-1, twin-2); name the Server instead"
        );
    }

    #[test]
    fn a_missing_node_is_named() {
        let err = PlacementError::NoNode {
            server: "node-a".into(),
        };
        assert_eq!(err.reason(), "NodeMissing");
        assert_eq!(
            err.to_string(),
            "server node-a: no Node named node-a exists, so nothing can run there"
        );
    }

    #[test]
    fn check_owner_accepts_owned_servers_only() {
        let owned = vec!["node-a".to_string()];
        assert_eq!(check_owner("cust", &owned, "node-a"), Ok(()));
        let err = check_owner("cust", &owned, "node-b").unwrap_err();
        assert_eq!(err.reason(), "ServerNotOwned");
        assert_eq!(err.to_string(), "customer cust does not own server node-b");
        let as_refusal: Refusal = err.into();
        assert_eq!(as_refusal.reason(), "ServerNotOwned");
    }

    /// The input of the next round: same requests, the decided reservations.
    fn rerun(input: &[Candidate], out: &Admission) -> Vec<Candidate> {
        input
            .iter()
            .map(|c| {
                let d = out.decisions.iter().find(|d| d.key == c.key).unwrap();
                Candidate {
                    reserved: d.reserved,
                    ..c.clone()
                }
            })
            .collect()
    }

    fn res(max: u64) -> impl Strategy<Value = Resources> {
        (0..=max, 0..=max).prop_map(|(m, s)| Resources::new(m, s))
    }

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        proptest::collection::vec(
            (
                0i64..4,
                res(600),
                proptest::option::of(res(600)),
                proptest::bool::weighted(0.1),
            ),
            0..10,
        )
        .prop_map(|raw| {
            raw.into_iter()
                .enumerate()
                .map(|(i, (created, requested, reserved, blocked))| Candidate {
                    key: ObjectKey::new(created, "cust", format!("c{i}")),
                    requested,
                    reserved,
                    blocked: blocked.then(|| PlacementError::NotOwner {
                        customer: "cust".into(),
                        server: "node-a".into(),
                    }),
                })
                .collect()
        })
    }

    fn sum<'a>(rs: impl Iterator<Item = &'a Resources>) -> (u128, u128) {
        rs.fold((0, 0), |(m, s), r| {
            (m + u128::from(r.memory_mb), s + u128::from(r.storage_mb))
        })
    }

    proptest! {
        #[test]
        fn never_oversold_unless_capacity_was_lowered_and_then_nothing_grows(
            capacity in res(2000),
            input in candidates(),
        ) {
            let server = Server { name: "node-a".into(), capacity };
            let out = admit(&server, &input);
            let before = sum(input.iter().filter_map(|c| c.reserved.as_ref()));
            let after = sum(out.decisions.iter().filter_map(|d| d.reserved.as_ref()));
            let cap = (u128::from(capacity.memory_mb), u128::from(capacity.storage_mb));
            let fits = |x: (u128, u128)| x.0 <= cap.0 && x.1 <= cap.1;

            let grew = rerun(&input, &out).iter().zip(&input).any(|(now, was)| match (was.reserved, now.reserved) {
                (None, Some(_)) => true,
                (Some(old), Some(new)) => !new.fits_within(&old),
                _ => false,
            });
            if fits(before) || grew {
                prop_assert!(fits(after), "oversold: {:?} > {:?}", after, cap);
            }
            prop_assert!(after.0 <= before.0.max(cap.0) && after.1 <= before.1.max(cap.1));
            prop_assert_eq!(out.usage.is_overcommitted(), !fits(after));
        }

        #[test]
        fn an_admitted_container_only_ever_changes_to_what_it_asked_for(
            capacity in res(2000),
            input in candidates(),
        ) {
            let out = admit(&Server { name: "node-a".into(), capacity }, &input);
            prop_assert_eq!(out.decisions.len(), input.len());
            for c in &input {
                let d = out.decisions.iter().find(|d| d.key == c.key).unwrap();
                match &d.outcome {
                    Outcome::Admitted(_) => prop_assert_eq!(d.reserved, Some(c.requested)),
                    Outcome::Refused(_) => prop_assert_eq!(d.reserved, c.reserved),
                }
                if c.blocked.is_some() {
                    prop_assert!(!d.is_admitted());
                }
                if let Some(old) = c.reserved {
                    let now = d.reserved.expect("an admitted container lost its reservation");
                    prop_assert!(now == old || now == c.requested);
                    // Shrinking is always allowed.
                    if c.blocked.is_none() && c.requested.fits_within(&old) {
                        prop_assert!(d.is_admitted());
                    }
                }
            }
        }

        #[test]
        fn the_input_order_does_not_matter(
            capacity in res(2000),
            (input, shuffled) in candidates().prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
        ) {
            let server = Server { name: "node-a".into(), capacity };
            prop_assert_eq!(admit(&server, &input), admit(&server, &shuffled));
        }

        #[test]
        fn admitting_the_output_again_changes_nothing(
            capacity in res(2000),
            input in candidates(),
        ) {
            let server = Server { name: "node-a".into(), capacity };
            let first = admit(&server, &input);
            let second = admit(&server, &rerun(&input, &first));
            prop_assert_eq!(&first.usage, &second.usage);
            for (a, b) in first.decisions.iter().zip(&second.decisions) {
                prop_assert_eq!(&a.key, &b.key);
                prop_assert_eq!(a.reserved, b.reserved);
                match (&a.outcome, &b.outcome) {
                    (Outcome::Admitted(_), Outcome::Admitted(change)) => {
                        prop_assert_eq!(*change, Change::Unchanged)
                    }
                    (Outcome::Refused(x), Outcome::Refused(y)) => prop_assert_eq!(x, y),
                    (x, y) => prop_assert!(false, "{:?} became {:?}", x, y),
                }
            }
        }
    }
}
