//! The races a reviewer named, made to happen on purpose: a fault proxy between the controller
//! and the API server holds back a decision while someone else grants the same room, loses the
//! response to a grant that was applied, and serves a stale relist. The test itself plays the
//! other controller, committing to the ledger with the same compare-and-swap any controller
//! uses. A test binary of its own: its controller talks only through the proxy.

mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::*;
use uwsgi_it_api::{Container, LedgerEntry, Server};
use uwsgi_it_testbed::control_plane::ControlPlane;
use uwsgi_it_testbed::fault_proxy::{FaultProxy, Rule};

/// The scenarios share the proxy and its controller: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The controller's namespace (uid record).
static SYSTEM: OnceLock<String> = OnceLock::new();

/// The proxy and the controller behind it, on a runtime of their own that lives as long as
/// the test binary.
fn proxy() -> Arc<FaultProxy> {
    static PROXY: OnceLock<Arc<FaultProxy>> = OnceLock::new();
    PROXY
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Runtime::new().unwrap();
                runtime.block_on(async move {
                    let plane = ControlPlane::shared();
                    plane.install_crds(&uwsgi_it_api::crds()).await.unwrap();
                    let system = plane.namespace("uwsgi-it-system").await.unwrap();
                    let admin = plane.client().await.unwrap();
                    let proxy = Arc::new(FaultProxy::start(admin).await.unwrap());
                    let client = proxy.client().unwrap();
                    SYSTEM.set(system.clone()).unwrap();
                    tx.send(Arc::clone(&proxy)).unwrap();
                    let mut options = uwsgi_it_controller::Options::new(test_config(), system);
                    options.config.release_timeout = Duration::from_secs(1);
                    uwsgi_it_telemetry::init_tracing(
                        &std::env::var("RACES_LOG").unwrap_or_else(|_| "warn".into()),
                        false,
                    );
                    let _ = uwsgi_it_controller::run(client, options, std::future::pending()).await;
                });
            });
            rx.recv().unwrap()
        })
        .clone()
}

async fn setup(server: &str, memory: u64) -> (Arc<FaultProxy>, Client) {
    let proxy = proxy();
    let client = tokio::task::spawn_blocking(ControlPlane::shared)
        .await
        .unwrap()
        .client()
        .await
        .unwrap();
    server_node(&client, server, memory, 100000, "203.0.113.70").await;
    (proxy, client)
}

fn status_path(server: &str) -> String {
    format!("/apis/uwsgi.it/v1alpha1/servers/{server}/status")
}

async fn customer_for(client: &Client, name: &str, server: &str) -> Api<Container> {
    customer(client, name, &[server], &[]).await;
    Api::namespaced(client.clone(), name)
}

async fn create(containers: &Api<Container>, name: &str, server: &str, memory: u64) -> Container {
    containers
        .create(
            &PostParams::default(),
            &container(
                name,
                json!({"server": server, "memory": memory, "storage": 100}),
            ),
        )
        .await
        .unwrap()
}

fn reserved_memory(server: &Server) -> i64 {
    server.ledger().iter().map(|e| e.memory).sum()
}

/// What another controller does: commit a grant to the ledger with a resourceVersion
/// precondition, retrying on conflict.
async fn grant_as_the_other_controller(
    client: &Client,
    server: &str,
    container: &Container,
    uid: i64,
) {
    let servers: Api<Server> = Api::all(client.clone());
    loop {
        let mut current = servers.get(server).await.unwrap();
        let mut status = current.status.clone().unwrap_or_default();
        status.ledger.push(LedgerEntry {
            object_uid: container.metadata.uid.clone().unwrap(),
            namespace: container.namespace().unwrap(),
            name: container.name_any(),
            uid,
            memory: container.spec.memory,
            storage: container.spec.storage,
        });
        status.highest_uid = Some(status.highest_uid.unwrap_or(0).max(uid));
        current.status = Some(status);
        match servers
            .replace_status(server, &PostParams::default(), &current)
            .await
        {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => panic!("the other controller's grant: {e}"),
        }
    }
}

#[tokio::test]
async fn a_decision_held_while_another_controller_grants_the_room_is_decided_again() {
    let _serial = SERIAL.lock().await;
    let (proxy, client) = setup("race-hold", 1000).await;
    let containers = customer_for(&client, "race-hold", "race-hold").await;

    // The controller decides to grant `first` 600 MB; its commit is held on the way.
    proxy.hold(Rule::new(http::Method::PUT, status_path("race-hold")));
    create(&containers, "first", "race-hold", 600).await;
    tokio::time::timeout(Duration::from_secs(30), proxy.wait_held(1))
        .await
        .expect("the controller's grant never reached the proxy");

    // Meanwhile another controller grants 600 MB of the same 1000 to `second`.
    let second = create(&containers, "second", "race-hold", 600).await;
    grant_as_the_other_controller(&client, "race-hold", &second, 50_001).await;

    // The held commit goes through now: it was computed from a revision that is gone.
    proxy.release();
    let first = wait_for(&containers, "first", decided).await;
    let (status, reason, message) = admission(&first);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "InsufficientMemory")
    );
    assert!(
        message.contains("400 MB memory free, 600 MB requested"),
        "{message}"
    );
    let second = wait_for(&containers, "second", admitted).await;
    assert_eq!(second.status.unwrap().uid, Some(50_001));
    let server: Server = Api::all(client.clone()).get("race-hold").await.unwrap();
    assert_eq!(reserved_memory(&server), 600, "{:?}", server.ledger());
    assert_eq!(server.ledger().len(), 1);
}

async fn mark(client: &Client) -> i64 {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM.get().unwrap());
    maps.get(&test_config().uid_store)
        .await
        .unwrap()
        .data
        .unwrap()["highWaterMark"]
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_grant_whose_response_is_lost_keeps_its_one_uid() {
    let _serial = SERIAL.lock().await;
    let (proxy, client) = setup("race-lost", 1000).await;
    let containers = customer_for(&client, "race-lost", "race-lost").await;
    // A first container makes sure the uid record exists.
    create(&containers, "warm", "race-lost", 100).await;
    wait_for(&containers, "warm", admitted).await;
    let before = mark(&client).await;

    proxy.lose_next_response(Rule::new(http::Method::PUT, status_path("race-lost")));
    create(&containers, "lost", "race-lost", 300).await;
    let lost = wait_for(&containers, "lost", admitted).await;
    assert_eq!(proxy.lost(), 1, "the response was never lost");
    let uid = lost.status.as_ref().unwrap().uid.unwrap();
    let server: Server = Api::all(client.clone()).get("race-lost").await.unwrap();
    let entries: Vec<&LedgerEntry> = server
        .ledger()
        .iter()
        .filter(|e| e.name == "lost")
        .collect();
    assert_eq!(entries.len(), 1, "{:?}", server.ledger());
    assert_eq!(
        entries[0].uid, uid,
        "the status and the ledger disagree on the uid"
    );
    assert_eq!(
        mark(&client).await,
        before + 1,
        "the retry allocated another uid"
    );
    assert_eq!(uid, before + 1);
}

#[tokio::test]
async fn a_stale_relist_neither_strips_a_reservation_nor_oversells() {
    let _serial = SERIAL.lock().await;
    let (proxy, client) = setup("race-stale", 1000).await;
    let containers = customer_for(&client, "race-stale", "race-stale").await;
    let path = "/apis/uwsgi.it/v1alpha1/containers";

    // The stale view: `running` not admitted yet, `doomed` alive.
    proxy.hold(Rule::new(http::Method::PUT, status_path("race-stale")));
    create(&containers, "running", "race-stale", 500).await;
    create(&containers, "doomed", "race-stale", 300).await;
    tokio::time::timeout(Duration::from_secs(30), proxy.wait_held(1))
        .await
        .expect("no grant reached the proxy");
    let stale = proxy.snapshot(path).await.unwrap();
    proxy.release();
    wait_for(&containers, "running", admitted).await;
    wait_for(&containers, "doomed", admitted).await;
    containers
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&containers, "doomed").await;

    // The controller relists and is served the old list; then a newcomer asks for room.
    proxy.serve_stale(path, stale);
    tokio::time::timeout(Duration::from_secs(30), async {
        while proxy.stale_served() == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the controller never relisted");
    create(&containers, "newcomer", "race-stale", 400).await;
    wait_for(&containers, "newcomer", admitted).await;

    let running = containers.get("running").await.unwrap();
    let reserved = running.status.unwrap().reserved.unwrap();
    assert_eq!(
        reserved.memory, 500,
        "the running container's reservation was changed"
    );
    let server: Server = Api::all(client.clone()).get("race-stale").await.unwrap();
    let mut names: Vec<&str> = server.ledger().iter().map(|e| e.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["newcomer", "running"]);
    assert!(reserved_memory(&server) <= 1000);
}

/// What another controller does to release a container: its entry out of the ledger (compare-
/// and-swap), then its finalizer off.
async fn release_as_the_other_controller(client: &Client, server: &str, container: &Container) {
    let servers: Api<Server> = Api::all(client.clone());
    let object = container.metadata.uid.clone().unwrap();
    loop {
        let mut current = servers.get(server).await.unwrap();
        let mut status = current.status.clone().unwrap_or_default();
        status.ledger.retain(|e| e.object_uid != object);
        current.status = Some(status);
        match servers
            .replace_status(server, &PostParams::default(), &current)
            .await
        {
            Ok(_) => break,
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => panic!("the other controller's release: {e}"),
        }
    }
    let containers: Api<Container> =
        Api::namespaced(client.clone(), &container.namespace().unwrap());
    match containers
        .patch(
            &container.name_any(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("the other controller's finalizer removal: {e}"),
    }
}

#[tokio::test]
async fn a_container_released_by_another_controller_is_never_granted_again_from_a_stale_cache() {
    let _serial = SERIAL.lock().await;
    let (proxy, client) = setup("race-ghost", 1000).await;
    let containers = customer_for(&client, "race-ghost", "race-ghost").await;
    let watch_path = "/apis/uwsgi.it/v1alpha1/containers";
    let commits = status_path("race-ghost");

    // This controller sees `ghost` (with its finalizer) and decides to grant it; the commit is
    // held on the way.
    proxy.hold(Rule::new(http::Method::PUT, commits.clone()));
    create(&containers, "ghost", "race-ghost", 300).await;
    tokio::time::timeout(Duration::from_secs(30), proxy.wait_held(1))
        .await
        .expect("the controller's grant never reached the proxy");

    // Another controller admits `ghost` first. From now on this controller hears nothing of the
    // containers (its watch is held): its cache shows `ghost` alive and without a uid while
    // `ghost` is deleted and the other controller releases it.
    let ghost = containers.get("ghost").await.unwrap();
    grant_as_the_other_controller(&client, "race-ghost", &ghost, 50_003).await;
    proxy.hold(Rule::new(http::Method::GET, watch_path));
    proxy.reset_watches();
    tokio::time::timeout(Duration::from_secs(30), proxy.wait_held(2))
        .await
        .expect("the controller never watched the containers again");
    containers
        .delete("ghost", &DeleteParams::default())
        .await
        .unwrap();
    release_as_the_other_controller(&client, "race-ghost", &ghost).await;
    wait_gone(&containers, "ghost").await;

    // The held grant goes now and fails (the Server changed); the pass decides again on the
    // new revision, with the stale cache.
    let reads_before = proxy.reads().len();
    proxy.release_path(&commits);
    let servers: Api<Server> = Api::all(client.clone());
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        let server = servers.get("race-ghost").await.unwrap();
        assert!(
            server.ledger().iter().all(|e| e.name != "ghost"),
            "a released container was granted again from a stale cache: {:?}",
            server.ledger()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reads: Vec<String> = proxy.reads()[reads_before..].to_vec();
    proxy.release();
    // It did decide again: it read `ghost` from the API before granting it anything.
    assert!(
        reads
            .iter()
            .any(|r| r.contains("/namespaces/race-ghost/containers/ghost")),
        "no pass looked at the stale ghost: {reads:?}"
    );
}
