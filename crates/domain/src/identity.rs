//! Object ordering keys and container uid allocation.
//!
//! A container's uid names its home directory (`<homeRoot>/<uid>`) and is the Unix identity its
//! processes run as, so a uid must be unique in the cluster and must **never be handed out
//! twice**: a new container that inherited an old uid would inherit the old home (or the
//! archived one), its files and its SSH keys.
//!
//! Deleted containers leave no trace in the API, so "in use" is not enough to avoid reuse. The
//! controller therefore persists a *high-water mark* — the last uid ever handed out — in one
//! object updated with optimistic concurrency (a `resourceVersion` conflict means another
//! writer won: re-read and re-run [`allocate_uids`]). Only the pure part lives here.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Stable, total ordering of the objects the rules arbitrate between ("first come keeps it").
///
/// Field order is the ordering: creation time, then namespace, then name. The derived `Ord`
/// relies on it, so do not reorder the fields.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    /// `metadata.creationTimestamp` as seconds since the Unix epoch. Kubernetes stores it with
    /// one-second resolution, which is why namespace and name break ties.
    pub created: i64,
    /// `metadata.namespace` (empty for cluster-scoped objects).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectKey {
    /// Builds a key from the three parts of an object's identity.
    pub fn new(created: i64, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            created,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    /// `namespace/name`, the form people use in `kubectl` and in messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The first uid a container may get (as in uwsgi.it): well above the ranges distributions
/// give to system and login users, so a container never shares an identity with a host user.
pub const FIRST_UID: u32 = 30001;

/// uids that are skipped although they are above [`FIRST_UID`].
///
/// - 65534 is `nobody`/`nogroup`: the overflow id NFS and user namespaces show for unmapped
///   owners, so files of a container running as 65534 would look like everybody's "unknown".
/// - 65535 is `(uid16_t)-1`, the "no change" value of the 16-bit `chown` system calls.
/// - 4294967295 is `(uid_t)-1`, the "no change"/error value of `chown`, `setresuid` and friends.
pub const SKIPPED_UIDS: [u32; 3] = [65534, 65535, u32::MAX];

/// Whether `uid` may ever be handed to a container.
pub fn is_allocatable(uid: u32) -> bool {
    uid >= FIRST_UID && !SKIPPED_UIDS.contains(&uid)
}

/// The outcome of one allocation round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidAllocation {
    /// One uid per distinct key asked for, in key order.
    pub assignments: Vec<(ObjectKey, u32)>,
    /// The high-water mark to persist: the last uid handed out, or the highest uid known to be
    /// used. Never lower than the mark it was computed from. Persist it (with optimistic
    /// concurrency) **before** writing any assigned uid into a container's status, so a crash
    /// in between can only waste uids, never hand one out twice.
    pub high_water_mark: u32,
}

/// Why no uids could be allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidError {
    /// Fewer allocatable uids remain above the high-water mark than containers need one.
    #[error(
        "uid space exhausted: {requested} uid(s) requested above high-water mark {high_water_mark}, \
         only {available} allocatable uid(s) remain (uids never get reused)"
    )]
    Exhausted {
        /// The mark the allocation started from.
        high_water_mark: u32,
        /// How many distinct containers needed a uid.
        requested: usize,
        /// How many allocatable uids are left above the mark.
        available: u64,
    },
}

/// Allocates one fresh uid for each container in `needing`.
///
/// - `high_water_mark`: the persisted last uid handed out (`None` before the first allocation).
/// - `in_use`: uids currently in containers' status. They matter when the mark was lost or the
///   cluster was migrated: allocation always starts above all of them.
/// - `needing`: containers without a uid; order does not matter (they are sorted by key, so the
///   older container gets the lower uid) and duplicates get a single uid.
///
/// The first uid is `max(high_water_mark, max(in_use), FIRST_UID - 1) + 1`, then upwards,
/// skipping [`SKIPPED_UIDS`]. Every returned uid is greater than the mark and than every uid in
/// use. With nothing to allocate, the mark is still raised to the highest uid in use.
pub fn allocate_uids(
    high_water_mark: Option<u32>,
    in_use: impl IntoIterator<Item = u32>,
    needing: &[ObjectKey],
) -> Result<UidAllocation, UidError> {
    let start = in_use
        .into_iter()
        .chain(high_water_mark)
        .fold(FIRST_UID - 1, u32::max);
    let keys: BTreeSet<&ObjectKey> = needing.iter().collect();

    let mut assignments = Vec::with_capacity(keys.len());
    let mut last = start;
    for key in keys.iter() {
        match next_allocatable(last) {
            Some(uid) => {
                assignments.push(((*key).clone(), uid));
                last = uid;
            }
            None => {
                return Err(UidError::Exhausted {
                    high_water_mark: start,
                    requested: keys.len(),
                    available: remaining_after(start),
                });
            }
        }
    }
    Ok(UidAllocation {
        assignments,
        high_water_mark: last,
    })
}

/// The smallest allocatable uid strictly greater than `after`.
fn next_allocatable(after: u32) -> Option<u32> {
    let mut uid = after.checked_add(1)?;
    while !is_allocatable(uid) {
        uid = uid.checked_add(1)?;
    }
    Some(uid)
}

/// How many allocatable uids are strictly greater than `after`.
fn remaining_after(after: u32) -> u64 {
    let above = u64::from(u32::MAX - after.max(FIRST_UID - 1));
    let skipped = SKIPPED_UIDS.iter().filter(|&&uid| uid > after).count() as u64;
    above - skipped
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(created: i64, name: &str) -> ObjectKey {
        ObjectKey::new(created, "ns", name)
    }

    #[test]
    fn object_keys_order_by_time_then_namespace_then_name() {
        let mut keys = [
            ObjectKey::new(2, "a", "a"),
            ObjectKey::new(1, "b", "a"),
            ObjectKey::new(1, "a", "b"),
            ObjectKey::new(1, "a", "a"),
        ];
        keys.sort();
        let order: Vec<String> = keys.iter().map(|k| format!("{}:{k}", k.created)).collect();
        assert_eq!(order, ["1:a/a", "1:a/b", "1:b/a", "2:a/a"]);
    }

    #[test]
    fn object_key_displays_as_namespace_slash_name() {
        assert_eq!(ObjectKey::new(0, "cust", "web").to_string(), "cust/web");
    }

    #[test]
    fn first_allocation_in_an_empty_cluster_starts_at_30001() {
        let out = allocate_uids(None, [], &[key(1, "a"), key(2, "b")]).unwrap();
        assert_eq!(
            out.assignments,
            vec![(key(1, "a"), 30001), (key(2, "b"), 30002)]
        );
        assert_eq!(out.high_water_mark, 30002);
    }

    #[test]
    fn allocation_continues_above_the_high_water_mark_even_when_nothing_is_in_use() {
        // Every container up to 30010 was deleted: their uids must still never come back.
        let out = allocate_uids(Some(30010), [], &[key(1, "a")]).unwrap();
        assert_eq!(out.assignments, vec![(key(1, "a"), 30011)]);
        assert_eq!(out.high_water_mark, 30011);
    }

    #[test]
    fn allocation_starts_above_uids_in_use_when_the_mark_is_behind() {
        let out = allocate_uids(Some(30002), [30001, 30050, 30003], &[key(1, "a")]).unwrap();
        assert_eq!(out.assignments, vec![(key(1, "a"), 30051)]);
        assert_eq!(out.high_water_mark, 30051);
    }

    #[test]
    fn uids_in_use_below_the_first_uid_are_ignored() {
        let out = allocate_uids(None, [0, 1000, 30000], &[key(1, "a")]).unwrap();
        assert_eq!(out.assignments[0].1, FIRST_UID);
    }

    #[test]
    fn older_containers_get_lower_uids_whatever_the_input_order() {
        let out = allocate_uids(None, [], &[key(5, "late"), key(1, "early")]).unwrap();
        assert_eq!(
            out.assignments,
            vec![(key(1, "early"), 30001), (key(5, "late"), 30002)]
        );
    }

    #[test]
    fn a_container_listed_twice_gets_one_uid() {
        let out = allocate_uids(None, [], &[key(1, "a"), key(1, "a")]).unwrap();
        assert_eq!(out.assignments, vec![(key(1, "a"), 30001)]);
        assert_eq!(out.high_water_mark, 30001);
    }

    #[test]
    fn nothing_to_allocate_keeps_the_mark_or_raises_it_to_the_highest_uid_in_use() {
        let out = allocate_uids(Some(30005), [30001], &[]).unwrap();
        assert_eq!(out.high_water_mark, 30005);
        let out = allocate_uids(Some(30005), [30009], &[]).unwrap();
        assert_eq!(out.high_water_mark, 30009);
        let out = allocate_uids(None, [], &[]).unwrap();
        assert_eq!(out.high_water_mark, FIRST_UID - 1);
    }

    #[test]
    fn nobody_and_the_16_bit_minus_one_are_skipped() {
        let out = allocate_uids(Some(65533), [], &[key(1, "a"), key(2, "b")]).unwrap();
        assert_eq!(
            out.assignments,
            vec![(key(1, "a"), 65533 + 3), (key(2, "b"), 65537)]
        );
    }

    #[test]
    fn minus_one_is_never_allocated_and_exhaustion_is_an_error() {
        let out = allocate_uids(Some(u32::MAX - 2), [], &[key(1, "a")]).unwrap();
        assert_eq!(out.assignments[0].1, u32::MAX - 1);

        let err = allocate_uids(Some(u32::MAX - 2), [], &[key(1, "a"), key(2, "b")]).unwrap_err();
        assert_eq!(
            err,
            UidError::Exhausted {
                high_water_mark: u32::MAX - 2,
                requested: 2,
                available: 1,
            }
        );
        assert!(err.to_string().contains("2 uid(s) requested"), "{err}");
        assert!(err.to_string().contains("only 1 allocatable"), "{err}");
    }

    #[test]
    fn exhaustion_when_the_mark_is_the_maximum_reports_nothing_left() {
        let err = allocate_uids(Some(u32::MAX), [], &[key(1, "a")]).unwrap_err();
        assert!(matches!(err, UidError::Exhausted { available: 0, .. }));
    }

    #[test]
    fn is_allocatable_draws_the_boundaries() {
        assert!(!is_allocatable(30000));
        assert!(is_allocatable(30001));
        assert!(!is_allocatable(65534));
        assert!(!is_allocatable(65535));
        assert!(is_allocatable(65536));
        assert!(is_allocatable(u32::MAX - 1));
        assert!(!is_allocatable(u32::MAX));
    }

    fn uid_near_interesting_values() -> impl Strategy<Value = u32> {
        prop_oneof![
            0u32..40_000,
            65_500u32..65_600,
            (u32::MAX - 50)..=u32::MAX,
            any::<u32>(),
        ]
    }

    proptest! {
        #[test]
        fn allocated_uids_are_fresh_unique_and_the_mark_never_goes_down(
            mark in proptest::option::of(uid_near_interesting_values()),
            in_use in proptest::collection::vec(uid_near_interesting_values(), 0..8),
            names in proptest::collection::vec((0i64..5, "[a-c]{1,2}"), 0..12),
        ) {
            let needing: Vec<ObjectKey> =
                names.iter().map(|(t, n)| ObjectKey::new(*t, "ns", n.clone())).collect();
            let distinct: BTreeSet<&ObjectKey> = needing.iter().collect();
            match allocate_uids(mark, in_use.iter().copied(), &needing) {
                Ok(out) => {
                    prop_assert_eq!(out.assignments.len(), distinct.len());
                    let uids: BTreeSet<u32> = out.assignments.iter().map(|(_, u)| *u).collect();
                    prop_assert_eq!(uids.len(), out.assignments.len(), "uids must be unique");
                    for &uid in &uids {
                        prop_assert!(is_allocatable(uid));
                        prop_assert!(mark.is_none_or(|m| uid > m), "uid {} not above mark", uid);
                        prop_assert!(in_use.iter().all(|&u| uid > u), "uid {} not above in-use", uid);
                        prop_assert!(uid <= out.high_water_mark);
                    }
                    prop_assert!(mark.is_none_or(|m| out.high_water_mark >= m));
                    prop_assert!(in_use.iter().all(|&u| out.high_water_mark >= u));
                    // Older containers get lower uids.
                    prop_assert!(out.assignments.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1));
                }
                Err(UidError::Exhausted { available, requested, .. }) => {
                    prop_assert!((requested as u64) > available);
                }
            }
        }

        #[test]
        fn a_second_round_never_repeats_a_uid_of_the_first(
            mark in proptest::option::of(30_000u32..70_000),
            first in 0usize..5,
            second in 0usize..5,
        ) {
            let round1: Vec<ObjectKey> = (0..first).map(|i| key(0, &format!("a{i}"))).collect();
            let round2: Vec<ObjectKey> = (0..second).map(|i| key(1, &format!("b{i}"))).collect();
            let out1 = allocate_uids(mark, [], &round1).unwrap();
            // The first round's containers are all deleted before the second round.
            let out2 = allocate_uids(Some(out1.high_water_mark), [], &round2).unwrap();
            for (_, uid) in &out2.assignments {
                prop_assert!(out1.assignments.iter().all(|(_, old)| old != uid));
            }
        }
    }
}
