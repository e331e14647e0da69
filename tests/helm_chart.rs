//! The Helm chart (charts/uwsgi-it-operator): it lints, renders what the programs and the
//! security model need for default and non-default values, refuses bad values with the schema's
//! message, ships the generated CRDs unchanged, installs into a real kube-apiserver, and its RBAC
//! grants exactly the security model of DESIGN.md when exercised by real (impersonated) users
//! and service accounts.
//!
//! helm comes from `hack/helm.sh` (built once from the Go module proxy, cached) unless
//! `UWSGI_IT_HELM` names a binary.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use uwsgi_it_api::{Container, CustomDistro, Customer, PortMapping};
use uwsgi_it_domain::config::{ForwardingBackend, HomeRetention, OperatorConfig};
use uwsgi_it_testbed::control_plane::ControlPlane;

/// Release and namespace of the default-values installation shared by the install tests.
const RELEASE: &str = "rel";
const NAMESPACE: &str = "uwsgi-it-system";
/// How long RBAC changes may take to reach the API server's authorizer cache.
const RBAC_SETTLE: Duration = Duration::from_secs(30);

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn chart_dir() -> PathBuf {
    repo_path("charts/uwsgi-it-operator")
}

fn non_default_values() -> PathBuf {
    chart_dir().join("ci/non-default-values.yaml")
}

/// The helm binary (`hack/helm.sh`'s, or `UWSGI_IT_HELM`).
fn helm_binary() -> PathBuf {
    uwsgi_it_testbed::chart::helm().expect("helm")
}

fn helm(args: &[&str]) -> Output {
    Command::new(helm_binary())
        .args(args)
        .output()
        .expect("helm runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs helm and returns its stdout, failing the test with helm's stderr when it fails.
fn helm_ok(args: &[&str]) -> String {
    let out = helm(args);
    assert!(
        out.status.success(),
        "helm {} failed: {}{}",
        args.join(" "),
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
}

/// The rendered manifests of `helm template`.
struct Manifests(Vec<Value>);

impl Manifests {
    fn render(extra: &[&str]) -> Manifests {
        let chart = chart_dir();
        let mut args = vec![
            "template",
            RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            NAMESPACE,
        ];
        args.extend_from_slice(extra);
        let yaml = helm_ok(&args);
        let documents: Vec<Value> = serde_saphyr::from_multiple(&yaml)
            .unwrap_or_else(|e| panic!("helm template output is not YAML: {e}\n{yaml}"));
        // Comment-only documents come back as null.
        Manifests(documents.into_iter().filter(|d| !d.is_null()).collect())
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|m| m["kind"] == kind && m["metadata"]["name"] == name)
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name).unwrap_or_else(|| {
            panic!(
                "no {kind} {name} rendered; rendered: {:?}",
                self.kinds_and_names()
            )
        })
    }

    fn kinds_and_names(&self) -> BTreeSet<(String, String)> {
        self.0
            .iter()
            .map(|m| {
                (
                    m["kind"].as_str().unwrap_or_default().to_string(),
                    m["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
    }

    /// The operator configuration file as the programs read it.
    fn config(&self, configmap: &str) -> (Value, OperatorConfig) {
        let text = self.get("ConfigMap", configmap)["data"]["config.yaml"]
            .as_str()
            .expect("ConfigMap has config.yaml")
            .to_string();
        let value: Value = serde_saphyr::from_str(&text).expect("config.yaml is YAML");
        let parsed = OperatorConfig::from_yaml(&text)
            .unwrap_or_else(|e| panic!("the programs refuse the rendered config: {e}\n{text}"));
        (value, parsed)
    }
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{value} is not an array"))
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

/// The rule of `role` granting `verb` on `group`/`resource`, with its resourceNames.
fn rule_names(role: &Value, group: &str, resource: &str, verb: &str) -> Option<Vec<String>> {
    role["rules"].as_array()?.iter().find_map(|rule| {
        let has = |key: &str, want: &str| {
            rule[key]
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == want))
        };
        (has("apiGroups", group) && has("resources", resource) && has("verbs", verb)).then(|| {
            rule["resourceNames"]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        })
    })
}

fn env_field_ref(container: &Value, name: &str) -> String {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("env {name} missing"))["valueFrom"]["fieldRef"]["fieldPath"]
        .as_str()
        .unwrap()
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Lint and render
// ---------------------------------------------------------------------------------------------

#[test]
fn chart_lints_with_default_and_non_default_values() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    helm_ok(&["lint", "--strict", chart]);
    let mut ci_files: Vec<_> = std::fs::read_dir(chart_dir().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    ci_files.sort();
    assert!(
        !ci_files.is_empty(),
        "charts/uwsgi-it-operator/ci/ is empty"
    );
    for values in ci_files {
        helm_ok(&["lint", "--strict", chart, "-f", values.to_str().unwrap()]);
    }
}

#[test]
fn default_render_has_the_agent_the_design_needs() {
    let manifests = Manifests::render(&[]);
    let ds = manifests.get("DaemonSet", "rel-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert!(
        pod["nodeSelector"].is_null(),
        "the agent needs no node label: {}",
        pod["nodeSelector"]
    );
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(pod["serviceAccountName"], "rel-agent");
    let agent = &pod["containers"][0];
    assert_eq!(
        strings(&agent["args"]),
        [
            "agent",
            "--config=/etc/uwsgi-it/config.yaml",
            "--node-name=$(NODE_NAME)",
            "--listen=127.0.0.1:9180"
        ]
    );
    assert_eq!(env_field_ref(agent, "NODE_NAME"), "spec.nodeName");
    // The endpoints stay off the server's public address, and the kubelet probes them where
    // they are.
    assert_eq!(agent["livenessProbe"]["httpGet"]["host"], "127.0.0.1");
    assert_eq!(agent["readinessProbe"]["httpGet"]["host"], "127.0.0.1");
    let security = &agent["securityContext"];
    assert_eq!(security["runAsUser"], 0);
    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<&str> = strings(&security["capabilities"]["add"])
        .into_iter()
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(["NET_ADMIN", "CHOWN", "FOWNER", "DAC_OVERRIDE"])
    );
    assert_eq!(agent["ports"][0]["containerPort"], 9180);
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(agent["ports"][0]["name"], "metrics");

    // The homes at the same path as on the host, the iptables lock shared with the host.
    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name} missing"))
            .clone()
    };
    let mount = |name: &str| {
        agent["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("mount {name} missing"))["mountPath"]
            .clone()
    };
    assert_eq!(
        volume("homes")["hostPath"],
        json!({"path": "/containers", "type": "DirectoryOrCreate"})
    );
    assert_eq!(mount("homes"), "/containers");
    assert_eq!(
        volume("xtables-lock")["hostPath"],
        json!({"path": "/run/xtables.lock", "type": "FileOrCreate"})
    );
    assert_eq!(mount("xtables-lock"), "/run/xtables.lock");
    assert_eq!(volume("config")["configMap"]["name"], "rel-config");
    assert_eq!(mount("config"), "/etc/uwsgi-it");
}

#[test]
fn default_render_has_a_restricted_leader_elected_controller() {
    let manifests = Manifests::render(&[]);
    let deployment = manifests.get("Deployment", "rel-controller");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "rel-controller");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let controller = &pod["containers"][0];
    assert_eq!(
        strings(&controller["args"]),
        [
            "controller",
            "--config=/etc/uwsgi-it/config.yaml",
            "--listen=0.0.0.0:8080"
        ]
    );
    let security = &controller["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["runAsUser"], 65532);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    assert!(security["capabilities"]["add"].is_null());
    assert_eq!(
        env_field_ref(controller, "POD_NAMESPACE"),
        "metadata.namespace"
    );
    assert_eq!(env_field_ref(controller, "POD_NAME"), "metadata.name");
    assert_eq!(
        controller["ports"],
        json!([{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}])
    );
    assert_eq!(controller["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(controller["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(!controller["resources"]["requests"].is_null());

    // Two replicas: a PDB keeps a standby through drains.
    manifests.get("PodDisruptionBudget", "rel-controller");
    // Metrics Services always; the ServiceMonitor only on request.
    let service = manifests.get("Service", "rel-controller-metrics");
    assert_eq!(service["spec"]["ports"][0]["name"], "metrics");
    manifests.get("Service", "rel-agent-metrics");
    assert!(
        !manifests
            .kinds_and_names()
            .iter()
            .any(|(kind, _)| kind == "ServiceMonitor")
    );
}

#[test]
fn default_config_is_what_the_programs_expect() {
    let manifests = Manifests::render(&[]);
    let (value, config) = manifests.config("rel-config");
    assert_eq!(value["homeRoot"], "/containers");
    assert_eq!(value["homeRetention"], "Archive");
    assert_eq!(value["portForward"]["backend"], "nftables");
    assert_eq!(value["portForward"]["resyncPeriod"], "30s");
    assert_eq!(value["customerClusterRole"], "uwsgi-it-customer");
    assert_eq!(value["uidStore"], "uwsgi-it-uids");
    assert_eq!(
        value["distros"],
        json!({"bookworm": "registry.example.invalid/uwsgi-it-distro-bookworm:0.1.0"})
    );
    // values.yaml lists the programs' own defaults (every infrastructure port, with why), plus
    // the agent's own host port; publicPorts is the programs' default too.
    assert_eq!(
        config.port_policy,
        uwsgi_it_domain::ports::PortPolicy::default(),
        "values.yaml's publicPorts/reservedPorts drifted from DEFAULT_RESERVED_PORTS"
    );
    assert!(config.port_policy.reserved.contains(9180));
    assert!(!config.port_policy.reserved.contains(8080));
    assert_eq!(config.port_forward.command_timeout, Duration::from_secs(10));
    assert_eq!(config.port_forward.max_sync_age, Duration::from_secs(140));
    assert_eq!(config.home_retention, HomeRetention::Archive);
    assert_eq!(config.port_forward.backend, ForwardingBackend::Nftables);
    assert_eq!(config.port_forward.resync_period, Duration::from_secs(30));
    assert_eq!(config.log_level, "info");
}

#[test]
fn a_config_change_rolls_both_programs() {
    let checksums = |extra: &[&str]| {
        let manifests = Manifests::render(extra);
        [("Deployment", "rel-controller"), ("DaemonSet", "rel-agent")].map(|(kind, name)| {
            manifests.get(kind, name)["spec"]["template"]["metadata"]["annotations"]
                ["checksum/config"]
                .as_str()
                .expect("checksum/config annotation")
                .to_string()
        })
    };
    let before = checksums(&[]);
    let after = checksums(&["--set", "config.logLevel=debug"]);
    assert_ne!(before[0], after[0], "the controller does not roll");
    assert_ne!(before[1], after[1], "the agents do not roll");
    assert_eq!(before, checksums(&[]), "the checksum is not stable");
}

#[test]
fn non_default_values_reach_every_object() {
    let values = non_default_values();
    let manifests = Manifests::render(&["-f", values.to_str().unwrap()]);

    let (value, config) = manifests.config("hosting-config");
    assert_eq!(value["homeRoot"], "/srv/homes");
    assert_eq!(value["homeRetention"], "Delete");
    assert_eq!(value["portForward"]["backend"], "iptables");
    assert_eq!(value["logLevel"], "debug");
    // Helm merges maps: the default `bookworm` entry is dropped by setting it to null.
    assert_eq!(
        value["distros"],
        json!({
            "trixie": "registry.example.com/distros/debian:trixie",
            "noble": "registry.example.com/distros/ubuntu:24.04"
        })
    );
    // A port written as a number reaches the programs as the string they expect.
    assert_eq!(
        strings(&value["reservedPorts"]),
        ["8000-8100", "9999", "9190"]
    );
    assert_eq!(config.home_retention, HomeRetention::Delete);
    assert_eq!(config.port_forward.backend, ForwardingBackend::Iptables);
    assert_eq!(config.port_forward.resync_period, Duration::from_secs(120));
    assert!(config.port_policy.reserved.contains(8050));
    assert!(!config.port_policy.reserved.contains(30000));

    let ds = manifests.get("DaemonSet", "hosting-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"], json!({"example.com/pool": "hosting"}));
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["imagePullSecrets"], json!([{"name": "regcred"}]));
    let agent = &pod["containers"][0];
    assert_eq!(
        agent["image"],
        "registry.example.com:5000/hosting/uwsgi-it-operator:0.1.0-rc.1"
    );
    assert!(strings(&agent["securityContext"]["capabilities"]["add"]).contains(&"NET_RAW"));
    // listen: internal: the node's InternalIP, where the kubelet probes by default.
    assert!(strings(&agent["args"]).contains(&"--listen=$(HOST_IP):9190"));
    assert_eq!(env_field_ref(agent, "HOST_IP"), "status.hostIP");
    assert!(agent["livenessProbe"]["httpGet"].get("host").is_none());
    let homes = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "homes")
        .unwrap();
    assert_eq!(homes["hostPath"]["path"], "/srv/homes");

    let deployment = manifests.get("Deployment", "hosting-controller");
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert!(
        manifests
            .find("PodDisruptionBudget", "hosting-controller")
            .is_none(),
        "a PDB for a single replica would block every drain"
    );

    // The customer role's name follows the configuration, and so does the controller's right to
    // bind it and to update the uid store.
    manifests.get("ClusterRole", "hosting-customer");
    assert!(manifests.find("ClusterRole", "uwsgi-it-customer").is_none());
    let controller_role = manifests.get("ClusterRole", "hosting-controller");
    assert_eq!(
        rule_names(
            controller_role,
            "rbac.authorization.k8s.io",
            "clusterroles",
            "bind"
        ),
        Some(vec!["hosting-customer".to_string()])
    );
    let role = manifests.get("Role", "hosting-controller");
    assert_eq!(
        rule_names(role, "", "configmaps", "update"),
        Some(vec!["hosting-uids".to_string()])
    );

    let monitor = manifests.get("ServiceMonitor", "hosting");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "15s");
    for service in ["hosting-controller-metrics", "hosting-agent-metrics"] {
        let labels = &manifests.get("Service", service)["metadata"]["labels"];
        for (key, want) in monitor["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
        {
            assert_eq!(&labels[key], want, "{service} escapes the ServiceMonitor");
        }
    }
}

#[test]
fn bad_values_are_refused_with_the_schema_message() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let cases = [
        (
            "config.portForward.backend=pf",
            "'/config/portForward/backend': value must be one of 'nftables', 'iptables'",
        ),
        (
            "config.homeRetention=Sometimes",
            "'/config/homeRetention': value must be one of 'Retain', 'Archive', 'Delete'",
        ),
        (
            "config.portForward.resyncPeriod=soon",
            "'/config/portForward/resyncPeriod': 'soon' does not match pattern",
        ),
        (
            "config.homeRoot=containers",
            "'/config/homeRoot': 'containers' does not match pattern",
        ),
        (
            "config.homeRoot=/srv/../etc",
            "'/config/homeRoot': '/srv/../etc' does not match pattern",
        ),
        (
            "config.reservedPorts={http}",
            "'/config/reservedPorts/0': 'http' does not match pattern",
        ),
        (
            "config.logLevel=loud",
            "'/config/logLevel': value must be one of",
        ),
        (
            "controller.replicas=0",
            "'/controller/replicas': minimum: got 0, want 1",
        ),
        ("image.repository=", "'/image/repository': minLength"),
        (
            "image.digest=latest",
            "'/image/digest': 'latest' does not match pattern",
        ),
        ("config.distros.bookworm=", "'/config/distros/bookworm'"),
        (
            "config.homeRot=/x",
            "additional properties 'homeRot' not allowed",
        ),
    ];
    let mut failures = Vec::new();
    for (set, expected) in cases {
        for command in ["template", "lint"] {
            let mut args = vec![command];
            if command == "template" {
                args.push(RELEASE);
            }
            args.extend([chart, "--set", set]);
            let out = helm(&args);
            let output = format!("{}{}", text(&out.stderr), text(&out.stdout));
            if out.status.success() {
                failures.push(format!("helm {command} --set {set} was accepted"));
            } else if !output.contains(expected) {
                failures.push(format!(
                    "helm {command} --set {set} was refused without `{expected}`: {output}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn chart_crds_are_the_generated_crds() {
    let listing = |dir: &Path| -> Vec<(String, String)> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read_to_string(&p).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    };
    let generated = listing(&repo_path("crds"));
    let chart = listing(&chart_dir().join("crds"));
    assert_eq!(generated.len(), 5, "crds/ lost a CRD");
    let names = |files: &[(String, String)]| files.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&chart),
        names(&generated),
        "charts/uwsgi-it-operator/crds/ differs from crds/; run `cp crds/*.yaml charts/uwsgi-it-operator/crds/`"
    );
    for ((name, chart_text), (_, generated_text)) in chart.iter().zip(&generated) {
        assert!(
            chart_text == generated_text,
            "charts/uwsgi-it-operator/crds/{name} differs from crds/{name}; run `cp crds/*.yaml charts/uwsgi-it-operator/crds/`"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Install into a real API server
// ---------------------------------------------------------------------------------------------

/// What `helm install` of the default values printed (NOTES included).
struct Installed {
    plane: &'static ControlPlane,
    output: String,
}

/// The default-values release, installed once per test binary (blocking: call from
/// `spawn_blocking`). Installs the CRDs too: they are in the chart's crds/.
fn installed() -> &'static Installed {
    static INSTALLED: OnceLock<Installed> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let plane = ControlPlane::shared();
        let chart = chart_dir();
        let kubeconfig = plane.kubeconfig_path().to_str().unwrap().to_string();
        // No kubelet runs, so the pods never start: no --wait.
        let output = helm_ok(&[
            "install",
            RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--kubeconfig",
            &kubeconfig,
            "--timeout",
            "2m",
        ]);
        Installed { plane, output }
    })
}

async fn install() -> &'static Installed {
    tokio::task::spawn_blocking(installed)
        .await
        .expect("helm install")
}

/// Polls `check` until it succeeds or `timeout` passes, then fails with its last error. RBAC
/// reaches the authorizer through an informer, so a fresh binding takes effect a moment after it
/// is stored; this is the only thing these tests wait for.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(()) => return,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: not within {timeout:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test]
async fn helm_install_creates_every_object() {
    let installed = install().await;
    assert!(
        installed.output.contains("kind: Server"),
        "NOTES do not tell the supplier how to make a server: {}",
        installed.output
    );
    assert!(installed.output.contains("kubectl get uwsgi -A"));

    let client = installed.plane.client().await.unwrap();
    let ns = NAMESPACE;
    let deployment = Api::<Deployment>::namespaced(client.clone(), ns)
        .get("rel-controller")
        .await
        .expect("Deployment rel-controller");
    assert_eq!(deployment.spec.unwrap().replicas, Some(2));
    let daemonset = Api::<DaemonSet>::namespaced(client.clone(), ns)
        .get("rel-agent")
        .await
        .expect("DaemonSet rel-agent");
    assert_eq!(
        daemonset.spec.unwrap().template.spec.unwrap().host_network,
        Some(true)
    );
    for name in ["rel-controller", "rel-agent"] {
        Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("ServiceAccount {name}: {e}"));
        Api::<ClusterRoleBinding>::all(client.clone())
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("ClusterRoleBinding {name}: {e}"));
    }
    for name in [
        "rel-controller",
        "rel-agent",
        "rel-supplier",
        "uwsgi-it-customer",
    ] {
        Api::<ClusterRole>::all(client.clone())
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("ClusterRole {name}: {e}"));
    }
    Api::<Role>::namespaced(client.clone(), ns)
        .get("rel-controller")
        .await
        .expect("Role rel-controller");
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .get("rel-controller")
        .await
        .expect("RoleBinding rel-controller");
    let config = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get("rel-config")
        .await
        .expect("ConfigMap rel-config");
    let text = &config.data.unwrap()["config.yaml"];
    OperatorConfig::from_yaml(text).expect("the installed config is valid for the programs");
    for name in ["rel-controller-metrics", "rel-agent-metrics"] {
        Api::<Service>::namespaced(client.clone(), ns)
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("Service {name}: {e}"));
    }
    Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
        .get("rel-controller")
        .await
        .expect("PodDisruptionBudget rel-controller");

    // The chart's crds/ went in first and are served.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "customers.uwsgi.it",
        "containers.uwsgi.it",
        "portmappings.uwsgi.it",
        "customdistros.uwsgi.it",
    ] {
        crds.get(name)
            .await
            .unwrap_or_else(|e| panic!("CRD {name}: {e}"));
    }
}

/// A stand-in for the Prometheus Operator's ServiceMonitor CRD (no schema), so the chart's
/// ServiceMonitor can be installed on a cluster without the Prometheus Operator.
fn service_monitor_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "names": {"kind": "ServiceMonitor", "plural": "servicemonitors", "singular": "servicemonitor", "listKind": "ServiceMonitorList"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}
            }]
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn non_default_values_install_next_to_the_default_release() {
    // Shares the cluster with the default release: it must not collide with it (own names, own
    // customer ClusterRole).
    let installed = install().await;
    let plane = installed.plane;
    plane
        .install_crds(&[service_monitor_crd()])
        .await
        .expect("ServiceMonitor CRD");
    let values = non_default_values();
    let chart = chart_dir();
    let kubeconfig = plane.kubeconfig_path().to_str().unwrap().to_string();
    let args = [
        "install",
        "hosting",
        chart.to_str().unwrap(),
        "--namespace",
        "hosting-system",
        "--create-namespace",
        "--kubeconfig",
        &kubeconfig,
        "-f",
        values.to_str().unwrap(),
    ]
    .map(str::to_string);
    tokio::task::spawn_blocking(move || helm_ok(&args.each_ref().map(String::as_str)))
        .await
        .unwrap();

    let client = plane.client().await.unwrap();
    Api::<ClusterRole>::all(client.clone())
        .get("hosting-customer")
        .await
        .expect("ClusterRole hosting-customer");
    Api::<DaemonSet>::namespaced(client.clone(), "hosting-system")
        .get("hosting-agent")
        .await
        .expect("DaemonSet hosting-agent");
    let monitors: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client,
        "hosting-system",
        &kube::api::ApiResource {
            group: "monitoring.coreos.com".into(),
            version: "v1".into(),
            api_version: "monitoring.coreos.com/v1".into(),
            kind: "ServiceMonitor".into(),
            plural: "servicemonitors".into(),
        },
    );
    monitors
        .get("hosting")
        .await
        .expect("ServiceMonitor hosting");
}

// ---------------------------------------------------------------------------------------------
// RBAC as the users and service accounts see it
// ---------------------------------------------------------------------------------------------

fn assert_forbidden<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

fn container(name: &str) -> Container {
    serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container",
        "metadata": {"name": name},
        "spec": {"server": "server-1", "memory": 100, "storage": 100}
    }))
    .unwrap()
}

/// One question to the RBAC authorizer: may someone `verb` `group`/`resource[/subresource]`
/// (in `namespace`, named `name`)?
#[derive(Debug, Clone, Copy)]
struct Ask<'a> {
    verb: &'a str,
    group: &'a str,
    resource: &'a str,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
}

fn ask<'a>(
    verb: &'a str,
    group: &'a str,
    resource: &'a str,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
) -> Ask<'a> {
    Ask {
        verb,
        group,
        resource,
        namespace,
        name,
    }
}

/// What `user` in `groups` may do, as the API server's RBAC authorizer decides it.
async fn allowed(client: &Client, user: &str, groups: &[&str], ask: Ask<'_>) -> bool {
    let (resource, subresource) = ask.resource.split_once('/').unwrap_or((ask.resource, ""));
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": user,
            "groups": groups,
            "resourceAttributes": {
                "verb": ask.verb, "group": ask.group, "resource": resource,
                "subresource": subresource,
                "namespace": ask.namespace.unwrap_or_default(),
                "name": ask.name.unwrap_or_default(),
            }
        }
    }))
    .unwrap();
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview");
    answer.status.expect("SubjectAccessReview status").allowed
}

#[tokio::test]
async fn customer_role_grants_exactly_the_security_model() {
    let installed = install().await;
    let plane = installed.plane;
    let admin = plane.client().await.unwrap();
    let acme = plane.namespace("acme").await.unwrap();
    let globex = plane.namespace("globex").await.unwrap();

    // The controller binds the customer role in the customer's namespace. Done here as the
    // controller's ServiceAccount, which proves the chart gives it the right to (bind on exactly
    // that role) without holding the role's permissions itself.
    let controller_sa = format!("system:serviceaccount:{NAMESPACE}:rel-controller");
    let sa_groups = [
        "system:serviceaccounts",
        &format!("system:serviceaccounts:{NAMESPACE}"),
        "system:authenticated",
    ];
    let as_controller = plane.client_as(&controller_sa, &sa_groups).await.unwrap();
    // The controller writes only in customer namespaces (the chart's admission policy).
    label_customer_namespace(&admin, &acme).await;
    let binding = |name: &str, role: &str| -> RoleBinding {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}]
        }))
        .unwrap()
    };
    let bindings: Api<RoleBinding> = Api::namespaced(as_controller, &acme);
    eventually(
        "the controller binds the customer role",
        RBAC_SETTLE,
        || {
            let bindings = bindings.clone();
            let customer = binding("uwsgi-it-customer", "uwsgi-it-customer");
            async move {
                match bindings.create(&PostParams::default(), &customer).await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            }
        },
    )
    .await;
    // ... and only that role: RBAC's escalation check refuses any other.
    assert_forbidden(
        "the controller binding cluster-admin",
        bindings
            .create(
                &PostParams::default(),
                &binding("escalate", "cluster-admin"),
            )
            .await,
    );
    assert_forbidden(
        "the controller binding the supplier role",
        bindings
            .create(&PostParams::default(), &binding("escalate", "rel-supplier"))
            .await,
    );

    let alice = plane.client_as("alice", &[]).await.unwrap();
    let containers: Api<Container> = Api::namespaced(alice.clone(), &acme);
    eventually("alice's binding takes effect", RBAC_SETTLE, || {
        let containers = containers.clone();
        async move {
            containers
                .list(&ListParams::default())
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await;

    // Containers: create, read, update; never delete, never status.
    let created = containers
        .create(&PostParams::default(), &container("web"))
        .await
        .expect("alice creates a Container");
    let mut changed = created.clone();
    changed.spec.memory = 200;
    containers
        .replace("web", &PostParams::default(), &changed)
        .await
        .expect("alice updates her Container");
    containers
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"note": "resized"}})),
        )
        .await
        .expect("alice patches her Container");
    containers
        .get("web")
        .await
        .expect("alice reads her Container");
    assert_forbidden(
        "alice deleting a Container",
        containers.delete("web", &DeleteParams::default()).await,
    );
    assert_forbidden(
        "alice writing a Container's status",
        containers
            .patch_status(
                "web",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"uid": 30001}})),
            )
            .await,
    );

    // PortMappings and CustomDistros: everything but status, delete included.
    let mappings: Api<PortMapping> = Api::namespaced(alice.clone(), &acme);
    let mapping: PortMapping = serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1", "kind": "PortMapping",
        "metadata": {"name": "web-9000"},
        "spec": {"container": "web", "proto": "tcp", "publicPort": 9000, "privatePort": 8000}
    }))
    .unwrap();
    mappings
        .create(&PostParams::default(), &mapping)
        .await
        .expect("alice creates a PortMapping");
    mappings
        .patch(
            "web-9000",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"privatePort": 8001}})),
        )
        .await
        .expect("alice updates her PortMapping");
    assert_forbidden(
        "alice writing a PortMapping's status",
        mappings
            .patch_status(
                "web-9000",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"target": "10.0.0.1:22"}})),
            )
            .await,
    );
    mappings
        .delete("web-9000", &DeleteParams::default())
        .await
        .expect("alice deletes her PortMapping");

    let distros: Api<CustomDistro> = Api::namespaced(alice.clone(), &acme);
    let distro: CustomDistro = serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1", "kind": "CustomDistro",
        "metadata": {"name": "ubuntu0001"},
        "spec": {"storageContainer": "web", "path": "ubuntu0001"}
    }))
    .unwrap();
    distros
        .create(&PostParams::default(), &distro)
        .await
        .expect("alice creates a CustomDistro");
    distros
        .patch(
            "ubuntu0001",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"note": "noble"}})),
        )
        .await
        .expect("alice updates her CustomDistro");
    assert_forbidden(
        "alice writing a CustomDistro's status",
        distros
            .patch_status(
                "ubuntu0001",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"usedBy": 0}})),
            )
            .await,
    );
    distros
        .delete("ubuntu0001", &DeleteParams::default())
        .await
        .expect("alice deletes her CustomDistro");

    // Pods: read only (workloads come from admitted Containers, not from customers).
    let pods: Api<Pod> = Api::namespaced(alice.clone(), &acme);
    pods.list(&ListParams::default())
        .await
        .expect("alice lists her Pods");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "sneaky"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))
    .unwrap();
    assert_forbidden(
        "alice creating a Pod",
        pods.create(&PostParams::default(), &pod).await,
    );
    // Events, both APIs; pod logs (no kubelet here to serve them, so asked of the authorizer).
    Api::<k8s_openapi::api::core::v1::Event>::namespaced(alice.clone(), &acme)
        .list(&ListParams::default())
        .await
        .expect("alice reads core Events");
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(alice.clone(), &acme)
        .list(&ListParams::default())
        .await
        .expect("alice reads events.k8s.io Events");
    let logs = ask("get", "", "pods/log", Some(&acme), Some("web-0"));
    assert!(
        allowed(&admin, "alice", &[], logs).await,
        "alice cannot read logs"
    );

    // Another customer's namespace is out of reach, and so are Customers (cluster-scoped).
    Api::<Container>::namespaced(admin.clone(), &globex)
        .create(&PostParams::default(), &container("theirs"))
        .await
        .expect("admin creates globex's Container");
    let theirs: Api<Container> = Api::namespaced(alice.clone(), &globex);
    assert_forbidden(
        "alice listing another namespace",
        theirs.list(&ListParams::default()).await,
    );
    assert_forbidden(
        "alice reading another's Container",
        theirs.get("theirs").await,
    );
    assert_forbidden(
        "alice creating in another namespace",
        theirs
            .create(&PostParams::default(), &container("intruder"))
            .await,
    );
    assert_forbidden(
        "alice reading another namespace's Pods",
        Api::<Pod>::namespaced(alice.clone(), &globex)
            .list(&ListParams::default())
            .await,
    );
    assert_forbidden(
        "alice listing Customers",
        Api::<Customer>::all(alice.clone())
            .list(&ListParams::default())
            .await,
    );
    assert_forbidden(
        "alice changing her own RoleBinding",
        Api::<RoleBinding>::namespaced(alice, &acme)
            .delete("uwsgi-it-customer", &DeleteParams::default())
            .await,
    );
}

#[tokio::test]
async fn controller_and_agent_have_least_privilege() {
    let installed = install().await;
    let admin = installed.plane.client().await.unwrap();
    let controller = format!("system:serviceaccount:{NAMESPACE}:rel-controller");
    let agent = format!("system:serviceaccount:{NAMESPACE}:rel-agent");
    let namespace_group = format!("system:serviceaccounts:{NAMESPACE}");
    let groups = [
        "system:serviceaccounts",
        namespace_group.as_str(),
        "system:authenticated",
    ];
    let customer = Some("acme");
    let release = Some(NAMESPACE);
    let (lease, uids) = (Some("uwsgi-it-controller"), Some("uwsgi-it-uids"));

    let cases = [
        // The controller: admission, workloads, status, leader election, the uid store...
        (
            &controller,
            ask("watch", "uwsgi.it", "containers", None, None),
            true,
        ),
        (
            &controller,
            ask(
                "update",
                "uwsgi.it",
                "containers/finalizers",
                customer,
                None,
            ),
            true,
        ),
        (
            &controller,
            ask("patch", "uwsgi.it", "customers/status", None, None),
            true,
        ),
        (&controller, ask("create", "", "pods", customer, None), true),
        (
            &controller,
            ask("create", "", "persistentvolumes", None, None),
            true,
        ),
        (
            &controller,
            ask("create", "", "persistentvolumeclaims", customer, None),
            true,
        ),
        (
            &controller,
            ask("patch", "", "persistentvolumeclaims", customer, None),
            true,
        ),
        (
            &controller,
            ask("patch", "", "persistentvolumes", None, None),
            false,
        ),
        (
            &controller,
            ask("create", "", "namespaces", None, None),
            true,
        ),
        (
            &controller,
            ask("create", "events.k8s.io", "events", customer, None),
            true,
        ),
        (
            &controller,
            ask("create", "coordination.k8s.io", "leases", release, None),
            true,
        ),
        (
            &controller,
            ask("update", "coordination.k8s.io", "leases", release, lease),
            true,
        ),
        (
            &controller,
            ask("patch", "coordination.k8s.io", "leases", release, lease),
            true,
        ),
        (
            &controller,
            ask("update", "", "configmaps", release, uids),
            true,
        ),
        // ... and nothing more.
        (
            &controller,
            ask("create", "uwsgi.it", "containers", customer, None),
            false,
        ),
        (
            &controller,
            ask("delete", "uwsgi.it", "containers", customer, None),
            false,
        ),
        (
            &controller,
            ask("create", "uwsgi.it", "customers", None, None),
            false,
        ),
        (
            &controller,
            ask("delete", "uwsgi.it", "customers", None, None),
            false,
        ),
        (
            &controller,
            ask("delete", "", "namespaces", None, None),
            false,
        ),
        (
            &controller,
            ask("get", "", "secrets", customer, None),
            false,
        ),
        (
            &controller,
            ask("update", "", "configmaps", release, Some("rel-config")),
            false,
        ),
        (
            &controller,
            ask(
                "update",
                "coordination.k8s.io",
                "leases",
                release,
                Some("x"),
            ),
            false,
        ),
        (
            &controller,
            ask("update", "coordination.k8s.io", "leases", customer, lease),
            false,
        ),
        (
            &controller,
            ask(
                "bind",
                "rbac.authorization.k8s.io",
                "clusterroles",
                None,
                Some("cluster-admin"),
            ),
            false,
        ),
        (&controller, ask("patch", "", "nodes", None, None), false),
        // Per-customer readers (the admission policy keeps them to reads of named objects).
        (
            &controller,
            ask(
                "create",
                "rbac.authorization.k8s.io",
                "clusterrolebindings",
                None,
                None,
            ),
            true,
        ),
        (
            &controller,
            ask(
                "escalate",
                "rbac.authorization.k8s.io",
                "clusterroles",
                None,
                None,
            ),
            false,
        ),
        // Watched, to hold back what another customer could still read.
        (
            &controller,
            ask(
                "watch",
                "rbac.authorization.k8s.io",
                "clusterroles",
                None,
                None,
            ),
            true,
        ),
        (
            &controller,
            ask(
                "list",
                "rbac.authorization.k8s.io",
                "clusterrolebindings",
                None,
                None,
            ),
            false,
        ),
        // The ledger is replaced under a precondition, never patched; the spec is the supplier's.
        (
            &controller,
            ask("update", "uwsgi.it", "servers/status", None, None),
            true,
        ),
        (
            &controller,
            ask("patch", "uwsgi.it", "servers/status", None, None),
            false,
        ),
        (
            &controller,
            ask("update", "uwsgi.it", "servers", None, None),
            false,
        ),
        // The agent: reads its objects, reports status and Events...
        (
            &agent,
            ask("watch", "uwsgi.it", "portmappings", None, None),
            true,
        ),
        (
            &agent,
            ask("patch", "uwsgi.it", "containers/status", customer, None),
            true,
        ),
        (
            &agent,
            ask("patch", "uwsgi.it", "portmappings/status", customer, None),
            true,
        ),
        (
            &agent,
            ask("patch", "uwsgi.it", "customdistros/status", customer, None),
            true,
        ),
        (&agent, ask("get", "", "nodes", None, None), true),
        (
            &agent,
            ask("watch", "uwsgi.it", "servers", None, None),
            true,
        ),
        (
            &agent,
            ask("update", "uwsgi.it", "servers/status", None, None),
            false,
        ),
        (
            &agent,
            ask("create", "events.k8s.io", "events", customer, None),
            true,
        ),
        // ... and nothing more.
        (
            &agent,
            ask("update", "uwsgi.it", "containers", customer, None),
            false,
        ),
        (
            &agent,
            ask("patch", "uwsgi.it", "containers", customer, None),
            false,
        ),
        (
            &agent,
            ask("get", "uwsgi.it", "customers", None, None),
            false,
        ),
        (&agent, ask("create", "", "pods", customer, None), false),
        (&agent, ask("patch", "", "nodes", None, None), false),
        (&agent, ask("get", "", "secrets", customer, None), false),
    ];

    // The release's bindings must reach the authorizer before the real questions are asked.
    for (who, first) in [
        (
            &controller,
            ask("watch", "uwsgi.it", "containers", None, None),
        ),
        (&agent, ask("get", "", "nodes", None, None)),
    ] {
        eventually("the release's bindings take effect", RBAC_SETTLE, || {
            let admin = admin.clone();
            async move {
                if allowed(&admin, who, &groups, first).await {
                    Ok(())
                } else {
                    Err(format!("{who} is not yet allowed {first:?}"))
                }
            }
        })
        .await;
    }

    let mut failures = Vec::new();
    for (who, question, want) in cases {
        let got = allowed(&admin, who, &groups, question).await;
        if got != want {
            failures.push(format!("{who} {question:?}: allowed={got}, want {want}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Labels `namespace` as a customer's, as the controller does when it makes one.
async fn label_customer_namespace(admin: &Client, namespace: &str) {
    Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone())
        .patch(
            namespace,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"uwsgi.it/customer": namespace}}})),
        )
        .await
        .unwrap();
}

/// The API server's refusal of a request, with its message; panics if it was allowed.
fn denied<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 || status.code == 422 => status.message,
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

/// The chart's ValidatingAdmissionPolicies, with real tokens: an agent token bound to a Pod on
/// node A can write only A's objects and only its own part of their status; the controller's
/// token can put Pods, claims and RoleBindings only in customer namespaces and PersistentVolumes
/// only under homeRoot. RBAC allows every one of the refused requests.
#[tokio::test]
async fn admission_policies_bind_the_agent_to_its_node_and_the_controller_to_customer_namespaces() {
    let installed = install().await;
    let plane = installed.plane;
    let admin = plane.client().await.unwrap();
    let customer_ns = plane.namespace("vap-customer").await.unwrap();
    label_customer_namespace(&admin, &customer_ns).await;
    let other_ns = plane.namespace("vap-other").await.unwrap();
    let suffix = std::process::id();
    let (node_a, node_b) = (format!("vap-a-{suffix}"), format!("vap-b-{suffix}"));
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin.clone());
    for node in [&node_a, &node_b] {
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": node}})).unwrap(),
            )
            .await
            .unwrap();
    }

    // The agent's Pod on node A (no kubelet runs it: its token is what matters).
    let agent_pod = format!("agent-on-a-{suffix}");
    Api::<Pod>::namespaced(admin.clone(), NAMESPACE)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": agent_pod},
                "spec": {"nodeName": node_a, "serviceAccountName": "rel-agent",
                         "containers": [{"name": "agent", "image": "agent"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let agent_a = Client::try_from(
        plane
            .pod_bound_config(NAMESPACE, "rel-agent", &agent_pod)
            .await
            .unwrap(),
    )
    .unwrap();
    let unbound_agent = plane
        .service_account_client(NAMESPACE, "rel-agent")
        .await
        .unwrap();

    // Two admitted containers, one per node, as the controller leaves them.
    let admin_containers: Api<Container> = Api::namespaced(admin.clone(), &customer_ns);
    for (name, node, uid) in [("on-a", &node_a, 40001), ("on-b", &node_b, 40002)] {
        let mut c = container(name);
        c.spec.server = node.clone();
        admin_containers
            .create(&PostParams::default(), &c)
            .await
            .unwrap();
        admin_containers
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"uid": uid, "server": node, "conditions": [
                    {"type": "Admitted", "status": "True", "reason": "Admitted", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}
                ]}})),
            )
            .await
            .unwrap();
    }
    let home_ready = |status: &str| {
        json!({"apiVersion": "uwsgi.it/v1alpha1", "kind": "Container", "status": {"conditions": [
            {"type": "HomeReady", "status": status, "reason": "HomeReady", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}
        ]}})
    };
    let apply = PatchParams::apply("uwsgi-it-agent");
    let as_agent: Api<Container> = Api::namespaced(agent_a.clone(), &customer_ns);
    // Its own node's object, its own condition: allowed (RBAC settles first).
    eventually(
        "the agent writes HomeReady on its node",
        RBAC_SETTLE,
        || {
            let as_agent = as_agent.clone();
            let body = home_ready("True");
            let apply = apply.clone();
            async move {
                as_agent
                    .patch_status("on-a", &apply, &Patch::Apply(body))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
    // The API server loads a new policy a moment after it is stored: wait (with dry runs, which
    // change nothing) until it refuses.
    eventually("the agent policy is in force", RBAC_SETTLE, || {
        let as_agent = as_agent.clone();
        let body = home_ready("False");
        async move {
            let mut params = PatchParams::apply("uwsgi-it-agent");
            params.dry_run = true;
            match as_agent
                .patch_status("on-b", &params, &Patch::Apply(body))
                .await
            {
                Err(kube::Error::Api(status)) if status.code == 403 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let message = denied(
        "node A's agent writing node B's container",
        as_agent
            .patch_status("on-b", &apply, &Patch::Apply(home_ready("False")))
            .await,
    );
    assert!(
        message.contains("may only write the status of objects on its own node"),
        "{message}"
    );
    // A uid, once set, is refused by the CRD's own rule; the policy keeps every other field of
    // the controller's too (here the home path, which would send the agent to another home).
    denied(
        "node A's agent giving its container node B's uid",
        as_agent
            .patch_status(
                "on-a",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"uid": 40002}})),
            )
            .await,
    );
    let message = denied(
        "node A's agent pointing its container at another home",
        as_agent
            .patch_status(
                "on-a",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"home": "/containers/40002"}})),
            )
            .await,
    );
    assert!(
        message.contains("status.home is the controller's"),
        "{message}"
    );
    let message = denied(
        "node A's agent moving its container to node B",
        as_agent
            .patch_status(
                "on-a",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"server": node_b}})),
            )
            .await,
    );
    assert!(message.contains("another node"), "{message}");
    let message = denied(
        "node A's agent writing the controller's condition",
        as_agent
            .patch_status(
                "on-a",
                &PatchParams::apply("forged").force(),
                &Patch::Apply(json!({"apiVersion": "uwsgi.it/v1alpha1", "kind": "Container", "status": {"conditions": [
                    {"type": "Admitted", "status": "False", "reason": "Forged", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}
                ]}})),
            )
            .await,
    );
    assert!(
        message.contains("only write its own conditions"),
        "{message}"
    );
    let message = denied(
        "the agent's ServiceAccount with a token not bound to its Pod",
        Api::<Container>::namespaced(unbound_agent, &customer_ns)
            .patch_status("on-a", &apply, &Patch::Apply(home_ready("False")))
            .await,
    );
    assert!(message.contains("carries no node name"), "{message}");
    let on_b = admin_containers.get("on-b").await.unwrap();
    assert!(
        uwsgi_it_api::condition::find(
            uwsgi_it_api::condition::HasConditions::conditions(&on_b),
            "HomeReady"
        )
        .is_none(),
        "node B's container is untouched"
    );

    // The controller, with its real token.
    let controller = plane
        .service_account_client(NAMESPACE, "rel-controller")
        .await
        .unwrap();
    let pod = |name: &str, host_path: bool| -> Pod {
        let mut value = json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "i"}]}
        });
        if host_path {
            value["spec"]["volumes"] = json!([{"name": "root", "hostPath": {"path": "/"}}]);
        }
        serde_json::from_value(value).unwrap()
    };
    let in_customer: Api<Pod> = Api::namespaced(controller.clone(), &customer_ns);
    eventually(
        "the controller creates a Pod in a customer namespace",
        RBAC_SETTLE,
        || {
            let in_customer = in_customer.clone();
            let pod = pod("workload", false);
            async move {
                in_customer
                    .create(&PostParams::default(), &pod)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
    eventually("the controller policy is in force", RBAC_SETTLE, || {
        let pods = Api::<Pod>::namespaced(controller.clone(), &other_ns);
        let pod = pod("probe", false);
        async move {
            let params = PostParams {
                dry_run: true,
                ..PostParams::default()
            };
            match pods.create(&params, &pod).await {
                Err(kube::Error::Api(status)) if status.code == 403 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let message = denied(
        "the controller's Pod in a namespace that is no customer's",
        Api::<Pod>::namespaced(controller.clone(), &other_ns)
            .create(&PostParams::default(), &pod("escape", false))
            .await,
    );
    assert!(message.contains("only in customer namespaces"), "{message}");
    let message = denied(
        "the controller's Pod with the host's root mounted",
        in_customer
            .create(&PostParams::default(), &pod("host", true))
            .await,
    );
    assert!(message.contains("no hostPath volume"), "{message}");

    let volume =
        |name: &str, path: &str, class: &str| -> k8s_openapi::api::core::v1::PersistentVolume {
            serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "1Mi"}, "accessModes": ["ReadWriteOnce"],
                "storageClassName": class, "local": {"path": path},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [node_a.clone()]}
                ]}]}}
            }
        }))
        .unwrap()
        };
    let volumes: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(controller.clone());
    let home = format!("vap-home-{suffix}");
    volumes
        .create(
            &PostParams::default(),
            &volume(&home, "/containers/40001", "uwsgi-it-local"),
        )
        .await
        .expect("a home volume under homeRoot");
    // `..` is refused by the API server's own validation; the policy refuses the rest.
    for (path, class, by_policy) in [
        ("/etc", "uwsgi-it-local", true),
        ("/containers", "uwsgi-it-local", true),
        ("/containers/../etc", "uwsgi-it-local", false),
        ("/containersx/1", "uwsgi-it-local", true),
        ("/containers/40001", "fast-ssd", true),
    ] {
        let message = denied(
            &format!("the controller's volume at {path} ({class})"),
            volumes
                .create(
                    &PostParams::default(),
                    &volume(&format!("vap-bad-{suffix}"), path, class),
                )
                .await,
        );
        if by_policy {
            assert!(
                message.contains("strictly under homeRoot /containers"),
                "{path}: {message}"
            );
        }
    }
    let message = denied(
        "the controller binding the customer role outside a customer namespace",
        Api::<RoleBinding>::namespaced(controller.clone(), &other_ns)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "uwsgi-it-customer"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "uwsgi-it-customer"},
                    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "mallory"}]
                }))
                .unwrap(),
            )
            .await,
    );
    assert!(message.contains("only in customer namespaces"), "{message}");
    let message = denied(
        "the controller turning another namespace into a customer's",
        Api::<k8s_openapi::api::core::v1::Namespace>::all(controller.clone())
            .patch(
                &other_ns,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"uwsgi.it/customer": "mallory"}}})),
            )
            .await,
    );
    assert!(message.contains("changes no other namespace"), "{message}");

    // Per-customer readers: its own kind of ClusterRole and binding, nothing broader.
    let roles: Api<ClusterRole> = Api::all(controller.clone());
    let reader = format!("uwsgi-it-customer-vap-{suffix}");
    let role = |name: &str, rules: serde_json::Value| -> ClusterRole {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {"uwsgi.it/customer": "x"}}, "rules": rules})).unwrap()
    };
    let reads = json!([
        {"apiGroups": ["uwsgi.it"], "resources": ["customers"], "verbs": ["get", "watch"], "resourceNames": [format!("vap-{suffix}")]},
        {"apiGroups": ["uwsgi.it"], "resources": ["servers"], "verbs": ["get", "watch"], "resourceNames": ["s1"]},
    ]);
    roles
        .create(&PostParams::default(), &role(&reader, reads.clone()))
        .await
        .expect("the controller writes a customer's reader ClusterRole");
    let mut aggregated = role(
        &format!("uwsgi-it-customer-agg-{suffix}"),
        json!([{"apiGroups": ["uwsgi.it"], "resources": ["customers"], "verbs": ["get"], "resourceNames": [format!("agg-{suffix}")]}]),
    );
    aggregated.metadata.labels.get_or_insert_default().insert(
        "rbac.authorization.k8s.io/aggregate-to-view".into(),
        "true".into(),
    );
    let message = denied(
        "the controller writing a reader ClusterRole that aggregates into view",
        roles.create(&PostParams::default(), &aggregated).await,
    );
    assert!(message.contains("aggregate-to-*"), "{message}");
    for (what, name, rules) in [
        ("another name", format!("admin-{suffix}"), reads.clone()),
        (
            "another Customer",
            format!("uwsgi-it-customer-other-{suffix}"),
            json!([{"apiGroups": ["uwsgi.it"], "resources": ["customers"], "verbs": ["get"], "resourceNames": [format!("vap-{suffix}")]}]),
        ),
        (
            "every Customer",
            format!("uwsgi-it-customer-all-{suffix}"),
            json!([{"apiGroups": ["uwsgi.it"], "resources": ["customers"], "verbs": ["get"]}]),
        ),
        (
            "a write",
            format!("uwsgi-it-customer-w-{suffix}"),
            // One the controller holds itself (so RBAC's escalation check would let it through).
            json!([{"apiGroups": ["uwsgi.it"], "resources": ["customers"], "verbs": ["patch"], "resourceNames": ["acme"]}]),
        ),
        (
            "another resource",
            format!("uwsgi-it-customer-p-{suffix}"),
            json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"], "resourceNames": ["p"]}]),
        ),
    ] {
        let message = denied(
            &format!("the controller writing a ClusterRole with {what}"),
            roles
                .create(&PostParams::default(), &role(&name, rules))
                .await,
        );
        assert!(
            message.contains("uwsgi-it-customer-<customer>"),
            "{what}: {message}"
        );
    }
    let bindings: Api<ClusterRoleBinding> = Api::all(controller.clone());
    let binding = |name: &str, role: &str| -> ClusterRoleBinding {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "mallory"}]
        }))
        .unwrap()
    };
    bindings
        .create(&PostParams::default(), &binding(&reader, &reader))
        .await
        .expect("the controller binds a customer's reader ClusterRole");
    let message = denied(
        "the controller binding its reader name to another ClusterRole",
        bindings
            .create(
                &PostParams::default(),
                &binding(&format!("uwsgi-it-customer-x-{suffix}"), &reader),
            )
            .await,
    );
    assert!(
        message.contains("bind only the ClusterRole of their own name"),
        "{message}"
    );
    for (what, subject) in [
        (
            "every authenticated user",
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}),
        ),
        (
            "anonymous requests",
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:anonymous"}),
        ),
        (
            "a ServiceAccount",
            json!({"kind": "ServiceAccount", "name": "default", "namespace": "kube-system"}),
        ),
    ] {
        let message = denied(
            &format!("the controller binding a reader to {what}"),
            bindings
                .patch(
                    &reader,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"subjects": [subject]})),
                )
                .await,
        );
        assert!(
            message.contains("binds only a Customer's users and groups"),
            "{what}: {message}"
        );
    }
    let _ = bindings.delete(&reader, &DeleteParams::default()).await;
    let _ = roles.delete(&reader, &DeleteParams::default()).await;

    // Cleanup of the cluster-scoped objects (namespaced ones go with their namespaces).
    let _ = volumes.delete(&home, &DeleteParams::default()).await;
    for node in [&node_a, &node_b] {
        let _ = nodes.delete(node, &DeleteParams::default()).await;
    }
}

/// The pre-upgrade hook that keeps the CRDs current: it carries this chart's crds/ exactly, runs
/// the operator image's `crds --apply` on them, has rights on the operator's CRDs only (and the
/// create a new CRD needs), and exists only while it runs.
#[test]
fn the_upgrade_hook_applies_this_charts_crds() {
    let manifests = Manifests::render(&[]);
    let name = "rel-crd-upgrade";
    let configmap = manifests.get("ConfigMap", name);
    let mut shipped = BTreeSet::new();
    for entry in std::fs::read_dir(chart_dir().join("crds")).unwrap() {
        let entry = entry.unwrap();
        let file = entry.file_name().into_string().unwrap();
        assert_eq!(
            configmap["data"][&file].as_str(),
            Some(std::fs::read_to_string(entry.path()).unwrap().as_str()),
            "{file} is carried as it is"
        );
        shipped.insert(file);
    }
    assert_eq!(shipped.len(), 5);
    let job = manifests.get("Job", name);
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], name);
    assert_eq!(
        strings(&pod["containers"][0]["args"]),
        ["crds", "--apply=/crds", "--timeout-seconds=120"]
    );
    assert_eq!(
        pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"],
        true
    );
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Job",
    ] {
        let object = manifests.get(kind, name);
        let annotations = &object["metadata"]["annotations"];
        assert_eq!(annotations["helm.sh/hook"], "pre-upgrade", "{kind}");
        assert_eq!(
            annotations["helm.sh/hook-delete-policy"], "before-hook-creation,hook-succeeded",
            "{kind}"
        );
    }
    let role = manifests.get("ClusterRole", name);
    let mut names = rule_names(
        role,
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        "update",
    )
    .expect("update by name");
    names.sort();
    assert_eq!(
        names,
        [
            "containers.uwsgi.it",
            "customdistros.uwsgi.it",
            "customers.uwsgi.it",
            "portmappings.uwsgi.it",
            "servers.uwsgi.it"
        ]
    );
    assert!(
        Manifests::render(&["--set", "crdUpgrade.enabled=false"])
            .find("Job", name)
            .is_none(),
        "crdUpgrade.enabled=false renders no hook"
    );
}
