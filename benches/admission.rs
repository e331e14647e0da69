//! Admission benchmark: the real controller binary against a real kube-apiserver + etcd.
//!
//! For each N (500 and 2,000) on a fresh control plane: 20 server Nodes sized so that about 80%
//! of the containers fit (the rest are refused), one Customer owning them, N Containers (no
//! distro, so no Pods) created as fast as a client can with 32 requests in flight. It prints
//!
//! - the controller's time from the first create until every container has its final `Admitted`
//!   condition (seen by a watch; "final" = the last change of the decision, confirmed by a quiet
//!   period after every container is decided),
//! - the floor: the same N containers created the same way, then N status writes of the same shape
//!   the controller writes (uid, server, address, home, reserved, Admitted) done raw by a client
//!   with server-side apply and the same concurrency: first create to last status write,
//! - the ratio, the controller's peak RSS (VmHWM) and the cost per container, so linear growth
//!   shows as a flat µs/container column.
//!
//! Run: `cargo bench --bench admission` (`ADMISSION_BENCH_N=500,2000` picks the sizes).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use uwsgi_it_api::Container;
use uwsgi_it_api::condition::{self, ADMITTED};
use uwsgi_it_testbed::control_plane::ControlPlane;

/// Servers (Nodes) per run.
const SERVERS: usize = 20;
/// Requests in flight, for the containers' creation and for the floor's status writes.
const IN_FLIGHT: usize = 32;
/// Memory of every container (MB); servers get room for 80% of their share.
const MEMORY: u64 = 100;
/// How long the decisions must stay unchanged, once all are decided, to count as final.
const QUIET: Duration = Duration::from_secs(4);
/// Give up on a run after this long.
const TIMEOUT: Duration = Duration::from_secs(600);
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
    format!("bench-{i:02}")
}

fn server_address(i: usize) -> String {
    format!("198.51.100.{}", 10 + i)
}

fn container_name(i: usize) -> String {
    format!("c{i:05}")
}

/// Container `i` of a run: round-robin over the servers (by name, or by public address for
/// every third one, as the uwsgi.it API allowed).
fn container_manifest(i: usize) -> Container {
    let server = if i.is_multiple_of(3) {
        server_address(i % SERVERS)
    } else {
        server_name(i % SERVERS)
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
fn fitting_per_server(n: usize) -> usize {
    (n / SERVERS) * 8 / 10
}

async fn create_servers(client: &Client, n: usize) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    for i in 0..SERVERS {
        let memory = fitting_per_server(n) as u64 * MEMORY;
        let node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": server_name(i),
                "labels": {"uwsgi.it/server": "true"},
                "annotations": {
                    "uwsgi.it/memory": memory.to_string(),
                    "uwsgi.it/storage": "100000000",
                    "uwsgi.it/address": server_address(i),
                },
            },
        });
        nodes
            .patch(
                &server_name(i),
                &PatchParams::apply("bench").force(),
                &Patch::Apply(&node),
            )
            .await?;
    }
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

/// Creates containers 0..n in `namespace`, IN_FLIGHT at a time. Returns when the first create
/// was sent.
async fn create_containers(client: &Client, namespace: &str, n: usize) -> Result<Instant> {
    let api: Api<Container> = Api::namespaced(client.clone(), namespace);
    let started = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &container_manifest(i))
                    .await
                    .with_context(|| format!("creating {}", container_name(i)))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(started)
}

/// The floor: N creates, then N raw status writes of the controller's shape, same concurrency.
async fn floor(client: &Client, n: usize) -> Result<Duration> {
    let namespace = "floor";
    create_namespace(client, namespace).await?;
    let started = create_containers(client, namespace, n).await?;
    let api: Api<Container> = Api::namespaced(client.clone(), namespace);
    let fit = fitting_per_server(n);
    stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let name = container_name(i);
                let server = i % SERVERS;
                let admitted = i / SERVERS < fit;
                let uid = 30001 + i as i64;
                let mut status = json!({
                    "uid": uid,
                    "observedGeneration": 1,
                    "conditions": [{
                        "type": ADMITTED,
                        "status": if admitted { "True" } else { "False" },
                        "reason": if admitted { "Admitted" } else { "InsufficientMemory" },
                        "message": if admitted {
                            format!("server {}: reserved {MEMORY} MB memory and 100 MB storage", server_name(server))
                        } else {
                            format!("server {}: 0 MB memory free, {MEMORY} MB requested", server_name(server))
                        },
                        "observedGeneration": 1,
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                    }],
                });
                if admitted {
                    status["server"] = json!(server_name(server));
                    status["address"] = json!(server_address(server));
                    status["home"] = json!(format!("/containers/{uid}"));
                    status["reserved"] = json!({"memory": MEMORY, "storage": 100});
                }
                let body = json!({
                    "apiVersion": "uwsgi.it/v1alpha1",
                    "kind": "Container",
                    "metadata": {"name": name},
                    "status": status,
                });
                api.patch_status(
                    &name,
                    &PatchParams::apply("uwsgi-it-controller").force(),
                    &Patch::Apply(&body),
                )
                .await
                .with_context(|| format!("status of {name}"))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    let elapsed = started.elapsed();
    // Out of the controller's way: it must not see (nor count) the floor's containers.
    api.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !api
        .list(&ListParams::default().limit(1))
        .await?
        .items
        .is_empty()
    {
        if Instant::now() > deadline {
            bail!("the floor's containers were not deleted");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(elapsed)
}

/// The controller's decision on a container as the watch shows it, once decided.
type Decision = (String, String, Option<String>, Option<i64>);

fn decision(container: &Container) -> Option<Decision> {
    let status = container.status.as_ref()?;
    if status.observed_generation != container.metadata.generation {
        return None;
    }
    let admitted = condition::find(&status.conditions, ADMITTED)?;
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
    metrics: HashMap<String, f64>,
}

async fn controller(plane: &ControlPlane, client: &Client, n: usize) -> Result<ControllerRun> {
    let work = std::env::temp_dir().join(format!("uwsgi-it-bench-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let mut process = ControllerProcess::start(plane, &work)?;
    process.wait_ready().await?;

    let customers: Api<uwsgi_it_api::Customer> = Api::all(client.clone());
    let servers: Vec<String> = (0..SERVERS).map(server_name).collect();
    let customer: uwsgi_it_api::Customer = serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1",
        "kind": "Customer",
        "metadata": {"name": CUSTOMER},
        "spec": {"servers": servers},
    }))?;
    customers.create(&PostParams::default(), &customer).await?;
    let ready = |c: Option<&uwsgi_it_api::Customer>| {
        c.and_then(|c| c.status.as_ref())
            .is_some_and(|s| condition::is_true(&s.conditions, "Ready"))
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        kube::runtime::wait::await_condition(customers.clone(), CUSTOMER, ready),
    )
    .await
    .context("the Customer was not Ready within 60s")??;

    // The watch is running (initial list done) before the first create.
    let api: Api<Container> = Api::namespaced(client.clone(), CUSTOMER);
    let (init_tx, init_rx) = tokio::sync::oneshot::channel();
    let watch = tokio::spawn(async move {
        let mut init_tx = Some(init_tx);
        let mut seen: HashMap<String, (Decision, Instant, usize)> = HashMap::new();
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
                        // A changed decision restarts the quiet period.
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
    init_rx.await.context("the watch never started")?;
    let started = create_containers(client, CUSTOMER, n).await?;
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
        if *count != fitting_per_server(n) {
            bail!("{server}: {count} admitted, {} fit", fitting_per_server(n));
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
        metrics,
    })
}

struct Row {
    n: usize,
    run: ControllerRun,
    floor: Duration,
}

async fn bench(plane: &ControlPlane, n: usize) -> Result<Row> {
    let client = plane.client().await?;
    plane.install_crds(&uwsgi_it_api::crds()).await?;
    create_namespace(&client, SYSTEM).await?;
    create_servers(&client, n).await?;
    let floor = floor(&client, n).await?;
    let run = controller(plane, &client, n).await?;
    Ok(Row { n, run, floor })
}

fn sizes() -> Vec<usize> {
    std::env::var("ADMISSION_BENCH_N")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![500, 2000])
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run only for real.
    if !std::env::args().any(|a| a == "--bench") {
        println!("admission benchmark: run with `cargo bench --bench admission`");
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();
    for n in sizes() {
        eprintln!("admission bench: N = {n} on a fresh control plane");
        let plane = Plane::start()?;
        let row = runtime.block_on(bench(plane.get(), n))?;
        drop(plane);
        let m = &row.run.metrics;
        eprintln!(
            "  N = {n}: creates {:.2}s, admitted {}, refused {}, decisions changed after the first: {}; \
             reconciles {}, admission passes {} ({:.2}s in passes), admission status writes {}, reconcile failures {}",
            row.run.creates.as_secs_f64(),
            row.run.admitted,
            row.run.refused,
            row.run.changed_after_first,
            m.get("uwsgi_it_controller_reconciles_total")
                .copied()
                .unwrap_or_default(),
            m.get("uwsgi_it_controller_admission_pass_duration_seconds_count")
                .copied()
                .unwrap_or_default(),
            m.get("uwsgi_it_controller_admission_pass_duration_seconds_sum")
                .copied()
                .unwrap_or_default(),
            m.get("uwsgi_it_controller_status_writes_total")
                .copied()
                .unwrap_or_default(),
            m.get("uwsgi_it_controller_reconcile_failures_total")
                .copied()
                .unwrap_or_default(),
        );
        rows.push(row);
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
    println!("targets: time-to-final ≤ 1.5× floor, peak RSS < 64 MiB, µs/container flat in N");
    for row in &rows {
        let ratio = row.run.time_to_final.as_secs_f64() / row.floor.as_secs_f64();
        let rss = row.run.peak_rss_kib as f64 / 1024.0;
        println!(
            "  N = {}: ratio {} ({ratio:.2}), RSS {} ({rss:.1} MiB)",
            row.n,
            if ratio <= 1.5 { "met" } else { "NOT met" },
            if rss < 64.0 { "met" } else { "NOT met" },
        );
    }
    if let [first, .., last] = rows.as_slice() {
        let per = |r: &Row| r.run.time_to_final.as_secs_f64() / r.n as f64;
        println!(
            "  growth N = {} → {}: per-container cost × {:.2} (1.0 = linear)",
            first.n,
            last.n,
            per(last) / per(first)
        );
    }
    Ok(())
}
