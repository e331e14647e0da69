//! The release as a supplier takes it: the chart was installed from the loopback registry
//! (`oci://127.0.0.1:5000/charts/uwsgi-it-operator`, pushed by `hack/release.sh` during
//! `hack/cluster.sh up`), its Pods run the images pushed with it, pulled by digest (nothing was
//! imported into the nodes); and a `helm upgrade` to a release whose CRD has a new field
//! applies that CRD with no manual step.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use uwsgi_it_testbed::real_cluster::RealCluster;

use super::{SYSTEM, repo, step};

/// Every Pod of the release runs the image the release pushed, by digest, as pulled.
pub async fn pods_run_the_released_images(cluster: &RealCluster, client: &kube::Client) {
    step("the release's Pods run the images it pushed, pulled by digest from the registry");
    let operator = cluster.env("OPERATOR_IMAGE");
    let (_, digest) = operator
        .split_once('@')
        .expect("the release reports the operator image by digest");
    assert!(
        operator.starts_with(&format!("{}/", cluster.env("REGISTRY"))),
        "{operator}"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM);
    let listed = pods.list(&ListParams::default()).await.unwrap();
    let mut checked = 0;
    for pod in &listed.items {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.as_ref().unwrap();
        for container in &spec.containers {
            assert_eq!(
                container.image.as_deref(),
                Some(operator),
                "{name}/{}: the chart's default image is the release's, by digest",
                container.name
            );
        }
        for status in pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
        {
            assert!(
                status.image_id.ends_with(digest),
                "{name}/{}: runs {} (wanted {digest})",
                status.name,
                status.image_id
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "2 controllers and 2 agents, got {checked}");
    // The images came through the registry: the mirror served them to the nodes.
    let distro = cluster.env("DISTRO_IMAGE");
    assert!(distro.contains("@sha256:"), "{distro}");
}

/// `helm upgrade` to a release of the chart whose Server CRD has one more field: the hook
/// writes it before the release's objects change, and the API server keeps the field.
pub async fn an_upgrade_applies_its_crds(cluster: &RealCluster) {
    step("helm upgrade to a release with a changed CRD: the CRD is current, no manual step");
    let work = tempfile::tempdir().unwrap();
    let chart = work.path().join("uwsgi-it-operator");
    copy_dir(&repo("charts/uwsgi-it-operator"), &chart);
    let crd_file = chart.join("crds/servers.uwsgi.it.yaml");
    let mut crd: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(&crd_file).unwrap()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["rack"] = serde_json::json!({"type": "string", "description": "Where the server stands (new in this release)."});
    // JSON is YAML.
    std::fs::write(&crd_file, serde_json::to_string_pretty(&crd).unwrap()).unwrap();
    let released = cluster
        .release(&chart, "0.1.1-crd")
        .expect("hack/release.sh of the changed chart");
    assert!(
        released["CHART_DIGEST"].starts_with("sha256:"),
        "{released:?}"
    );

    cluster
        .upgrade_chart("uwsgi-it", SYSTEM, "0.1.1-crd", &[])
        .expect("helm upgrade");
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client().await.unwrap());
    let live = crds.get("servers.uwsgi.it").await.unwrap();
    let schema = serde_json::to_value(&live.spec.versions[0].schema).unwrap();
    assert_eq!(
        schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["rack"]["type"], "string",
        "the upgraded CRD has the new field"
    );
    // The field is kept (not pruned) on a real object.
    cluster
        .kubectl_run(&[
            "patch",
            "server",
            "server-2",
            "--type=merge",
            "-p",
            r#"{"spec":{"rack":"r1"}}"#,
        ])
        .expect("kubectl patch of the new field");
    let rack = cluster
        .kubectl_run(&["get", "server", "server-2", "-o", "jsonpath={.spec.rack}"])
        .unwrap();
    assert_eq!(rack.trim(), "r1");
    let hook = cluster
        .kubectl_run(&["get", "jobs", "-n", SYSTEM, "-o", "name"])
        .unwrap();
    assert!(
        !hook.contains("crd-upgrade"),
        "the hook's Job and rights are gone once it succeeded: {hook}"
    );
    let tested = cluster
        .test_chart("uwsgi-it", SYSTEM)
        .expect("helm test after the upgrade");
    assert!(tested.contains("ok: every CRD established"), "{tested}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
