//! Which Server a container names. One answer for the Server reconciler (is this container
//! mine?), the Container reconciler (does it name any Server?) and the watch that wakes
//! Servers up (which Server does this change concern?).

use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use uwsgi_it_api::{Container, Server};
use uwsgi_it_domain::capacity::PlacementError;

use crate::context::address_key;
use crate::facts::server_address;
use crate::index::Index;

/// The Servers, their Nodes and the index of Servers by declared address.
#[derive(Clone)]
pub struct ServerDirectory {
    servers: Store<Server>,
    nodes: Store<Node>,
    by_address: Arc<Index<Server>>,
}

impl ServerDirectory {
    /// A directory over the caches.
    pub fn new(servers: Store<Server>, nodes: Store<Node>, by_address: Arc<Index<Server>>) -> Self {
        ServerDirectory {
            servers,
            nodes,
            by_address,
        }
    }

    /// The names of the Servers whose effective public address is `address`, sorted: from the
    /// index of `spec.address`, else (an address taken from a Node) by looking at every Server.
    pub fn with_address(&self, address: &str) -> Vec<String> {
        let effective = |server: &Server| {
            let node = self.nodes.get(&ObjectRef::new(&server.name_any()));
            server_address(server, node.as_deref()).as_deref() == Some(address)
        };
        let mut names: Vec<String> = self
            .by_address
            .get(&address_key(address))
            .into_iter()
            .filter_map(|r| self.servers.get(&r))
            .filter(|s| effective(s))
            .map(|s| s.name_any())
            .collect();
        if names.is_empty() {
            names = self
                .servers
                .state()
                .iter()
                .filter(|s| effective(s))
                .map(|s| s.name_any())
                .collect();
        }
        names.sort();
        names
    }

    /// The Server a container is placed on: the one it holds a reservation on, else the one
    /// its `spec.server` names — a Server's name first, else a public address that exactly one
    /// Server has.
    pub fn named_by(&self, container: &Container) -> Result<String, PlacementError> {
        if let Some(status) = container.status.as_ref()
            && let (Some(server), Some(_)) = (&status.server, &status.reserved)
        {
            return Ok(server.clone());
        }
        let named = &container.spec.server;
        if self.servers.get(&ObjectRef::new(named)).is_some() {
            return Ok(named.clone());
        }
        match self.with_address(named).as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(PlacementError::UnknownServer {
                server: named.clone(),
            }),
            many => Err(PlacementError::AmbiguousAddress {
                address: named.clone(),
                servers: many.to_vec(),
            }),
        }
    }
}
