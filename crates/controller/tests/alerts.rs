//! The chart's controller alerts, evaluated by Prometheus' own engine (`hack/alertcheck`) on
//! scrapes of this binary's controller `/metrics` as it goes through the states they are about:
//! a standby that leads nothing yet, a healthy controller (nothing fires), a server nearly full,
//! a server overcommitted, admissions failing closed. Its own binary: it holds the Lease of its
//! controller and deletes its uid record.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::*;
use uwsgi_it_api::Container;
use uwsgi_it_testbed::alerts::{Scrapes, chart_rules, scrape};
use uwsgi_it_testbed::control_plane::ControlPlane;

const CONTROLLER_ALERTS: [&str; 5] = [
    "UwsgiItServerMemoryNearlyFull",
    "UwsgiItServerStorageNearlyFull",
    "UwsgiItServerOvercommitted",
    "UwsgiItControllerNotLeading",
    "UwsgiItAdmissionFailures",
];

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Scrapes the controller now and evaluates the rules at that time; returns the alerts that
/// fire among [`CONTROLLER_ALERTS`].
async fn firing(scrapes: &mut Scrapes, rules: &str, address: SocketAddr) -> Vec<String> {
    let text = scrape(address).await.expect("the controller's /metrics");
    let at = scrapes.record("controller", &text).unwrap();
    let alerts = scrapes.evaluate(rules, at).unwrap();
    CONTROLLER_ALERTS
        .iter()
        .filter(|a| {
            *alerts
                .get(**a)
                .unwrap_or_else(|| panic!("{a} is not in the chart's rules: {alerts:?}"))
        })
        .map(|a| a.to_string())
        .collect()
}

/// Scrapes (every 200 ms, a new record each time) until the alerts that fire are `expected`.
async fn wait_firing(scrapes: &mut Scrapes, rules: &str, address: SocketAddr, expected: &[&str]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = firing(scrapes, rules, address).await;
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {expected:?} to fire, after {WAIT:?} {now:?} fire; last scrape:\n{}",
            scrape(address).await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn each_controller_alert_fires_in_its_state_and_none_on_a_healthy_controller() {
    let plane = tokio::task::spawn_blocking(ControlPlane::shared)
        .await
        .unwrap();
    plane.install_crds(&uwsgi_it_api::crds()).await.unwrap();
    let admin = plane.client().await.unwrap();
    let system = plane.namespace("uwsgi-it-system").await.unwrap();
    let rules = chart_rules(&[]).expect("the chart's alert rules");
    let mut scrapes = Scrapes::new().unwrap();

    // The Lease is held by a replica that just died: the new one waits out its duration.
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    );
    let held = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some(uwsgi_it_controller::LEASE_NAME.into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some("a-replica-that-died".into()),
            lease_duration_seconds: Some(15),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..Default::default()
        }),
    };
    Api::<Lease>::namespaced(admin.clone(), &system)
        .create(&PostParams::default(), &held)
        .await
        .unwrap();
    let address = free_port();
    let _controller = RunningController::start_with(plane, system.clone(), move |options| {
        options.leader_election = true;
        options.identity = "alerts".into();
        options.listen = Some(address);
    });
    let deadline = Instant::now() + WAIT;
    while scrape(address).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the controller never served /metrics"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        firing(&mut scrapes, &rules, address).await,
        ["UwsgiItControllerNotLeading"],
        "a standby alone leads nothing"
    );

    // Leading, one server with room: nothing fires.
    server_node(&admin, "alerts-1", 4000, 100000, "203.0.113.41").await;
    customer(&admin, "alerting", &["alerts-1"], &[]).await;
    let containers: Api<Container> = Api::namespaced(admin.clone(), "alerting");
    let create = |name: &'static str, memory: u64| {
        let containers = containers.clone();
        async move {
            containers
                .create(
                    &PostParams::default(),
                    &container(
                        name,
                        json!({"server": "alerts-1", "memory": memory, "storage": 1000}),
                    ),
                )
                .await
                .unwrap();
            wait_for(&containers, name, decided).await
        }
    };
    assert!(admitted(&create("small", 1000).await));
    wait_firing(&mut scrapes, &rules, address, &[]).await;

    // 3,700 of 4,000 MB reserved: nearly full.
    assert!(admitted(&create("large", 2700).await));
    wait_firing(
        &mut scrapes,
        &rules,
        address,
        &["UwsgiItServerMemoryNearlyFull"],
    )
    .await;

    // The supplier lowers the capacity under what is reserved: overcommitted (and still full).
    let servers: Api<uwsgi_it_api::Server> = Api::all(admin.clone());
    servers
        .patch(
            "alerts-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"memory": 3000}})),
        )
        .await
        .unwrap();
    wait_firing(
        &mut scrapes,
        &rules,
        address,
        &[
            "UwsgiItServerMemoryNearlyFull",
            "UwsgiItServerOvercommitted",
        ],
    )
    .await;
    servers
        .patch(
            "alerts-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"memory": 40000}})),
        )
        .await
        .unwrap();
    wait_firing(&mut scrapes, &rules, address, &[]).await;

    // The uid record deleted while containers hold uids: admission fails closed.
    Api::<ConfigMap>::namespaced(admin.clone(), &system)
        .delete(&test_config().uid_store, &DeleteParams::default())
        .await
        .unwrap();
    let refused = create("after-the-loss", 100).await;
    assert_eq!(admission(&refused).1, "UidUnavailable");
    wait_firing(&mut scrapes, &rules, address, &["UwsgiItAdmissionFailures"]).await;
    assert!(scrapes.len() >= 5, "one scrape per state at least");
}
