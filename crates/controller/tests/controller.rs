//! The controller against a real kube-apiserver: admission without overselling, identities,
//! workloads, port ownership, custom distros and customers. Each test has its own servers,
//! customers and namespaces; one controller serves the whole test binary.

mod support;

use std::collections::BTreeSet;

use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::*;
use uwsgi_it_api::condition::{self, ACCEPTED, RUNNING};
use uwsgi_it_api::{Container, CustomDistro, Customer, PortMapping};

async fn client() -> kube::Client {
    plane_and_controller().await.client().await.unwrap()
}

#[tokio::test]
async fn quickstart_hydra_is_admitted_by_public_address_and_gets_a_pod() {
    let plane = plane_and_controller().await;
    let client = plane.client().await.unwrap();
    server_node(&client, "quick-1", 16000, 500000, "203.0.113.11").await;
    customer(&client, "quick", &["quick-1"], &["alice"]).await;
    let containers: Api<Container> = Api::namespaced(client.clone(), "quick");
    let hydra = container(
        "hydra",
        json!({"server": "203.0.113.11", "memory": 1000, "storage": 20000, "distro": "bookworm"}),
    );
    containers
        .create(&PostParams::default(), &hydra)
        .await
        .unwrap();
    let hydra = wait_for(&containers, "hydra", admitted).await;
    let status = hydra.status.clone().unwrap();
    let uid = status.uid.unwrap();
    assert!(uid >= 30001, "uid {uid}");
    assert_eq!(status.server.as_deref(), Some("quick-1"));
    assert_eq!(status.address.as_deref(), Some("203.0.113.11"));
    assert_eq!(status.home, Some(format!("/containers/{uid}")));
    let reserved = status.reserved.unwrap();
    assert_eq!((reserved.memory, reserved.storage), (1000, 20000));

    // The workload waits for the agent's home, then runs pinned, sized and unprivileged.
    report_home(&containers, "hydra", "HomeReady", true).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "quick");
    let pod = wait_for(&pods, "hydra", |_| true).await;
    let spec = pod.spec.unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("quick-1"));
    assert_eq!(spec.security_context.unwrap().run_as_user, Some(uid));
    let limits = spec.containers[0]
        .resources
        .clone()
        .unwrap()
        .limits
        .unwrap();
    assert_eq!(limits["memory"].0, "1000Mi");

    // The Pod's address and state come back into the Container's status.
    let pod_status = json!({"status": {"phase": "Running", "podIP": "10.244.1.7",
        "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status("hydra", &PatchParams::default(), &Patch::Merge(&pod_status))
        .await
        .unwrap();
    let hydra = wait_for(&containers, "hydra", |c| {
        c.status
            .as_ref()
            .is_some_and(|s| condition::is_true(&s.conditions, RUNNING))
    })
    .await;
    assert_eq!(hydra.status.unwrap().ip.as_deref(), Some("10.244.1.7"));

    let listed = plane
        .kubectl()
        .args(["get", "uwsgi", "-n", "quick"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("hydra"), "kubectl get uwsgi: {listed}");
    assert!(
        listed.contains(&uid.to_string()),
        "kubectl get uwsgi shows the uid: {listed}"
    );
}

#[tokio::test]
async fn concurrent_containers_never_oversell_a_server() {
    let client = client().await;
    server_node(&client, "crowd-1", 1000, 100000, "203.0.113.12").await;
    customer(&client, "crowd", &["crowd-1"], &[]).await;
    let containers: Api<Container> = Api::namespaced(client.clone(), "crowd");
    let names: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
    join_all(names.iter().map(|name| {
        let containers = containers.clone();
        let c = container(
            name,
            json!({"server": "crowd-1", "memory": 300, "storage": 1000}),
        );
        async move { containers.create(&PostParams::default(), &c).await.unwrap() }
    }))
    .await;
    let mut decided_all = Vec::new();
    for name in &names {
        decided_all.push(wait_for(&containers, name, decided).await);
    }
    let admitted_ones: Vec<&Container> = decided_all.iter().filter(|c| admitted(c)).collect();
    let memory: i64 = admitted_ones
        .iter()
        .map(|c| c.status.as_ref().unwrap().reserved.as_ref().unwrap().memory)
        .sum();
    assert_eq!(
        admitted_ones.len(),
        3,
        "exactly the ones that fit: 3 × 300 MB ≤ 1000 MB"
    );
    assert!(memory <= 1000, "reserved {memory} MB on a 1000 MB server");
    for refused in decided_all.iter().filter(|c| !admitted(c)) {
        let (status, reason, message) = admission(refused);
        assert_eq!(status, "False");
        assert_eq!(reason, "InsufficientMemory");
        assert!(
            message.contains("server crowd-1: 100 MB memory free, 300 MB requested"),
            "{message}"
        );
        assert!(refused.status.as_ref().unwrap().reserved.is_none());
    }
    let uids: BTreeSet<i64> = admitted_ones
        .iter()
        .map(|c| c.status.as_ref().unwrap().uid.unwrap())
        .collect();
    assert_eq!(uids.len(), 3, "no two containers share a uid");

    // First come, first served: each was admitted as soon as it was seen. When room frees up,
    // the earliest of those waiting for it (creationTimestamp, then name) gets it, nobody else.
    let mut waiting: Vec<&Container> = decided_all.iter().filter(|c| !admitted(c)).collect();
    waiting.sort_by_key(|c| {
        (
            c.metadata.creation_timestamp.clone().map(|t| t.0),
            c.name_any(),
        )
    });
    let freed = admitted_ones[0].name_any();
    containers
        .delete(&freed, &DeleteParams::default())
        .await
        .unwrap();
    report_home(&containers, &freed, "HomeReleased", false).await;
    wait_gone(&containers, &freed).await;
    let first = waiting[0].name_any();
    wait_for(&containers, &first, admitted).await;
    for later in &waiting[1..] {
        let later = containers.get(&later.name_any()).await.unwrap();
        assert!(
            !admitted(&later),
            "{} was admitted although {first} waited longer",
            later.name_any()
        );
    }
}

#[tokio::test]
async fn a_resize_that_does_not_fit_keeps_the_reservation_and_the_pod() {
    let client = client().await;
    server_node(&client, "resize-1", 1000, 100000, "203.0.113.13").await;
    customer(&client, "resize", &["resize-1"], &[]).await;
    let containers: Api<Container> = Api::namespaced(client.clone(), "resize");
    let big = container(
        "big",
        json!({"server": "resize-1", "memory": 600, "storage": 100, "distro": "bookworm"}),
    );
    containers
        .create(&PostParams::default(), &big)
        .await
        .unwrap();
    wait_for(&containers, "big", admitted).await;
    let small = container(
        "small",
        json!({"server": "resize-1", "memory": 300, "storage": 100}),
    );
    containers
        .create(&PostParams::default(), &small)
        .await
        .unwrap();
    wait_for(&containers, "small", admitted).await;
    report_home(&containers, "big", "HomeReady", true).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "resize");
    let pod = wait_for(&pods, "big", |_| true).await;

    let grow = json!({"spec": {"memory": 800}});
    containers
        .patch("big", &PatchParams::default(), &Patch::Merge(&grow))
        .await
        .unwrap();
    let big = wait_for(&containers, "big", decided).await;
    let (status, reason, message) = admission(&big);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "InsufficientMemory")
    );
    // Free counts the container's own 600 MB as released: 1000 - 300 held by "small".
    assert!(
        message.contains("700 MB memory free, 800 MB requested"),
        "{message}"
    );
    assert!(
        message.contains("keeping the current reservation"),
        "{message}"
    );
    assert_eq!(
        big.status
            .as_ref()
            .unwrap()
            .reserved
            .as_ref()
            .unwrap()
            .memory,
        600
    );
    let still = pods.get("big").await.unwrap();
    assert_eq!(still.uid(), pod.uid(), "the running Pod is kept");
    assert!(still.metadata.deletion_timestamp.is_none());

    // Shrinking fits and is admitted.
    let shrink = json!({"spec": {"memory": 500}});
    containers
        .patch("big", &PatchParams::default(), &Patch::Merge(&shrink))
        .await
        .unwrap();
    let big = wait_for(&containers, "big", |c| decided(c) && admitted(c)).await;
    assert_eq!(big.status.unwrap().reserved.unwrap().memory, 500);
}

#[tokio::test]
async fn a_uid_is_never_reused_after_deletion() {
    let client = client().await;
    server_node(&client, "reuse-1", 4000, 100000, "203.0.113.14").await;
    customer(&client, "reuse", &["reuse-1"], &[]).await;
    let containers: Api<Container> = Api::namespaced(client.clone(), "reuse");
    let first = container(
        "first",
        json!({"server": "reuse-1", "memory": 100, "storage": 100}),
    );
    containers
        .create(&PostParams::default(), &first)
        .await
        .unwrap();
    let first = wait_for(&containers, "first", admitted).await;
    let old_uid = first.status.unwrap().uid.unwrap();

    containers
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    // The agent archives the home; the controller then releases the finalizer.
    report_home(&containers, "first", "HomeReleased", false).await;
    wait_gone(&containers, "first").await;

    let again = container(
        "first",
        json!({"server": "reuse-1", "memory": 100, "storage": 100}),
    );
    containers
        .create(&PostParams::default(), &again)
        .await
        .unwrap();
    let again = wait_for(&containers, "first", admitted).await;
    let new_uid = again.status.unwrap().uid.unwrap();
    assert!(
        new_uid > old_uid,
        "uid {new_uid} after deleting {old_uid}: a home must never be inherited"
    );
}

#[tokio::test]
async fn deleting_a_container_waits_for_the_agent_then_frees_its_reservation() {
    let client = client().await;
    server_node(&client, "free-1", 1000, 100000, "203.0.113.15").await;
    customer(&client, "free", &["free-1"], &[]).await;
    let containers: Api<Container> = Api::namespaced(client.clone(), "free");
    let holder = container(
        "holder",
        json!({"server": "free-1", "memory": 800, "storage": 100}),
    );
    containers
        .create(&PostParams::default(), &holder)
        .await
        .unwrap();
    wait_for(&containers, "holder", admitted).await;
    let waiter = container(
        "waiter",
        json!({"server": "free-1", "memory": 800, "storage": 100}),
    );
    containers
        .create(&PostParams::default(), &waiter)
        .await
        .unwrap();
    let waiting = wait_for(&containers, "waiter", decided).await;
    assert!(!admitted(&waiting));

    containers
        .delete("holder", &DeleteParams::default())
        .await
        .unwrap();
    // Until the agent has archived the home, the reservation is held.
    let held = containers.get("holder").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(!admitted(&containers.get("waiter").await.unwrap()));

    report_home(&containers, "holder", "HomeReleased", false).await;
    wait_gone(&containers, "holder").await;
    wait_for(&containers, "waiter", admitted).await;
}

#[tokio::test]
async fn a_customer_cannot_place_containers_on_a_server_it_does_not_own() {
    let client = client().await;
    server_node(&client, "owned-1", 4000, 100000, "203.0.113.16").await;
    server_node(&client, "foreign-1", 4000, 100000, "203.0.113.17").await;
    customer(&client, "owner", &["owned-1"], &[]).await;
    let containers: Api<Container> = Api::namespaced(client.clone(), "owner");
    let c = container(
        "intruder",
        json!({"server": "203.0.113.17", "memory": 100, "storage": 100}),
    );
    containers.create(&PostParams::default(), &c).await.unwrap();
    let c = wait_for(&containers, "intruder", decided).await;
    let (status, reason, message) = admission(&c);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "ServerNotOwned")
    );
    assert!(
        message.contains("customer owner does not own server foreign-1"),
        "{message}"
    );

    let unknown = container(
        "lost",
        json!({"server": "198.51.100.99", "memory": 100, "storage": 100}),
    );
    containers
        .create(&PostParams::default(), &unknown)
        .await
        .unwrap();
    let unknown = wait_for(&containers, "lost", decided).await;
    assert_eq!(admission(&unknown).1, "ServerUnknown");
}

fn mapping(name: &str, container: &str, proto: &str, public: i32, private: i32) -> PortMapping {
    serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1", "kind": "PortMapping",
        "metadata": {"name": name},
        "spec": {"container": container, "proto": proto, "publicPort": public, "privatePort": private},
    }))
    .unwrap()
}

fn accepted(m: &PortMapping) -> Option<(String, String, String)> {
    m.status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, ACCEPTED))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn one_owner_per_public_port_across_customers() {
    let client = client().await;
    server_node(&client, "shared-1", 4000, 100000, "203.0.113.18").await;
    customer(&client, "first-co", &["shared-1"], &[]).await;
    customer(&client, "second-co", &["shared-1"], &[]).await;
    for namespace in ["first-co", "second-co"] {
        let containers: Api<Container> = Api::namespaced(client.clone(), namespace);
        let c = container(
            "web",
            json!({"server": "shared-1", "memory": 100, "storage": 100}),
        );
        containers.create(&PostParams::default(), &c).await.unwrap();
        wait_for(&containers, "web", admitted).await;
    }
    let first: Api<PortMapping> = Api::namespaced(client.clone(), "first-co");
    let second: Api<PortMapping> = Api::namespaced(client.clone(), "second-co");
    first
        .create(
            &PostParams::default(),
            &mapping("http", "web", "tcp", 9000, 8000),
        )
        .await
        .unwrap();
    let owner = wait_for(&first, "http", |m| accepted(m).is_some()).await;
    assert_eq!(accepted(&owner).unwrap().0, "True");
    assert_eq!(
        owner.status.unwrap().address.as_deref(),
        Some("203.0.113.18")
    );

    second
        .create(
            &PostParams::default(),
            &mapping("http", "web", "tcp", 9000, 8000),
        )
        .await
        .unwrap();
    let (status, reason, message) =
        accepted(&wait_for(&second, "http", |m| accepted(m).is_some()).await).unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "PortInUse"),
        "{message}"
    );
    assert!(
        !message.contains("first-co"),
        "another customer's objects are not named: {message}"
    );

    second
        .create(
            &PostParams::default(),
            &mapping("dns", "web", "udp", 9000, 53),
        )
        .await
        .unwrap();
    let (status, _, message) =
        accepted(&wait_for(&second, "dns", |m| accepted(m).is_some()).await).unwrap();
    assert_eq!(
        status, "True",
        "udp 9000 is another port than tcp 9000: {message}"
    );

    second
        .create(
            &PostParams::default(),
            &mapping("nodeport", "web", "tcp", 30080, 80),
        )
        .await
        .unwrap();
    let (status, reason, message) =
        accepted(&wait_for(&second, "nodeport", |m| accepted(m).is_some()).await).unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "ReservedPort"),
        "{message}"
    );
    assert!(message.contains("30000-32767"), "{message}");

    // Every port of the node's own infrastructure: the API server and etcd of a control-plane
    // server, the overlays and WireGuard other nodes send to, exporters, memberlist, kubelet.
    let infrastructure = [
        ("apiserver", "tcp", 6443),
        ("etcd", "tcp", 2379),
        ("etcd-peer", "tcp", 2380),
        ("vxlan", "udp", 8472),
        ("vxlan-iana", "udp", 4789),
        ("geneve", "udp", 6081),
        ("wireguard", "udp", 51820),
        ("node-exporter", "tcp", 9100),
        ("memberlist", "tcp", 7946),
        ("kubelet", "tcp", 10250),
    ];
    for (name, proto, port) in infrastructure {
        second
            .create(
                &PostParams::default(),
                &mapping(name, "web", proto, port, 80),
            )
            .await
            .unwrap();
    }
    for (name, proto, port) in infrastructure {
        let (status, reason, message) =
            accepted(&wait_for(&second, name, |m| accepted(m).is_some()).await).unwrap();
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "ReservedPort"),
            "{proto}/{port}: {message}"
        );
        assert!(
            message.contains(&format!("publicPort {port} is reserved")),
            "{message}"
        );
    }

    // The owner still owns it: a later claim never steals the port.
    let owner = first.get("http").await.unwrap();
    assert_eq!(accepted(&owner).unwrap().0, "True");
}

#[tokio::test]
async fn custom_distro_rules_are_enforced() {
    let client = client().await;
    server_node(&client, "distro-a", 4000, 100000, "203.0.113.19").await;
    server_node(&client, "distro-b", 4000, 100000, "203.0.113.20").await;
    customer(&client, "distros", &["distro-a", "distro-b"], &[]).await;
    let containers: Api<Container> = Api::namespaced(client.clone(), "distros");
    let distros: Api<CustomDistro> = Api::namespaced(client.clone(), "distros");
    let store = container(
        "store",
        json!({"server": "distro-a", "memory": 64, "storage": 1000, "customDistrosStorage": true}),
    );
    containers
        .create(&PostParams::default(), &store)
        .await
        .unwrap();
    let store = wait_for(&containers, "store", admitted).await;
    let store_uid = store.status.unwrap().uid.unwrap();
    let distro: CustomDistro = serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1", "kind": "CustomDistro",
        "metadata": {"name": "ubuntu0001"},
        "spec": {"storageContainer": "store", "path": "ubuntu0001"},
    }))
    .unwrap();
    distros
        .create(&PostParams::default(), &distro)
        .await
        .unwrap();
    let distro = wait_for(&distros, "ubuntu0001", |d| {
        d.status
            .as_ref()
            .is_some_and(|s| condition::is_true(&s.conditions, ACCEPTED))
    })
    .await;
    let status = distro.status.unwrap();
    assert_eq!(status.server.as_deref(), Some("distro-a"));
    assert_eq!(
        status.host_path,
        Some(format!("/containers/.distros/{store_uid}/ubuntu0001"))
    );

    // Same server: usable. Other server: listed as not usable and never started on it.
    let near = container(
        "near",
        json!({"server": "distro-a", "memory": 64, "storage": 100, "distro": "bookworm", "customDistro": "ubuntu0001"}),
    );
    let far = container(
        "far",
        json!({"server": "distro-b", "memory": 64, "storage": 100, "distro": "bookworm", "customDistro": "ubuntu0001"}),
    );
    containers
        .create(&PostParams::default(), &near)
        .await
        .unwrap();
    containers
        .create(&PostParams::default(), &far)
        .await
        .unwrap();
    let near = wait_for(&containers, "near", |c| {
        c.status
            .as_ref()
            .is_some_and(|s| s.usable_custom_distros == ["ubuntu0001"])
    })
    .await;
    assert!(admitted(&near));
    wait_for(&containers, "far", admitted).await;
    report_home(&containers, "far", "HomeReady", true).await;
    let far = wait_for(&containers, "far", |c| {
        c.status
            .as_ref()
            .and_then(|s| condition::find(&s.conditions, RUNNING))
            .is_some_and(|r| r.reason == "CustomDistroOnOtherServer")
    })
    .await;
    assert!(far.status.unwrap().usable_custom_distros.is_empty());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "distros");
    assert!(
        pods.get_opt("far").await.unwrap().is_none(),
        "never started on the wrong root"
    );

    // A distro in use is not deleted.
    let used = wait_for(&distros, "ubuntu0001", |d| {
        d.status.as_ref().is_some_and(|s| s.used_by == 2)
    })
    .await;
    assert_eq!(used.status.unwrap().used_by, 2);
    distros
        .delete("ubuntu0001", &DeleteParams::default())
        .await
        .unwrap();
    let blocked = wait_for(&distros, "ubuntu0001", |d| {
        d.status
            .as_ref()
            .and_then(|s| condition::find(&s.conditions, ACCEPTED))
            .is_some_and(|c| c.reason == "DeletionBlocked")
    })
    .await;
    let message = condition::find(&blocked.status.unwrap().conditions, ACCEPTED)
        .unwrap()
        .message
        .clone();
    assert!(
        message.contains("far") && message.contains("near"),
        "{message}"
    );
    for user in ["near", "far"] {
        let patch = json!({"spec": {"customDistro": null}});
        containers
            .patch(user, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }
    wait_gone(&distros, "ubuntu0001").await;
}

#[tokio::test]
async fn a_customer_with_containers_is_not_deleted() {
    let client = client().await;
    server_node(&client, "keep-1", 4000, 100000, "203.0.113.21").await;
    customer(&client, "keeper", &["keep-1"], &["bob"]).await;
    let containers: Api<Container> = Api::namespaced(client.clone(), "keeper");
    let c = container(
        "app",
        json!({"server": "keep-1", "memory": 100, "storage": 100}),
    );
    containers.create(&PostParams::default(), &c).await.unwrap();
    wait_for(&containers, "app", admitted).await;

    let customers: Api<Customer> = Api::all(client.clone());
    let kept = wait_for(&customers, "keeper", |c| {
        c.status
            .as_ref()
            .is_some_and(|s| s.servers.first().is_some_and(|u| u.containers == 1))
    })
    .await;
    let usage = &kept.status.unwrap().servers[0];
    assert_eq!(
        (usage.memory.capacity, usage.memory.used, usage.memory.free),
        (4000, 100, 3900)
    );
    customers
        .delete("keeper", &DeleteParams::default())
        .await
        .unwrap();
    let held = wait_for(&customers, "keeper", |c| {
        c.status.as_ref().is_some_and(|s| {
            condition::find(&s.conditions, "Ready").is_some_and(|r| r.reason == "HasContainers")
        })
    })
    .await;
    assert!(held.metadata.deletion_timestamp.is_some());
    containers
        .delete("app", &DeleteParams::default())
        .await
        .unwrap();
    report_home(&containers, "app", "HomeReleased", false).await;
    wait_gone(&containers, "app").await;
    wait_gone(&customers, "keeper").await;
}

fn assert_forbidden<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn a_customer_user_creates_a_container_and_sees_it_admitted_but_cannot_delete_it() {
    let plane = plane_and_controller().await;
    let admin = plane.client().await.unwrap();
    server_node(&admin, "self-1", 4000, 100000, "203.0.113.22").await;
    server_node(&admin, "self-2", 4000, 100000, "203.0.113.23").await;
    // The controller binds carol to the chart's customer role in namespace "selfserve" (and
    // dave in "neighbour"); nothing else gives either of them any right.
    customer(&admin, "selfserve", &["self-1"], &["carol"]).await;
    customer(&admin, "neighbour", &["self-2"], &["dave"]).await;
    let carol = plane.client_as("carol", &[]).await.unwrap();
    let containers: Api<Container> = Api::namespaced(carol.clone(), "selfserve");
    // The RoleBinding reaches the API server's authorizer shortly after it is written.
    let deadline = std::time::Instant::now() + WAIT;
    while let Err(e) = containers.list(&Default::default()).await {
        assert!(
            std::time::Instant::now() < deadline,
            "carol's binding never took effect: {e}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Her namespace: Pod Security labels and the NetworkPolicy that keeps other customers out.
    let namespace = Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone())
        .get("selfserve")
        .await
        .unwrap();
    let labels = namespace.metadata.labels.unwrap_or_default();
    assert_eq!(labels["pod-security.kubernetes.io/enforce"], "baseline");
    assert_eq!(labels["pod-security.kubernetes.io/warn"], "restricted");
    assert_eq!(labels["pod-security.kubernetes.io/audit"], "restricted");
    let policy = Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(
        admin.clone(),
        "selfserve",
    )
    .get("uwsgi-it-isolation")
    .await
    .expect("the isolation NetworkPolicy");
    let rule = serde_json::to_value(&policy.spec.unwrap().ingress.unwrap()[0]).unwrap();
    assert_eq!(
        rule["from"],
        json!([
            {"podSelector": {}},
            {"namespaceSelector": {"matchExpressions": [{"key": "uwsgi.it/customer", "operator": "DoesNotExist"}]}},
            {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"]}},
        ])
    );

    let app = container(
        "app",
        json!({"server": "203.0.113.22", "memory": 256, "storage": 1000}),
    );
    containers
        .create(&PostParams::default(), &app)
        .await
        .expect("carol creates a Container in her namespace");
    // She watches her own Container until the controller has admitted it.
    let app = wait_for(&containers, "app", admitted).await;
    let status = app.status.unwrap();
    assert_eq!(status.server.as_deref(), Some("self-1"));
    assert_eq!(status.reserved.unwrap().memory, 256);

    assert_forbidden(
        "carol deleting her Container",
        containers.delete("app", &DeleteParams::default()).await,
    );
    let neighbour: Api<Container> = Api::namespaced(carol, "neighbour");
    let intruder = container(
        "intruder",
        json!({"server": "self-2", "memory": 64, "storage": 100}),
    );
    assert_forbidden(
        "carol creating a Container in another customer's namespace",
        neighbour.create(&PostParams::default(), &intruder).await,
    );
    assert_forbidden(
        "carol listing another customer's Containers",
        neighbour.list(&Default::default()).await,
    );
    assert!(
        containers.get("app").await.is_ok(),
        "still there: a customer never deletes a Container"
    );
}

fn ready_reason(customer: &Customer) -> Option<(String, String, String)> {
    customer
        .status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, "Ready"))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn a_namespace_belongs_to_the_first_customer_and_never_to_one_that_is_not_a_customers() {
    let client = client().await;
    server_node(&client, "claim-1", 4000, 100000, "203.0.113.24").await;
    customer(&client, "claim-first", &["claim-1"], &[]).await;
    let customers: Api<Customer> = Api::all(client.clone());
    let second: Customer = serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1", "kind": "Customer",
        "metadata": {"name": "claim-second"},
        "spec": {"namespace": "claim-first", "servers": ["claim-1"], "users": ["mallory"]},
    }))
    .unwrap();
    customers
        .create(&PostParams::default(), &second)
        .await
        .unwrap();
    let refused = wait_for(&customers, "claim-second", |c: &Customer| {
        ready_reason(c).is_some()
    })
    .await;
    let (status, reason, message) = ready_reason(&refused).unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NamespaceClaimed")
    );
    assert!(message.contains("claim-first"), "{message}");
    // The first keeps it: its RoleBinding does not bind the second's users.
    let binding =
        Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(client.clone(), "claim-first")
            .get("uwsgi-it-customer")
            .await
            .unwrap();
    let subjects = serde_json::to_string(&binding.subjects).unwrap();
    assert!(!subjects.contains("mallory"), "{subjects}");

    // A namespace that exists without being a customer's is never taken over.
    let system: Customer = serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1", "kind": "Customer",
        "metadata": {"name": "claim-system"},
        "spec": {"namespace": "kube-system", "users": ["mallory"]},
    }))
    .unwrap();
    customers
        .create(&PostParams::default(), &system)
        .await
        .unwrap();
    let refused = wait_for(&customers, "claim-system", |c: &Customer| {
        ready_reason(c).is_some()
    })
    .await;
    let (status, reason, _) = ready_reason(&refused).unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NamespaceNotCustomers")
    );
    let kube_system = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .get("kube-system")
        .await
        .unwrap();
    assert!(
        !kube_system
            .labels()
            .contains_key(uwsgi_it_api::well_known::CUSTOMER_LABEL),
        "kube-system was labelled as a customer's"
    );
    assert!(
        Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(client.clone(), "kube-system")
            .get_opt("uwsgi-it-customer")
            .await
            .unwrap()
            .is_none()
    );
}

/// Retries `read` until it succeeds, for a grant the controller has just written (RBAC reaches
/// the authorizer shortly after).
async fn eventually_allowed<T, F, Fut>(what: &str, read: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match read().await {
            Ok(value) => return value,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("{what}: still refused after {WAIT:?}: {e}")
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

/// Retries until `read` is refused with 403, for a grant the controller has just withdrawn.
async fn eventually_forbidden<T: std::fmt::Debug, F, Fut>(what: &str, read: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match read().await {
            Err(kube::Error::Api(status)) if status.code == 403 => return,
            other if std::time::Instant::now() > deadline => {
                panic!("{what}: expected 403 within {WAIT:?}, got {other:?}")
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test]
async fn a_customer_reads_its_own_customer_and_the_servers_only_it_owns_and_nothing_else() {
    let plane = plane_and_controller().await;
    let admin = plane.client().await.unwrap();
    for (name, address) in [
        ("reader-1", "203.0.113.31"),
        ("reader-2", "203.0.113.32"),
        ("reader-3", "203.0.113.33"),
    ] {
        server_node(&admin, name, 4000, 100000, address).await;
    }
    // erin as a person (impersonated) and as a ServiceAccount with a real token.
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(admin.clone(), "default");
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "erin-robot"}})).unwrap(),
        )
        .await
        .unwrap();
    let robot = "system:serviceaccount:default:erin-robot";
    // reader-2 is shared with another customer: its ledger names that customer's containers.
    customer(
        &admin,
        "reader",
        &["reader-1", "reader-2"],
        &["erin", robot],
    )
    .await;
    customer(
        &admin,
        "other-reader",
        &["reader-2", "reader-3"],
        &["frank"],
    )
    .await;
    let erin = plane.client_as("erin", &[]).await.unwrap();
    let erin_token = plane
        .service_account_client("default", "erin-robot")
        .await
        .unwrap();

    for (who, client) in [("erin", &erin), ("erin's token", &erin_token)] {
        let customers: Api<Customer> = Api::all(client.clone());
        let servers: Api<uwsgi_it_api::Server> = Api::all(client.clone());
        let own = eventually_allowed(&format!("{who} reading Customer reader"), || {
            customers.get("reader")
        })
        .await;
        let usage = own.status.expect("the Customer's status").servers;
        assert_eq!(
            usage.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
            ["reader-1", "reader-2"],
            "{who} sees the usage of every server of hers"
        );
        let sole = eventually_allowed(&format!("{who} reading Server reader-1"), || {
            servers.get("reader-1")
        })
        .await;
        assert_eq!(sole.spec.memory, 4000);
        assert!(sole.status.is_some(), "with its usage");
        assert_forbidden(
            &format!("{who} reading another Customer"),
            customers.get("other-reader").await,
        );
        assert_forbidden(
            &format!("{who} reading a Server shared with another customer"),
            servers.get("reader-2").await,
        );
        assert_forbidden(
            &format!("{who} reading another customer's Server"),
            servers.get("reader-3").await,
        );
        assert_forbidden(
            &format!("{who} listing Customers"),
            customers.list(&Default::default()).await,
        );
        assert_forbidden(
            &format!("{who} listing Servers"),
            servers.list(&Default::default()).await,
        );
        assert_forbidden(
            &format!("{who} changing her Customer"),
            customers
                .patch(
                    "reader",
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"spec": {"servers": ["reader-1", "reader-2", "reader-3"]}}),
                    ),
                )
                .await,
        );
    }

    // The other customer leaves reader-2: erin owns it alone and may read it; it joins again:
    // erin loses it.
    let customers: Api<Customer> = Api::all(admin.clone());
    let set_servers = |servers: serde_json::Value| {
        let customers = customers.clone();
        async move {
            customers
                .patch(
                    "other-reader",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"servers": servers}})),
                )
                .await
                .unwrap();
        }
    };
    let erin_servers: Api<uwsgi_it_api::Server> = Api::all(erin.clone());
    set_servers(json!(["reader-3"])).await;
    eventually_allowed("erin reading reader-2 once she owns it alone", || {
        erin_servers.get("reader-2")
    })
    .await;
    // It joins again and at once puts a container there: the container is admitted only once
    // erin may no longer read reader-2, whose ledger would name it.
    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(admin.clone());
    let erin_reads = |role: &k8s_openapi::api::rbac::v1::ClusterRole| {
        role.rules.iter().flatten().any(|rule| {
            rule.resource_names
                .iter()
                .flatten()
                .any(|name| name == "reader-2")
        })
    };
    assert!(erin_reads(
        &roles.get("uwsgi-it-customer-reader").await.unwrap()
    ));
    set_servers(json!(["reader-2", "reader-3"])).await;
    let frank_containers: Api<Container> = Api::namespaced(admin.clone(), "other-reader");
    frank_containers
        .create(
            &PostParams::default(),
            &container(
                "joins-shared",
                json!({"server": "reader-2", "memory": 100, "storage": 100}),
            ),
        )
        .await
        .unwrap();
    wait_for(&frank_containers, "joins-shared", admitted).await;
    assert!(
        !erin_reads(&roles.get("uwsgi-it-customer-reader").await.unwrap()),
        "frank's container was admitted to reader-2 while erin's role still let her read it"
    );
    eventually_forbidden("erin reading reader-2 once it is shared again", || {
        erin_servers.get("reader-2")
    })
    .await;

    // Deleting the Customer takes its readers with it (owner references).
    let role = roles.get("uwsgi-it-customer-reader").await.unwrap();
    assert_eq!(
        role.metadata.owner_references.unwrap()[0].name,
        "reader",
        "owned by its Customer"
    );
}

#[tokio::test]
async fn a_restart_the_customer_asks_for_replaces_the_pod_exactly_once() {
    let plane = plane_and_controller().await;
    let admin = plane.client().await.unwrap();
    server_node(&admin, "restart-1", 4000, 100000, "203.0.113.34").await;
    customer(&admin, "restarter", &["restart-1"], &["gina"]).await;
    let gina = plane.client_as("gina", &[]).await.unwrap();
    let containers: Api<Container> = Api::namespaced(gina.clone(), "restarter");
    let app = container(
        "app",
        json!({"server": "restart-1", "memory": 128, "storage": 1000, "distro": "bookworm"}),
    );
    let params = PostParams::default();
    eventually_allowed("gina creating her Container", || {
        containers.create(&params, &app)
    })
    .await;
    let admin_containers: Api<Container> = Api::namespaced(admin.clone(), "restarter");
    wait_for(&admin_containers, "app", admitted).await;
    report_home(&admin_containers, "app", "HomeReady", true).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "restarter");
    let first = wait_for(&pods, "app", |p: &Pod| {
        p.metadata.deletion_timestamp.is_none()
    })
    .await;
    let first_uid = first.uid().unwrap();

    let restart = |value: &'static str| {
        let containers = containers.clone();
        async move {
            containers
                .patch(
                    "app",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"restartedAt": value}})),
                )
                .await
                .expect("gina may ask for a restart")
        }
    };
    // What a kubelet does with a Pod being deleted (there is none in this tier): it finishes
    // the deletion once the Pod stopped.
    let kubelet_finishes = |uid: String| {
        let pods = pods.clone();
        async move {
            let terminating = wait_for(&pods, "app", |p: &Pod| {
                p.uid().as_deref() != Some(uid.as_str()) || p.metadata.deletion_timestamp.is_some()
            })
            .await;
            if terminating.uid().as_deref() == Some(uid.as_str()) {
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(kube::api::Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                let _ = pods.delete("app", &params).await;
            }
        }
    };
    restart("2026-12-02T10:00:00Z").await;
    kubelet_finishes(first_uid.clone()).await;
    let second = wait_for(&pods, "app", |p: &Pod| {
        p.uid().as_deref() != Some(first_uid.as_str()) && p.metadata.deletion_timestamp.is_none()
    })
    .await;
    let second_uid = second.uid().unwrap();
    assert_eq!(
        second.annotations()["uwsgi.it/restarted-at"],
        "2026-12-02T10:00:00Z"
    );
    // The same request again, and edits that restart nothing: the Pod stays.
    restart("2026-12-02T10:00:00Z").await;
    containers
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"note": "still the same Pod", "tags": ["x"]}})),
        )
        .await
        .unwrap();
    let edited = wait_for(&admin_containers, "app", |c: &Container| {
        c.status.as_ref().is_some_and(|s| {
            condition::find(&s.conditions, RUNNING)
                .is_some_and(|r| r.observed_generation == c.metadata.generation)
        })
    })
    .await;
    assert_eq!(edited.metadata.generation, Some(3));
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        pods.get("app").await.unwrap().uid().as_deref(),
        Some(second_uid.as_str()),
        "one request, one new Pod"
    );
    // A new request: one more Pod.
    restart("2026-12-02T10:05:00Z").await;
    kubelet_finishes(second_uid.clone()).await;
    wait_for(&pods, "app", |p: &Pod| {
        p.uid().as_deref() != Some(second_uid.as_str()) && p.metadata.deletion_timestamp.is_none()
    })
    .await;
}
