//! End to end on the real cluster (tier 3): `hack/cluster.sh` brings up the control plane and
//! two real server nodes (kubelet, containerd, runc, CNI, kube-proxy in network namespaces of
//! their own), the project is released to the cluster's loopback registry and its chart is
//! installed from there with helm (`oci://`, images by digest), and the controller and the agent run as the
//! Deployment and DaemonSet Pods they are in production.
//!
//! One test function on purpose: the machine holds one real cluster at a time, and bringing one
//! up is the expensive part. Each step says what it shows; a failing step names itself. At the
//! end the cluster is taken down and the test checks that nothing is left behind.

use std::net::SocketAddrV4;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};
use uwsgi_it_api::{Container, PortMapping};
use uwsgi_it_testbed::netns::{Netns, UdpFlow};
use uwsgi_it_testbed::real_cluster::{RealCluster, http_get, wait_condition, write_as_customer};

#[path = "real_cluster/custom_distros.rs"]
mod custom_distros;
#[path = "real_cluster/release.rs"]
mod release;

const SYSTEM: &str = "uwsgi-it-system";
const CUSTOMER: &str = "acme";
const WAIT: Duration = Duration::from_secs(120);

#[test]
fn the_hosting_model_runs_for_real_on_two_server_nodes() {
    let cluster = RealCluster::up().expect("bringing up the real cluster");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(scenario(&cluster));
    drop(runtime);
    cluster
        .down()
        .expect("taking the cluster down leaves nothing behind");
}

fn step(what: &str) {
    eprintln!("[real-cluster] {what}");
}

async fn scenario(cluster: &RealCluster) {
    let client = cluster.client().await.expect("admin client");
    let crash_loops = CrashLoopWatch::default();

    step("servers, the chart (controller Deployment with 2 replicas, agent DaemonSet)");
    cluster
        .install_chart("uwsgi-it", SYSTEM, &[])
        .expect("helm install");
    step("helm test: CRDs established, a controller leading, every agent ready");
    let tested = cluster.test_chart("uwsgi-it", SYSTEM).expect("helm test");
    assert!(
        tested.contains("ok: every CRD established, a controller leading, every agent ready"),
        "{tested}"
    );
    release::pods_run_the_released_images(cluster, &client).await;
    cluster_apply(
        cluster,
        &std::fs::read_to_string(repo("examples/00-server.yaml")).unwrap(),
    );
    cluster_apply(
        cluster,
        "apiVersion: uwsgi.it/v1alpha1
kind: Server
metadata: {name: server-2}
spec: {memory: 8000, storage: 100000, address: 203.0.113.20}
---
apiVersion: uwsgi.it/v1alpha1
kind: Customer
metadata: {name: acme}
spec: {servers: [server-1, server-2], users: [alice]}",
    );
    let customers: Api<uwsgi_it_api::Customer> = Api::all(client.clone());
    wait_condition(&customers, CUSTOMER, "Ready", WAIT)
        .await
        .expect("the customer's namespace is made");
    // The controller labels the namespace for Pod Security (enforce baseline; warn and audit
    // restricted) and gives it its isolation NetworkPolicy.
    let namespace = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .get(CUSTOMER)
        .await
        .expect("the customer's namespace");
    let labels = namespace.metadata.labels.unwrap_or_default();
    for (key, value) in [
        ("pod-security.kubernetes.io/enforce", "baseline"),
        ("pod-security.kubernetes.io/warn", "restricted"),
        ("pod-security.kubernetes.io/audit", "restricted"),
    ] {
        assert_eq!(
            labels.get(key).map(String::as_str),
            Some(value),
            "{labels:?}"
        );
    }
    Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(client.clone(), CUSTOMER)
        .get("uwsgi-it-isolation")
        .await
        .expect("the customer's isolation NetworkPolicy");
    crash_loops.check(cluster);

    step("the agents' endpoints answer on their node's loopback only, never on a public address");
    let client_netns = cluster.client_netns().expect("the client namespace");
    for node in ["server-1", "server-2"] {
        let netns = cluster.node_netns(node).expect("the node's namespace");
        let local = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9180);
        let (status, body) = http_get(&netns, local, "/metrics", Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{node}: the agent's /metrics on loopback: {e}"));
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("forwarding_last_success_timestamp_seconds"),
            "{body}"
        );
        for address in [cluster.public_ip(node), cluster.node_ip(node)] {
            let outside = http_get(
                &client_netns,
                SocketAddrV4::new(address, 9180),
                "/metrics",
                Duration::from_secs(2),
            );
            assert!(
                outside.is_err(),
                "{node}: /metrics answered on {address}: {outside:?}"
            );
        }
    }

    step(
        "the seed quickstart: container hydra (1000 MB / 20000 MB) on server-1 by its public address",
    );
    cluster_apply(
        cluster,
        "apiVersion: uwsgi.it/v1alpha1
kind: Container
metadata: {name: hydra, namespace: acme}
spec: {server: 203.0.113.10, memory: 1000, storage: 20000, distro: bookworm}",
    );
    let containers: Api<Container> = Api::namespaced(client.clone(), CUSTOMER);
    let hydra = wait_condition(&containers, "hydra", "Running", WAIT)
        .await
        .expect("hydra runs its Emperor");
    let status = hydra.status.clone().unwrap_or_default();
    let uid = u32::try_from(status.uid.expect("a uid")).unwrap();
    let home = cluster.home_root().join(uid.to_string());
    assert_eq!(status.server.as_deref(), Some("server-1"));
    for dir in ["vassals", "logs", "run", "tmp", "etc", ".ssh"] {
        let meta = std::fs::metadata(home.join(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            uid,
            "{dir} is the container's"
        );
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), CUSTOMER);
    let pod = pods.get("hydra").await.expect("hydra's Pod");
    let pod_spec = pod.spec.clone().unwrap();
    assert_eq!(pod_spec.node_name.as_deref(), Some("server-1"));
    assert_eq!(
        pod_spec
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user),
        Some(i64::from(uid))
    );

    step(
        "server-2's agent, with its own Pod token, cannot write hydra's status (admission policy)",
    );
    agent_token_is_confined_to_its_node(cluster, &client).await;

    step(
        "a vassal placed in the home as the customer would, mapped tcp 9000 -> 8000 and udp 9001 -> 8001",
    );
    write_app(&home, uid, "app", 8000, Some(8001), "hello from hydra");
    cluster_apply(
        cluster,
        "apiVersion: uwsgi.it/v1alpha1
kind: PortMapping
metadata: {name: hydra-web, namespace: acme}
spec: {container: hydra, proto: tcp, publicPort: 9000, privatePort: 8000}
---
apiVersion: uwsgi.it/v1alpha1
kind: PortMapping
metadata: {name: hydra-udp, namespace: acme}
spec: {container: hydra, proto: udp, publicPort: 9001, privatePort: 8001}",
    );
    let mappings: Api<PortMapping> = Api::namespaced(client.clone(), CUSTOMER);
    for name in ["hydra-web", "hydra-udp"] {
        wait_condition(&mappings, name, "Programmed", WAIT)
            .await
            .expect("the agent programs the forward");
    }
    let client_ns = cluster.client_netns().expect("the client namespace");
    let public = cluster.public_ip("server-1");
    let web = SocketAddrV4::new(public, 9000);
    let answer = wait_http(&client_ns, web, Duration::from_secs(60))
        .await
        .expect("the app answers through the public port");
    assert_eq!(answer.trim(), "hello from hydra");
    let flow = UdpFlow::open(
        &client_ns,
        SocketAddrV4::new(public, 9001),
        Duration::from_secs(2),
    )
    .unwrap();
    let mut udp_answer = None;
    for _ in 0..20 {
        if let Ok(reply) = flow.exchange("ping") {
            udp_answer = Some(reply);
            break;
        }
    }
    assert_eq!(
        udp_answer.as_deref(),
        Some("echo:ping"),
        "the UDP app answers"
    );
    crash_loops.check(cluster);

    step("a vassal added while the container runs serves within 5 s; removing its .ini stops it");
    cluster_apply(
        cluster,
        "apiVersion: uwsgi.it/v1alpha1
kind: PortMapping
metadata: {name: hydra-second, namespace: acme}
spec: {container: hydra, publicPort: 9002, privatePort: 8002}",
    );
    wait_condition(&mappings, "hydra-second", "Programmed", WAIT)
        .await
        .unwrap();
    let second = SocketAddrV4::new(public, 9002);
    let dropped = Instant::now();
    write_app(&home, uid, "second", 8002, None, "second vassal");
    let answer = wait_http(&client_ns, second, Duration::from_secs(5))
        .await
        .expect("the new vassal serves within 5 s");
    eprintln!(
        "[real-cluster] new vassal answered {:?} after its .ini was written",
        dropped.elapsed()
    );
    assert_eq!(answer.trim(), "second vassal");
    std::fs::remove_file(home.join("vassals/second.ini")).unwrap();
    wait_until(Duration::from_secs(15), "the removed vassal stops", || {
        http_get(&client_ns, second, "/", Duration::from_secs(1)).is_err()
    })
    .await;
    assert!(
        http_get(&client_ns, web, "/", Duration::from_secs(2)).is_ok(),
        "the first vassal still serves"
    );

    step(
        "a Failed Pod (what an eviction by the kubelet leaves) is replaced and the app answers again",
    );
    let failed_uid = pods.get("hydra").await.unwrap().metadata.uid;
    let evicted = serde_json::json!({
        "status": {"phase": "Failed", "reason": "Evicted", "message": "the node was low on memory"}
    });
    pods.patch_status(
        "hydra",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&evicted),
    )
    .await
    .expect("marking hydra's Pod Failed");
    let failed_at = Instant::now();
    let deadline = failed_at + WAIT;
    loop {
        let pod = pods.get_opt("hydra").await.unwrap();
        let replaced = pod.as_ref().is_some_and(|p| {
            p.metadata.uid != failed_uid
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        });
        if replaced {
            break;
        }
        if Instant::now() > deadline {
            let hydra = containers.get("hydra").await.unwrap();
            panic!(
                "the Failed Pod was not replaced within {WAIT:?}; Pod: {:?}; container status: {:?}",
                pod.map(|p| (p.metadata.uid, p.metadata.deletion_timestamp, p.status)),
                hydra.status
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "[real-cluster] the Failed Pod was replaced by a running one in {:?}",
        failed_at.elapsed()
    );
    // The answer must come from the new Pod: the forward is re-programmed to its address first.
    let new_ip = pods
        .get("hydra")
        .await
        .unwrap()
        .status
        .and_then(|s| s.pod_ip)
        .expect("the new Pod's address");
    let deadline = Instant::now() + WAIT;
    loop {
        let mapping = mappings.get("hydra-web").await.unwrap();
        let target = mapping.status.and_then(|s| s.target).unwrap_or_default();
        let programmed = serde_json::to_value(mappings.get("hydra-web").await.unwrap())
            .unwrap()["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Programmed" && c["status"] == "True");
        if target == format!("{new_ip}:8000") && programmed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the forward never moved to the new Pod ({target})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let answer = wait_http(&client_ns, web, Duration::from_secs(60))
        .await
        .expect("the app answers from the new Pod");
    assert_eq!(answer.trim(), "hello from hydra");

    step("the agent Pod of server-1 deleted while traffic flows: no refused connection");
    let probe = Probe::start(cluster.client_netns().unwrap(), web);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let system_pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM);
    let agent_selector = ListParams::default()
        .labels("app.kubernetes.io/component=agent")
        .fields("spec.nodeName=server-1");
    let old_agent = system_pods.list(&agent_selector).await.unwrap().items[0].clone();
    let old_uid = old_agent.metadata.uid.clone();
    system_pods
        .delete(
            old_agent.metadata.name.as_deref().unwrap(),
            &DeleteParams::default(),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let pods = system_pods.list(&agent_selector).await.unwrap().items;
        let replaced_and_ready = pods.iter().any(|p| {
            p.metadata.uid != old_uid
                && p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        });
        if replaced_and_ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the DaemonSet did not replace the agent"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A few seconds with the new agent in charge (its first full sync included).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (answered, failed) = probe.stop();
    eprintln!(
        "[real-cluster] probe during agent replacement: {answered} answered, {failed} failed"
    );
    assert!(answered > 50, "the probe ran ({answered} answers)");
    assert_eq!(failed, 0, "connections failed while the agent was replaced");

    step("the leading controller Pod deleted: the standby takes over and admits a new container");
    let leases: Api<Lease> = Api::namespaced(client.clone(), SYSTEM);
    let leader = leases
        .get(uwsgi_it_controller::LEASE_NAME)
        .await
        .expect("the leader Lease")
        .spec
        .and_then(|s| s.holder_identity)
        .expect("a holder");
    system_pods
        .delete(&leader, &DeleteParams::default())
        .await
        .expect("deleting the leader's Pod");
    // Only once the standby holds the Lease: the old leader may still act during its grace
    // period, and what it admitted would prove nothing about the standby.
    let deadline = Instant::now() + WAIT;
    let new_leader = loop {
        let holder = leases
            .get(uwsgi_it_controller::LEASE_NAME)
            .await
            .unwrap()
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default();
        if !holder.is_empty() && holder != leader {
            break holder;
        }
        assert!(Instant::now() < deadline, "no replica took over the Lease");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("[real-cluster] {new_leader} took over from {leader}");
    cluster_apply(
        cluster,
        "apiVersion: uwsgi.it/v1alpha1
kind: Container
metadata: {name: after-failover, namespace: acme}
spec: {server: server-2, memory: 500, storage: 1000, distro: bookworm}",
    );
    wait_condition(&containers, "after-failover", "Admitted", WAIT)
        .await
        .expect("the standby admits a new container");
    wait_condition(&containers, "after-failover", "Running", WAIT)
        .await
        .expect("its Emperor runs on server-2");
    crash_loops.check(cluster);

    custom_distros::scenario(cluster, &client).await;
    crash_loops.check(cluster);

    release::an_upgrade_applies_its_crds(cluster).await;
    crash_loops.check(cluster);

    step("no Pod crash-looped at any check");
    crash_loops.assert_none();
}

/// A uWSGI app in the home: `<name>.py` answering `body` over HTTP on `http_port`, optionally a
/// mule echoing UDP on `udp_port`, and the vassal `vassals/<name>.ini` that runs them (written
/// last, so the Emperor sees a complete app).
fn write_app(home: &Path, uid: u32, name: &str, http_port: u16, udp_port: Option<u16>, body: &str) {
    let app = format!(
        "def application(env, start_response):\n    start_response('200 OK', [('Content-Type', 'text/plain')])\n    return [b'{body}\\n']\n"
    );
    write_as_customer(&home.join(format!("{name}.py")), &app, uid).unwrap();
    let mut ini = format!(
        "[uwsgi]\nplugins = python3\nmaster = true\nhttp-socket = :{http_port}\nwsgi-file = {home}/{name}.py\n",
        home = container_home(home)
    );
    if let Some(port) = udp_port {
        let echo = format!(
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', {port}))\nwhile True:\n    data, peer = s.recvfrom(2048)\n    s.sendto(b'echo:' + data, peer)\n"
        );
        write_as_customer(&home.join(format!("{name}-udp.py")), &echo, uid).unwrap();
        ini.push_str(&format!(
            "mule = {home}/{name}-udp.py\n",
            home = container_home(home)
        ));
    }
    write_as_customer(&home.join("vassals").join(format!("{name}.ini")), &ini, uid).unwrap();
}

/// The home's path inside the Pod: `/containers/<uid>`.
fn container_home(host_home: &Path) -> String {
    format!(
        "/containers/{}",
        host_home.file_name().unwrap().to_string_lossy()
    )
}

async fn wait_http(
    netns: &Netns,
    address: SocketAddrV4,
    within: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + within;
    loop {
        let last = match http_get(netns, address, "/", Duration::from_secs(1)) {
            Ok((200, body)) => return Ok(body),
            Ok((status, body)) => format!("HTTP {status}: {body}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            anyhow::bail!("no answer from {address} within {within:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn cluster_apply(cluster: &RealCluster, yaml: &str) {
    cluster.apply(yaml).expect("kubectl apply");
}

fn repo(relative: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Pods seen in CrashLoopBackOff at any check.
#[derive(Default)]
struct CrashLoopWatch {
    seen: std::sync::Mutex<Vec<String>>,
}

impl CrashLoopWatch {
    fn check(&self, cluster: &RealCluster) {
        let found = cluster.crash_looping_pods().expect("listing Pods");
        self.seen.lock().unwrap().extend(found);
    }

    fn assert_none(&self) {
        let seen = self.seen.lock().unwrap();
        assert!(seen.is_empty(), "Pods in CrashLoopBackOff: {seen:?}");
    }
}

/// New HTTP connections to one address, one after the other, until stopped: how many answered
/// and how many failed (refused, reset, timed out, wrong status).
struct Probe {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU32>,
    failed: Arc<AtomicU32>,
    thread: std::thread::JoinHandle<()>,
}

impl Probe {
    fn start(netns: Netns, address: SocketAddrV4) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU32::new(0));
        let failed = Arc::new(AtomicU32::new(0));
        let thread = {
            let (stop, answered, failed) = (stop.clone(), answered.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match http_get(&netns, address, "/", Duration::from_secs(2)) {
                        Ok((200, _)) => answered.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Probe {
            stop,
            answered,
            failed,
            thread,
        }
    }

    fn stop(self) -> (u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        (
            self.answered.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// The token the kubelet projected into server-2's agent Pod (read from that kubelet's volume
/// directory) writing the status of a server-1 object: the chart's admission policy refuses it.
async fn agent_token_is_confined_to_its_node(cluster: &RealCluster, client: &kube::Client) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM);
    let agents = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await
        .expect("the agent Pods");
    let on_server_2 = agents
        .items
        .iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("server-2"))
        .expect("an agent Pod on server-2");
    let uid = on_server_2.metadata.uid.clone().unwrap();
    let volumes = std::path::PathBuf::from(cluster.env("KUBECONFIG"))
        .parent()
        .unwrap()
        .join(format!(
            "nodes/server-2/kubelet/pods/{uid}/volumes/kubernetes.io~projected"
        ));
    let token = std::fs::read_dir(&volumes)
        .unwrap_or_else(|e| panic!("{}: {e}", volumes.display()))
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("token")).ok())
        .next()
        .expect("the agent Pod's projected token");
    let mut config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(cluster.kubeconfig()).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.trim().to_owned().into()),
        ..Default::default()
    };
    let as_agent_2: Api<Container> =
        Api::namespaced(kube::Client::try_from(config).unwrap(), CUSTOMER);
    let forged = serde_json::json!({"status": {"conditions": [{"type": "HomeReady", "status": "False",
        "reason": "Forged", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    match as_agent_2
        .patch_status(
            "hydra",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(forged),
        )
        .await
    {
        Err(kube::Error::Api(status)) => assert!(
            status
                .message
                .contains("may only write the status of objects on its own node"),
            "{status:?}"
        ),
        other => panic!("server-2's agent patched hydra: {other:?}"),
    }
}
