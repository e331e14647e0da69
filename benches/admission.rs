//! Admission benchmarks: the real controller binary against a real kube-apiserver + etcd.
//!
//! **Latency.** One Server on an idle cluster; 50 times one Container is created and a watch
//! sees it `Admitted=True`. Prints the median and p99 of apply → Admitted.
//!
//! **Scale.** For each N (5,000, 20,000 and 50,000), 1,000 Servers sized so that 80% of the
//! containers fit, one Customer owning them, and N Containers (no distro, so no Pods) created
//! with 32 requests in flight. Each run has a control plane of its own. It prints
//!
//! - the controller's time from the first create until every container has its final `Admitted`
//!   condition (seen by a watch; "final" = the last change, confirmed by a quiet period),
//! - the floor: the same N creates and the same number of writes the controller made (its
//!   ledger commits, status projections and finalizer patches, counted by its metrics), done raw
//!   by a client: each container's writes issued as soon as its create returns, 32 containers
//!   in flight,
//! - the ratio, the controller's peak RSS (VmHWM) and the cost per container.
//!
//! Run: `cargo bench --bench admission` (`ADMISSION_BENCH_N=5000,20000` picks the sizes,
//! `ADMISSION_BENCH_SKIP_LATENCY=1` skips the latency part).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use uwsgi_it_api::Container;
use uwsgi_it_api::condition::{self, ADMITTED};
use uwsgi_it_testbed::control_plane::ControlPlane;

/// Servers per scale run.
const SERVERS: usize = 1000;
/// Containers created one after the other for the latency benchmark.
const LATENCY_SAMPLES: usize = 50;
/// Requests in flight, for the containers' creation and for the floor's status writes.
const IN_FLIGHT: usize = 32;
/// Memory of every container (MB); servers get room for 80% of their share.
const MEMORY: u64 = 100;
/// How long the decisions must stay unchanged, once all are decided, to count as final.
const QUIET: Duration = Duration::from_secs(4);
/// Give up on a run after this long.
const TIMEOUT: Duration = Duration::from_secs(1800);
/// The namespace of the Customer whose containers the controller admits.
const CUSTOMER: &str = "bench";
/// The controller's namespace (uid store).
const SYSTEM: &str = "uwsgi-it-system";

/// A control plane on a thread of its own: its processes die when that thread ends.
struct Plane {
    plane: Option<Arc<ControlPlane>>,
    stop: mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Plane {
    fn start() -> Result<Self> {
        let (started, receive) = mpsc::channel();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("control-plane".into())
            .spawn(move || match ControlPlane::start() {
                Ok(plane) => {
                    let plane = Arc::new(plane);
                    let _ = started.send(Ok(Arc::clone(&plane)));
                    let _ = stopped.recv();
                    plane.stop();
                }
                Err(e) => {
                    let _ = started.send(Err(e));
                }
            })?;
        let plane = receive.recv().context("control-plane thread")??;
        Ok(Plane {
            plane: Some(plane),
            stop,
            thread: Some(thread),
        })
    }

    fn get(&self) -> &ControlPlane {
        self.plane.as_ref().expect("running plane")
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.plane.take();
        let _ = self.stop.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The controller binary as a child process, killed when dropped.
struct ControllerProcess {
    child: Child,
    listen: String,
}

impl ControllerProcess {
    fn start(plane: &ControlPlane, work: &Path) -> Result<Self> {
        let config = work.join("config.yaml");
        std::fs::write(
            &config,
            "distros:\n  bookworm: docker.io/library/debian:bookworm-slim\nlogLevel: warn\n",
        )?;
        let listen = format!(
            "127.0.0.1:{}",
            TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()
        );
        let log = std::fs::File::create(work.join("controller.log"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_uwsgi-it-operator"))
            .args([
                "controller",
                "--leader-elect=false",
                "--listen",
                &listen,
                "--namespace",
                SYSTEM,
                "--config",
            ])
            .arg(&config)
            .env("KUBECONFIG", plane.kubeconfig_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the controller binary")?;
        Ok(ControllerProcess { child, listen })
    }

    fn http_get(&self, path: &str) -> Result<String> {
        let mut stream = TcpStream::connect(&self.listen)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.listen
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the controller exited with {status}");
            }
            if self
                .http_get("/readyz")
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the controller was not ready within 60s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// VmHWM (peak resident set) of the controller, in KiB.
    fn peak_rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmHWM in /proc/<pid>/status")
    }

    /// Selected counters of `/metrics` (name → value, summed over labels).
    fn metrics(&self) -> HashMap<String, f64> {
        let mut out = HashMap::new();
        let Ok(text) = self.http_get("/metrics") else {
            return out;
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = name.split('{').next().unwrap_or(name);
            if let Ok(value) = value.parse::<f64>() {
                *out.entry(name.to_string()).or_default() += value;
            }
        }
        out
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server_name(i: usize) -> String {
    format!("bench-{i:04}")
}

fn server_address(i: usize) -> String {
    format!("198.{}.{}.{}", 18 + i / 65536, (i / 256) % 256, i % 256)
}

fn container_name(i: usize) -> String {
    format!("c{i:05}")
}

/// Container `i` of a run: round-robin over the servers (by name, or by public address for
/// every third one, as the uwsgi.it API allowed).
fn container_manifest(i: usize, servers: usize) -> Container {
    let server = if i.is_multiple_of(3) {
        server_address(i % servers)
    } else {
        server_name(i % servers)
    };
    serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1",
        "kind": "Container",
        "metadata": {"name": container_name(i)},
        "spec": {"server": server, "memory": MEMORY, "storage": 100},
    }))
    .expect("container manifest")
}

/// How many containers fit on one server: 80% of its share.
fn fitting_per_server(n: usize, servers: usize) -> usize {
    (n / servers) * 8 / 10
}

async fn create_servers(client: &Client, servers: usize, memory: u64) -> Result<()> {
    stream::iter(0..servers)
        .map(|i| {
            let client = client.clone();
            async move {
                let address = server_address(i);
                uwsgi_it_testbed::servers::declare(
                    &client,
                    &server_name(i),
                    &uwsgi_it_testbed::servers::ServerSpec {
                        memory,
                        storage: 100_000_000,
                        address: Some(&address),
                        pod_cidr: None,
                    },
                    true,
                )
                .await
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(())
}

async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    namespaces
        .create(&PostParams::default(), &namespace)
        .await?;
    Ok(())
}

async fn create_customer(client: &Client, servers: usize) -> Result<()> {
    let customers: Api<uwsgi_it_api::Customer> = Api::all(client.clone());
    let names: Vec<String> = (0..servers).map(server_name).collect();
    let customer: uwsgi_it_api::Customer = serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1",
        "kind": "Customer",
        "metadata": {"name": CUSTOMER},
        "spec": {"servers": names},
    }))?;
    customers.create(&PostParams::default(), &customer).await?;
    let ready = |c: Option<&uwsgi_it_api::Customer>| {
        c.and_then(|c| c.status.as_ref())
            .is_some_and(|s| condition::is_true(&s.conditions, "Ready"))
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        kube::runtime::wait::await_condition(customers.clone(), CUSTOMER, ready),
    )
    .await
    .context("the Customer was not Ready within 120s")??;
    Ok(())
}

/// Creates containers 0..n in `namespace`, IN_FLIGHT at a time. Returns when the first create
/// was sent.
async fn create_containers(
    client: &Client,
    namespace: &str,
    n: usize,
    servers: usize,
) -> Result<Instant> {
    let api: Api<Container> = Api::namespaced(client.clone(), namespace);
    let started = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &container_manifest(i, servers))
                    .await
                    .with_context(|| format!("creating {}", container_name(i)))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(started)
}

/// A status write of the shape the controller's projection has.
fn projection(i: usize, servers: usize, fit: usize, generation: i64) -> serde_json::Value {
    let server = i % servers;
    let admitted = i / servers < fit;
    let uid = 30001 + i as i64;
    let mut status = json!({
        "uid": uid,
        "conditions": [{
            "type": ADMITTED,
            "status": if admitted { "True" } else { "False" },
            "reason": if admitted { "Admitted" } else { "InsufficientMemory" },
            "message": if admitted {
                format!("server {}: reserved {MEMORY} MB memory and 100 MB storage", server_name(server))
            } else {
                format!("server {}: 0 MB memory free, {MEMORY} MB requested", server_name(server))
            },
            "observedGeneration": generation,
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }],
    });
    if admitted {
        status["server"] = json!(server_name(server));
        status["address"] = json!(server_address(server));
        status["home"] = json!(format!("/containers/{uid}"));
        status["reserved"] = json!({"memory": MEMORY, "storage": 100});
    }
    json!({
        "apiVersion": "uwsgi.it/v1alpha1",
        "kind": "Container",
        "metadata": {"name": container_name(i)},
        "status": status,
    })
}

/// The floor: N creates, each followed at once by its share of `writes` raw status writes,
/// IN_FLIGHT containers at a time. First create to last write.
async fn floor(client: &Client, n: usize, servers: usize, writes: usize) -> Result<Duration> {
    let namespace = "floor";
    create_namespace(client, namespace).await?;
    let api: Api<Container> = Api::namespaced(client.clone(), namespace);
    let fit = fitting_per_server(n, servers);
    let started = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            // Container i's share of the writes: spread evenly, the total is exact.
            let share = writes * (i + 1) / n - writes * i / n;
            async move {
                let name = container_name(i);
                api.create(&PostParams::default(), &container_manifest(i, servers))
                    .await
                    .with_context(|| format!("creating {name}"))?;
                for write in 0..share {
                    api.patch_status(
                        &name,
                        &PatchParams::apply("uwsgi-it-controller").force(),
                        &Patch::Apply(&projection(i, servers, fit, 1 + write as i64)),
                    )
                    .await
                    .with_context(|| format!("status of {name}"))?;
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(started.elapsed())
}

/// The controller's decision on a container as the watch shows it, once decided.
type Decision = (String, String, Option<String>, Option<i64>);

fn decision(container: &Container) -> Option<Decision> {
    let status = container.status.as_ref()?;
    let admitted = condition::find(&status.conditions, ADMITTED)
        .filter(|c| c.observed_generation == container.metadata.generation)?;
    Some((
        admitted.status.clone(),
        admitted.reason.clone(),
        status.server.clone(),
        status.reserved.as_ref().map(|r| r.memory),
    ))
}

struct ControllerRun {
    time_to_final: Duration,
    creates: Duration,
    peak_rss_kib: u64,
    admitted: usize,
    refused: usize,
    changed_after_first: usize,
    /// Ledger commits, status projections and finalizer patches.
    writes: usize,
    metrics: HashMap<String, f64>,
}

fn metric(metrics: &HashMap<String, f64>, name: &str) -> f64 {
    metrics.get(name).copied().unwrap_or_default()
}

/// Each container's decision, when it last changed and how often it changed.
type Decisions = HashMap<String, (Decision, Instant, usize)>;

/// Watches the customer's containers until all `n` are decided and nothing changed for QUIET.
/// The receiver fires once the watch's initial list is done.
fn watch_decisions(
    client: &Client,
    n: usize,
) -> (
    tokio::sync::oneshot::Receiver<()>,
    tokio::task::JoinHandle<Result<Decisions>>,
) {
    let api: Api<Container> = Api::namespaced(client.clone(), CUSTOMER);
    let (init_tx, init_rx) = tokio::sync::oneshot::channel();
    let watch = tokio::spawn(async move {
        let mut init_tx = Some(init_tx);
        let mut seen: Decisions = HashMap::new();
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
        let mut all_decided_at: Option<Instant> = None;
        loop {
            let wait = match all_decided_at {
                Some(at) => QUIET.saturating_sub(at.elapsed()),
                None => TIMEOUT,
            };
            let event = match tokio::time::timeout(wait, events.next()).await {
                Err(_) if all_decided_at.is_some() => return Ok(seen),
                Err(_) => bail!("not every container was decided within {TIMEOUT:?}"),
                Ok(None) => bail!("the watch ended"),
                Ok(Some(event)) => event?,
            };
            let container = match event {
                watcher::Event::InitDone => {
                    if let Some(tx) = init_tx.take() {
                        let _ = tx.send(());
                    }
                    continue;
                }
                watcher::Event::Apply(c) | watcher::Event::InitApply(c) => c,
                watcher::Event::Delete(_) | watcher::Event::Init => continue,
            };
            let now = Instant::now();
            if let Some(d) = decision(&container) {
                let name = container.name_any();
                match seen.get_mut(&name) {
                    Some((old, at, changes)) if *old != d => {
                        *old = d;
                        *at = now;
                        *changes += 1;
                        all_decided_at = Some(now);
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(name, (d, now, 0));
                        if seen.len() == n {
                            all_decided_at = Some(now);
                        }
                    }
                }
            }
        }
    });
    (init_rx, watch)
}

async fn controller(
    plane: &ControlPlane,
    client: &Client,
    n: usize,
    servers: usize,
) -> Result<ControllerRun> {
    let work = std::env::temp_dir().join(format!("uwsgi-it-bench-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let mut process = ControllerProcess::start(plane, &work)?;
    process.wait_ready().await?;
    create_customer(client, servers).await?;

    let (init, watch) = watch_decisions(client, n);
    init.await.context("the watch never started")?;
    let before = process.metrics();
    let started = create_containers(client, CUSTOMER, n, servers).await?;
    let creates = started.elapsed();
    let seen = watch.await??;
    let last = seen
        .values()
        .map(|(_, at, _)| *at)
        .max()
        .context("nothing decided")?;
    let time_to_final = last.duration_since(started);
    let peak_rss_kib = process.peak_rss_kib()?;
    let metrics = process.metrics();
    if let Some(status) = process.child.try_wait()? {
        bail!("the controller exited with {status} during the run");
    }
    let counted = |m: &HashMap<String, f64>| {
        metric(m, "uwsgi_it_controller_status_writes_total")
            + metric(m, "uwsgi_it_controller_finalizer_writes_total")
    };
    let writes = (counted(&metrics) - counted(&before)).max(0.0) as usize;

    // The decisions are right: exactly the containers that fit, never oversold.
    let all = Api::<Container>::namespaced(client.clone(), CUSTOMER)
        .list(&ListParams::default())
        .await?;
    let mut per_server: HashMap<String, usize> = HashMap::new();
    let mut admitted = 0;
    for c in &all.items {
        let status = c.status.as_ref().context("undecided container")?;
        if condition::is_true(&status.conditions, ADMITTED) {
            admitted += 1;
            *per_server
                .entry(status.server.clone().unwrap_or_default())
                .or_default() += 1;
        }
    }
    for (server, count) in &per_server {
        if *count != fitting_per_server(n, servers) {
            bail!(
                "{server}: {count} admitted, {} fit",
                fitting_per_server(n, servers)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(ControllerRun {
        time_to_final,
        creates,
        peak_rss_kib,
        admitted,
        refused: all.items.len() - admitted,
        changed_after_first: seen.values().filter(|(_, _, c)| *c > 0).count(),
        writes,
        metrics,
    })
}

struct Row {
    n: usize,
    run: ControllerRun,
    floor: Duration,
}

async fn prepare(plane: &ControlPlane, servers: usize, memory: u64) -> Result<Client> {
    let client = plane.client().await?;
    plane.install_crds(&uwsgi_it_api::crds()).await?;
    create_namespace(&client, SYSTEM).await?;
    create_servers(&client, servers, memory).await?;
    Ok(client)
}

fn sizes() -> Vec<usize> {
    std::env::var("ADMISSION_BENCH_N")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![5000, 20000, 50000])
}

/// apply → `Admitted=True` for one container at a time on an idle cluster.
async fn latency(plane: &ControlPlane) -> Result<Vec<Duration>> {
    let client = prepare(plane, 1, 1_000_000).await?;
    let work = std::env::temp_dir().join(format!("uwsgi-it-latency-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let mut process = ControllerProcess::start(plane, &work)?;
    process.wait_ready().await?;
    create_customer(&client, 1).await?;
    let api: Api<Container> = Api::namespaced(client.clone(), CUSTOMER);
    let mut events = std::pin::pin!(
        watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects()
    );
    let mut samples = Vec::new();
    for i in 0..LATENCY_SAMPLES {
        // Idle: nothing else in flight.
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Named by its Server's name (not its address): the first of every three.
        let index = i * 3 + 1;
        let name = container_name(index);
        let started = Instant::now();
        api.create(&PostParams::default(), &container_manifest(index, 1))
            .await?;
        loop {
            let c = tokio::time::timeout(Duration::from_secs(60), events.try_next())
                .await
                .context("no Admitted within 60s")??
                .context("the watch ended")?;
            if c.name_any() == name
                && c.status
                    .as_ref()
                    .is_some_and(|s| condition::is_true(&s.conditions, ADMITTED))
            {
                samples.push(started.elapsed());
                break;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    drop(process);
    Ok(samples)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run only for real.
    if !std::env::args().any(|a| a == "--bench") {
        println!("admission benchmark: run with `cargo bench --bench admission`");
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;

    if std::env::var_os("ADMISSION_BENCH_SKIP_LATENCY").is_none() {
        let plane = Plane::start()?;
        let mut samples = runtime.block_on(latency(plane.get()))?;
        drop(plane);
        samples.sort();
        let median = percentile(&samples, 50.0);
        let p99 = percentile(&samples, 99.0);
        println!();
        println!(
            "latency: apply → Admitted=True, one container at a time on an idle cluster ({} samples)",
            samples.len()
        );
        println!(
            "  median {:.1} ms, p99 {:.1} ms, min {:.1} ms, max {:.1} ms  (target: median ≤ 100 ms: {})",
            median.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            samples[0].as_secs_f64() * 1e3,
            samples[samples.len() - 1].as_secs_f64() * 1e3,
            if median <= Duration::from_millis(100) {
                "met"
            } else {
                "NOT met"
            }
        );
    }

    let mut rows = Vec::new();
    for n in sizes() {
        let servers = SERVERS.min(n);
        let memory = fitting_per_server(n, servers) as u64 * MEMORY;
        eprintln!(
            "admission bench: N = {n}, {servers} servers, controller on a fresh control plane"
        );
        let plane = Plane::start()?;
        let run = runtime.block_on(async {
            let client = prepare(plane.get(), servers, memory).await?;
            controller(plane.get(), &client, n, servers).await
        })?;
        drop(plane);
        eprintln!(
            "admission bench: N = {n}, controller peak RSS {:.1} MiB; floor ({} writes) on a fresh control plane",
            run.peak_rss_kib as f64 / 1024.0,
            run.writes
        );
        let plane = Plane::start()?;
        let floor = runtime.block_on(async {
            let client = prepare(plane.get(), servers, memory).await?;
            floor(&client, n, servers, run.writes).await
        })?;
        drop(plane);
        let m = &run.metrics;
        eprintln!(
            "  N = {n}: creates {:.2}s, admitted {}, refused {}, decisions changed after the first: {}; \
             reconciles {}, admission passes {} ({:.2}s in passes), ledger conflicts {}, writes {}, reconcile failures {}",
            run.creates.as_secs_f64(),
            run.admitted,
            run.refused,
            run.changed_after_first,
            metric(m, "uwsgi_it_controller_reconciles_total"),
            metric(
                m,
                "uwsgi_it_controller_admission_pass_duration_seconds_count"
            ),
            metric(m, "uwsgi_it_controller_admission_pass_duration_seconds_sum"),
            metric(m, "uwsgi_it_controller_ledger_conflicts_total"),
            run.writes,
            metric(m, "uwsgi_it_controller_reconcile_failures_total"),
        );
        rows.push(Row { n, run, floor });
    }
    if rows.is_empty() {
        return Ok(());
    }

    println!();
    println!(
        "{:>6} | {:>16} | {:>10} | {:>6} | {:>13} | {:>18} | {:>13}",
        "N", "time-to-final", "floor", "ratio", "peak RSS", "controller µs/c", "floor µs/c"
    );
    println!("{}", "-".repeat(100));
    for row in &rows {
        let t = row.run.time_to_final.as_secs_f64();
        let f = row.floor.as_secs_f64();
        println!(
            "{:>6} | {:>15.2}s | {:>9.2}s | {:>5.2}× | {:>9.1} MiB | {:>18.0} | {:>13.0}",
            row.n,
            t,
            f,
            t / f,
            row.run.peak_rss_kib as f64 / 1024.0,
            t * 1e6 / row.n as f64,
            f * 1e6 / row.n as f64,
        );
    }
    println!();
    println!(
        "targets: ratio ≤ 1.3 at every N, µs/container flat within ±25%, peak RSS ≤ 200 MiB at 50,000"
    );
    let per = |r: &Row| r.run.time_to_final.as_secs_f64() * 1e6 / r.n as f64;
    let base = per(&rows[0]);
    for row in &rows {
        let ratio = row.run.time_to_final.as_secs_f64() / row.floor.as_secs_f64();
        let rss = row.run.peak_rss_kib as f64 / 1024.0;
        let drift = per(row) / base - 1.0;
        println!(
            "  N = {}: ratio {ratio:.2} ({}), µs/container {:+.0}% vs N = {} ({}), RSS {rss:.1} MiB{}",
            row.n,
            if ratio <= 1.3 { "met" } else { "NOT met" },
            drift * 100.0,
            rows[0].n,
            if drift.abs() <= 0.25 {
                "met"
            } else {
                "NOT met"
            },
            if row.n >= 50_000 {
                if rss <= 200.0 { " (met)" } else { " (NOT met)" }
            } else {
                ""
            },
        );
    }
    Ok(())
}
