//! A real Kubernetes control plane on loopback: etcd, kube-apiserver and kube-controller-manager's
//! PersistentVolume binder, built from pinned Go modules by `hack/control-plane.sh`, started the way controller-runtime's envtest starts them
//! (client-certificate admin in `system:masters`, RBAC authorization, service-account keys).
//!
//! Tests share one control plane per test binary ([`ControlPlane::shared`]) and give each test
//! its own namespace ([`ControlPlane::namespace`]). Every child process gets `PR_SET_PDEATHSIG`,
//! so etcd and kube-apiserver die with the test binary even when a test panics or the binary is
//! killed; a [`ControlPlane`] that is dropped stops them at once.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Environment variable naming the directory with etcd, kube-apiserver and kubectl. When unset,
/// `hack/control-plane.sh` is run to build (or find in its cache) the pinned binaries.
pub const BIN_DIR_ENV: &str = "UWSGI_IT_CONTROL_PLANE_BIN";

const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A running etcd + kube-apiserver pair and the credentials to talk to it.
pub struct ControlPlane {
    dir: PathBuf,
    bin_dir: PathBuf,
    server: String,
    kubeconfig: PathBuf,
    kubeconfig_yaml: String,
    ca_pem: String,
    children: Mutex<Vec<Child>>,
}

impl ControlPlane {
    /// The control plane of this test binary, started on first use. Its processes live until
    /// the binary exits.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<ControlPlane> = OnceLock::new();
        SHARED.get_or_init(|| {
            // PR_SET_PDEATHSIG fires when the *thread* that spawned the child exits, and test
            // threads end with their test. A thread that parks forever spawns the processes
            // instead, so they live exactly as long as the test binary.
            let (started, receive) = mpsc::channel();
            std::thread::Builder::new()
                .name("control-plane".into())
                .spawn(move || {
                    let _ = started.send(ControlPlane::start());
                    loop {
                        std::thread::park();
                    }
                })
                .expect("spawning the control-plane thread");
            receive
                .recv()
                .expect("control-plane thread reports")
                .unwrap_or_else(|e| panic!("starting the test control plane: {e:#}"))
        })
    }

    /// Starts a fresh etcd and kube-apiserver on free loopback ports and waits until the API
    /// server is ready. Blocking; call it from a thread that lives as long as the control plane.
    pub fn start() -> Result<Self> {
        let bin_dir = locate_binaries()?;
        let dir = fresh_work_dir()?;
        let mut plane = ControlPlane {
            dir: dir.clone(),
            bin_dir,
            server: String::new(),
            kubeconfig: dir.join("kubeconfig"),
            kubeconfig_yaml: String::new(),
            ca_pem: String::new(),
            children: Mutex::new(Vec::new()),
        };
        plane.boot()?;
        Ok(plane)
    }

    fn boot(&mut self) -> Result<()> {
        let certs = self.dir.join("certs");
        std::fs::create_dir_all(&certs)?;
        let pki = Pki::generate()?;
        pki.write(&certs)?;

        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let etcd = self.spawn(
            "etcd",
            &[
                "--name=testbed".into(),
                format!("--data-dir={}", self.dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=testbed={peer_url}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?;
        self.children.lock().expect("children lock").push(etcd);

        let port = free_port()?;
        self.server = format!("https://127.0.0.1:{port}");
        let cert = |name: &str| certs.join(name).display().to_string();
        let apiserver = self.spawn(
            "kube-apiserver",
            &[
                "--advertise-address=127.0.0.1".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--etcd-servers={etcd_url}"),
                format!("--cert-dir={}", certs.display()),
                format!("--tls-cert-file={}", cert("apiserver.crt")),
                format!("--tls-private-key-file={}", cert("apiserver.key")),
                format!("--client-ca-file={}", cert("ca.crt")),
                "--authorization-mode=RBAC".into(),
                format!("--service-account-key-file={}", cert("sa.pub")),
                format!("--service-account-signing-key-file={}", cert("sa.key")),
                format!("--service-account-issuer=https://127.0.0.1:{port}"),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--allow-privileged=true".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
                "--v=0".into(),
            ],
        )?;
        self.children.lock().expect("children lock").push(apiserver);

        self.kubeconfig_yaml = pki.kubeconfig(&self.server);
        self.ca_pem = pki.ca_pem.clone();
        std::fs::write(&self.kubeconfig, &self.kubeconfig_yaml)?;
        self.wait_ready()?;

        // Kubernetes' own PersistentVolume binder, the one controller of kube-controller-manager
        // the controller's workloads depend on (it binds their pre-bound home volumes and claims).
        let binder = self.spawn(
            "kube-controller-manager",
            &[
                format!("--kubeconfig={}", self.kubeconfig.display()),
                "--controllers=persistentvolume-binder-controller".into(),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                "--v=0".into(),
            ],
        )?;
        self.children.lock().expect("children lock").push(binder);
        Ok(())
    }

    fn spawn(&self, binary: &str, args: &[String]) -> Result<Child> {
        let log = std::fs::File::create(self.dir.join(format!("{binary}.log")))?;
        let mut command = Command::new(self.bin_dir.join(binary));
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut command);
        command
            .spawn()
            .with_context(|| format!("starting {}", self.bin_dir.join(binary).display()))
    }

    fn wait_ready(&self) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        runtime.block_on(async {
            let client = self.client().await?;
            loop {
                let request = http::Request::get("/readyz").body(Vec::new())?;
                let last = match client.request_text(request).await {
                    Ok(text) if text.trim() == "ok" => return Ok(()),
                    Ok(text) => text,
                    Err(e) => e.to_string(),
                };
                self.check_children_alive()?;
                if Instant::now() > deadline {
                    bail!(
                        "kube-apiserver not ready after {READY_TIMEOUT:?}: {last}; logs in {}",
                        self.dir.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    }

    fn check_children_alive(&self) -> Result<()> {
        let mut children = self.children.lock().expect("children lock");
        for child in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "a control-plane process exited with {status}; logs in {}",
                    self.dir.display()
                );
            }
        }
        Ok(())
    }

    /// URL of the API server, `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// Path of a kubeconfig with the cluster-admin client certificate.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Directory holding the etcd, kube-apiserver, kube-controller-manager and kubectl binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The cluster-admin client configuration.
    pub async fn config(&self) -> Result<Config> {
        let kubeconfig = Kubeconfig::from_yaml(&self.kubeconfig_yaml)?;
        Ok(Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)
    }

    /// A new cluster-admin client. Each test gets its own: a client is bound to the tokio
    /// runtime it first ran on, and every `#[tokio::test]` has a runtime of its own.
    pub async fn client(&self) -> Result<Client> {
        Ok(Client::try_from(self.config().await?)?)
    }

    /// A client that acts as `user` in `groups`, through impersonation by the admin: requests
    /// are authorized exactly as that user's would be.
    pub async fn client_as(&self, user: &str, groups: &[&str]) -> Result<Client> {
        let mut config = self.config().await?;
        config.auth_info.impersonate = Some(user.to_string());
        config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
        Ok(Client::try_from(config)?)
    }

    /// A client authenticated with a real token of ServiceAccount `namespace/name` (TokenRequest
    /// API), exactly as a Pod running under that account would be: requests are authorized by
    /// the account's RBAC alone.
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> Result<Client> {
        Ok(Client::try_from(
            self.service_account_config(namespace, name).await?,
        )?)
    }

    /// The configuration behind [`ControlPlane::service_account_client`], for callers that
    /// build their client on a runtime of their own.
    pub async fn service_account_config(&self, namespace: &str, name: &str) -> Result<Config> {
        self.token_config(namespace, name, None).await
    }

    /// Like [`ControlPlane::service_account_config`], with the token bound to the Pod `pod` of
    /// `namespace` as the kubelet's projected tokens are: the API server adds the Pod's node
    /// (`authentication.kubernetes.io/node-name`) to the identity, which admission policies read.
    pub async fn pod_bound_config(&self, namespace: &str, name: &str, pod: &str) -> Result<Config> {
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.client().await?, namespace);
        let uid = pods
            .get(pod)
            .await
            .with_context(|| format!("Pod {namespace}/{pod}"))?
            .metadata
            .uid;
        let bound = k8s_openapi::api::authentication::v1::BoundObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.into()),
            uid,
        };
        self.token_config(namespace, name, Some(bound)).await
    }

    async fn token_config(
        &self,
        namespace: &str,
        name: &str,
        bound: Option<k8s_openapi::api::authentication::v1::BoundObjectReference>,
    ) -> Result<Config> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client().await?, namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(24 * 3600),
                bound_object_ref: bound,
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let token = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{name}"))?
            .status
            .context("TokenRequest without a status")?
            .token;
        let yaml = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {name}
  user:
    token: {token}
contexts:
- name: testbed
  context:
    cluster: testbed
    user: {name}
    namespace: {namespace}
current-context: testbed
",
            server = self.server,
            ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem),
        );
        Ok(Config::from_custom_kubeconfig(
            Kubeconfig::from_yaml(&yaml)?,
            &KubeConfigOptions::default(),
        )
        .await?)
    }

    /// `kubectl apply --server-side` of a YAML text (one or more documents).
    pub fn apply_yaml(&self, yaml: &str) -> Result<()> {
        let mut kubectl = self.kubectl();
        kubectl.args(["apply", "--server-side", "--force-conflicts", "-f", "-"]);
        run_with_input(kubectl, yaml)
    }

    /// `kubectl` preconfigured with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(self.bin_dir.join("kubectl"));
        command.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        command
    }

    /// Creates a namespace with a unique name starting with `prefix`, so every test works in
    /// a namespace of its own.
    pub async fn namespace(&self, prefix: &str) -> Result<String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let namespaces: Api<Namespace> = Api::all(self.client().await?);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        namespaces
            .create(&PostParams::default(), &namespace)
            .await?;
        Ok(name)
    }

    /// Installs (server-side apply) the given CRDs and waits until each is Established.
    pub async fn install_crds(&self, crds: &[CustomResourceDefinition]) -> Result<()> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client().await?);
        let params = PatchParams::apply("uwsgi-it-testbed").force();
        for crd in crds {
            let name = crd.metadata.name.clone().context("CRD without a name")?;
            api.patch(&name, &params, &Patch::Apply(crd)).await?;
        }
        for crd in crds {
            let name = crd.metadata.name.as_deref().unwrap_or_default();
            let established = kube::runtime::conditions::is_crd_established();
            tokio::time::timeout(
                Duration::from_secs(30),
                kube::runtime::wait::await_condition(api.clone(), name, established),
            )
            .await
            .map_err(|_| anyhow!("CRD {name} not Established within 30s"))??;
        }
        Ok(())
    }

    /// Stops etcd and kube-apiserver.
    pub fn stop(&self) {
        let mut children = self.children.lock().expect("children lock");
        for child in children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        children.clear();
    }
}

/// A control plane owned by one caller (a test, the local run) rather than by the whole test
/// binary. Its processes are spawned by a thread that lives until this is dropped — children
/// get `PR_SET_PDEATHSIG` when their spawning *thread* exits — and dropping it stops etcd and
/// kube-apiserver and removes their files.
pub struct OwnedControlPlane {
    plane: Option<Arc<ControlPlane>>,
    release: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OwnedControlPlane {
    /// Blocking: starts etcd and kube-apiserver and waits until the API server is ready.
    pub fn start() -> Result<Self> {
        let (started, receive) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("control-plane".into())
            .spawn(move || match ControlPlane::start() {
                Ok(plane) => {
                    let plane = Arc::new(plane);
                    let _ = started.send(Ok(plane.clone()));
                    // Until the owner lets go (or is gone); then the plane drops here.
                    let _ = released.recv();
                    drop(plane);
                }
                Err(error) => {
                    let _ = started.send(Err(error));
                }
            })?;
        let plane = receive.recv().context("the control-plane thread ended")??;
        Ok(OwnedControlPlane {
            plane: Some(plane),
            release: Some(release),
            thread: Some(thread),
        })
    }
}

impl std::ops::Deref for OwnedControlPlane {
    type Target = ControlPlane;
    fn deref(&self) -> &ControlPlane {
        self.plane
            .as_ref()
            .expect("the control plane lives until drop")
    }
}

impl Drop for OwnedControlPlane {
    fn drop(&mut self) {
        self.plane.take();
        self.release.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `command` (a kubectl invocation) with `input` on its stdin; an error with its stderr
/// when it fails.
pub(crate) fn run_with_input(mut command: Command, input: &str) -> Result<()> {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kubectl")?;
    child
        .stdin
        .take()
        .context("kubectl's stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Makes the kernel kill the child when the thread that spawned it goes away, so no etcd or
/// kube-apiserver outlives a crashed or killed test binary.
fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The directory with the control-plane binaries: `$UWSGI_IT_CONTROL_PLANE_BIN`, else what
/// `hack/control-plane.sh` builds (or finds in its cache).
pub fn locate_binaries() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack/control-plane.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!("{} failed with {}", script.display(), output.status);
    }
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
}

/// A work directory for this process; directories left by processes that no longer exist
/// (killed test binaries) are removed on the way.
fn fresh_work_dir() -> Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let root = std::env::temp_dir().join("uwsgi-it-testbed");
    std::fs::create_dir_all(&root)?;
    for entry in std::fs::read_dir(&root)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = root.join(format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A free TCP port on loopback. The port is released before the server binds it; the window
/// is small and collisions show up as a clear start-up failure.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The certificates and keys of one control plane.
struct Pki {
    ca_pem: String,
    apiserver_cert_pem: String,
    apiserver_key_pem: String,
    admin_cert_pem: String,
    admin_key_pem: String,
    service_account_key: KeyPair,
}

impl Pki {
    fn generate() -> Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "uwsgi-it-testbed-ca");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_pem = ca_params.self_signed(&ca_key)?.pem();
        let issuer = Issuer::new(ca_params, ca_key);

        let apiserver_key = KeyPair::generate()?;
        let mut apiserver = CertificateParams::new(vec!["localhost".to_string()])?;
        apiserver
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        apiserver
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        apiserver.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let apiserver_cert_pem = apiserver.signed_by(&apiserver_key, &issuer)?.pem();

        // The envtest admin: a client certificate in system:masters, which RBAC always allows.
        let admin_key = KeyPair::generate()?;
        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin.distinguished_name.push(DnType::CommonName, "admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert_pem = admin.signed_by(&admin_key, &issuer)?.pem();

        Ok(Pki {
            ca_pem,
            apiserver_cert_pem,
            apiserver_key_pem: apiserver_key.serialize_pem(),
            admin_cert_pem,
            admin_key_pem: admin_key.serialize_pem(),
            service_account_key: KeyPair::generate()?,
        })
    }

    fn write(&self, dir: &Path) -> Result<()> {
        std::fs::write(dir.join("ca.crt"), &self.ca_pem)?;
        std::fs::write(dir.join("apiserver.crt"), &self.apiserver_cert_pem)?;
        std::fs::write(dir.join("apiserver.key"), &self.apiserver_key_pem)?;
        std::fs::write(dir.join("sa.key"), self.service_account_key.serialize_pem())?;
        std::fs::write(
            dir.join("sa.pub"),
            self.service_account_key.public_key_pem(),
        )?;
        Ok(())
    }

    fn kubeconfig(&self, server: &str) -> String {
        let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: testbed
  context:
    cluster: testbed
    user: admin
    namespace: default
current-context: testbed
",
            ca = b64(&self.ca_pem),
            cert = b64(&self.admin_cert_pem),
            key = b64(&self.admin_key_pem),
        )
    }
}
