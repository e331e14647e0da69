//! What a person's mistake or a lost machine must not turn into: a uid handed out twice after
//! the uid record was deleted or edited down, or a deletion that waits for ever because the
//! container's server has no agent any more. A test binary of its own: it deletes the uid
//! record of its controller and runs that controller with a short release timeout.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::*;
use uwsgi_it_api::{Container, Server};
use uwsgi_it_testbed::control_plane::ControlPlane;

/// The deletion timeout of this binary's controller.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(3);

/// The tests share one controller and its uid record: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    client: kube::Client,
    system: String,
}

async fn setup() -> Setup {
    static CONTROLLER: tokio::sync::OnceCell<(RunningController, String)> =
        tokio::sync::OnceCell::const_new();
    let plane = tokio::task::spawn_blocking(ControlPlane::shared)
        .await
        .unwrap();
    plane.install_crds(&uwsgi_it_api::crds()).await.unwrap();
    let (_, system) = CONTROLLER
        .get_or_init(|| async {
            let system = plane.namespace("uwsgi-it-system").await.unwrap();
            let controller = RunningController::start_with(plane, system.clone(), |options| {
                options.config.release_timeout = RELEASE_TIMEOUT;
            });
            (controller, system)
        })
        .await;
    Setup {
        client: plane.client().await.unwrap(),
        system: system.clone(),
    }
}

fn uid(container: &Container) -> i64 {
    container.status.as_ref().unwrap().uid.unwrap()
}

async fn create(containers: &Api<Container>, name: &str, server: &str) {
    containers
        .create(
            &PostParams::default(),
            &container(
                name,
                json!({"server": server, "memory": 100, "storage": 100}),
            ),
        )
        .await
        .unwrap();
}

async fn set_mark(maps: &Api<ConfigMap>, name: &str, mark: i64) {
    let map = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
        "data": {"highWaterMark": mark.to_string()}});
    maps.patch(
        name,
        &PatchParams::apply("person").force(),
        &Patch::Apply(&map),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_deleted_or_lowered_uid_record_never_hands_a_uid_out_twice() {
    let _serial = SERIAL.lock().await;
    let Setup { client, system } = setup().await;
    server_node(&client, "record-1", 4000, 100000, "203.0.113.60").await;
    customer(&client, "record", &["record-1"], &[]).await;
    let containers: Api<Container> = Api::namespaced(client.clone(), "record");
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &system);
    let record = test_config().uid_store;

    create(&containers, "first", "record-1").await;
    let first = uid(&wait_for(&containers, "first", admitted).await);
    create(&containers, "gone", "record-1").await;
    let gone = uid(&wait_for(&containers, "gone", admitted).await);
    // "gone" leaves no container behind, only its archived home and its uid in the ledger's
    // highestUid.
    containers
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    report_home(&containers, "gone", "HomeReleased", false).await;
    wait_gone(&containers, "gone").await;

    // The record deleted: no uid is handed out, and the container says why.
    maps.delete(&record, &DeleteParams::default())
        .await
        .unwrap();
    create(&containers, "during", "record-1").await;
    let during = wait_for(&containers, "during", decided).await;
    let (status, reason, message) = admission(&during);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "UidUnavailable")
    );
    assert!(
        message.contains(&record) && message.contains(&gone.to_string()),
        "the message names the record and the highest uid: {message}"
    );
    assert!(during.status.as_ref().unwrap().uid.is_none());
    assert!(
        maps.get_opt(&record).await.unwrap().is_none(),
        "the record is not silently recreated"
    );

    // Restored by a person, but too low (below every uid used so far): allocation still starts
    // above everything recorded — the live container's uid and the deleted one's.
    set_mark(&maps, &record, 30001).await;
    let during = wait_for(&containers, "during", admitted).await;
    assert!(
        uid(&during) > first.max(gone),
        "uid {} after {first} and {gone}: a uid was handed out twice",
        uid(&during)
    );

    // Edited down again while running.
    set_mark(&maps, &record, 30001).await;
    create(&containers, "after", "record-1").await;
    let after = uid(&wait_for(&containers, "after", admitted).await);
    assert!(after > uid(&during), "uid {after} after {}", uid(&during));

    let server: Server = Api::all(client.clone()).get("record-1").await.unwrap();
    let status = server.status.unwrap();
    assert_eq!(status.highest_uid, Some(after));
    let mut seen = BTreeMap::new();
    for entry in &status.ledger {
        assert!(seen.insert(entry.uid, entry.name.clone()).is_none());
    }
    assert_eq!(
        seen.into_values().collect::<Vec<_>>(),
        ["first", "during", "after"]
    );
}

#[tokio::test]
async fn deleting_a_container_whose_server_has_no_agent_completes_with_a_warning() {
    let _serial = SERIAL.lock().await;
    let Setup { client, .. } = setup().await;
    server_node(&client, "lost-1", 1000, 100000, "203.0.113.61").await;
    customer(&client, "lost", &["lost-1"], &[]).await;
    let containers: Api<Container> = Api::namespaced(client.clone(), "lost");
    create(&containers, "stranded", "lost-1").await;
    wait_for(&containers, "stranded", admitted).await;
    create(&containers, "forced", "lost-1").await;
    wait_for(&containers, "forced", admitted).await;

    // The machine is gone for good: no Node, no agent to archive the homes.
    Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .delete("lost-1", &DeleteParams::default())
        .await
        .unwrap();
    containers
        .delete("stranded", &DeleteParams::default())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    wait_gone(&containers, "stranded").await;
    // deletionTimestamp has one-second resolution: the timeout may end up to 1 s early.
    assert!(
        started.elapsed() >= RELEASE_TIMEOUT - Duration::from_secs(1),
        "released after {:?}, before the timeout",
        started.elapsed()
    );

    // The supplier's explicit word needs no timeout.
    containers
        .patch(
            "forced",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"uwsgi.it/force-release": "true"}}})),
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    containers
        .delete("forced", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&containers, "forced").await;
    assert!(
        started.elapsed() < RELEASE_TIMEOUT,
        "the annotation did not release at once ({:?})",
        started.elapsed()
    );

    let server: Server = Api::all(client.clone()).get("lost-1").await.unwrap();
    let status = server.status.unwrap();
    assert!(status.ledger.is_empty(), "{:?}", status.ledger);
    assert_eq!(status.memory.unwrap().reserved, 0);
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "lost");
    let warnings: Vec<_> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("ReleasedWithoutAgent"))
        .filter_map(|e| e.regarding.and_then(|r| r.name))
        .collect();
    assert!(
        warnings.contains(&"stranded".to_string()) && warnings.contains(&"forced".to_string()),
        "a Warning for each: {warnings:?}"
    );
}
