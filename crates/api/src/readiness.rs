//! `Ready` and `Stalled`: one verdict per object, for people and for GitOps tools.
//!
//! kstatus (what Flux, Helm 4's `--wait` and Argo CD's defaults read) looks at
//! `status.observedGeneration`, then `Stalled`, then `Ready`. Each kind's own conditions say
//! what part of the job is done (the controller's `Admitted`, the agent's `HomeReady`, ...);
//! this module sums them up:
//!
//! - `Ready=True` when every condition the object needs is `True` *for its current
//!   generation*;
//! - else `Ready=False` with the reason and message of the first condition that is not, in the
//!   order a person would look (admission before the home before the workload);
//! - `Stalled=True` as well when that reason is one only a person can fix (a server the customer
//!   does not own, a reserved port, a distro on another server, ...). `Stalled` is left out
//!   otherwise: kstatus reads an absent `Stalled` as "not stalled".
//!
//! Waiting for something the system does by itself (a condition not reported yet, a generation
//! not observed yet, a Pod starting) is progress, never a stall.
//!
//! Pure: no I/O, only the object as it is.

use crate::condition::{
    ACCEPTED, ADMITTED, AVAILABLE, Condition, HOME_READY, HasConditions, KEYS_READY, PROGRAMMED,
    RUNNING, find,
};
use crate::{Container, CustomDistro, PortMapping};

/// `Stalled`: the object cannot progress until a person changes something.
pub const STALLED: &str = "Stalled";

/// `Ready=True`'s reason.
pub const READY_REASON: &str = "Ready";
/// `Ready=False` while a needed condition is not reported yet.
pub const WAITING_REASON: &str = "Waiting";
/// `Ready=False` while a needed condition describes an older generation of the object.
pub const RECONCILING_REASON: &str = "Reconciling";
/// `Ready=False` while the object is being deleted.
pub const TERMINATING_REASON: &str = "Terminating";

/// One condition to set: truth, reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// True or False.
    pub status: bool,
    /// CamelCase reason.
    pub reason: String,
    /// For a person.
    pub message: String,
}

/// `Ready`, and `Stalled` when only a person can help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The `Ready` condition.
    pub ready: Verdict,
    /// `Stalled=True`, or `None` (the condition is removed).
    pub stalled: Option<Verdict>,
}

/// A condition an object needs for `Ready`: its type, who reports it, and the `False` reasons
/// that only a person can fix.
#[derive(Debug, Clone, Copy)]
struct Need {
    type_: &'static str,
    reporter: &'static str,
    stalls: &'static [&'static str],
}

const CONTROLLER: &str = "the controller";
const AGENT: &str = "the server's agent";

/// Admission refusals: the customer or the supplier must change a spec (or free room).
const ADMITTED_STALLS: &[&str] = &[
    "ServerUnknown",
    "ServerNotOwned",
    "AmbiguousServer",
    "InsufficientMemory",
    "InsufficientStorage",
    "UidUnavailable",
];
/// What the agent refuses to build a home over.
const HOME_STALLS: &[&str] = &[
    "SymlinkRefused",
    "UnexpectedFileType",
    "InvalidPath",
    "MountPointRefused",
    "ArchiveExists",
    "NotOwned",
];
/// A workload that cannot be built from this spec and this operator configuration.
const RUNNING_STALLS: &[&str] = &[
    "UnknownDistro",
    "NoCustomDistroImage",
    "InvalidUid",
    "InvalidHome",
    "StorageContainerCannotUseCustomDistro",
    "CustomDistroOfOtherCustomer",
    "CustomDistroOnOtherServer",
];
const KEYS_STALLS: &[&str] = &["InvalidSshKey", "HandMadeKeysFile", "SymlinkRefused"];
/// Port refusals by the controller (ownership, policy, a port another mapping holds).
const ACCEPTED_MAPPING_STALLS: &[&str] = &[
    "ServerNotOwned",
    "PortOutOfRange",
    "ReservedPort",
    "PortInUse",
];
/// Port refusals by the agent: its own policy check, a socket of the node on the port, a
/// target that may never be forwarded to.
const PROGRAMMED_STALLS: &[&str] = &[
    "PortOutOfRange",
    "ReservedPort",
    "HostListening",
    "InvalidTarget",
    "PortConflict",
];
const ACCEPTED_DISTRO_STALLS: &[&str] = &["InvalidPath", "NotAStorageContainer"];
/// A tree on the server that is not a distro the operator may mount.
const AVAILABLE_STALLS: &[&str] = &[
    "Symlink",
    "NotADirectory",
    "NotOwned",
    "InvalidPath",
    "NoUwsgi",
];
/// Server: `Ready` is the admission pass's own; a ledger over capacity needs the supplier.
const SERVER_STALLS: &[&str] = &["Overcommitted"];
/// Customer: `Ready` is its reconciler's own; a namespace it may never have needs a new spec.
const CUSTOMER_STALLS: &[&str] = &["NamespaceClaimed", "NamespaceNotCustomers"];

/// The summary of a Container: admitted, home ready, running (with a distro), keys applied.
/// `StorageWithinQuota` is a warning threshold, not a failure, and is left out.
pub fn container(container: &Container) -> Summary {
    let runs_workload = container.spec.distro.is_some() || container.spec.custom_distro.is_some();
    let mut needs = vec![
        Need {
            type_: ADMITTED,
            reporter: CONTROLLER,
            stalls: ADMITTED_STALLS,
        },
        Need {
            type_: HOME_READY,
            reporter: AGENT,
            stalls: HOME_STALLS,
        },
    ];
    if runs_workload {
        needs.push(Need {
            type_: RUNNING,
            reporter: CONTROLLER,
            stalls: RUNNING_STALLS,
        });
    }
    needs.push(Need {
        type_: KEYS_READY,
        reporter: AGENT,
        stalls: KEYS_STALLS,
    });
    summarise(container, &needs)
}

/// The summary of a PortMapping: the port is its own, and the forward is programmed.
pub fn port_mapping(mapping: &PortMapping) -> Summary {
    summarise(
        mapping,
        &[
            Need {
                type_: ACCEPTED,
                reporter: CONTROLLER,
                stalls: ACCEPTED_MAPPING_STALLS,
            },
            Need {
                type_: PROGRAMMED,
                reporter: AGENT,
                stalls: PROGRAMMED_STALLS,
            },
        ],
    )
}

/// The summary of a CustomDistro: accepted, and its tree on the server checked.
pub fn custom_distro(distro: &CustomDistro) -> Summary {
    summarise(
        distro,
        &[
            Need {
                type_: ACCEPTED,
                reporter: CONTROLLER,
                stalls: ACCEPTED_DISTRO_STALLS,
            },
            Need {
                type_: AVAILABLE,
                reporter: AGENT,
                stalls: AVAILABLE_STALLS,
            },
        ],
    )
}

/// `Stalled` for a Server whose `Ready` (written by the admission pass) has this reason.
pub fn server_stalled(ready: &Verdict) -> Option<Verdict> {
    stalled_by(ready, SERVER_STALLS)
}

/// `Stalled` for a Customer whose `Ready` has this reason.
pub fn customer_stalled(ready: &Verdict) -> Option<Verdict> {
    stalled_by(ready, CUSTOMER_STALLS)
}

fn stalled_by(ready: &Verdict, stalls: &[&str]) -> Option<Verdict> {
    (!ready.status && stalls.contains(&ready.reason.as_str())).then(|| Verdict {
        status: true,
        reason: ready.reason.clone(),
        message: ready.message.clone(),
    })
}

/// The kinds this module summarises, for code that handles them alike.
pub trait Summarised: HasConditions + kube::Resource {
    /// `Ready` and `Stalled` of this object as it is.
    fn summary(&self) -> Summary;
    /// `status.observedGeneration`: the generation the summary was last written for. kstatus
    /// reads the summary only once this equals `metadata.generation`, so only the summary's
    /// writer sets it.
    fn observed_generation(&self) -> Option<i64>;
}

impl Summarised for Container {
    fn summary(&self) -> Summary {
        container(self)
    }
    fn observed_generation(&self) -> Option<i64> {
        self.status.as_ref().and_then(|s| s.observed_generation)
    }
}

impl Summarised for PortMapping {
    fn summary(&self) -> Summary {
        port_mapping(self)
    }
    fn observed_generation(&self) -> Option<i64> {
        self.status.as_ref().and_then(|s| s.observed_generation)
    }
}

impl Summarised for CustomDistro {
    fn summary(&self) -> Summary {
        custom_distro(self)
    }
    fn observed_generation(&self) -> Option<i64> {
        self.status.as_ref().and_then(|s| s.observed_generation)
    }
}

fn summarise<K: HasConditions + kube::Resource>(object: &K, needs: &[Need]) -> Summary {
    let generation = object.meta().generation;
    if object.meta().deletion_timestamp.is_some() {
        return not_ready(TERMINATING_REASON, "the object is being deleted".into());
    }
    let conditions = object.conditions();
    for need in needs {
        let Some(condition) = find(conditions, need.type_) else {
            return not_ready(
                WAITING_REASON,
                format!("waiting for {} to report {}", need.reporter, need.type_),
            );
        };
        if is_stale(condition, generation) {
            return not_ready(
                RECONCILING_REASON,
                format!(
                    "{} describes generation {} of the object; waiting for {} to observe generation {}",
                    need.type_,
                    condition
                        .observed_generation
                        .map_or_else(|| "(none)".to_owned(), |g| g.to_string()),
                    need.reporter,
                    generation.unwrap_or_default()
                ),
            );
        }
        if condition.status == "True" {
            continue;
        }
        // The reason is in the message too: kstatus and Argo CD show only the message.
        let message = format!(
            "{}={} ({}): {}",
            need.type_, condition.status, condition.reason, condition.message
        );
        let stalled = need
            .stalls
            .contains(&condition.reason.as_str())
            .then(|| Verdict {
                status: true,
                reason: condition.reason.clone(),
                message: message.clone(),
            });
        return Summary {
            ready: Verdict {
                status: false,
                reason: condition.reason.clone(),
                message,
            },
            stalled,
        };
    }
    let names: Vec<&str> = needs.iter().map(|n| n.type_).collect();
    Summary {
        ready: Verdict {
            status: true,
            reason: READY_REASON.into(),
            message: format!("{} are True", names.join(", ")),
        },
        stalled: None,
    }
}

fn not_ready(reason: &str, message: String) -> Summary {
    Summary {
        ready: Verdict {
            status: false,
            reason: reason.into(),
            message,
        },
        stalled: None,
    }
}

/// A condition written for another generation than the object's says nothing about the
/// current spec.
fn is_stale(condition: &Condition, generation: Option<i64>) -> bool {
    generation.is_some() && condition.observed_generation != generation
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ContainerSpec, ContainerStatus, PortMappingSpec, PortMappingStatus, Protocol};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn condition(type_: &str, status: bool, reason: &str, generation: i64) -> Condition {
        Condition {
            type_: type_.into(),
            status: if status { "True" } else { "False" }.into(),
            reason: reason.into(),
            message: format!("{reason} says so"),
            observed_generation: Some(generation),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }
    }

    fn container_with(distro: Option<&str>, conditions: Vec<Condition>) -> Container {
        let mut c = Container::new(
            "web",
            ContainerSpec {
                server: "server-1".into(),
                memory: 100,
                storage: 1000,
                distro: distro.map(Into::into),
                custom_distro: None,
                custom_distros_storage: false,
                ssh_keys: vec![],
                tags: vec![],
                note: None,
                quota_threshold: 90,
                restarted_at: None,
            },
        );
        c.metadata.generation = Some(2);
        c.status = Some(ContainerStatus {
            conditions,
            ..Default::default()
        });
        c
    }

    fn all_fine(generation: i64) -> Vec<Condition> {
        vec![
            condition(ADMITTED, true, "Admitted", generation),
            condition(HOME_READY, true, "HomeReady", generation),
            condition(RUNNING, true, "PodRunning", generation),
            condition(KEYS_READY, true, "KeysApplied", generation),
        ]
    }

    #[test]
    fn a_container_with_everything_true_is_ready() {
        let summary = container(&container_with(Some("bookworm"), all_fine(2)));
        assert!(summary.ready.status);
        assert_eq!(summary.ready.reason, READY_REASON);
        assert_eq!(summary.stalled, None);
    }

    #[test]
    fn no_status_at_all_is_waiting_not_stalled() {
        let mut c = container_with(None, vec![]);
        c.status = None;
        let summary = container(&c);
        assert!(!summary.ready.status);
        assert_eq!(summary.ready.reason, WAITING_REASON);
        assert!(summary.ready.message.contains("Admitted"), "{summary:?}");
        assert_eq!(summary.stalled, None);
    }

    #[test]
    fn running_is_needed_only_with_a_workload() {
        let mut conditions = all_fine(2);
        conditions.retain(|c| c.type_ != RUNNING);
        assert!(
            container(&container_with(None, conditions.clone()))
                .ready
                .status
        );
        let summary = container(&container_with(Some("bookworm"), conditions));
        assert_eq!(summary.ready.reason, WAITING_REASON);
        assert!(summary.ready.message.contains(RUNNING));
    }

    #[test]
    fn the_first_condition_that_is_not_fine_gives_the_reason() {
        let mut conditions = all_fine(2);
        conditions[1] = condition(HOME_READY, false, "SymlinkRefused", 2);
        conditions[2] = condition(RUNNING, false, "WaitingForHome", 2);
        let summary = container(&container_with(Some("bookworm"), conditions));
        assert_eq!(summary.ready.reason, "SymlinkRefused");
        assert_eq!(
            summary.ready.message,
            "HomeReady=False (SymlinkRefused): SymlinkRefused says so"
        );
        let stalled = summary.stalled.expect("a person must remove the symlink");
        assert!(stalled.status);
        assert_eq!(stalled.reason, "SymlinkRefused");
    }

    #[test]
    fn every_refusal_of_admission_stalls_and_waiting_does_not() {
        for reason in ADMITTED_STALLS {
            let mut conditions = all_fine(2);
            conditions[0] = condition(ADMITTED, false, reason, 2);
            let summary = container(&container_with(None, conditions));
            assert_eq!(summary.ready.reason, *reason);
            assert!(summary.stalled.is_some(), "{reason} should stall");
        }
        let mut conditions = all_fine(2);
        conditions[2] = condition(RUNNING, false, "PodPending", 2);
        let summary = container(&container_with(Some("bookworm"), conditions));
        assert_eq!(summary.ready.reason, "PodPending");
        assert_eq!(summary.stalled, None, "a starting Pod is progress");
    }

    #[test]
    fn a_condition_of_an_older_generation_is_not_ready_yet() {
        let mut conditions = all_fine(2);
        conditions[3] = condition(KEYS_READY, true, "KeysApplied", 1);
        let summary = container(&container_with(None, conditions));
        assert!(!summary.ready.status);
        assert_eq!(summary.ready.reason, RECONCILING_REASON);
        assert!(
            summary.ready.message.contains("generation 1") && summary.ready.message.contains("2"),
            "{summary:?}"
        );
        assert_eq!(summary.stalled, None);
    }

    #[test]
    fn a_stale_refusal_does_not_stall() {
        // The customer fixed the spec; the old refusal no longer speaks for it.
        let mut conditions = all_fine(2);
        conditions[0] = condition(ADMITTED, false, "InsufficientMemory", 1);
        let summary = container(&container_with(None, conditions));
        assert_eq!(summary.ready.reason, RECONCILING_REASON);
        assert_eq!(summary.stalled, None);
    }

    #[test]
    fn a_container_being_deleted_is_terminating() {
        let mut c = container_with(None, all_fine(2));
        c.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let summary = container(&c);
        assert_eq!(summary.ready.reason, TERMINATING_REASON);
        assert_eq!(summary.stalled, None);
    }

    fn mapping_with(conditions: Vec<Condition>) -> PortMapping {
        let mut m = PortMapping::new(
            "web",
            PortMappingSpec {
                container: "web".into(),
                proto: Protocol::Tcp,
                public_port: 9000,
                private_port: 8000,
            },
        );
        m.metadata.generation = Some(1);
        m.status = Some(PortMappingStatus {
            conditions,
            ..Default::default()
        });
        m
    }

    #[test]
    fn a_mapping_needs_acceptance_then_programming() {
        let accepted = condition(ACCEPTED, true, "Accepted", 1);
        let summary = port_mapping(&mapping_with(vec![accepted.clone()]));
        assert_eq!(summary.ready.reason, WAITING_REASON);
        assert!(summary.ready.message.contains("agent"));
        let programmed = condition(PROGRAMMED, true, "Programmed", 1);
        assert!(
            port_mapping(&mapping_with(vec![accepted.clone(), programmed]))
                .ready
                .status
        );
        for (reason, stalls) in [
            ("PortInUse", true),
            ("ReservedPort", true),
            ("ContainerNotAdmitted", false),
            ("ContainerNotFound", false),
        ] {
            let summary = port_mapping(&mapping_with(vec![condition(ACCEPTED, false, reason, 1)]));
            assert_eq!(summary.ready.reason, reason);
            assert_eq!(summary.stalled.is_some(), stalls, "{reason}");
        }
        for (reason, stalls) in [
            ("HostListening", true),
            ("TargetUnverified", false),
            ("SyncFailed", false),
            ("WaitingForTarget", false),
        ] {
            let summary = port_mapping(&mapping_with(vec![
                accepted.clone(),
                condition(PROGRAMMED, false, reason, 1),
            ]));
            assert_eq!(summary.stalled.is_some(), stalls, "{reason}");
        }
    }

    #[test]
    fn servers_and_customers_stall_only_on_what_a_person_must_fix() {
        let verdict = |status: bool, reason: &str| Verdict {
            status,
            reason: reason.into(),
            message: "m".into(),
        };
        assert!(server_stalled(&verdict(false, "Overcommitted")).is_some());
        assert!(server_stalled(&verdict(false, "NodeMissing")).is_none());
        assert!(server_stalled(&verdict(true, "Admitting")).is_none());
        assert!(customer_stalled(&verdict(false, "NamespaceClaimed")).is_some());
        assert!(customer_stalled(&verdict(false, "NamespaceNotCustomers")).is_some());
        assert!(customer_stalled(&verdict(false, "HasContainers")).is_none());
    }
}
