//! Test support for the controller's integration tests: the real control plane with the CRDs,
//! one controller per test binary running on a thread of its own — as the chart's controller
//! ServiceAccount, with exactly the chart's RBAC, so every test also proves that RBAC sufficient —
//! and helpers that build the objects of a test in names of its own.

#![allow(dead_code)]

use std::collections::BTreeMap;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use uwsgi_it_api::condition::{self, ADMITTED};
use uwsgi_it_api::{Container, Customer};
use uwsgi_it_domain::config::OperatorConfig;
use uwsgi_it_testbed::control_plane::ControlPlane;

/// How long a test waits for the controller before failing.
pub const WAIT: Duration = Duration::from_secs(60);

/// The configuration the test controllers run with.
pub fn test_config() -> OperatorConfig {
    OperatorConfig::from_yaml(
        "distros:\n  bookworm: docker.io/library/debian:bookworm-slim\ncustomDistroImage: uwsgi-it.local/distro-root:test\n",
    )
    .expect("test configuration")
}

/// Release name the chart is rendered with: its controller ServiceAccount is
/// `<release>-controller`.
pub const RELEASE: &str = "uwsgi-it";

/// The chart's controller ServiceAccount name for [`RELEASE`].
pub fn controller_service_account() -> String {
    format!("{RELEASE}-controller")
}

/// Renders the chart's ServiceAccounts and RBAC (the customer role included) for release
/// namespace `namespace` and applies them; nothing else of the chart is applied.
pub fn apply_chart_rbac(plane: &ControlPlane, namespace: &str) {
    let yaml =
        uwsgi_it_testbed::chart::render_rbac(RELEASE, namespace).expect("the chart's RBAC renders");
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&yaml).expect("helm template output is YAML");
    let has = |kind: &str, name: &str| {
        documents
            .iter()
            .any(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    };
    let customer_role = test_config().customer_cluster_role;
    assert!(
        has("ServiceAccount", &controller_service_account())
            && has("ClusterRole", &format!("{RELEASE}-controller"))
            && has("ClusterRole", &customer_role),
        "the chart renders the controller's ServiceAccount and roles and the customer role"
    );
    plane.apply_yaml(&yaml).expect("the chart's RBAC applies");
}

/// A client holding a real token of the chart's controller ServiceAccount in `namespace`.
pub async fn controller_client(plane: &ControlPlane, namespace: &str) -> Client {
    plane
        .service_account_client(namespace, &controller_service_account())
        .await
        .expect("controller ServiceAccount client")
}

/// Waits until the RBAC just applied reaches the API server's authorizer: the ServiceAccount
/// can list Containers cluster-wide (ClusterRoleBinding) and read its uid store (RoleBinding;
/// a missing ConfigMap is a 404, a missing grant a 403).
async fn wait_for_rbac(client: &Client, namespace: &str) {
    let deadline = Instant::now() + WAIT;
    let containers: Api<Container> = Api::all(client.clone());
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let uid_store = test_config().uid_store;
    loop {
        let listed = containers.list(&ListParams::default().limit(1)).await;
        let read = maps.get_opt(&uid_store).await;
        match (listed, read) {
            (Ok(_), Ok(_)) => return,
            (listed, read) if Instant::now() > deadline => panic!(
                "the chart's RBAC did not take effect within {WAIT:?}: {:?} {:?}",
                listed.err(),
                read.err()
            ),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A controller running on a thread of its own, stopped when dropped.
pub struct RunningController {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningController {
    /// Starts a controller against `plane`, keeping its Lease and uid store in `namespace`. It
    /// runs as the chart's controller ServiceAccount of `namespace`, with the chart's RBAC
    /// (rendered for release namespace `namespace` and applied first).
    pub fn start(plane: &'static ControlPlane, namespace: String) -> Self {
        Self::start_with(plane, namespace, |_| {})
    }

    /// Starts a replica that takes part in leader election under `identity`.
    pub fn start_elected(plane: &'static ControlPlane, namespace: String, identity: &str) -> Self {
        let identity = identity.to_string();
        Self::start_with(plane, namespace, move |options| {
            options.leader_election = true;
            options.identity = identity;
        })
    }

    /// Starts a controller whose options `configure` adjusts first.
    pub fn start_with(
        plane: &'static ControlPlane,
        namespace: String,
        configure: impl FnOnce(&mut uwsgi_it_controller::Options) + Send + 'static,
    ) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        uwsgi_it_telemetry::init_tracing("warn", false);
        let thread = std::thread::spawn(move || {
            apply_chart_rbac(plane, &namespace);
            let runtime = tokio::runtime::Runtime::new().expect("controller runtime");
            runtime.block_on(async move {
                let client = controller_client(plane, &namespace).await;
                wait_for_rbac(&client, &namespace).await;
                let mut options = uwsgi_it_controller::Options::new(test_config(), namespace);
                configure(&mut options);
                let shutdown = async move {
                    let _ = stopped.await;
                };
                if let Err(e) = uwsgi_it_controller::run(client, options, shutdown).await {
                    eprintln!("controller stopped with an error: {e:#}");
                }
            });
        });
        RunningController {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops the controller as a crash would: mid-work, without any goodbye.
    pub fn kill(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RunningController {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// The control plane (with CRDs) and the controller of this test binary (started once, by
/// whichever test comes first; the others wait for it).
pub async fn plane_and_controller() -> &'static ControlPlane {
    static CONTROLLER: tokio::sync::OnceCell<RunningController> =
        tokio::sync::OnceCell::const_new();
    let plane = tokio::task::spawn_blocking(ControlPlane::shared)
        .await
        .expect("control plane");
    plane
        .install_crds(&uwsgi_it_api::crds())
        .await
        .expect("CRDs");
    CONTROLLER
        .get_or_init(|| async {
            let namespace = plane
                .namespace("uwsgi-it-system")
                .await
                .expect("controller namespace");
            RunningController::start(plane, namespace)
        })
        .await;
    plane
}

/// Declares a server as a supplier does: its Node and its `Server` with capacity and address.
pub async fn server_node(client: &Client, name: &str, memory: u64, storage: u64, address: &str) {
    uwsgi_it_testbed::servers::declare(
        client,
        name,
        &uwsgi_it_testbed::servers::ServerSpec {
            memory,
            storage,
            address: Some(address),
            pod_cidr: None,
        },
        true,
    )
    .await
    .expect("server");
}

/// Creates a Customer owning `servers` with its namespace named after it.
pub async fn customer(client: &Client, name: &str, servers: &[&str], users: &[&str]) -> Customer {
    let customers: Api<Customer> = Api::all(client.clone());
    let customer: Customer = serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1",
        "kind": "Customer",
        "metadata": {"name": name},
        "spec": {"servers": servers, "users": users},
    }))
    .unwrap();
    let created = customers
        .create(&PostParams::default(), &customer)
        .await
        .expect("customer");
    wait_for(&customers, name, |c: &Customer| {
        c.status
            .as_ref()
            .is_some_and(|s| condition::is_true(&s.conditions, "Ready"))
    })
    .await;
    created
}

/// A Container manifest.
pub fn container(name: &str, spec: serde_json::Value) -> Container {
    serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1",
        "kind": "Container",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

/// Waits until `name` satisfies `check`, failing the test after [`WAIT`].
pub async fn wait_for<K, F>(api: &Api<K>, name: &str, check: F) -> K
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug + Send + 'static,
    F: Fn(&K) -> bool,
{
    let condition = move |object: Option<&K>| object.is_some_and(&check);
    match tokio::time::timeout(WAIT, await_condition(api.clone(), name, condition)).await {
        Ok(Ok(Some(object))) => object,
        Ok(Ok(None)) => panic!("{name} disappeared"),
        Ok(Err(e)) => panic!("watching {name}: {e}"),
        Err(_) => panic!(
            "{name} did not reach the expected state within {WAIT:?}; it is: {:?}",
            api.get_opt(name).await
        ),
    }
}

/// Waits until `name` no longer exists.
pub async fn wait_gone<K>(api: &Api<K>, name: &str)
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug + Send + 'static,
{
    let gone = |object: Option<&K>| object.is_none();
    tokio::time::timeout(WAIT, await_condition(api.clone(), name, gone))
        .await
        .unwrap_or_else(|_| panic!("{name} still exists after {WAIT:?}"))
        .unwrap();
}

/// True once the controller decided the container (Admitted is present for this generation).
pub fn decided(container: &Container) -> bool {
    container.status.as_ref().is_some_and(|s| {
        condition::find(&s.conditions, ADMITTED)
            .is_some_and(|c| c.observed_generation == container.metadata.generation)
    })
}

/// True when the container is admitted.
pub fn admitted(container: &Container) -> bool {
    container
        .status
        .as_ref()
        .is_some_and(|s| condition::is_true(&s.conditions, ADMITTED) && s.uid.is_some())
}

/// The `Admitted` condition's (status, reason, message).
pub fn admission(container: &Container) -> (String, String, String) {
    let c = container
        .status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, ADMITTED))
        .expect("Admitted condition");
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

/// Plays the agent's part of a container's life: reports its home ready (test stand-in for
/// the agent, with the agent's field manager).
pub async fn report_home(api: &Api<Container>, name: &str, reason: &str, ready: bool) {
    let status = if ready { "True" } else { "False" };
    let body = json!({
        "apiVersion": "uwsgi.it/v1alpha1",
        "kind": "Container",
        "metadata": {"name": name},
        "status": {"conditions": [{
            "type": "HomeReady", "status": status, "reason": reason,
            "message": "test stand-in for the agent", "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]},
    });
    api.patch_status(
        name,
        &PatchParams::apply("uwsgi-it-agent").force(),
        &Patch::Apply(&body),
    )
    .await
    .expect("agent status");
}

/// Labels helper.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
