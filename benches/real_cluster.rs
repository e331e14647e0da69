//! The real cluster's chain, measured (not a test: it prints figures).
//!
//! On `hack/cluster.sh`'s cluster with the chart installed, 20 times, one after the other:
//!
//! - **apply → first answer**: a Container (platform distro, on server-1) and a PortMapping are
//!   applied together; as soon as the agent has made the home, the bench drops a vassal there as
//!   the customer would; the clock stops at the first HTTP answer through the server's public
//!   port from the client namespace;
//! - **Pod creation → Emperor running**: from the first time the container's Pod is seen to
//!   the first time its container (the Emperor) is seen started;
//! - **the floor**, same work without the operator: the bench itself creates a bare Pod of the
//!   same image on the same node, with the same app already in its command line, and times
//!   create → first HTTP answer on the Pod's own address from the node. What the operator adds
//!   (admission, the ledger, home, PV and claim, the port forward) is the difference.
//!
//! Prints median and p90 of each. Target: the whole chain under 5 s median on a 2-core machine.
//!
//! Run (as root): `cargo bench --bench real_cluster` (`REAL_CLUSTER_BENCH_RUNS=5` for fewer).

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use uwsgi_it_api::Container;
use uwsgi_it_testbed::netns::Netns;
use uwsgi_it_testbed::real_cluster::{RealCluster, http_get, wait_condition, write_as_customer};

const NAMESPACE: &str = "bench";
const PATIENCE: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(20);

fn main() -> Result<()> {
    let runs: usize = std::env::var("REAL_CLUSTER_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let cluster = RealCluster::up()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(bench(&cluster, runs));
    drop(runtime);
    cluster.down()?;
    outcome
}

async fn bench(cluster: &RealCluster, runs: usize) -> Result<()> {
    let client = cluster.client().await?;
    cluster.install_chart("uwsgi-it", "uwsgi-it-system", &[])?;
    cluster.apply(
        "apiVersion: uwsgi.it/v1alpha1
kind: Server
metadata: {name: server-1}
spec: {memory: 16000, storage: 500000, address: 203.0.113.10}
---
apiVersion: uwsgi.it/v1alpha1
kind: Customer
metadata: {name: bench}
spec: {servers: [server-1]}",
    )?;
    let customers: Api<uwsgi_it_api::Customer> = Api::all(client.clone());
    wait_condition(&customers, NAMESPACE, "Ready", PATIENCE).await?;
    let client_ns = cluster.client_netns()?;
    let node_ns = Netns::existing("uitc-server-1")?;
    let public = cluster.public_ip("server-1");
    let distro_image = cluster.env("DISTRO_IMAGE").to_string();

    // One warm-up of each, not counted: the first Pod of an image on a node pays for things
    // (snapshot preparation, the CNI's first call) no later Pod pays.
    let mut chain = Vec::new();
    let mut emperor = Vec::new();
    let mut floor = Vec::new();
    for run in 0..=runs {
        let port = 9100 + u16::try_from(run)?;
        let (total, to_emperor) = operator_chain(cluster, &client, &client_ns, public, run, port)
            .await
            .with_context(|| format!("run {run}"))?;
        let bare = bare_pod(&client, &node_ns, &distro_image, run).await?;
        if run > 0 {
            chain.push(total);
            emperor.push(to_emperor);
            floor.push(bare);
        }
        eprintln!(
            "run {run:2}: apply -> answer {total:?}, Pod -> Emperor {to_emperor:?}, floor {bare:?}"
        );
    }
    println!("real cluster, {runs} runs, one at a time, 2 server nodes on this machine:");
    report("apply Container + PortMapping -> first HTTP answer", &chain);
    report("Pod creation -> Emperor running", &emperor);
    report(
        "floor: bare Pod create -> first HTTP answer on its IP",
        &floor,
    );
    let median_chain = median(&chain);
    println!(
        "operator's share of the chain: {:?} (median chain - median floor); target: chain median < 5 s: {}",
        median_chain.saturating_sub(median(&floor)),
        if median_chain < Duration::from_secs(5) {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

/// One Container + PortMapping, the customer's vassal dropped as soon as the home exists.
/// Returns (apply → first answer, Pod seen → Emperor seen started).
async fn operator_chain(
    cluster: &RealCluster,
    client: &kube::Client,
    client_ns: &Netns,
    public: std::net::Ipv4Addr,
    run: usize,
    port: u16,
) -> Result<(Duration, Duration)> {
    let name = format!("app-{run}");
    let containers: Api<Container> = Api::namespaced(client.clone(), NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let started = Instant::now();
    cluster.apply(&format!(
        "apiVersion: uwsgi.it/v1alpha1
kind: Container
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec: {{server: server-1, memory: 128, storage: 100, distro: bookworm}}
---
apiVersion: uwsgi.it/v1alpha1
kind: PortMapping
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec: {{container: {name}, publicPort: {port}, privatePort: 8000}}"
    ))?;
    let mut vassal_written = false;
    let mut pod_seen = None;
    let mut emperor_started = None;
    let address = SocketAddrV4::new(public, port);
    loop {
        if started.elapsed() > PATIENCE {
            bail!("{name}: no answer on {address} within {PATIENCE:?}");
        }
        if !vassal_written
            && let Some(uid) = containers
                .get_opt(&name)
                .await?
                .and_then(|c| c.status.and_then(|s| s.uid))
        {
            let home = cluster.home_root().join(uid.to_string());
            if home.join("vassals").is_dir() {
                write_app(&home, u32::try_from(uid)?)?;
                vassal_written = true;
            }
        }
        if emperor_started.is_none()
            && let Some(pod) = pods.get_opt(&name).await?
        {
            pod_seen.get_or_insert_with(Instant::now);
            let started = pod
                .status
                .and_then(|s| s.container_statuses)
                .is_some_and(|c| c.iter().any(|c| c.started == Some(true)));
            if started {
                emperor_started = Some(Instant::now());
            }
        }
        if vassal_written
            && let Ok((200, _)) = http_get(client_ns, address, "/", Duration::from_millis(500))
        {
            let total = started.elapsed();
            let to_emperor = match (pod_seen, emperor_started) {
                (Some(seen), Some(running)) => running - seen,
                _ => Duration::ZERO,
            };
            return Ok((total, to_emperor));
        }
        tokio::time::sleep(POLL).await;
    }
}

const APP: &str = "def application(env, start_response):\n    start_response('200 OK', [('Content-Type', 'text/plain')])\n    return [b'bench\\n']\n";

fn write_app(home: &std::path::Path, uid: u32) -> Result<()> {
    write_as_customer(&home.join("app.py"), APP, uid)?;
    write_as_customer(
        &home.join("vassals/app.ini"),
        &format!(
            "[uwsgi]\nplugins = python3\nhttp-socket = :8000\nwsgi-file = /containers/{uid}/app.py\n"
        ),
        uid,
    )
}

/// The floor: a bare Pod of the same image on the same node, the app in its command line,
/// create → first answer on the Pod's address from the node.
async fn bare_pod(
    client: &kube::Client,
    node_ns: &Netns,
    image: &str,
    run: usize,
) -> Result<Duration> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let name = format!("floor-{run}");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeName": "server-1",
            "automountServiceAccountToken": false,
            "securityContext": {"runAsUser": 40000, "runAsGroup": 40000, "runAsNonRoot": true,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "main",
                "image": image,
                "command": ["/bin/sh", "-c",
                    format!("printf '%s' \"$APP\" > /tmp/app.py && exec /opt/unbit/uwsgi/uwsgi --plugins python3 --http-socket :8000 --wsgi-file /tmp/app.py")],
                "env": [{"name": "APP", "value": APP}],
                "resources": {"requests": {"memory": "128Mi"}, "limits": {"memory": "128Mi"}},
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
            }]
        }
    }))?;
    let started = Instant::now();
    pods.create(&PostParams::default(), &pod).await?;
    let answered = loop {
        if started.elapsed() > PATIENCE {
            bail!("{name}: no answer within {PATIENCE:?}");
        }
        if let Some(ip) = pods
            .get_opt(&name)
            .await?
            .and_then(|p| p.status.and_then(|s| s.pod_ip))
            && let Ok(ip) = ip.parse()
            && let Ok((200, _)) = http_get(
                node_ns,
                SocketAddrV4::new(ip, 8000),
                "/",
                Duration::from_millis(500),
            )
        {
            break started.elapsed();
        }
        tokio::time::sleep(POLL).await;
    };
    pods.delete(&name, &DeleteParams::default().grace_period(0))
        .await?;
    Ok(answered)
}

fn median(samples: &[Duration]) -> Duration {
    percentile(samples, 50)
}

fn percentile(samples: &[Duration], p: usize) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() * p).div_ceil(100)).saturating_sub(1);
    sorted[index.min(sorted.len() - 1)]
}

fn report(what: &str, samples: &[Duration]) {
    println!(
        "  {what}: median {:.2?}, p90 {:.2?} (min {:.2?}, max {:.2?})",
        median(samples),
        percentile(samples, 90),
        samples.iter().min().copied().unwrap_or_default(),
        samples.iter().max().copied().unwrap_or_default()
    );
}
