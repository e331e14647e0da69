//! Container homes: created and kept right for this node's admitted Containers, measured
//! against their storage reservation, and released (archived, retained or deleted) when a
//! Container is deleted.
//!
//! The deletion handshake with the controller: the controller holds its finalizer on a deleted
//! Container, stops the Pod and writes `Running=False` reason `Stopped` (a container without a
//! distro never has `Running`). The agent then applies `homeRetention` and writes
//! `HomeReady=False` reason [`HOME_RELEASED_REASON`], on which the controller lets the Container
//! go.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use kube::{Resource, ResourceExt};
use tracing::{info, warn};
use uwsgi_it_api::Container;
use uwsgi_it_api::condition::HasConditions;
use uwsgi_it_api::condition::{self, HOME_READY, KEYS_READY, RUNNING};
use uwsgi_it_domain::config::HomeRetention;

use crate::Context;
use crate::homes::{
    ArchiveOutcome, HomeError, HomeSpec, KeysOutcome, Retention, threshold_crossed,
};
use crate::reporter::DesiredCondition;
use crate::scope::Caches;

/// `HomeReady=False` reason once a deleted container's home has been released; the controller
/// releases its finalizer on it (the controller's `HOME_RELEASED_REASON`).
pub const HOME_RELEASED_REASON: &str = "HomeReleased";
/// `Running=False` reason the controller writes once a deleted container's Pod is gone.
pub const STOPPED_REASON: &str = "Stopped";
/// Container condition: the home's storage use is below its `quotaThreshold`.
pub const STORAGE_WITHIN_QUOTA: &str = "StorageWithinQuota";
/// Reason of `HomeReady=True`.
pub const HOME_READY_REASON: &str = "HomeReady";
/// Reason of `StorageWithinQuota=False`, and of the Warning Event when it becomes so.
pub const QUOTA_THRESHOLD_REACHED: &str = "QuotaThresholdReached";

/// Reason of `KeysReady=True`.
pub const KEYS_APPLIED_REASON: &str = "KeysApplied";

/// Every condition type the agent writes on a Container.
const OWNED: &[&str] = &[HOME_READY, KEYS_READY, STORAGE_WITHIN_QUOTA];

const MIB: u64 = 1024 * 1024;

/// One walk of a home: the limits it was judged against and what it found (`None`: the walk
/// failed; the previous condition stands until the next resync).
#[derive(Clone)]
struct Measurement {
    /// `spec.storage` and `spec.quotaThreshold` at the time.
    limits: (i64, i32),
    found: Option<(DesiredCondition, i64)>,
}

/// What the loop remembers between passes, by uid.
#[derive(Default)]
struct HomesState {
    /// The spec each home was last made to match.
    ensured: HashMap<u32, HomeSpec>,
    /// The last walk of each home since start; a home without one, or measured for other
    /// limits, is walked on the next pass. Other edits (tags, a note, keys) write the last
    /// result again for the new generation instead of walking the home again.
    measured: HashMap<u32, Measurement>,
    /// What releasing a home said, kept until the controller lets the Container go, so a
    /// failed status write is retried with the real outcome (a second archive finds nothing).
    released: HashMap<u32, DesiredCondition>,
}

pub(crate) async fn homes_loop(ctx: Arc<Context>) -> anyhow::Result<()> {
    let mut state = HomesState::default();
    let mut resync = tokio::time::interval(ctx.config.port_forward.resync_period);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let full = tokio::select! {
            _ = resync.tick() => true,
            _ = ctx.triggers.homes.notified() => false,
        };
        homes_pass(&ctx, &mut state, full).await;
    }
}

/// The uid the controller gave a container, when it holds a reservation.
fn placed_uid(container: &Container) -> Option<u32> {
    let status = container.status.as_ref()?;
    status.reserved.as_ref()?;
    u32::try_from(status.uid?).ok()
}

/// The containers that claim a uid another container of this node holds: the one whose home
/// this agent already reported ready, else the earliest (creation time, then namespace and
/// name). uids are never handed out twice, so a second claim is a forged or corrupted status;
/// its home would be the other container's home, keys included. Pure.
pub fn second_claims(containers: &[Arc<Container>]) -> HashMap<(String, String), String> {
    let mut ordered: Vec<&Arc<Container>> = containers.iter().collect();
    ordered.sort_by_key(|c| {
        (
            !condition::is_true(c.conditions(), HOME_READY),
            c.meta().creation_timestamp.clone().map(|t| t.0),
            c.namespace(),
            c.name_any(),
        )
    });
    let mut holders: HashMap<u32, String> = HashMap::new();
    let mut seconds = HashMap::new();
    for container in ordered {
        let Some(uid) = placed_uid(container) else {
            continue;
        };
        let name = format!(
            "{}/{}",
            container.namespace().unwrap_or_default(),
            container.name_any()
        );
        match holders.get(&uid) {
            Some(holder) => {
                seconds.insert(
                    (
                        container.namespace().unwrap_or_default(),
                        container.name_any(),
                    ),
                    holder.clone(),
                );
            }
            None => {
                holders.insert(uid, name);
            }
        }
    }
    seconds
}

async fn homes_pass(ctx: &Context, state: &mut HomesState, full: bool) {
    let containers = Caches::mine(&ctx.caches.containers, &ctx.node);
    let seconds = second_claims(&containers);
    let mut homes = 0;
    for container in &containers {
        let Some(uid) = placed_uid(container) else {
            continue;
        };
        let key = (
            container.namespace().unwrap_or_default(),
            container.name_any(),
        );
        if let Some(holder) = seconds.get(&key) {
            let refused = DesiredCondition::new(
                HOME_READY,
                false,
                "UidClaimedTwice",
                format!(
                    "uid {uid} belongs to {holder}, which claimed it first; this container gets no home and no keys"
                ),
            );
            write(ctx, container, std::slice::from_ref(&refused), None).await;
            continue;
        }
        if container.meta().deletion_timestamp.is_some() {
            release(ctx, state, container, uid).await;
            continue;
        }
        state.released.remove(&uid);
        if ensure(ctx, state, container, uid, full).await {
            homes += 1;
        }
    }
    ctx.metrics.set_homes(homes);
}

/// Makes the home match the Container and reports it; true when the home is ready.
async fn ensure(
    ctx: &Context,
    state: &mut HomesState,
    container: &Container,
    uid: u32,
    full: bool,
) -> bool {
    let spec = HomeSpec {
        uid,
        storage_container: container.spec.custom_distros_storage,
        ssh_keys: container.spec.ssh_keys.clone(),
    };
    let conditions = container.conditions();
    let generation = container.meta().generation;
    // Reported for this generation: an edit that changes nothing here (tags, a note) is still
    // written again, so every condition says it saw the spec as it is (kubectl wait, kstatus).
    let reported_ready = [HOME_READY, KEYS_READY].iter().all(|type_| {
        condition::find(conditions, type_)
            .is_some_and(|c| c.status == "True" && c.observed_generation == generation)
    });
    let limits = (container.spec.storage, container.spec.quota_threshold);
    let last = state
        .measured
        .get(&uid)
        .filter(|m| m.limits == limits)
        .cloned();
    let quota_reported = last.as_ref().is_some_and(|m| {
        m.found.is_none()
            || condition::find(conditions, STORAGE_WITHIN_QUOTA)
                .is_some_and(|c| c.observed_generation == generation)
    });
    let up_to_date = state.ensured.get(&uid) == Some(&spec) && reported_ready;
    if up_to_date && !full && quota_reported {
        return true;
    }

    let homes = ctx.homes.clone();
    let to_ensure = spec.clone();
    let ensured = tokio::task::spawn_blocking(move || homes.ensure(&to_ensure))
        .await
        .unwrap_or_else(|e| {
            Err(HomeError::Io {
                path: ctx.homes.root().to_owned(),
                op: "ensure",
                source: std::io::Error::other(e.to_string()),
            })
        });
    let mut desired = Vec::new();
    let ready = match ensured {
        Ok(report) => {
            if !report.unchanged() {
                let changes: Vec<String> = report.changes.iter().map(|c| c.to_string()).collect();
                info!(uid, changes = %changes.join("; "), "home updated");
            }
            if let Some(path) = &report.unexpected_distros {
                warn!(uid, path = %path.display(), "a container that is not a storage container has a distros entry; left alone");
            }
            let keys = keys_condition(&report.keys);
            if let Err(error) = &report.keys {
                warn!(uid, %error, "sshKeys not applied; the home and its container are not affected");
            } else {
                // Only a home whose keys are right is skipped until the next resync; a key
                // problem (say, a hand-made file the customer is about to remove) is retried.
                state.ensured.insert(uid, spec);
            }
            desired.push(DesiredCondition::new(
                HOME_READY,
                true,
                HOME_READY_REASON,
                format!("home {} is ready", report.home.display()),
            ));
            desired.push(keys);
            true
        }
        Err(error) => {
            state.ensured.remove(&uid);
            desired.push(DesiredCondition::new(
                HOME_READY,
                false,
                home_error_reason(&error),
                error.to_string(),
            ));
            false
        }
    };
    // The last result, not the cache's: a cached Container older than the agent's last write
    // would have the field dropped by an apply that leaves it out.
    let mut storage_used = state
        .measured
        .get(&uid)
        .and_then(|m| m.found.as_ref())
        .map(|(_, used)| *used);
    if ready {
        let found = match &last {
            Some(last) if !full => last.found.clone(),
            _ => {
                let found = measure(ctx, container, uid).await;
                // A failed walk keeps the previous result for the same limits (and the
                // condition that says it).
                let kept = last.and_then(|m| m.found);
                state.measured.insert(
                    uid,
                    Measurement {
                        limits,
                        found: found.clone().or(kept),
                    },
                );
                found
            }
        };
        if let Some((quota, used_mb)) = found {
            desired.push(quota);
            storage_used = Some(used_mb);
            ctx.metrics.set_home_storage_used(
                &container.namespace().unwrap_or_default(),
                &container.name_any(),
                used_mb,
            );
        }
    }
    write(ctx, container, &desired, storage_used).await;
    ready
}

/// `StorageWithinQuota` from one walk of the home; `None` when the walk failed (logged, and
/// the previous condition stands).
async fn measure(
    ctx: &Context,
    container: &Container,
    uid: u32,
) -> Option<(DesiredCondition, i64)> {
    let homes = ctx.homes.clone();
    let usage = match tokio::task::spawn_blocking(move || homes.usage(uid)).await {
        Ok(Ok(usage)) => usage,
        Ok(Err(error)) => {
            warn!(uid, %error, "could not measure the home's storage use");
            return None;
        }
        Err(error) => {
            warn!(uid, %error, "storage measurement task failed");
            return None;
        }
    };
    let storage_mb = u64::try_from(container.spec.storage).unwrap_or(0);
    let threshold = u32::try_from(container.spec.quota_threshold).unwrap_or(0);
    let used_mb = usage.bytes.div_ceil(MIB);
    let at_least = if usage.truncated { "at least " } else { "" };
    let message =
        format!("uses {at_least}{used_mb} MB of {storage_mb} MB (warning at {threshold}%)");
    let condition = if threshold_crossed(usage.bytes, storage_mb, threshold) {
        DesiredCondition::new(
            STORAGE_WITHIN_QUOTA,
            false,
            QUOTA_THRESHOLD_REACHED,
            message,
        )
    } else {
        DesiredCondition::new(STORAGE_WITHIN_QUOTA, true, "WithinQuota", message)
    };
    Some((condition, i64::try_from(used_mb).unwrap_or(i64::MAX)))
}

/// `KeysReady` from what became of the keys.
fn keys_condition(keys: &Result<KeysOutcome, HomeError>) -> DesiredCondition {
    let (status, reason, message) = match keys {
        Ok(KeysOutcome::Applied { keys: 0 }) => (
            true,
            KEYS_APPLIED_REASON,
            "no sshKeys, and no authorized_keys written by the operator".to_owned(),
        ),
        Ok(KeysOutcome::Applied { keys }) => (
            true,
            KEYS_APPLIED_REASON,
            format!("{keys} key(s) in .ssh/authorized_keys"),
        ),
        Ok(KeysOutcome::HandMade) => (
            true,
            "HandMadeKeysKept",
            "no sshKeys; .ssh/authorized_keys was written in the container and is left as it is"
                .to_owned(),
        ),
        Err(error) => (false, home_error_reason(error), error.to_string()),
    };
    DesiredCondition::new(KEYS_READY, status, reason, message)
}

fn home_error_reason(error: &HomeError) -> &'static str {
    match error {
        HomeError::Symlink { .. } => "SymlinkRefused",
        HomeError::NotADirectory { .. } | HomeError::NotARegularFile { .. } => "UnexpectedFileType",
        HomeError::Path(_) => "InvalidPath",
        HomeError::InvalidSshKey(_) => "InvalidSshKey",
        HomeError::HandMadeKeys { .. } => "HandMadeKeysFile",
        HomeError::MountPoint { .. } => "MountPointRefused",
        HomeError::ArchiveExists { .. } => "ArchiveExists",
        HomeError::NotOwned { .. } => "NotOwned",
        HomeError::NotFound { .. } | HomeError::NotEmpty { .. } | HomeError::Io { .. } => {
            "HomeFailed"
        }
    }
}

/// Applies `homeRetention` to a deleted Container's home once its workload is stopped.
async fn release(ctx: &Context, state: &mut HomesState, container: &Container, uid: u32) {
    let conditions = container.conditions();
    if condition::find(conditions, HOME_READY).is_some_and(|c| c.reason == HOME_RELEASED_REASON) {
        return;
    }
    if condition::find(conditions, RUNNING).is_some_and(|c| c.reason != STOPPED_REASON) {
        // The controller is still stopping the Pod, which may be writing into the home.
        return;
    }
    state.ensured.remove(&uid);
    state.measured.remove(&uid);
    let desired = match state.released.get(&uid) {
        Some(done) => done.clone(),
        None => {
            let homes = ctx.homes.clone();
            let retention = match ctx.config.home_retention {
                HomeRetention::Retain => Retention::Retain,
                HomeRetention::Archive => Retention::Archive,
                HomeRetention::Delete => Retention::Delete,
            };
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let outcome = tokio::task::spawn_blocking(move || homes.archive(uid, retention, now))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match outcome {
                Ok(outcome) => {
                    let message = match outcome {
                        ArchiveOutcome::Archived { to } => format!("archived to {}", to.display()),
                        ArchiveOutcome::Retained { home } => {
                            format!("retained at {}", home.display())
                        }
                        ArchiveOutcome::Deleted { home } => format!("deleted {}", home.display()),
                        ArchiveOutcome::AlreadyGone => "no home left to release".to_owned(),
                    };
                    info!(uid, %message, "home released");
                    let done =
                        DesiredCondition::new(HOME_READY, false, HOME_RELEASED_REASON, message);
                    state.released.insert(uid, done.clone());
                    done
                }
                Err(error) => {
                    warn!(uid, %error, "could not release the home");
                    DesiredCondition::new(HOME_READY, false, "ReleaseFailed", error)
                }
            }
        }
    };
    ctx.metrics.forget_home(
        &container.namespace().unwrap_or_default(),
        &container.name_any(),
    );
    write(ctx, container, std::slice::from_ref(&desired), None).await;
}

/// Writes the conditions; publishes an Event when a problem appears or the quota threshold is
/// crossed (only on the write that changes the condition, so a persisting problem is one Event).
/// `storage_used` is a new measurement (MB); without one the last stays (the agent owns the
/// field: a write that left it out would remove it).
async fn write(
    ctx: &Context,
    container: &Container,
    desired: &[DesiredCondition],
    storage_used: Option<i64>,
) {
    let before = container
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let current_used = container.status.as_ref().and_then(|s| s.storage_used);
    let used = storage_used.or(current_used);
    let mut fields = serde_json::Map::new();
    if let Some(used) = used {
        fields.insert("storageUsed".into(), serde_json::json!(used));
    }
    match ctx
        .reporter
        .status(container, OWNED, desired, fields, used == current_used)
        .await
    {
        Ok(true) => {
            let reference = container.object_ref(&());
            for want in desired {
                let previous = condition::find(&before, want.type_);
                let changed = previous.is_none_or(|c| c.reason != want.reason);
                if !changed {
                    continue;
                }
                if !want.status && want.reason != HOME_RELEASED_REASON {
                    ctx.reporter
                        .warning(&reference, &want.reason, "Reconcile", want.message.clone())
                        .await;
                } else if want.reason == HOME_RELEASED_REASON {
                    ctx.reporter
                        .normal(
                            &reference,
                            &want.reason,
                            "ReleaseHome",
                            want.message.clone(),
                        )
                        .await;
                }
            }
        }
        Ok(false) => {}
        Err(error) => warn!(
            %error,
            container = %container.name_any(),
            namespace = container.namespace().unwrap_or_default(),
            "could not report the home's conditions"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    fn container(ns: &str, name: &str, created: i64, uid: Option<i64>) -> Arc<Container> {
        let mut c: Container = serde_json::from_value(json!({
            "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"server": "n1", "memory": 1, "storage": 1},
            "status": {"uid": uid, "server": "n1", "reserved": {"memory": 1, "storage": 1}},
        }))
        .unwrap();
        c.metadata.creation_timestamp = Some(Time(jiff::Timestamp::from_second(created).unwrap()));
        Arc::new(c)
    }

    #[test]
    fn a_home_already_ready_keeps_its_uid_whatever_the_names_and_times() {
        let mut victim = (*container("zeta", "victim", 10, Some(30001))).clone();
        victim.status.as_mut().unwrap().conditions = vec![
            serde_json::from_value(json!({
            "type": "HomeReady", "status": "True", "reason": "HomeReady", "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}))
            .unwrap(),
        ];
        // Created in the same second, with a name that sorts first.
        let seconds =
            second_claims(&[container("aaa", "thief", 10, Some(30001)), Arc::new(victim)]);
        assert_eq!(seconds.len(), 1);
        assert_eq!(seconds[&("aaa".into(), "thief".into())], "zeta/victim");
    }

    #[test]
    fn the_first_claim_of_a_uid_keeps_it_and_later_ones_get_nothing() {
        let seconds = second_claims(&[
            container("mallory", "thief", 20, Some(30001)),
            container("acme", "victim", 10, Some(30001)),
            container("acme", "other", 5, Some(30002)),
            container("acme", "unplaced", 1, None),
            container("bob", "thief-2", 30, Some(30001)),
        ]);
        assert_eq!(seconds.len(), 2, "{seconds:?}");
        assert_eq!(seconds[&("mallory".into(), "thief".into())], "acme/victim");
        assert_eq!(seconds[&("bob".into(), "thief-2".into())], "acme/victim");
    }
}
