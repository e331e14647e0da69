//! `uwsgi-it-operator check`: whether an install answers, as `helm test` asks it: every CRD of
//! this API established, a controller replica leading (a Lease renewed within its duration),
//! every agent of the DaemonSet ready (the agent is ready once its caches synced and its first
//! forwarding sync succeeded; its liveness fails when syncs stop).
//!
//! Retries until everything holds or the time is up, then prints what held and what did not.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;

/// What `check` looks at.
pub struct Target {
    /// The release namespace: the controller's Lease and the agent DaemonSet are there.
    pub namespace: String,
    /// The agent DaemonSet's name.
    pub agent_daemonset: String,
    /// How long to keep trying.
    pub timeout: Duration,
}

/// Runs the checks until all pass (Ok) or `timeout` (Err, naming every failing check).
pub async fn run(client: kube::Client, target: Target) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + target.timeout;
    loop {
        let problems = problems(&client, &target).await;
        if problems.is_empty() {
            println!("ok: every CRD established, a controller leading, every agent ready");
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            for problem in &problems {
                println!("not ok: {problem}");
            }
            anyhow::bail!(
                "{} check(s) failed after {:?}",
                problems.len(),
                target.timeout
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn problems(client: &kube::Client, target: &Target) -> Vec<String> {
    let mut problems = Vec::new();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for wanted in uwsgi_it_api::crds() {
        let name = wanted.metadata.name.clone().unwrap_or_default();
        match crds.get(&name).await {
            Ok(crd) => problems.extend(crd_problem(&crd, &wanted)),
            Err(e) => problems.push(format!("CRD {name}: {e}")),
        }
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), &target.namespace);
    match leases.get(uwsgi_it_controller::LEASE_NAME).await {
        Ok(lease) => problems.extend(lease_problem(&lease, Timestamp::now())),
        Err(e) => problems.push(format!(
            "Lease {}/{}: {e}",
            target.namespace,
            uwsgi_it_controller::LEASE_NAME
        )),
    }
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), &target.namespace);
    match daemonsets.get(&target.agent_daemonset).await {
        Ok(daemonset) => problems.extend(daemonset_problem(&daemonset)),
        Err(e) => problems.push(format!(
            "DaemonSet {}/{}: {e}",
            target.namespace, target.agent_daemonset
        )),
    }
    problems
}

/// Why the served CRD is not usable as this binary's: not established, or without a version
/// this binary serves.
pub fn crd_problem(
    crd: &CustomResourceDefinition,
    wanted: &CustomResourceDefinition,
) -> Option<String> {
    let name = crd.metadata.name.clone().unwrap_or_default();
    let established = crd
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
    if !established {
        return Some(format!("CRD {name} is not Established"));
    }
    for version in &wanted.spec.versions {
        let served = crd
            .spec
            .versions
            .iter()
            .any(|v| v.name == version.name && v.served);
        if !served {
            return Some(format!("CRD {name} does not serve {}", version.name));
        }
    }
    None
}

/// Why nobody leads: no holder, or a holder that stopped renewing.
pub fn lease_problem(lease: &Lease, now: Timestamp) -> Option<String> {
    let spec = lease.spec.as_ref();
    let holder = spec
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default();
    if holder.is_empty() {
        return Some("no controller replica holds the Lease".into());
    }
    let duration = spec
        .and_then(|s| s.lease_duration_seconds)
        .unwrap_or(15)
        .max(1);
    let Some(renewed) = spec.and_then(|s| s.renew_time.as_ref()) else {
        return Some(format!("the Lease's holder {holder} never renewed it"));
    };
    let age = now.duration_since(renewed.0).as_secs();
    (age > i64::from(duration)).then(|| {
        format!("the Lease's holder {holder} last renewed it {age}s ago (duration {duration}s)")
    })
}

/// Why not every agent is ready (or none is scheduled at all).
pub fn daemonset_problem(daemonset: &DaemonSet) -> Option<String> {
    let name = daemonset.metadata.name.clone().unwrap_or_default();
    let Some(status) = &daemonset.status else {
        return Some(format!("DaemonSet {name} has no status yet"));
    };
    if status.observed_generation != daemonset.metadata.generation {
        return Some(format!("DaemonSet {name} is being rolled out"));
    }
    if status.desired_number_scheduled == 0 {
        return Some(format!(
            "DaemonSet {name} runs on no node (agent.nodeSelector matches none)"
        ));
    }
    let updated = status.updated_number_scheduled.unwrap_or(0);
    (status.number_ready < status.desired_number_scheduled
        || updated < status.desired_number_scheduled)
        .then(|| {
            format!(
                "{} of {} agents ready ({updated} updated): an agent has not synced its server yet",
                status.number_ready, status.desired_number_scheduled
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DaemonSetStatus;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: Option<&str>, renewed: Option<Timestamp>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                lease_duration_seconds: Some(15),
                renew_time: renewed.map(MicroTime),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn a_lease_is_led_only_by_a_holder_that_renews() {
        let now: Timestamp = "2026-12-02T10:00:00Z".parse().unwrap();
        let fresh: Timestamp = "2026-12-02T09:59:55Z".parse().unwrap();
        let stale: Timestamp = "2026-12-02T09:59:00Z".parse().unwrap();
        assert_eq!(lease_problem(&lease(Some("a"), Some(fresh)), now), None);
        assert!(
            lease_problem(&lease(Some("a"), Some(stale)), now)
                .unwrap()
                .contains("60s ago")
        );
        assert!(lease_problem(&lease(None, Some(fresh)), now).is_some());
        assert!(lease_problem(&lease(Some(""), Some(fresh)), now).is_some());
        assert!(lease_problem(&lease(Some("a"), None), now).is_some());
    }

    fn daemonset(desired: i32, ready: i32, updated: i32) -> DaemonSet {
        let mut d = DaemonSet::default();
        d.metadata.generation = Some(2);
        d.status = Some(DaemonSetStatus {
            desired_number_scheduled: desired,
            number_ready: ready,
            updated_number_scheduled: Some(updated),
            observed_generation: Some(2),
            ..DaemonSetStatus::default()
        });
        d
    }

    #[test]
    fn every_scheduled_agent_must_be_ready_and_updated() {
        assert_eq!(daemonset_problem(&daemonset(2, 2, 2)), None);
        assert!(
            daemonset_problem(&daemonset(2, 1, 2))
                .unwrap()
                .contains("1 of 2")
        );
        assert!(daemonset_problem(&daemonset(2, 2, 1)).is_some());
        assert!(
            daemonset_problem(&daemonset(0, 0, 0))
                .unwrap()
                .contains("no node")
        );
        let mut rolling = daemonset(2, 2, 2);
        rolling.metadata.generation = Some(3);
        assert!(daemonset_problem(&rolling).unwrap().contains("rolled out"));
    }

    #[test]
    fn a_crd_must_be_established_and_serve_our_versions() {
        let wanted = uwsgi_it_api::crds().remove(0);
        let mut served = wanted.clone();
        assert!(
            crd_problem(&served, &wanted)
                .unwrap()
                .contains("Established")
        );
        served.status = Some(
            serde_json::from_value(serde_json::json!({
                "conditions": [{"type": "Established", "status": "True"}]
            }))
            .unwrap(),
        );
        assert_eq!(crd_problem(&served, &wanted), None);
        served.spec.versions[0].served = false;
        assert!(
            crd_problem(&served, &wanted)
                .unwrap()
                .contains("does not serve")
        );
    }
}
