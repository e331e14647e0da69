//! Which public IPv4 address a server's port forwards listen on. One function, used by the
//! controller (status, PortMapping messages) and by the agent (the rules it programs), so the
//! two can never disagree.

use std::net::Ipv4Addr;

/// The server's public address: the Server's `spec.address`, else the Node's first ExternalIP,
/// else its first InternalIP (`node_addresses` are the Node's `(type, address)` pairs, in the
/// Node's order). Only IPv4 addresses count; `None` when there is none.
pub fn public_address<'a>(
    declared: Option<&str>,
    node_addresses: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
) -> Option<Ipv4Addr> {
    if let Some(address) = declared.and_then(|d| d.trim().parse().ok()) {
        return Some(address);
    }
    ["ExternalIP", "InternalIP"].into_iter().find_map(|kind| {
        node_addresses
            .clone()
            .into_iter()
            .filter(|(type_, _)| *type_ == kind)
            .find_map(|(_, address)| address.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: [(&str, &str); 3] = [
        ("InternalIP", "10.0.0.1"),
        ("ExternalIP", "fd00::1"),
        ("ExternalIP", "198.51.100.1"),
    ];

    #[test]
    fn the_declared_address_wins() {
        assert_eq!(
            public_address(Some("203.0.113.5"), NODE),
            Some(Ipv4Addr::new(203, 0, 113, 5))
        );
    }

    #[test]
    fn then_the_first_ipv4_external_then_internal_address() {
        assert_eq!(
            public_address(None, NODE),
            Some(Ipv4Addr::new(198, 51, 100, 1))
        );
        assert_eq!(
            public_address(None, [("InternalIP", "10.0.0.1")]),
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(public_address(None, [("Hostname", "n1")]), None);
    }

    #[test]
    fn a_declared_address_that_is_not_ipv4_falls_back_to_the_node() {
        assert_eq!(
            public_address(Some("not an address"), NODE),
            Some(Ipv4Addr::new(198, 51, 100, 1))
        );
    }
}
