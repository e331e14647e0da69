//! The API types without a server: defaults, and every example survives a serde round trip
//! into the typed resources and back.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uwsgi_it_api::{
    Container, ContainerSpec, CustomDistro, Customer, PortMapping, PortMappingSpec, Protocol,
};

fn example_documents() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut documents = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let values: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{} is not YAML: {e}", file.display()));
        for value in values {
            documents.push((file.display().to_string(), value));
        }
    }
    documents
}

/// Typed → JSON must keep every field the example wrote: nothing is dropped or renamed.
fn assert_round_trip<T: DeserializeOwned + Serialize>(origin: &str, value: &Value) {
    let typed: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{origin}: does not parse as its type: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_subset(origin, value, &back);
    let again: T = serde_json::from_value(back.clone()).unwrap();
    assert_eq!(serde_json::to_value(again).unwrap(), back, "{origin}");
}

fn assert_subset(origin: &str, written: &Value, serialized: &Value) {
    match (written, serialized) {
        (Value::Object(w), Value::Object(s)) => {
            for (key, value) in w {
                let other = s
                    .get(key)
                    .unwrap_or_else(|| panic!("{origin}: field {key} lost in the round trip"));
                assert_subset(origin, value, other);
            }
        }
        _ => assert_eq!(written, serialized, "{origin}"),
    }
}

#[test]
fn every_example_round_trips_through_its_type() {
    let documents = example_documents();
    let mut kinds = Vec::new();
    for (origin, value) in &documents {
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "Customer" => assert_round_trip::<Customer>(origin, value),
            "Container" => assert_round_trip::<Container>(origin, value),
            "PortMapping" => assert_round_trip::<PortMapping>(origin, value),
            "CustomDistro" => assert_round_trip::<CustomDistro>(origin, value),
            "Server" => assert_round_trip::<uwsgi_it_api::Server>(origin, value),
            other => panic!("{origin}: unexpected kind {other}"),
        }
        kinds.push(kind);
    }
    for kind in [
        "Server",
        "Customer",
        "Container",
        "PortMapping",
        "CustomDistro",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no example of {kind}");
    }
}

#[test]
fn container_defaults_match_the_design() {
    let spec: ContainerSpec =
        serde_json::from_value(json!({"server": "server-1", "memory": 1000, "storage": 20000}))
            .unwrap();
    assert_eq!(spec.quota_threshold, 90);
    assert!(!spec.custom_distros_storage);
    assert_eq!(spec.distro, None);
    assert_eq!(spec.custom_distro, None);
    assert!(spec.ssh_keys.is_empty());
}

#[test]
fn port_mapping_protocol_defaults_to_tcp_and_is_lowercase_on_the_wire() {
    let spec: PortMappingSpec = serde_json::from_value(
        json!({"container": "hydra", "publicPort": 9000, "privatePort": 8000}),
    )
    .unwrap();
    assert_eq!(spec.proto, Protocol::Tcp);
    let udp: PortMappingSpec = serde_json::from_value(
        json!({"container": "hydra", "proto": "udp", "publicPort": 9000, "privatePort": 8000}),
    )
    .unwrap();
    assert_eq!(udp.proto, Protocol::Udp);
    assert_eq!(serde_json::to_value(udp.proto).unwrap(), json!("udp"));
}

#[test]
fn customer_namespace_defaults_to_its_name() {
    let defaulted = Customer::new("acme", Default::default());
    assert_eq!(defaulted.namespace_name(), "acme");
    let mut explicit = Customer::new("acme", Default::default());
    explicit.spec.namespace = Some("acme-prod".into());
    assert_eq!(explicit.namespace_name(), "acme-prod");
}

#[test]
fn every_crd_has_status_category_short_name_and_list_map_conditions() {
    for crd in uwsgi_it_api::crds() {
        let name = crd.metadata.name.clone().unwrap();
        let names = &crd.spec.names;
        assert_eq!(
            names.categories.as_deref(),
            Some(&["uwsgi".to_string()][..]),
            "{name}"
        );
        assert!(
            names.short_names.as_ref().is_some_and(|s| !s.is_empty()),
            "{name}"
        );
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{name}"
        );
        assert!(
            version
                .additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 4),
            "{name}"
        );
        let schema = serde_json::to_value(&version.schema).unwrap();
        let conditions =
            &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{name}");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            json!(["type"]),
            "{name}"
        );
        let text = schema.to_string();
        assert!(
            !text.contains("\"format\":\"uint"),
            "{name} uses format uint*"
        );
    }
}

#[test]
fn every_schema_field_has_a_description() {
    fn walk(path: &str, schema: &Value, missing: &mut Vec<String>) {
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (field, sub) in properties {
                let here = format!("{path}.{field}");
                // metadata, apiVersion and kind are Kubernetes' own and documented upstream.
                if !matches!(field.as_str(), "metadata" | "apiVersion" | "kind")
                    && sub.get("description").is_none()
                {
                    missing.push(here.clone());
                }
                walk(&here, sub, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for crd in uwsgi_it_api::crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        walk(
            crd.metadata.name.as_deref().unwrap(),
            &schema["openAPIV3Schema"],
            &mut missing,
        );
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}
