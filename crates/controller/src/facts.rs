//! Translation of API objects into the domain's inputs. Pure: objects in, facts out.

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use uwsgi_it_api::condition::{self, ADMITTED};
use uwsgi_it_api::well_known::{
    ADDRESS_ANNOTATION, MEMORY_ANNOTATION, SERVER_LABEL, STORAGE_ANNOTATION,
};
use uwsgi_it_api::{Container, CustomDistro};
use uwsgi_it_domain::capacity::{NodeFacts, Resources};
use uwsgi_it_domain::distro::{ContainerFacts, DistroFacts};
use uwsgi_it_domain::identity::ObjectKey;

/// The ordering key of an object: earlier creation wins, then namespace/name.
pub fn key_of<K: ResourceExt>(object: &K) -> ObjectKey {
    let created = object
        .meta()
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or(i64::MAX);
    ObjectKey::new(
        created,
        object.namespace().unwrap_or_default(),
        object.name_any(),
    )
}

/// The public address of a node: the `uwsgi.it/address` annotation, else its ExternalIP,
/// else its InternalIP.
pub fn node_address(node: &Node) -> Option<String> {
    if let Some(address) = node.annotations().get(ADDRESS_ANNOTATION) {
        return Some(address.trim().to_string());
    }
    let addresses = node.status.as_ref()?.addresses.as_ref()?;
    ["ExternalIP", "InternalIP"].iter().find_map(|kind| {
        addresses
            .iter()
            .find(|a| a.type_ == *kind)
            .map(|a| a.address.clone())
    })
}

/// What admission needs to know about a node.
pub fn node_facts(node: &Node) -> NodeFacts {
    NodeFacts {
        name: node.name_any(),
        is_server: node.labels().get(SERVER_LABEL).map(String::as_str) == Some("true"),
        memory: node.annotations().get(MEMORY_ANNOTATION).cloned(),
        storage: node.annotations().get(STORAGE_ANNOTATION).cloned(),
        address: node_address(node),
    }
}

/// What a container asks for, in MB. Schema minimums make negative values impossible; a
/// negative value read anyway is treated as zero rather than wrapping.
pub fn requested(container: &Container) -> Resources {
    Resources::new(
        container.spec.memory.max(0) as u64,
        container.spec.storage.max(0) as u64,
    )
}

/// The custom-distro view of a container, with its admission state as the controller knows it.
pub fn container_facts(
    container: &Container,
    server: Option<String>,
    admitted: bool,
) -> ContainerFacts {
    ContainerFacts {
        namespace: container.namespace().unwrap_or_default(),
        name: container.name_any(),
        server,
        admitted,
        custom_distros_storage: container.spec.custom_distros_storage,
        custom_distro: container.spec.custom_distro.clone(),
    }
}

/// Container facts from the cached status alone (used outside an admission pass).
pub fn cached_container_facts(container: &Container) -> ContainerFacts {
    let status = container.status.as_ref();
    let admitted = status.is_some_and(|s| s.reserved.is_some() && s.uid.is_some())
        && status.is_some_and(|s| condition::find(&s.conditions, ADMITTED).is_some());
    container_facts(container, status.and_then(|s| s.server.clone()), admitted)
}

/// The custom-distro view of a CustomDistro.
pub fn distro_facts(distro: &CustomDistro) -> DistroFacts {
    DistroFacts {
        namespace: distro.namespace().unwrap_or_default(),
        name: distro.name_any(),
        storage_container: distro.spec.storage_container.clone(),
        path: distro.spec.path.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(value: serde_json::Value) -> Node {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn address_prefers_annotation_then_external_then_internal() {
        let both = json!({"metadata": {"name": "a"}, "status": {"addresses": [
            {"type": "InternalIP", "address": "10.0.0.1"},
            {"type": "ExternalIP", "address": "198.51.100.1"}]}});
        assert_eq!(
            node_address(&node(both.clone())).as_deref(),
            Some("198.51.100.1")
        );
        let mut annotated = both;
        annotated["metadata"]["annotations"] = json!({"uwsgi.it/address": "203.0.113.5"});
        assert_eq!(
            node_address(&node(annotated)).as_deref(),
            Some("203.0.113.5")
        );
        let internal = json!({"metadata": {"name": "a"}, "status": {"addresses": [
            {"type": "InternalIP", "address": "10.0.0.1"}]}});
        assert_eq!(node_address(&node(internal)).as_deref(), Some("10.0.0.1"));
        assert_eq!(
            node_address(&node(json!({"metadata": {"name": "a"}}))),
            None
        );
    }

    #[test]
    fn node_facts_read_label_and_annotations() {
        let facts = node_facts(&node(json!({"metadata": {"name": "server-1",
            "labels": {"uwsgi.it/server": "true"},
            "annotations": {"uwsgi.it/memory": "16000", "uwsgi.it/storage": "500000"}}})));
        assert!(facts.is_server);
        assert_eq!(facts.memory.as_deref(), Some("16000"));
        assert_eq!(facts.storage.as_deref(), Some("500000"));
        let plain = node_facts(&node(
            json!({"metadata": {"name": "n", "labels": {"uwsgi.it/server": "yes"}}}),
        ));
        assert!(!plain.is_server, "only the value \"true\" makes a server");
    }
}
