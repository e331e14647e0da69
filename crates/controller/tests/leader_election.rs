//! Two replicas with Lease leader election: exactly one acts, and when it dies the other takes
//! over. A test binary of its own, because it owns the controllers' lives.

mod support;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use serde_json::json;
use support::*;
use uwsgi_it_api::Container;
use uwsgi_it_testbed::control_plane::ControlPlane;

fn holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref()?.holder_identity.clone()
}

#[tokio::test]
async fn one_replica_leads_and_a_standby_takes_over_when_it_dies() {
    let plane = tokio::task::spawn_blocking(ControlPlane::shared)
        .await
        .unwrap();
    plane.install_crds(&uwsgi_it_api::crds()).await.unwrap();
    let client = plane.client().await.unwrap();
    let system = plane.namespace("uwsgi-it-system").await.unwrap();
    server_node(&client, "elected-1", 4000, 100000, "203.0.113.50").await;

    let first = RunningController::start_elected(plane, system.clone(), "replica-a");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &system);
    let lease = wait_for(&leases, uwsgi_it_controller::LEASE_NAME, |l| {
        holder(l).is_some()
    })
    .await;
    assert_eq!(holder(&lease).as_deref(), Some("replica-a"));
    let second = RunningController::start_elected(plane, system.clone(), "replica-b");

    customer(&client, "elected", &["elected-1"], &[]).await;
    let containers: Api<Container> = Api::namespaced(client.clone(), "elected");
    let before = container(
        "before",
        json!({"server": "elected-1", "memory": 100, "storage": 100}),
    );
    containers
        .create(&PostParams::default(), &before)
        .await
        .unwrap();
    wait_for(&containers, "before", admitted).await;
    let lease = leases.get(uwsgi_it_controller::LEASE_NAME).await.unwrap();
    assert_eq!(
        holder(&lease).as_deref(),
        Some("replica-a"),
        "the standby did not take over while the leader lives"
    );

    // The leader dies without releasing the Lease; the standby takes over once it expires.
    first.kill();
    let after = container(
        "after",
        json!({"server": "elected-1", "memory": 100, "storage": 100}),
    );
    containers
        .create(&PostParams::default(), &after)
        .await
        .unwrap();
    wait_for(&containers, "after", admitted).await;
    let lease = leases.get(uwsgi_it_controller::LEASE_NAME).await.unwrap();
    assert_eq!(holder(&lease).as_deref(), Some("replica-b"));
    let uids: Vec<i64> = [
        containers.get("before").await.unwrap(),
        containers.get("after").await.unwrap(),
    ]
    .iter()
    .map(|c| c.status.as_ref().unwrap().uid.unwrap())
    .collect();
    assert!(
        uids[1] > uids[0],
        "the new leader continues the uid sequence: {uids:?}"
    );
    drop(second);
}
