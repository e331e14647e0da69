//! Servers as a supplier declares them: a Node (what the kubelet registers; here created by
//! hand where no kubelet runs) and the `Server` of the same name with its capacity and address.

use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

/// Field manager of the objects the test support applies.
const MANAGER: &str = "uwsgi-it-testbed";

/// The `Server` resource, without depending on the API crate (test support is used by it).
fn server_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("uwsgi.it", "v1alpha1", "Server"),
        "servers",
    )
}

/// What a server is declared with.
#[derive(Debug, Clone)]
pub struct ServerSpec<'a> {
    /// Memory capacity, MB.
    pub memory: u64,
    /// Storage capacity, MB.
    pub storage: u64,
    /// Public IPv4 address (`spec.address`), if any.
    pub address: Option<&'a str>,
    /// The Node's `spec.podCIDR`, if any.
    pub pod_cidr: Option<&'a str>,
}

/// Applies the Node `name` (only when `with_node`: a real kubelet registers its own) and the
/// Server `name`, both idempotently.
pub async fn declare(
    client: &Client,
    name: &str,
    spec: &ServerSpec<'_>,
    with_node: bool,
) -> kube::Result<()> {
    let params = PatchParams::apply(MANAGER).force();
    if with_node {
        register_node(client, name, spec.pod_cidr).await?;
    }
    let mut server_spec = json!({"memory": spec.memory, "storage": spec.storage});
    if let Some(address) = spec.address {
        server_spec["address"] = json!(address);
    }
    let server = json!({
        "apiVersion": "uwsgi.it/v1alpha1",
        "kind": "Server",
        "metadata": {"name": name},
        "spec": server_spec,
    });
    Api::<DynamicObject>::all_with(client.clone(), &server_resource())
        .patch(name, &params, &Patch::Apply(&server))
        .await?;
    Ok(())
}

/// Registers the Node `name` the way a kubelet would, where none runs (the stand-in tiers).
pub async fn register_node(
    client: &Client,
    name: &str,
    pod_cidr: Option<&str>,
) -> kube::Result<()> {
    let mut node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
    if let Some(cidr) = pod_cidr {
        node["spec"] = json!({"podCIDR": cidr});
    }
    Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&node),
        )
        .await?;
    Ok(())
}

/// Deletes the Server and the Node `name`, ignoring what is already gone.
pub async fn remove(client: &Client, name: &str) {
    let params = kube::api::DeleteParams::default();
    let _ = Api::<DynamicObject>::all_with(client.clone(), &server_resource())
        .delete(name, &params)
        .await;
    let _ = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .delete(name, &params)
        .await;
}
