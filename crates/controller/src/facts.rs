//! Translation of API objects into the domain's inputs. Pure: objects in, facts out.

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use uwsgi_it_api::{Container, CustomDistro, Server};
use uwsgi_it_domain::capacity::{Resources, ServerFacts};
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

/// The public address of a server: its `spec.address`, else its Node's ExternalIP, else its
/// InternalIP (the one rule the agent applies too).
pub fn server_address(server: &Server, node: Option<&Node>) -> Option<String> {
    uwsgi_it_domain::address::public_address(
        server.spec.address.as_deref(),
        uwsgi_it_api::server::node_addresses(node),
    )
    .map(|a| a.to_string())
}

/// What admission needs to know about a server.
pub fn server_facts(server: &Server, node: Option<&Node>) -> ServerFacts {
    ServerFacts {
        name: server.name_any(),
        capacity: Resources::new(
            server.spec.memory.max(0) as u64,
            server.spec.storage.max(0) as u64,
        ),
        address: server_address(server, node),
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

    fn server(address: Option<&str>) -> Server {
        serde_json::from_value(json!({"apiVersion": "uwsgi.it/v1alpha1", "kind": "Server",
            "metadata": {"name": "a"},
            "spec": {"memory": 16000, "storage": 500000, "address": address}}))
        .unwrap()
    }

    #[test]
    fn address_prefers_the_spec_then_external_then_internal() {
        let both = node(json!({"metadata": {"name": "a"}, "status": {"addresses": [
            {"type": "InternalIP", "address": "10.0.0.1"},
            {"type": "ExternalIP", "address": "198.51.100.1"}]}}));
        assert_eq!(
            server_address(&server(None), Some(&both)).as_deref(),
            Some("198.51.100.1")
        );
        assert_eq!(
            server_address(&server(Some("203.0.113.5")), Some(&both)).as_deref(),
            Some("203.0.113.5")
        );
        let internal = node(json!({"metadata": {"name": "a"}, "status": {"addresses": [
            {"type": "InternalIP", "address": "10.0.0.1"}]}}));
        assert_eq!(
            server_address(&server(None), Some(&internal)).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(server_address(&server(None), None), None);
    }

    #[test]
    fn server_facts_read_the_spec() {
        let facts = server_facts(&server(Some("203.0.113.5")), None);
        assert_eq!(facts.name, "a");
        assert_eq!(facts.capacity, Resources::new(16000, 500000));
        assert_eq!(facts.address.as_deref(), Some("203.0.113.5"));
    }
}
