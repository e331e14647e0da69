//! The shipped Argo CD health check against its fixtures, the way Argo CD's own
//! `resource_customizations` tests run theirs: each entry of `health/argocd/health_test.yaml`
//! names a manifest and the exact status and message the check must return. Lua 5.1, as in
//! Argo CD (gopher-lua), without the libraries argocd-cm scripts do not get.
//!
//! The same check is run on live objects in the end-to-end tests (`crates/agent/tests`).

use std::path::Path;

use serde::Deserialize;
use uwsgi_it_testbed::health::{argo_health, argo_health_script, flux_health, kstatus};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Fixtures {
    tests: Vec<Fixture>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Fixture {
    health_status: Expected,
    input_path: String,
}

#[derive(Deserialize)]
struct Expected {
    status: String,
    message: String,
}

#[test]
fn the_argo_cd_health_check_passes_its_fixtures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("health/argocd");
    let fixtures: Fixtures =
        serde_saphyr::from_str(&std::fs::read_to_string(dir.join("health_test.yaml")).unwrap())
            .expect("health_test.yaml");
    assert!(
        fixtures.tests.len() >= 9,
        "every kind and outcome has a fixture"
    );
    let mut failures = Vec::new();
    for fixture in &fixtures.tests {
        let manifest = std::fs::read_to_string(dir.join(&fixture.input_path))
            .unwrap_or_else(|e| panic!("{}: {e}", fixture.input_path));
        let object: serde_json::Value = serde_saphyr::from_str(&manifest)
            .unwrap_or_else(|e| panic!("{}: {e}", fixture.input_path));
        let health =
            argo_health(&object).unwrap_or_else(|e| panic!("{}: {e:#}", fixture.input_path));
        if health.status != fixture.health_status.status
            || health.message != fixture.health_status.message
        {
            failures.push(format!(
                "{}: expected {} {:?}, got {} {:?}",
                fixture.input_path,
                fixture.health_status.status,
                fixture.health_status.message,
                health.status,
                health.message
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_fixture_manifest_is_listed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("health/argocd");
    let listed = std::fs::read_to_string(dir.join("health_test.yaml")).unwrap();
    for entry in std::fs::read_dir(dir.join("testdata")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            listed.contains(&format!("testdata/{name}")),
            "testdata/{name} is not in health_test.yaml"
        );
    }
    assert!(argo_health_script().is_file());
}

#[test]
fn the_argocd_cm_snippet_holds_the_check_for_every_kind() {
    #[derive(Deserialize)]
    struct ConfigMapPatch {
        data: std::collections::BTreeMap<String, String>,
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("health/argocd");
    let script = std::fs::read_to_string(argo_health_script()).unwrap();
    let patch: ConfigMapPatch =
        serde_saphyr::from_str(&std::fs::read_to_string(dir.join("argocd-cm.yaml")).unwrap())
            .expect("argocd-cm.yaml");
    let kinds: Vec<String> = uwsgi_it_api::crds()
        .iter()
        .map(|crd| {
            format!(
                "resource.customizations.health.uwsgi.it_{}",
                crd.spec.names.kind
            )
        })
        .collect();
    assert_eq!(patch.data.keys().cloned().collect::<Vec<_>>(), {
        let mut sorted = kinds.clone();
        sorted.sort();
        sorted
    });
    for (key, value) in &patch.data {
        assert_eq!(value, &script, "{key} differs from health.lua");
    }
}

/// The same fixtures through Flux's own evaluator with the shipped `healthCheckExprs`, and
/// through kstatus: all three tools read each object alike (Healthy = Current, Degraded =
/// Failed, Progressing = InProgress).
#[test]
fn flux_and_kstatus_read_the_fixtures_as_argo_cd_does() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("health/argocd");
    let fixtures: Fixtures =
        serde_saphyr::from_str(&std::fs::read_to_string(dir.join("health_test.yaml")).unwrap())
            .expect("health_test.yaml");
    let objects: Vec<serde_json::Value> = fixtures
        .tests
        .iter()
        .map(|f| {
            serde_saphyr::from_str(&std::fs::read_to_string(dir.join(&f.input_path)).unwrap())
                .unwrap()
        })
        .collect();
    let flux = flux_health(&objects).expect("Flux's evaluator");
    let kstatus = kstatus(&objects).expect("kstatus");
    let mut failures = Vec::new();
    for (i, fixture) in fixtures.tests.iter().enumerate() {
        let wanted = match fixture.health_status.status.as_str() {
            "Healthy" => "Current",
            "Degraded" => "Failed",
            "Progressing" => "InProgress",
            other => panic!("{}: unexpected Argo CD status {other}", fixture.input_path),
        };
        // Flux's expressions cannot be evaluated on an object without status (no such
        // attribute): its status reader says Unknown and polls again, which is progress too.
        // kstatus reads an object with no status at all (not seen by the operator yet) as
        // Current: it has nothing to look at. No status can be written before the controller
        // sees the object, so that moment is kstatus' limit, not a state the operator reports.
        let unreported = objects[i].get("status").is_none();
        let flux_ok =
            flux[i] == wanted || (wanted == "InProgress" && flux[i] == "Unknown" && unreported);
        let kstatus_ok = kstatus[i].status == wanted
            || (wanted == "InProgress" && kstatus[i].status == "Current" && unreported);
        if !flux_ok || !kstatus_ok {
            failures.push(format!(
                "{}: Argo CD {}, Flux {}, kstatus {} (wanted {wanted})",
                fixture.input_path, fixture.health_status.status, flux[i], kstatus[i].status
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
