//! The `uwsgi.it/v1alpha1` API: the five custom resources suppliers and customers write.
//!
//! Everything a schema can check statically is in the schema (ranges, patterns, CEL rules with
//! messages), so `kubectl apply` refuses bad input before the controller sees it. Rules that need
//! other objects (capacity, ownership, port conflicts) belong to the controller.
//!
//! This crate depends on no other part of the project.

// `#[kube(printcolumn(...))]` repeats one attribute per column by design.
#![allow(clippy::duplicated_attributes)]

pub mod condition;
pub mod container;
pub mod custom_distro;
pub mod customer;
pub mod port_mapping;
pub mod readiness;
pub mod server;
pub mod well_known;

pub use container::{Container, ContainerSpec, ContainerStatus, Reservation};
pub use custom_distro::{CustomDistro, CustomDistroSpec, CustomDistroStatus, DistroRoot};
pub use customer::{Customer, CustomerSpec, CustomerStatus, ResourceUsage, ServerUsage};
pub use port_mapping::{PortMapping, PortMappingSpec, PortMappingStatus, Protocol};
pub use server::{Capacity, LedgerEntry, Server, ServerSpec, ServerStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every resource in this crate.
pub const GROUP: &str = "uwsgi.it";
/// API version of every resource in this crate.
pub const VERSION: &str = "v1alpha1";

/// The CustomResourceDefinitions of this API, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        Server::crd(),
        Customer::crd(),
        Container::crd(),
        PortMapping::crd(),
        CustomDistro::crd(),
    ]
}

/// One generated manifest of `crds/`: its file name and its YAML text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdManifest {
    /// File name inside `crds/`, e.g. `containers.uwsgi.it.yaml`.
    pub file_name: String,
    /// The YAML document, with a header saying it is generated.
    pub yaml: String,
}

/// Renders every CRD as the YAML committed in `crds/`. The drift test compares the committed
/// files with this output, so it is the single source of the manifests.
pub fn crd_manifests() -> Result<Vec<CrdManifest>, serde_saphyr::SerializeError> {
    crds()
        .into_iter()
        .map(|crd| {
            let file_name = format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or_default());
            let body = serde_saphyr::to_string(&crd)?;
            let yaml = format!(
                "# Generated from the Rust types in crates/api by `hack/update-crds.sh`; do not edit.\n{body}"
            );
            Ok(CrdManifest { file_name, yaml })
        })
        .collect()
}
