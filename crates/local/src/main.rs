//! `uwsgi-it-local`: the whole uwsgi-it-operator system on one machine, for real
//! (`hack/run-local.sh`).
//!
//! It brings up the real cluster (`hack/cluster.sh`: the control plane and two server nodes
//! with kubelet, containerd, runc, CNI and kube-proxy, each in a network namespace of its own),
//! installs the chart with helm (the controller Deployment and the agent DaemonSet run as Pods
//! of the locally built image), applies the quickstart of `examples/` (Server, Customer,
//! Container `hydra`, PortMapping 9000 → 8000), drops an app into hydra's home as its customer
//! would, and waits until the app answers on 203.0.113.10:9000 from a client namespace. Then it
//! prints how to use the cluster and keeps it until Ctrl-C or SIGTERM, and removes everything:
//! processes, Pods, mounts, cgroups, network namespaces (their nft tables go with them), files.
//!
//! ```text
//! uitc-client 198.18.0.100 ─┬─ br0 (uitc-cp: etcd, kube-apiserver 198.18.0.1:6443, …)
//!                           ├─ server-1 198.18.0.11, public 203.0.113.10, Pods 10.244.1.0/24
//!                           ├─ server-2 198.18.0.12, public 203.0.113.20, Pods 10.244.2.0/24
//!                           └─ this host 198.18.0.254 (kubectl)
//! ```
//!
//! Needs root.

use std::io::Write as _;
use std::net::SocketAddrV4;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::api::Api;
use tokio::signal::unix::{SignalKind, signal};
use uwsgi_it_api::{Container, Customer, PortMapping};
use uwsgi_it_testbed::chart::repo_path;
use uwsgi_it_testbed::real_cluster::{RealCluster, http_get, wait_condition, write_as_customer};

const SYSTEM_NAMESPACE: &str = "uwsgi-it-system";
const RELEASE: &str = "uwsgi-it";
const CUSTOMER: &str = "acme";
/// The quickstart's server and mapping (examples/00 and 03).
const SERVER: &str = "server-1";
const PUBLIC_PORT: u16 = 9000;
const PRIVATE_PORT: u16 = 8000;
/// Bound of every wait for the system to reach a state.
const PATIENCE: Duration = Duration::from_secs(180);

/// The line that proves the app answered through the public port (the local-run test waits
/// for it).
pub const APP_ANSWERED: &str = "[local] app answered:";

fn say(message: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "[local] {message}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "[local] run me as root (network namespaces, cgroups, a kubelet): sudo bash hack/run-local.sh"
        );
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("[local] cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run());
    drop(runtime);
    match outcome {
        Ok(()) => {
            say("everything removed; bye");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("[local] failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    // Registered before anything starts, so an early Ctrl-C stops the run cleanly.
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let started = Instant::now();
    say("bringing up the real cluster: control plane and two server nodes");
    let cluster = tokio::task::spawn_blocking(RealCluster::up).await??;
    say(format!("cluster up after {:?}", started.elapsed()));
    let outcome = tokio::select! {
        outcome = quickstart(&cluster, started) => outcome,
        _ = interrupt.recv() => Err(anyhow::anyhow!("interrupted while starting")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated while starting")),
    };
    if outcome.is_ok() {
        tokio::select! {
            _ = interrupt.recv() => say("SIGINT: removing everything"),
            _ = terminate.recv() => say("SIGTERM: removing everything"),
        }
    } else {
        say("removing everything");
    }
    let down = tokio::task::spawn_blocking(move || cluster.down()).await?;
    outcome.and(down)
}

async fn quickstart(cluster: &RealCluster, started: Instant) -> Result<()> {
    let client = cluster.client().await?;
    say("helm install of the chart (controller Deployment, agent DaemonSet)");
    cluster.install_chart(RELEASE, SYSTEM_NAMESPACE, &[])?;

    say(
        "applying examples/: Server server-1, Customer acme, Container hydra, PortMapping 9000 -> 8000",
    );
    cluster.apply(&read_example("00-server.yaml")?)?;
    cluster.apply(
        "apiVersion: uwsgi.it/v1alpha1
kind: Server
metadata: {name: server-2}
spec: {memory: 8000, storage: 100000, address: 203.0.113.20, note: the second server node}",
    )?;
    cluster.apply(&read_example("01-customer.yaml")?)?;
    let customers: Api<Customer> = Api::all(client.clone());
    wait_condition(&customers, CUSTOMER, "Ready", PATIENCE).await?;
    cluster.apply(&read_example("02-container-hydra.yaml")?)?;
    cluster.apply(&read_example("03-portmapping-hydra.yaml")?)?;

    let containers: Api<Container> = Api::namespaced(client.clone(), CUSTOMER);
    let hydra = wait_condition(&containers, "hydra", "Running", PATIENCE).await?;
    let uid = hydra
        .status
        .as_ref()
        .and_then(|s| s.uid)
        .context("hydra has no uid")?;
    let home = cluster.home_root().join(uid.to_string());
    say(format!(
        "hydra runs its uWSGI Emperor as uid {uid}; its home is {}",
        home.display()
    ));

    // What the customer would do over ssh: an app and its vassal in the home, owned by its uid.
    let uid = u32::try_from(uid)?;
    write_as_customer(
        &home.join("hello.py"),
        "def application(env, start_response):\n    start_response('200 OK', [('Content-Type', 'text/plain')])\n    return [b'hello from hydra\\n']\n",
        uid,
    )?;
    write_as_customer(
        &home.join("vassals/hello.ini"),
        &format!(
            "[uwsgi]\nplugins = python3\nmaster = true\nhttp-socket = :{PRIVATE_PORT}\nwsgi-file = /containers/{uid}/hello.py\n"
        ),
        uid,
    )?;
    let mappings: Api<PortMapping> = Api::namespaced(client.clone(), CUSTOMER);
    wait_condition(&mappings, "hydra-web", "Programmed", PATIENCE).await?;

    let public = SocketAddrV4::new(cluster.public_ip(SERVER), PUBLIC_PORT);
    let client_ns = cluster.client_netns()?;
    let deadline = Instant::now() + PATIENCE;
    let body = loop {
        match http_get(&client_ns, public, "/", Duration::from_secs(2)) {
            Ok((200, body)) => break body,
            result if Instant::now() > deadline => {
                bail!("the app did not answer on {public}: {result:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    say(format!(
        "app answered: http://{public}/ -> {:?} ({:?} after start)",
        body.trim(),
        started.elapsed()
    ));
    let kubeconfig = cluster.kubeconfig().display().to_string();
    let home = home.display();
    let client_netns = cluster.env("CLIENT_NETNS");
    let text = format!(
        "
The cluster is yours until Ctrl-C:
  export KUBECONFIG={kubeconfig}
  kubectl get uwsgi -A                          # servers, customers, containers, mappings
  kubectl -n {CUSTOMER} logs hydra                    # the Emperor and its vassals
  ip netns exec {client_netns} curl http://{public}/   # from a client outside the servers
  ls {home}/vassals                             # drop a vassal .ini here to deploy an app
(examples/04 and 05, custom distros, need a root filesystem uploaded first: see the README.)
"
    );
    println!("{text}");
    Ok(())
}

fn read_example(name: &str) -> Result<String> {
    let path = repo_path(&format!("examples/{name}"));
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}
