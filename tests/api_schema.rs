//! The CRDs on a real kube-apiserver: they install, the examples are accepted, every static rule
//! refuses bad input at `kubectl apply` time with its own message, immutable fields stay put,
//! and `kubectl explain` teaches the fields.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use uwsgi_it_api::{Container, ContainerSpec, Customer, CustomerSpec};
use uwsgi_it_testbed::control_plane::ControlPlane;

async fn plane_with_crds() -> &'static ControlPlane {
    let plane = tokio::task::spawn_blocking(ControlPlane::shared)
        .await
        .expect("control plane starts");
    plane
        .install_crds(&uwsgi_it_api::crds())
        .await
        .expect("CRDs install and become Established");
    plane
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn kubectl(plane: &ControlPlane, args: &[&str]) -> Output {
    plane.kubectl().args(args).output().expect("kubectl runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn the_five_crds_are_established() {
    let plane = plane_with_crds().await;
    let crds: Api<CustomResourceDefinition> = Api::all(plane.client().await.unwrap());
    for name in [
        "servers.uwsgi.it",
        "customers.uwsgi.it",
        "containers.uwsgi.it",
        "portmappings.uwsgi.it",
        "customdistros.uwsgi.it",
    ] {
        let crd = crds.get(name).await.unwrap();
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is not Established");
    }
    let all = kubectl(plane, &["get", "uwsgi", "--all-namespaces"]);
    assert!(
        all.status.success(),
        "`kubectl get uwsgi` (the category) fails: {}",
        text(&all.stderr)
    );
}

#[tokio::test]
async fn every_example_is_accepted() {
    let plane = plane_with_crds().await;
    // The examples live in the example customer's namespace, which the controller would create.
    let namespaces: Api<Namespace> = Api::all(plane.client().await.unwrap());
    let acme: Namespace = serde_json::from_value(json!({"metadata": {"name": "acme"}})).unwrap();
    namespaces
        .create(&PostParams::default(), &acme)
        .await
        .expect("namespace acme");

    let mut examples: Vec<_> = std::fs::read_dir(repo_path("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 6, "examples/ lost its quickstarts");
    for example in examples {
        let out = kubectl(
            plane,
            &["apply", "-f", example.to_str().unwrap(), "--server-side"],
        );
        assert!(
            out.status.success(),
            "{} is refused: {}",
            example.display(),
            text(&out.stderr)
        );
    }
}

#[tokio::test]
async fn every_schema_rule_refuses_its_bad_manifest_with_its_message() {
    let plane = plane_with_crds().await;
    let namespace = plane.namespace("schema-rules").await.unwrap();
    let mut cases: Vec<_> = std::fs::read_dir(repo_path("tests/invalid"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert!(cases.len() >= 16, "a schema rule lost its bad manifest");
    let mut failures = Vec::new();
    for case in cases {
        let manifest = std::fs::read_to_string(&case).unwrap();
        let expected = manifest
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", case.display()));
        let out = kubectl(
            plane,
            &["apply", "-n", &namespace, "-f", case.to_str().unwrap()],
        );
        let stderr = text(&out.stderr);
        if out.status.success() {
            failures.push(format!("{} was accepted", case.display()));
        } else if !stderr.contains(expected) {
            failures.push(format!(
                "{} was refused without `{expected}`: {stderr}",
                case.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn container(name: &str, server: &str) -> Container {
    Container::new(
        name,
        serde_json::from_value::<ContainerSpec>(json!({
            "server": server, "memory": 100, "storage": 100
        }))
        .unwrap(),
    )
}

#[tokio::test]
async fn container_server_is_immutable() {
    let plane = plane_with_crds().await;
    let namespace = plane.namespace("immutable-server").await.unwrap();
    let containers: Api<Container> = Api::namespaced(plane.client().await.unwrap(), &namespace);
    containers
        .create(&PostParams::default(), &container("web", "server-1"))
        .await
        .unwrap();

    let moved = json!({"spec": {"server": "server-2"}});
    let err = containers
        .patch("web", &PatchParams::default(), &Patch::Merge(&moved))
        .await
        .expect_err("moving a container to another server must be refused");
    assert!(err.to_string().contains("server is immutable"), "{err}");

    let resized = json!({"spec": {"memory": 200}});
    containers
        .patch("web", &PatchParams::default(), &Patch::Merge(&resized))
        .await
        .expect("other fields stay editable");
}

/// A status write as a controller or a compromised writer would send it.
async fn write_status<K>(api: &Api<K>, name: &str, status: serde_json::Value) -> kube::Result<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let body = json!({
        "apiVersion": "uwsgi.it/v1alpha1",
        "kind": K::kind(&()),
        "metadata": {"name": name},
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply("writer").force(),
        &Patch::Apply(&body),
    )
    .await
}

#[tokio::test]
async fn a_container_uid_never_changes_and_its_server_stays_while_reserved() {
    let plane = plane_with_crds().await;
    let namespace = plane.namespace("immutable-status").await.unwrap();
    let containers: Api<Container> = Api::namespaced(plane.client().await.unwrap(), &namespace);
    containers
        .create(&PostParams::default(), &container("web", "server-1"))
        .await
        .unwrap();
    write_status(&containers, "web", json!({"uid": 30010}))
        .await
        .expect("a first uid is accepted");
    let err = write_status(&containers, "web", json!({"uid": 30011}))
        .await
        .expect_err("a second uid must be refused");
    assert!(
        err.to_string()
            .contains("status.uid never changes once set"),
        "{err}"
    );

    write_status(
        &containers,
        "web",
        json!({"uid": 30010, "server": "server-1", "reserved": {"memory": 100, "storage": 100}}),
    )
    .await
    .expect("a reservation is accepted");
    let err = write_status(
        &containers,
        "web",
        json!({"uid": 30010, "server": "server-2", "reserved": {"memory": 100, "storage": 100}}),
    )
    .await
    .expect_err("moving a reserved container must be refused");
    assert!(
        err.to_string()
            .contains("status.server never changes while the container holds a reservation"),
        "{err}"
    );
}

#[tokio::test]
async fn a_server_highest_uid_never_goes_down() {
    let plane = plane_with_crds().await;
    let servers: Api<uwsgi_it_api::Server> = Api::all(plane.client().await.unwrap());
    let server: uwsgi_it_api::Server = serde_json::from_value(json!({
        "apiVersion": "uwsgi.it/v1alpha1", "kind": "Server",
        "metadata": {"name": "highest-uid"},
        "spec": {"memory": 1000, "storage": 1000},
    }))
    .unwrap();
    servers
        .create(&PostParams::default(), &server)
        .await
        .unwrap();
    write_status(&servers, "highest-uid", json!({"highestUid": 30020}))
        .await
        .unwrap();
    write_status(&servers, "highest-uid", json!({"highestUid": 30021}))
        .await
        .expect("it may grow");
    let err = write_status(&servers, "highest-uid", json!({"highestUid": 30001}))
        .await
        .expect_err("lowering it must be refused");
    assert!(
        err.to_string()
            .contains("status.highestUid never goes down"),
        "{err}"
    );
}

#[tokio::test]
async fn customer_namespace_is_immutable_once_set_or_defaulted() {
    let plane = plane_with_crds().await;
    let customers: Api<Customer> = Api::all(plane.client().await.unwrap());
    let explicit = Customer::new(
        "immutable-explicit",
        CustomerSpec {
            namespace: Some("immutable-explicit-ns".into()),
            ..CustomerSpec::default()
        },
    );
    customers
        .create(&PostParams::default(), &explicit)
        .await
        .unwrap();
    let renamed = json!({"spec": {"namespace": "elsewhere"}});
    let err = customers
        .patch(
            "immutable-explicit",
            &PatchParams::default(),
            &Patch::Merge(&renamed),
        )
        .await
        .expect_err("changing the namespace must be refused");
    assert!(err.to_string().contains("namespace is immutable"), "{err}");

    // Without spec.namespace the namespace is the Customer's name; setting it later would
    // move the customer's objects, so it is refused too.
    let defaulted = Customer::new("immutable-defaulted", CustomerSpec::default());
    customers
        .create(&PostParams::default(), &defaulted)
        .await
        .unwrap();
    let err = customers
        .patch(
            "immutable-defaulted",
            &PatchParams::default(),
            &Patch::Merge(&renamed),
        )
        .await
        .expect_err("setting the namespace later must be refused");
    assert!(err.to_string().contains("namespace is immutable"), "{err}");
}

#[tokio::test]
async fn kubectl_explain_teaches_the_container_fields() {
    let plane = plane_with_crds().await;
    // The API server publishes a new CRD's OpenAPI a moment after it is Established.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let explained = loop {
        let out = kubectl(plane, &["explain", "container.spec"]);
        if out.status.success() {
            break text(&out.stdout);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "kubectl explain keeps failing: {}",
            text(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for needle in [
        "server",
        "The server this container lives on",
        "memory",
        "Memory reserved on the server, in MB",
        "storage",
        "customDistrosStorage",
        "quotaThreshold",
        "sshKeys",
    ] {
        assert!(
            explained.contains(needle),
            "`kubectl explain container.spec` lacks {needle:?}:\n{explained}"
        );
    }
}
