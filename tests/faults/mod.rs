//! Support for the fault tests that run the controller as the program it is (a child process of
//! the test, so it can be paused with SIGSTOP and killed with SIGKILL): the processes, an
//! auditor that watches every revision of every Server's ledger and every Container's uid, and
//! a small seeded random source so a failing run can be replayed.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::Client;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use uwsgi_it_api::{Container, Server};
use uwsgi_it_testbed::control_plane::ControlPlane;

/// How long a test waits for the system to settle before it fails.
pub const SETTLE: Duration = Duration::from_secs(90);

/// xorshift64*: deterministic for a seed, printed by every test that uses it.
pub struct Random(u64);

impl Random {
    /// Seeded from `UWSGI_IT_FAULT_SEED`, else from the clock.
    pub fn from_env() -> Self {
        let seed = std::env::var("UWSGI_IT_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("[faults] seed {seed} (replay with UWSGI_IT_FAULT_SEED={seed})");
        Random(seed | 1)
    }

    pub fn seeded(seed: u64) -> Self {
        Random(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `low..high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low)
    }

    pub fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(self.range(low, high))
    }
}

/// A controller running as its own process (`uwsgi-it-operator controller`).
pub struct ControllerProcess {
    child: Child,
    pub identity: String,
    listen: String,
}

impl ControllerProcess {
    /// Starts a controller that does not take part in leader election: it acts as leader
    /// whatever others do (what a lapsed lease can make of any replica).
    pub fn start(
        plane: &ControlPlane,
        namespace: &str,
        config: &std::path::Path,
        identity: &str,
    ) -> Self {
        let log =
            std::env::temp_dir().join(format!("uwsgi-it-{identity}-{}.log", std::process::id()));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("controller log");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_uwsgi-it-operator"))
            .args(["controller", "--leader-elect", "false", "--listen", &listen])
            .arg("--namespace")
            .arg(namespace)
            .arg("--identity")
            .arg(identity)
            .arg("--config")
            .arg(config)
            .env("KUBECONFIG", plane.kubeconfig_path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("the controller starts");
        ControllerProcess {
            child,
            identity: identity.to_string(),
            listen,
        }
    }

    /// Waits until its caches are synced (`/readyz` answers 200): it decides from then on.
    pub async fn wait_ready(&mut self) {
        use std::io::{Read, Write};
        let deadline = Instant::now() + SETTLE;
        loop {
            assert!(self.alive(), "controller {} exited", self.identity);
            let ready = std::net::TcpStream::connect(&self.listen).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                write!(s, "GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")?;
                let mut answer = String::new();
                s.read_to_string(&mut answer)?;
                Ok(answer.split_whitespace().nth(1) == Some("200"))
            });
            if ready.unwrap_or(false) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "controller {} never ready",
                self.identity
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; it is reaped only in Drop, so the pid is ours.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }

    /// Freezes the process where it is (mid-request, mid-decision).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Kills it with no chance to finish anything.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Whether it is still running (it must not crash on its own).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// What every fault test starts from: the control plane with the CRDs, an admin client, the
/// controllers' namespace, a work directory holding their configuration, and the auditor,
/// watching before anything is created.
pub struct Setup {
    pub plane: &'static ControlPlane,
    pub client: Client,
    pub system: String,
    pub config: PathBuf,
    pub auditor: Auditor,
    /// Holds the configuration file: keep it for the whole test.
    pub work: tempfile::TempDir,
}

pub async fn setup() -> Setup {
    let plane = tokio::task::spawn_blocking(ControlPlane::shared)
        .await
        .unwrap();
    plane.install_crds(&uwsgi_it_api::crds()).await.unwrap();
    let client = plane.client().await.unwrap();
    let system = plane.namespace("uwsgi-it-system").await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let config = config_file(work.path());
    let auditor = Auditor::start(&client);
    Setup {
        plane,
        client,
        system,
        config,
        auditor,
        work,
    }
}

/// A controller configuration file: `releaseTimeout` short, since no agent runs here.
pub fn config_file(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(&path, "releaseTimeout: 1s\nlogLevel: warn\n").unwrap();
    path
}

/// What the auditor found.
#[derive(Default, Debug)]
pub struct Findings {
    /// Ledger revisions checked.
    pub revisions: usize,
    /// Container revisions checked.
    pub container_revisions: usize,
    /// Every broken guarantee, in words.
    pub violations: Vec<String>,
    /// The uid each Container (by metadata.uid) ever had.
    uid_of: HashMap<String, i64>,
    /// The Container (by metadata.uid) each uid ever belonged to.
    owner_of: HashMap<i64, String>,
}

impl Findings {
    fn claim(&mut self, object: &str, name: &str, uid: i64, origin: &str) {
        if let Some(had) = self.uid_of.insert(object.to_string(), uid)
            && had != uid
        {
            self.violations
                .push(format!("{origin}: {name} changed uid from {had} to {uid}"));
        }
        if let Some(owner) = self.owner_of.insert(uid, object.to_string())
            && owner != object
        {
            self.violations.push(format!(
                "{origin}: uid {uid} handed to {name} although it belonged to another container"
            ));
        }
    }

    fn check_server(&mut self, server: &Server) {
        self.revisions += 1;
        let name = server.name_any();
        let revision = server.resource_version().unwrap_or_default();
        let (memory, storage) = server
            .ledger()
            .iter()
            .fold((0i64, 0i64), |(m, s), e| (m + e.memory, s + e.storage));
        if memory > server.spec.memory || storage > server.spec.storage {
            self.violations.push(format!(
                "server {name} revision {revision} oversold: {memory}/{} MB memory, {storage}/{} MB storage",
                server.spec.memory, server.spec.storage
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for entry in server.ledger() {
            if !seen.insert(entry.uid) {
                self.violations.push(format!(
                    "server {name} revision {revision}: uid {} twice in the ledger",
                    entry.uid
                ));
            }
            self.claim(
                &entry.object_uid,
                &format!("{}/{}", entry.namespace, entry.name),
                entry.uid,
                &format!("server {name} revision {revision}"),
            );
        }
    }

    fn check_container(&mut self, container: &Container) {
        self.container_revisions += 1;
        if let Some(uid) = container.status.as_ref().and_then(|s| s.uid) {
            self.claim(
                &container.metadata.uid.clone().unwrap_or_default(),
                &container.name_any(),
                uid,
                "container status",
            );
        }
    }
}

/// Watches every revision of every Server and every Container from resourceVersion `from` on,
/// reconnecting from the last one seen; all of them are checked.
pub struct Auditor {
    findings: Arc<Mutex<Findings>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn follow<K, F>(api: Api<K>, findings: Arc<Mutex<Findings>>, check: F)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(&mut Findings, &K) + Send + 'static,
{
    let mut from = "0".to_string();
    loop {
        let params = WatchParams::default().timeout(290);
        let stream = match api.watch(&params, &from).await {
            Ok(stream) => stream,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut stream = stream.boxed();
        while let Ok(Some(event)) = stream.try_next().await {
            match event {
                WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => {
                    from = o.resource_version().unwrap_or_default();
                    check(&mut findings.lock().unwrap(), &o);
                }
                WatchEvent::Bookmark(b) => from = b.metadata.resource_version,
                WatchEvent::Error(e) => {
                    findings.lock().unwrap().violations.push(format!(
                        "the audit watch lost revisions ({e:?}): the check is incomplete"
                    ));
                    return;
                }
            }
        }
    }
}

impl Auditor {
    pub fn start(client: &Client) -> Self {
        let findings = Arc::new(Mutex::new(Findings::default()));
        let servers = tokio::spawn(follow(
            Api::<Server>::all(client.clone()),
            Arc::clone(&findings),
            |f, s| f.check_server(s),
        ));
        let containers = tokio::spawn(follow(
            Api::<Container>::all(client.clone()),
            Arc::clone(&findings),
            |f, c| f.check_container(c),
        ));
        Auditor {
            findings,
            tasks: vec![servers, containers],
        }
    }

    /// Stops watching and returns what was found.
    pub async fn finish(self) -> Findings {
        // Let the watches deliver what is already committed.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for task in &self.tasks {
            task.abort();
        }
        std::mem::take(&mut *self.findings.lock().unwrap())
    }
}

/// Declares `count` small servers `<prefix>-<i>` and a Customer owning them (namespace =
/// customer name).
pub async fn servers_and_customer(
    client: &Client,
    prefix: &str,
    count: usize,
    memory: u64,
    storage: u64,
) -> Vec<String> {
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let address = format!("198.51.100.{}", 10 + i);
        uwsgi_it_testbed::servers::declare(
            client,
            name,
            &uwsgi_it_testbed::servers::ServerSpec {
                memory,
                storage,
                address: Some(&address),
                pod_cidr: None,
            },
            true,
        )
        .await
        .unwrap();
    }
    let customer: uwsgi_it_api::Customer = serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1", "kind": "Customer",
        "metadata": {"name": prefix},
        "spec": {"servers": names},
    }))
    .unwrap();
    Api::<uwsgi_it_api::Customer>::all(client.clone())
        .create(&PostParams::default(), &customer)
        .await
        .unwrap();
    names
}

/// Waits until the controller has made the customer's namespace.
pub async fn wait_namespace(client: &Client, name: &str) {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let deadline = Instant::now() + SETTLE;
    while namespaces.get_opt(name).await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "namespace {name} never appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A container manifest.
pub fn container(name: &str, server: &str, memory: u64, storage: u64) -> Container {
    serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container",
        "metadata": {"name": name},
        "spec": {"server": server, "memory": memory, "storage": storage},
    }))
    .unwrap()
}

/// True once the controller decided the container's current generation.
pub fn decided(container: &Container) -> bool {
    container.status.as_ref().is_some_and(|s| {
        uwsgi_it_api::condition::find(&s.conditions, uwsgi_it_api::condition::ADMITTED)
            .is_some_and(|c| c.observed_generation == container.metadata.generation)
    })
}

/// Waits until every Container of `namespace` is decided at its generation and every deleted
/// one is gone; returns them.
pub async fn settled(client: &Client, namespace: &str) -> Vec<Container> {
    let api: Api<Container> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + SETTLE;
    loop {
        let items = api.list(&Default::default()).await.unwrap().items;
        let pending: Vec<String> = items
            .iter()
            .filter(|c| c.metadata.deletion_timestamp.is_some() || !decided(c))
            .map(|c| c.name_any())
            .collect();
        if pending.is_empty() {
            return items;
        }
        assert!(
            Instant::now() < deadline,
            "not settled within {SETTLE:?}: {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The final state agrees with itself: every admitted container has the ledger entry its
/// status shows, and nothing else holds a reservation. Read again until it does (within
/// [`SETTLE`]): a container refused earlier may be admitted by the pass a last release starts,
/// between one read of the containers and the next of the ledgers; what must never happen is a
/// state that stays inconsistent. Returns the containers of the consistent snapshot.
pub async fn assert_consistent(client: &Client, containers: &[Container]) -> Vec<Container> {
    let namespace = containers
        .first()
        .and_then(|c| c.namespace())
        .unwrap_or_default();
    let deadline = Instant::now() + SETTLE;
    let mut containers = containers.to_vec();
    loop {
        let servers = Api::<Server>::all(client.clone())
            .list(&Default::default())
            .await
            .unwrap()
            .items;
        let Some(problem) = inconsistency(&servers, &containers, &namespace) else {
            return containers;
        };
        assert!(
            Instant::now() < deadline,
            "still inconsistent after {SETTLE:?}: {problem}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        containers = settled(client, &namespace).await;
    }
}

/// What in this snapshot disagrees with itself, if anything.
fn inconsistency(servers: &[Server], containers: &[Container], namespace: &str) -> Option<String> {
    let entries: HashMap<String, (String, uwsgi_it_api::LedgerEntry)> = servers
        .iter()
        .flat_map(|s| {
            s.ledger()
                .iter()
                .map(|e| (e.object_uid.clone(), (s.name_any(), e.clone())))
        })
        .collect();
    for c in containers {
        let name = c.name_any();
        let Some(status) = c.status.as_ref() else {
            return Some(format!("{name}: no status"));
        };
        let object = c.metadata.uid.clone().unwrap_or_default();
        match (&status.reserved, entries.get(&object)) {
            (Some(reserved), Some((server, entry))) => {
                if status.server.as_deref() != Some(server.as_str()) {
                    return Some(format!(
                        "{name}: status server {:?}, ledger on {server}",
                        status.server
                    ));
                }
                if status.uid != Some(entry.uid) {
                    return Some(format!(
                        "{name}: status uid {:?}, ledger uid {}",
                        status.uid, entry.uid
                    ));
                }
                if (reserved.memory, reserved.storage) != (entry.memory, entry.storage) {
                    return Some(format!(
                        "{name}: status and ledger disagree: {reserved:?} vs {entry:?}"
                    ));
                }
            }
            (None, None) => {}
            (status, entry) => {
                return Some(format!(
                    "{name}: status reserved {status:?} but ledger entry {entry:?}"
                ));
            }
        }
    }
    let live: std::collections::HashSet<String> = containers
        .iter()
        .filter_map(|c| c.metadata.uid.clone())
        .collect();
    entries
        .iter()
        .find(|(object, (_, entry))| entry.namespace == namespace && !live.contains(*object))
        .map(|(_, (server, entry))| {
            format!(
                "server {server} still reserves for {}, which is gone",
                entry.name
            )
        })
}
