//! The node's public IPv4 address, and a watch on the node's addresses and links.
//!
//! The supplier's word wins: the Server's `spec.address`, else the Node's ExternalIP, else its
//! InternalIP (the domain's one rule, shared with the controller). A node that has none of them is asked through rtnetlink: the first global
//! IPv4 address of the interface holding the default route. Address and link changes (netlink
//! multicast) wake the forwarding sync up, so a re-addressed node is reprogrammed at once
//! rather than at the next periodic resync.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::route::RouteAttribute;
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};
use tracing::{debug, warn};
use uwsgi_it_api::Server;

/// Where the node's network lives: the agent's own network namespace (production: the host's,
/// the agent Pod runs with `hostNetwork`) or a named one under `/run/netns` (tests, where each
/// simulated node is a network namespace).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NetworkNamespace {
    #[default]
    Current,
    Named(String),
}

impl NetworkNamespace {
    fn path(&self) -> Option<PathBuf> {
        match self {
            NetworkNamespace::Current => None,
            NetworkNamespace::Named(name) => Some(Path::new("/run/netns").join(name)),
        }
    }

    /// Runs `open` on a thread inside this namespace with the current tokio runtime entered, so
    /// a netlink socket it creates belongs to the namespace (a socket keeps the namespace it was
    /// created in) and is registered with this runtime's reactor.
    fn open<T: Send + 'static>(
        &self,
        open: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        if self.path().is_none() {
            return open();
        }
        let runtime = tokio::runtime::Handle::current();
        self.run_blocking(move || {
            let _runtime = runtime.enter();
            open()
        })
    }

    /// Runs `work` inside this namespace: here for the current one, else on a short-lived
    /// thread that enters it first (so `/proc/thread-self/net` is the namespace's). Blocks.
    pub(crate) fn run_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let Some(path) = self.path() else {
            return work();
        };
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path)?;
            // SAFETY: setns only reads the descriptor, which `file` keeps open for the call; it
            // changes the namespace of this short-lived thread alone.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            work()
        })
        .join()
        .map_err(|_| std::io::Error::other("netns thread panicked"))?
    }
}

/// The main routing table's id in a route header.
const RT_TABLE_MAIN: u8 = 254;

/// The public address the Server and its Node declare: `spec.address`, else ExternalIP, else
/// InternalIP.
pub fn declared_public_address(server: Option<&Server>, node: Option<&Node>) -> Option<Ipv4Addr> {
    uwsgi_it_domain::address::public_address(
        server.and_then(|s| s.spec.address.as_deref()),
        uwsgi_it_api::server::node_addresses(node),
    )
}

/// The first global IPv4 address of the interface that holds the default route.
pub async fn discover_public_address(
    netns: &NetworkNamespace,
) -> std::io::Result<Option<Ipv4Addr>> {
    let (connection, handle, _) = netns.open(rtnetlink::new_connection)?;
    let connection = tokio::spawn(connection);
    let found = default_route_address(&handle).await;
    connection.abort();
    found.map_err(std::io::Error::other)
}

async fn default_route_address(handle: &Handle) -> Result<Option<Ipv4Addr>, rtnetlink::Error> {
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut interface = None;
    while let Some(route) = routes.try_next().await? {
        let is_default =
            route.header.destination_prefix_length == 0 && route.header.table == RT_TABLE_MAIN;
        if !is_default {
            continue;
        }
        interface = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(index) => Some(*index),
            _ => None,
        });
        if interface.is_some() {
            break;
        }
    }
    let Some(interface) = interface else {
        return Ok(None);
    };
    let mut addresses = handle
        .address()
        .get()
        .set_link_index_filter(interface)
        .execute();
    while let Some(message) = addresses.try_next().await? {
        if message.header.family != AddressFamily::Inet
            || message.header.scope != AddressScope::Universe
        {
            continue;
        }
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on point-to-point
        // links and equals IFA_LOCAL elsewhere.
        let local = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(address)) => Some(*address),
            _ => None,
        });
        let address = local.or_else(|| {
            message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(address)) => Some(*address),
                _ => None,
            })
        });
        if address.is_some() {
            return Ok(address);
        }
    }
    Ok(None)
}

/// Calls `on_change` for every address, link or IPv4 route change of the namespace, until the
/// netlink socket fails.
pub async fn watch_changes(
    netns: &NetworkNamespace,
    on_change: impl Fn() + Send + 'static,
) -> std::io::Result<()> {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv4Route,
    ];
    let (connection, _handle, mut messages) =
        netns.open(move || rtnetlink::new_multicast_connection(&groups))?;
    let connection = tokio::spawn(connection);
    while let Some((message, _)) = messages.next().await {
        debug!(?message.header, "netlink change");
        on_change();
    }
    connection.abort();
    warn!("netlink change notifications ended");
    Ok(())
}
