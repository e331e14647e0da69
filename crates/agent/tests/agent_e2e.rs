//! The agent end to end, with the controller's part written by the tests themselves (named
//! `..._with_written_controller_status`... where it matters): the real API server, one agent per
//! simulated server node running inside the node's network namespace, the kubelet stand-in,
//! and real TCP and UDP traffic from a client namespace. Both netfilter backends. Needs root.
//!
//! Every test has its own Kubernetes namespace, its own Nodes and network namespaces, and waits
//! with timeouts; nothing is left behind when it fails (see `support`).

mod support;

use std::net::SocketAddrV4;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use support::*;
use uwsgi_it_api::condition::{HOME_READY, KEYS_READY, PROGRAMMED};
use uwsgi_it_api::well_known::CONTROLLER_FINALIZER;
use uwsgi_it_testbed::netns::{Netns, UdpFlow, tcp_exchange};
use uwsgi_it_testbed::ssh_keys;

const PUBLIC_PORT: u16 = 9000;
const PRIVATE_PORT: u16 = 8000;

fn replies_from(reply: &str, message: &str, source: impl std::fmt::Display) {
    assert_eq!(reply, format!("{message} from {source}"));
}

/// Container `hydra` (1000/20000, distro) on node 1 with its Pod, and PortMappings public tcp and
/// udp 9000 → 8000, accepted with the Pod's address as target.
async fn seed_example(world: &World) -> SocketAddrV4 {
    let node = world.node(1);
    create(
        &world.containers(),
        json!({
            "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container",
            "metadata": {"name": "hydra", "namespace": world.namespace},
            "spec": {
                "server": node.public.to_string(), "memory": 1000, "storage": 20000,
                "distro": "bookworm",
                "sshKeys": [ssh_keys::ALICE],
            },
        }),
    )
    .await;
    write_container_status_as_controller(world, "hydra", node, 30001, vec![]).await;
    let address = run_pod(world, "hydra", node, &[]).await;
    let target = SocketAddrV4::new(address, PRIVATE_PORT);
    for (name, proto) in [("hydra-web", "tcp"), ("hydra-udp", "udp")] {
        create(
            &world.mappings(),
            json!({
                "apiVersion": "uwsgi.it/v1alpha1", "kind": "PortMapping",
                "metadata": {"name": name, "namespace": world.namespace},
                "spec": {"container": "hydra", "proto": proto, "publicPort": PUBLIC_PORT, "privatePort": PRIVATE_PORT},
            }),
        )
        .await;
        write_mapping_status_as_controller(world, name, node, true, Some(target)).await;
    }
    target
}

async fn programmed(world: &World, name: &str) {
    condition_where(&world.mappings(), name, PROGRAMMED, |c| c.status == "True").await;
}

fn tcp_ok(netns: &Netns, to: SocketAddrV4, message: &str) -> String {
    tcp_exchange(netns, to, message, NET_PATIENCE)
        .unwrap_or_else(|e| panic!("tcp {message} to {to}: {e}"))
}

async fn seed_example_reaches_the_container(backend: Backend) {
    let plane = plane_with_crds().await;
    let world = World::new(plane, backend, 2, vec![PRIVATE_PORT]).await;
    let mut agent = world.start_agent(1);
    // The second node's agent must leave node 1's mappings alone.
    let mut other = world.start_agent(2);
    let target = seed_example(&world).await;
    programmed(&world, "hydra-web").await;
    programmed(&world, "hydra-udp").await;
    agent.wait_ready().await;
    other.wait_ready().await;
    assert_eq!(agent.metrics.forwards_programmed(), 2);
    assert_eq!(other.metrics.forwards_programmed(), 0);

    let node = world.node(1);
    let public = node.public(PUBLIC_PORT);
    let client = &world.client_netns;
    replies_from(&tcp_ok(client, public, "tcp"), "tcp", CLIENT_ADDRESS);
    let flow = UdpFlow::open(client, public, NET_PATIENCE).unwrap();
    replies_from(&flow.exchange("udp").unwrap(), "udp", CLIENT_ADDRESS);
    // Node 2 does not forward node 1's port.
    assert!(
        tcp_exchange(
            client,
            world.node(2).public(PUBLIC_PORT),
            "x",
            Duration::from_millis(500)
        )
        .is_err()
    );

    // Node-local and hairpin clients are masqueraded behind the node's pod-network address.
    let gateway = format!("10.244.{}.1", node.index);
    replies_from(&tcp_ok(&node.netns, public, "node"), "node", &gateway);
    let pod = world
        .kubelet()
        .pod_netns(&world.namespace, "hydra")
        .unwrap();
    replies_from(&tcp_ok(&pod, public, "hairpin"), "hairpin", &gateway);
    let hairpin = UdpFlow::open(&pod, public, NET_PATIENCE).unwrap();
    replies_from(&hairpin.exchange("hairpin").unwrap(), "hairpin", &gateway);

    let condition = condition_where(&world.mappings(), "hydra-web", PROGRAMMED, |c| {
        c.status == "True"
    })
    .await;
    assert!(
        condition.message.contains(&target.to_string()),
        "{condition:?}"
    );

    // The home of the admitted container exists on node 1 only.
    condition_where(&world.containers(), "hydra", HOME_READY, |c| {
        c.status == "True"
    })
    .await;
    assert!(node.home_root.join("30001/.ssh/authorized_keys").is_file());
    assert!(!world.node(2).home_root.join("30001").exists());

    agent.stop().await.unwrap();
    other.stop().await.unwrap();
}

#[tokio::test]
async fn seed_example_reaches_the_container_nftables() {
    seed_example_reaches_the_container(Backend::Nftables).await;
}

#[tokio::test]
async fn seed_example_reaches_the_container_iptables() {
    seed_example_reaches_the_container(Backend::Iptables).await;
}

/// A status that claims `Accepted` (a compromised controller or node, or a mapping accepted
/// under an older configuration) still never gets an infrastructure port or a port a socket of
/// the node listens on; the node's own service keeps its traffic and the other forwards work.
#[tokio::test]
async fn infrastructure_and_listened_ports_are_never_forwarded_whatever_the_status_says() {
    let plane = plane_with_crds().await;
    let world = World::new(plane, Backend::Nftables, 1, vec![PRIVATE_PORT]).await;
    let mut agent = world.start_agent(1);
    let target = seed_example(&world).await;
    programmed(&world, "hydra-web").await;
    let node = world.node(1);
    let host_tcp = node
        .netns
        .enter(|| std::net::TcpListener::bind("0.0.0.0:9005"))
        .unwrap()
        .unwrap();
    let _host_udp = node
        .netns
        .enter(|| std::net::UdpSocket::bind("0.0.0.0:9006"))
        .unwrap()
        .unwrap();
    let attempts = [
        ("apiserver", "tcp", 6443, "ReservedPort"),
        ("etcd", "tcp", 2379, "ReservedPort"),
        ("vxlan", "udp", 8472, "ReservedPort"),
        ("vxlan-iana", "udp", 4789, "ReservedPort"),
        ("geneve", "udp", 6081, "ReservedPort"),
        ("wireguard", "udp", 51820, "ReservedPort"),
        ("node-exporter", "tcp", 9100, "ReservedPort"),
        ("memberlist", "tcp", 7946, "ReservedPort"),
        ("kubelet", "tcp", 10250, "ReservedPort"),
        ("nodeport", "tcp", 30080, "ReservedPort"),
        ("host-tcp", "tcp", 9005, "HostListening"),
        ("host-udp", "udp", 9006, "HostListening"),
    ];
    for (name, proto, port, _) in attempts {
        create(
            &world.mappings(),
            json!({
                "apiVersion": "uwsgi.it/v1alpha1", "kind": "PortMapping",
                "metadata": {"name": name, "namespace": world.namespace},
                "spec": {"container": "hydra", "proto": proto, "publicPort": port, "privatePort": PRIVATE_PORT},
            }),
        )
        .await;
        write_mapping_status_as_controller(&world, name, node, true, Some(target)).await;
    }
    for (name, proto, port, reason) in attempts {
        let refused =
            condition_where(&world.mappings(), name, PROGRAMMED, |c| c.status == "False").await;
        assert_eq!(refused.reason, reason, "{proto}/{port}: {refused:?}");
    }
    // Targets that are not hydra's own Pod: the cloud metadata service, the node itself, and
    // another container's Pod on the same node.
    create(
        &world.containers(),
        json!({
            "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container",
            "metadata": {"name": "neighbour", "namespace": world.namespace},
            "spec": {"server": node.name, "memory": 100, "storage": 100},
        }),
    )
    .await;
    write_container_status_as_controller(&world, "neighbour", node, 30002, vec![]).await;
    let neighbour = run_pod(&world, "neighbour", node, &[]).await;
    let forged = [
        (
            "forged-metadata",
            "169.254.169.254:80".parse().unwrap(),
            9010,
        ),
        (
            "forged-node",
            SocketAddrV4::new(node.public, PRIVATE_PORT),
            9011,
        ),
        (
            "forged-neighbour",
            SocketAddrV4::new(neighbour, PRIVATE_PORT),
            9012,
        ),
    ];
    for (name, target, port) in forged {
        create(
            &world.mappings(),
            json!({
                "apiVersion": "uwsgi.it/v1alpha1", "kind": "PortMapping",
                "metadata": {"name": name, "namespace": world.namespace},
                "spec": {"container": "hydra", "proto": "tcp", "publicPort": port, "privatePort": PRIVATE_PORT},
            }),
        )
        .await;
        write_mapping_status_as_controller(&world, name, node, true, Some(target)).await;
    }
    for (name, target, _) in forged {
        let refused =
            condition_where(&world.mappings(), name, PROGRAMMED, |c| c.status == "False").await;
        assert_eq!(refused.reason, "TargetUnverified", "{target}: {refused:?}");
        assert!(refused.message.contains("hydra's Pod"), "{refused:?}");
    }
    agent.wait_ready().await;
    assert_eq!(
        agent.metrics.forwards_programmed(),
        2,
        "only hydra's own two"
    );
    // The node's own listener still gets its connections, and hydra's forward still works.
    let public = node.public(9005);
    let client = world.client_netns.clone();
    let connect = std::thread::spawn(move || {
        client.enter(move || std::net::TcpStream::connect_timeout(&public.into(), NET_PATIENCE))
    });
    let (_, peer) = host_tcp.accept().unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::V4(CLIENT_ADDRESS));
    connect.join().unwrap().unwrap().unwrap();
    replies_from(
        &tcp_ok(&world.client_netns, node.public(PUBLIC_PORT), "still"),
        "still",
        CLIENT_ADDRESS,
    );
    agent.stop().await.unwrap();
}

async fn deleting_a_mapping_stops_new_and_ongoing_traffic(backend: Backend) {
    let plane = plane_with_crds().await;
    let world = World::new(plane, backend, 1, vec![PRIVATE_PORT]).await;
    let mut agent = world.start_agent(1);
    seed_example(&world).await;
    programmed(&world, "hydra-web").await;
    programmed(&world, "hydra-udp").await;
    agent.wait_ready().await;
    let public = world.node(1).public(PUBLIC_PORT);
    let client = &world.client_netns;
    let flow = UdpFlow::open(client, public, Duration::from_millis(300)).unwrap();
    flow.exchange("before").unwrap();
    tcp_ok(client, public, "before");

    let deleted = Instant::now();
    for name in ["hydra-web", "hydra-udp"] {
        world
            .mappings()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    let stopped = eventually("the ongoing UDP flow to stop", || async {
        flow.exchange("after").is_err().then(Instant::now)
    })
    .await;
    assert!(
        stopped - deleted < Duration::from_secs(2),
        "the UDP flow went on for {:?} after the delete",
        stopped - deleted
    );
    assert!(tcp_exchange(client, public, "after", Duration::from_millis(500)).is_err());
    eventually("no forwards programmed", || async {
        (agent.metrics.forwards_programmed() == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn deleting_a_mapping_stops_new_and_ongoing_traffic_nftables() {
    deleting_a_mapping_stops_new_and_ongoing_traffic(Backend::Nftables).await;
}

#[tokio::test]
async fn deleting_a_mapping_stops_new_and_ongoing_traffic_iptables() {
    deleting_a_mapping_stops_new_and_ongoing_traffic(Backend::Iptables).await;
}

/// A second customer's container on the same server claims the same public port. Its Pod
/// listens on no forwarded port, so traffic that reached it would fail.
async fn a_conflicting_mapping_never_steals_the_traffic(backend: Backend) {
    let plane = plane_with_crds().await;
    let world = World::new(plane, backend, 1, vec![PRIVATE_PORT]).await;
    let mut agent = world.start_agent(1);
    seed_example(&world).await;
    programmed(&world, "hydra-web").await;
    agent.wait_ready().await;
    let node = world.node(1);

    create(
        &world.containers(),
        json!({
            "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container",
            "metadata": {"name": "intruder", "namespace": world.namespace},
            "spec": {"server": node.name, "memory": 100, "storage": 100, "distro": "bookworm"},
        }),
    )
    .await;
    write_container_status_as_controller(&world, "intruder", node, 30002, vec![]).await;
    let intruder = run_pod(&world, "intruder", node, &[7000]).await;
    for name in ["intruder-refused", "intruder-racing"] {
        create(
            &world.mappings(),
            json!({
                "apiVersion": "uwsgi.it/v1alpha1", "kind": "PortMapping",
                "metadata": {"name": name, "namespace": world.namespace},
                "spec": {"container": "intruder", "proto": "tcp", "publicPort": PUBLIC_PORT, "privatePort": PRIVATE_PORT},
            }),
        )
        .await;
    }
    let target = Some(SocketAddrV4::new(intruder, PRIVATE_PORT));
    // What the controller does: refuses it.
    write_mapping_status_as_controller(&world, "intruder-refused", node, false, target).await;
    // What a controller bug or a race could do: accept it too. The earlier mapping still wins.
    write_mapping_status_as_controller(&world, "intruder-racing", node, true, target).await;
    let refused = condition_where(&world.mappings(), "intruder-refused", PROGRAMMED, |c| {
        c.status == "False"
    })
    .await;
    assert_eq!(refused.reason, "NotAccepted");
    let racing = condition_where(&world.mappings(), "intruder-racing", PROGRAMMED, |c| {
        c.status == "False"
    })
    .await;
    assert_eq!(racing.reason, "PortConflict", "{racing:?}");
    for attempt in 0..5 {
        replies_from(
            &tcp_ok(
                &world.client_netns,
                node.public(PUBLIC_PORT),
                &format!("try{attempt}"),
            ),
            &format!("try{attempt}"),
            CLIENT_ADDRESS,
        );
    }
    programmed(&world, "hydra-web").await;
}

#[tokio::test]
async fn a_conflicting_mapping_never_steals_the_traffic_nftables() {
    a_conflicting_mapping_never_steals_the_traffic(Backend::Nftables).await;
}

#[tokio::test]
async fn a_conflicting_mapping_never_steals_the_traffic_iptables() {
    a_conflicting_mapping_never_steals_the_traffic(Backend::Iptables).await;
}

async fn flushed_rules_come_back_within_a_resync(backend: Backend) {
    let plane = plane_with_crds().await;
    let world = World::new(plane, backend, 1, vec![PRIVATE_PORT]).await;
    let mut agent = world.start_agent(1);
    seed_example(&world).await;
    // Both forwards written before the flush: a flush that lands before the second mapping is
    // programmed is repaired by that change's own rewrite, which is rightly not counted as drift.
    programmed(&world, "hydra-web").await;
    programmed(&world, "hydra-udp").await;
    agent.wait_ready().await;
    eventually("both forwards programmed", || async {
        (agent.metrics.forwards_programmed() == 2).then_some(())
    })
    .await;
    let node = world.node(1);
    let public = node.public(PUBLIC_PORT);
    tcp_ok(&world.client_netns, public, "before");
    assert_eq!(agent.metrics.drift_repairs(), 0);

    let flushed = Instant::now();
    backend.flush(&node.netns);
    eventually("traffic back after the flush", || async {
        tcp_exchange(
            &world.client_netns,
            public,
            "after",
            Duration::from_millis(300),
        )
        .ok()
        .map(|_| ())
    })
    .await;
    let back = flushed.elapsed();
    assert!(
        back < RESYNC * 3,
        "forwarding came back after {back:?}, resync period {RESYNC:?}"
    );
    // The counter moves just after the rewrite that let the traffic through.
    eventually("the drift repair counted", || async {
        (agent.metrics.drift_repairs() >= 1).then_some(())
    })
    .await;
    // The repair is reported on the Node.
    let events: Api<Event> = Api::namespaced(world.client.clone(), "default");
    eventually("a drift Event on the Node", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("ForwardingDriftRepaired")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                        == Some(node.name.as_str())
            })
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn flushed_rules_come_back_within_a_resync_nftables() {
    flushed_rules_come_back_within_a_resync(Backend::Nftables).await;
}

#[tokio::test]
async fn flushed_rules_come_back_within_a_resync_iptables() {
    flushed_rules_come_back_within_a_resync(Backend::Iptables).await;
}

/// Probes the forward continuously (a fresh TCP connection each time) on a thread of its own.
struct Prober {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    successes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(netns: Arc<Netns>, to: SocketAddrV4) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let successes = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, failures, successes) = (stop.clone(), failures.clone(), successes.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp_exchange(&netns, to, "probe", NET_PATIENCE) {
                        Ok(_) => successes.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                    };
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Prober {
            stop,
            failures,
            successes,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        (
            self.successes.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn restarting_the_agent_never_interrupts_traffic(backend: Backend) {
    let plane = plane_with_crds().await;
    let world = World::new(plane, backend, 1, vec![PRIVATE_PORT]).await;
    let mut agent = world.start_agent(1);
    seed_example(&world).await;
    programmed(&world, "hydra-web").await;
    agent.wait_ready().await;
    let prober = Prober::start(
        world.client_netns.clone(),
        world.node(1).public(PUBLIC_PORT),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    agent.kill();
    drop(agent);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut restarted = world.start_agent(1);
    restarted.wait_ready().await;
    // Two full resyncs of the new agent.
    tokio::time::sleep(RESYNC * 2 + Duration::from_millis(200)).await;
    let (successes, failures) = prober.finish();
    assert_eq!(
        failures, 0,
        "{failures} probes failed, {successes} succeeded"
    );
    assert!(successes > 10, "only {successes} probes ran");
    assert_eq!(restarted.metrics.drift_repairs(), 0);
}

#[tokio::test]
async fn restarting_the_agent_never_interrupts_traffic_nftables() {
    restarting_the_agent_never_interrupts_traffic(Backend::Nftables).await;
}

#[tokio::test]
async fn restarting_the_agent_never_interrupts_traffic_iptables() {
    restarting_the_agent_never_interrupts_traffic(Backend::Iptables).await;
}

fn mode_of(path: &std::path::Path) -> (u32, u32, u32) {
    let metadata = std::fs::symlink_metadata(path).unwrap();
    (
        metadata.uid(),
        metadata.gid(),
        metadata.permissions().mode() & 0o7777,
    )
}

#[tokio::test]
async fn homes_follow_their_containers_with_written_controller_status() {
    let plane = plane_with_crds().await;
    let world = World::new(plane, Backend::Nftables, 1, vec![PRIVATE_PORT]).await;
    let mut agent = world.start_agent(1);
    let node = world.node(1);
    let key = ssh_keys::BOB;
    for (name, storage_container, uid) in [("storage", true, 30010u32), ("web", false, 30011)] {
        create(
            &world.containers(),
            json!({
                "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container",
                "metadata": {"name": name, "namespace": world.namespace, "finalizers": [CONTROLLER_FINALIZER]},
                "spec": {"server": node.name, "memory": 100, "storage": 1, "quotaThreshold": 50,
                         "customDistrosStorage": storage_container, "sshKeys": [key]},
            }),
        )
        .await;
        write_container_status_as_controller(&world, name, node, uid, vec![]).await;
    }
    for name in ["storage", "web"] {
        condition_where(&world.containers(), name, HOME_READY, |c| {
            c.status == "True"
        })
        .await;
    }
    agent.wait_ready().await;
    let storage_home = node.home_root.join("30010");
    let web_home = node.home_root.join("30011");
    assert_eq!(mode_of(&storage_home), (30010, 30010, 0o700));
    assert_eq!(mode_of(&web_home), (30011, 30011, 0o700));
    assert!(storage_home.join("distros").is_dir());
    assert!(!web_home.join("distros").exists());
    let keys = std::fs::read_to_string(web_home.join(".ssh/authorized_keys")).unwrap();
    assert_eq!(keys.lines().skip(1).collect::<Vec<_>>(), [key]);
    assert_eq!(agent.metrics.homes(), 2);

    // sshKeys are applied hot.
    let new_key = ssh_keys::CAROL;
    world
        .containers()
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sshKeys": [new_key]}})),
        )
        .await
        .unwrap();
    eventually("the new key written", || async {
        let keys = std::fs::read_to_string(web_home.join(".ssh/authorized_keys")).ok()?;
        (keys.lines().skip(1).collect::<Vec<_>>() == [new_key]).then_some(())
    })
    .await;
    let applied = condition_where(&world.containers(), "web", KEYS_READY, |c| {
        c.status == "True"
    })
    .await;
    assert_eq!(applied.message, "1 key(s) in .ssh/authorized_keys");

    // A file the customer wrote itself is the customer's: sshKeys do not overwrite it, and the
    // refusal is the keys' own condition, the home stays ready.
    let keys_file = web_home.join(".ssh/authorized_keys");
    std::fs::write(&keys_file, format!("{}\n", ssh_keys::ALICE)).unwrap();
    world
        .containers()
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sshKeys": [ssh_keys::BOB]}})),
        )
        .await
        .unwrap();
    let refused = condition_where(&world.containers(), "web", KEYS_READY, |c| {
        c.status == "False"
    })
    .await;
    assert_eq!(refused.reason, "HandMadeKeysFile", "{refused:?}");
    let home = condition_where(&world.containers(), "web", HOME_READY, |_| true).await;
    assert_eq!(home.status, "True", "{home:?}");
    assert_eq!(
        std::fs::read_to_string(&keys_file).unwrap(),
        format!("{}\n", ssh_keys::ALICE)
    );

    // Storage use: 1 MB reserved, warning at 50 %; a 700 KiB file crosses it.
    std::fs::write(web_home.join("big"), vec![7u8; 700 * 1024]).unwrap();
    let quota = condition_where(&world.containers(), "web", "StorageWithinQuota", |c| {
        c.status == "False"
    })
    .await;
    assert_eq!(quota.reason, "QuotaThresholdReached");
    assert!(quota.message.contains("of 1 MB"), "{quota:?}");
    let used = |c: &uwsgi_it_api::Container| c.status.as_ref().and_then(|s| s.storage_used);
    let measured = world.containers().get("web").await.unwrap();
    assert_eq!(used(&measured), Some(1), "700 KiB is 1 MB, rounded up");
    // An edit that changes neither storage nor quotaThreshold: the agent's conditions say the
    // new generation (the last measurement reported again, the home not walked for it) and
    // storageUsed stays.
    world
        .containers()
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"note": "a note changes nothing on the node"}})),
        )
        .await
        .unwrap();
    let generation = world
        .containers()
        .get("web")
        .await
        .unwrap()
        .metadata
        .generation;
    let again = condition_where(&world.containers(), "web", "StorageWithinQuota", |c| {
        c.observed_generation == generation
    })
    .await;
    assert_eq!(again.reason, "QuotaThresholdReached", "{again:?}");
    assert_eq!(
        used(&world.containers().get("web").await.unwrap()),
        Some(1),
        "storageUsed is kept across writes that carry no new measurement"
    );

    // Deletion while the workload still runs: the home stays until the controller says Stopped.
    write_container_status_as_controller(
        &world,
        "web",
        node,
        30011,
        vec![json!({"type": "Running", "status": "True", "reason": "Running", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"})],
    )
    .await;
    world
        .containers()
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    // Two resync periods: long enough for a wrong agent to have archived it.
    tokio::time::sleep(RESYNC * 2).await;
    assert!(
        web_home.join("big").is_file(),
        "archived while the workload was still running"
    );
    write_container_status_as_controller(
        &world,
        "web",
        node,
        30011,
        vec![json!({"type": "Running", "status": "False", "reason": "Stopped", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"})],
    )
    .await;
    let released = condition_where(&world.containers(), "web", HOME_READY, |c| {
        c.reason == "HomeReleased"
    })
    .await;
    assert_eq!(released.status, "False");
    assert!(released.message.contains("archived to"), "{released:?}");
    assert!(!web_home.exists());
    let archived: Vec<_> = std::fs::read_dir(node.home_root.join(".archive"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(archived.len(), 1, "{archived:?}");
    assert!(
        archived[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("30011-")
    );
    assert!(archived[0].join("big").is_file());
    // The controller's part: release the finalizer on HomeReleased.
    world
        .containers()
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    world
        .containers()
        .patch(
            "storage",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
}

/// A status that gives a second container a uid that another already holds (forged, or
/// corrupted): the first keeps its home and keys, the second gets neither.
#[tokio::test]
async fn a_uid_claimed_twice_never_gets_the_home_or_its_keys() {
    let plane = plane_with_crds().await;
    let world = World::new(plane, Backend::Nftables, 1, vec![PRIVATE_PORT]).await;
    let mut agent = world.start_agent(1);
    let node = world.node(1);
    for (name, key) in [("victim", ssh_keys::ALICE), ("thief", ssh_keys::MALLORY)] {
        create(
            &world.containers(),
            json!({
                "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container",
                "metadata": {"name": name, "namespace": world.namespace},
                "spec": {"server": node.name, "memory": 100, "storage": 100, "sshKeys": [key]},
            }),
        )
        .await;
        write_container_status_as_controller(&world, name, node, 30040, vec![]).await;
        if name == "victim" {
            condition_where(&world.containers(), "victim", HOME_READY, |c| {
                c.status == "True"
            })
            .await;
        }
    }
    let refused = condition_where(&world.containers(), "thief", HOME_READY, |c| {
        c.status == "False"
    })
    .await;
    assert_eq!(refused.reason, "UidClaimedTwice", "{refused:?}");
    assert!(refused.message.contains("victim"), "{refused:?}");
    agent.wait_ready().await;
    let keys = std::fs::read_to_string(node.home_root.join("30040/.ssh/authorized_keys")).unwrap();
    assert!(keys.contains(ssh_keys::ALICE), "{keys}");
    assert!(
        !keys.contains("mallory"),
        "the thief's key reached the victim's home: {keys}"
    );
    let victim = condition_where(&world.containers(), "victim", HOME_READY, |_| true).await;
    assert_eq!(victim.status, "True", "{victim:?}");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_planted_symlink_is_refused_and_nothing_outside_changes() {
    let plane = plane_with_crds().await;
    let world = World::new(plane, Backend::Nftables, 1, vec![PRIVATE_PORT]).await;
    let mut agent = world.start_agent(1);
    let node = world.node(1);
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("precious"), "keep").unwrap();
    let before = mode_of(outside.path());
    std::fs::create_dir_all(&node.home_root).unwrap();
    std::os::unix::fs::symlink(outside.path(), node.home_root.join("30020")).unwrap();

    create(
        &world.containers(),
        json!({
            "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container",
            "metadata": {"name": "victim", "namespace": world.namespace},
            "spec": {"server": node.name, "memory": 100, "storage": 100, "customDistrosStorage": true,
                     "sshKeys": [ssh_keys::MALLORY]},
        }),
    )
    .await;
    write_container_status_as_controller(&world, "victim", node, 30020, vec![]).await;
    let refused = condition_where(&world.containers(), "victim", HOME_READY, |c| {
        c.status == "False"
    })
    .await;
    assert_eq!(refused.reason, "SymlinkRefused", "{refused:?}");
    agent.wait_ready().await;
    assert_eq!(mode_of(outside.path()), before);
    let entries: Vec<_> = std::fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("precious")]);
    assert!(
        std::fs::symlink_metadata(node.home_root.join("30020"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

/// The agent's scoping relies on `.status.server` being a selectable field of the CRDs.
#[tokio::test]
async fn the_api_server_selects_containers_by_status_server() {
    let plane = plane_with_crds().await;
    let world = World::new(plane, Backend::Nftables, 2, vec![]).await;
    for (name, index, uid) in [("on-one", 1u8, 30031u32), ("on-two", 2, 30032)] {
        create(
            &world.containers(),
            json!({
                "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container",
                "metadata": {"name": name, "namespace": world.namespace},
                "spec": {"server": world.node(index).name, "memory": 1, "storage": 1},
            }),
        )
        .await;
        write_container_status_as_controller(&world, name, world.node(index), uid, vec![]).await;
    }
    let node = &world.node(1).name;
    let selected = world
        .containers()
        .list(&ListParams::default().fields(&format!("status.server={node}")))
        .await
        .unwrap();
    let names: Vec<_> = selected
        .items
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, vec!["on-one".to_owned()]);
    assert_eq!(
        uwsgi_it_agent::scope::choose_selector(&world.client, node)
            .await
            .unwrap(),
        uwsgi_it_agent::scope::NodeSelector::StatusField
    );
}

/// The configuration of `node` with the other backend.
fn with_backend(
    world: &World,
    node: &SimNode,
    backend: &str,
) -> uwsgi_it_domain::config::OperatorConfig {
    uwsgi_it_domain::config::OperatorConfig::from_yaml(&format!(
        "homeRoot: {}\nportForward:\n  backend: {backend}\n  resyncPeriod: {}s\n",
        node.home_root.display(),
        RESYNC.as_secs()
    ))
    .unwrap_or_else(|e| panic!("{e} ({:?})", world.backend))
}

fn owned_iptables_rules(node: &SimNode) -> Vec<String> {
    node.netns
        .run("iptables-save", &["-t", "nat"])
        .unwrap()
        .lines()
        .filter(|l| l.contains("UWSGI-IT"))
        .map(str::to_owned)
        .collect()
}

fn nft_table_exists(node: &SimNode) -> bool {
    node.netns
        .run("nft", &["list", "table", "ip", "uwsgi_it"])
        .is_ok()
}

/// iptables → nftables → iptables on one node: after each switch only the backend in use has
/// rules, traffic flows, and `agent --cleanup` removes everything.
#[tokio::test]
async fn switching_the_backend_leaves_no_old_rule_behind() {
    let plane = plane_with_crds().await;
    let world = World::new(plane, Backend::Iptables, 1, vec![PRIVATE_PORT]).await;
    let node = world.node(1);
    let public = node.public(PUBLIC_PORT);
    let mut agent = world.start_agent(1);
    seed_example(&world).await;
    programmed(&world, "hydra-web").await;
    agent.wait_ready().await;
    replies_from(
        &tcp_ok(&world.client_netns, public, "iptables"),
        "iptables",
        CLIENT_ADDRESS,
    );
    agent.stop().await.unwrap();
    assert!(!owned_iptables_rules(node).is_empty());

    for backend in ["nftables", "iptables"] {
        let mut agent = start_agent(
            world.client.clone(),
            node,
            with_backend(&world, node, backend),
        );
        agent.wait_ready().await;
        let (iptables_left, nft_left) = (
            !owned_iptables_rules(node).is_empty(),
            nft_table_exists(node),
        );
        assert_eq!(
            (iptables_left, nft_left),
            (backend == "iptables", backend == "nftables"),
            "after switching to {backend}: iptables rules {:?}, nft table {nft_left}",
            owned_iptables_rules(node)
        );
        replies_from(
            &tcp_ok(&world.client_netns, public, backend),
            backend,
            CLIENT_ADDRESS,
        );
        agent.stop().await.unwrap();
    }

    // `agent --cleanup`: nothing of the agent's stays, and the forward is gone with it.
    let removed = uwsgi_it_agent::cleanup(
        &uwsgi_it_agent::NetworkNamespace::Named(node.netns.name().to_owned()),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(
        removed,
        ["iptables-nft FORWARD accept", "iptables-nft chains"]
    );
    assert!(owned_iptables_rules(node).is_empty());
    assert!(!nft_table_exists(node));
    assert!(
        tcp_exchange(
            &world.client_netns,
            public,
            "gone",
            Duration::from_millis(500)
        )
        .is_err()
    );
    assert!(
        uwsgi_it_agent::cleanup(
            &uwsgi_it_agent::NetworkNamespace::Named(node.netns.name().to_owned()),
            Duration::from_secs(10),
        )
        .unwrap()
        .is_empty(),
        "a second cleanup has nothing to do"
    );
}

/// A host whose filter FORWARD policy is DROP (what Docker and ufw set): the agent accepts its
/// own forwarded connections there, whichever backend DNATs them, and puts the accept back when
/// it is removed behind its back.
async fn forwards_get_through_a_forward_drop_policy(backend: Backend) {
    let plane = plane_with_crds().await;
    let world = World::new(plane, backend, 1, vec![PRIVATE_PORT]).await;
    let node = world.node(1);
    node.netns
        .run("iptables", &["-P", "FORWARD", "DROP"])
        .unwrap();
    let mut agent = world.start_agent(1);
    seed_example(&world).await;
    programmed(&world, "hydra-web").await;
    agent.wait_ready().await;
    let public = node.public(PUBLIC_PORT);
    replies_from(
        &tcp_ok(&world.client_netns, public, "through"),
        "through",
        CLIENT_ADDRESS,
    );
    let filter = node.netns.run("iptables-save", &["-t", "filter"]).unwrap();
    assert!(filter.contains(":FORWARD DROP"), "{filter}");
    assert!(
        filter.contains("-A FORWARD -j UWSGI-IT-FORWARD"),
        "{filter}"
    );

    // Without the accept the policy drops the forward: the accept is what lets it through ...
    node.netns
        .run("iptables", &["-D", "FORWARD", "-j", "UWSGI-IT-FORWARD"])
        .unwrap();
    assert!(
        tcp_exchange(
            &world.client_netns,
            public,
            "dropped",
            Duration::from_millis(700)
        )
        .is_err()
    );
    // ... and the next full resync puts it back.
    let client = world.client_netns.clone();
    eventually("the accept is back", || {
        let client = client.clone();
        async move { tcp_exchange(&client, public, "back", NET_PATIENCE).ok() }
    })
    .await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn forwards_get_through_a_forward_drop_policy_nftables() {
    forwards_get_through_a_forward_drop_policy(Backend::Nftables).await;
}

#[tokio::test]
async fn forwards_get_through_a_forward_drop_policy_iptables() {
    forwards_get_through_a_forward_drop_policy(Backend::Iptables).await;
}

/// A host whose rules are in legacy iptables (an older distribution, or a kube-proxy run with
/// iptables-legacy): the agent finds them and writes its own there too, where they are ordered
/// with the host's; nothing goes to the nft flavour.
#[tokio::test]
async fn the_agent_writes_iptables_rules_in_the_flavour_the_host_uses() {
    let plane = plane_with_crds().await;
    let world = World::new(plane, Backend::Iptables, 1, vec![PRIVATE_PORT]).await;
    let node = world.node(1);
    for args in [
        &["-t", "nat", "-N", "KUBE-SERVICES"][..],
        &["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
        &["-t", "filter", "-N", "KUBE-FIREWALL"],
        &["-t", "filter", "-A", "INPUT", "-j", "KUBE-FIREWALL"],
    ] {
        node.netns.run("iptables-legacy", args).unwrap();
    }
    let mut agent = world.start_agent(1);
    seed_example(&world).await;
    programmed(&world, "hydra-web").await;
    agent.wait_ready().await;
    replies_from(
        &tcp_ok(&world.client_netns, node.public(PUBLIC_PORT), "legacy"),
        "legacy",
        CLIENT_ADDRESS,
    );
    let legacy = node.netns.run("iptables-legacy-save", &[]).unwrap();
    let nft = node.netns.run("iptables-nft-save", &[]).unwrap();
    assert!(legacy.contains("-A UWSGI-IT-FORWARDS"), "{legacy}");
    assert!(
        legacy.contains("-A FORWARD -j UWSGI-IT-FORWARD"),
        "{legacy}"
    );
    assert!(!nft.contains("UWSGI-IT"), "{nft}");
    agent.stop().await.unwrap();
    let removed = uwsgi_it_agent::cleanup(
        &uwsgi_it_agent::NetworkNamespace::Named(node.netns.name().to_owned()),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(
        removed,
        ["iptables-legacy FORWARD accept", "iptables-legacy chains"]
    );
    assert!(
        !node
            .netns
            .run("iptables-legacy-save", &[])
            .unwrap()
            .contains("UWSGI-IT")
    );
}
