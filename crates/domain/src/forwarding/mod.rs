//! The node's public port forwards as data, and their renderings for nftables and iptables.
//!
//! The agent builds one [`ForwardingRuleset`] per node from the accepted PortMappings, renders it
//! with [`nft`] or [`iptables`], and hands the result to the kernel in one transaction. Everything
//! here is pure so the rendering can be golden-tested and the diff property-tested.
//!
//! Two kinds of transaction exist: the whole owned table (first sync, periodic resync, drift
//! repair) and the [`RulesetDiff`] between the last written ruleset and the desired one (the
//! event path), which touches only the elements that changed, so its cost does not grow with the
//! number of mappings.

pub mod iptables;
pub mod nft;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};

/// Transport protocol of a forward. Ordered so that rendering is deterministic (tcp before udp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The lower-case name nft, iptables and conntrack all understand.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// Parses the lower-case name used by nft listings and iptables-save.
    pub fn from_name(name: &str) -> Option<Protocol> {
        match name {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One public port of the node forwarded to a container's private address.
///
/// Field order matters: the derived `Ord` sorts by protocol, then public port, which is the key
/// of the forwarding map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Forward {
    pub protocol: Protocol,
    pub public_port: u16,
    pub target: SocketAddrV4,
}

impl Forward {
    pub fn new(protocol: Protocol, public_port: u16, target: SocketAddrV4) -> Forward {
        Forward {
            protocol,
            public_port,
            target,
        }
    }

    /// The key a packet is looked up by: every public address shares one map.
    pub fn key(&self) -> (Protocol, u16) {
        (self.protocol, self.public_port)
    }
}

/// An IPv4 network in CIDR notation whose host bits are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Cidr {
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<Ipv4Cidr, RulesetError> {
        if prefix_len > 32 {
            return Err(RulesetError::CidrPrefixTooLong { prefix_len });
        }
        let cidr = Ipv4Cidr {
            network,
            prefix_len,
        };
        if u32::from(network) & !cidr.mask() != 0 {
            return Err(RulesetError::CidrHostBitsSet {
                network,
                prefix_len,
            });
        }
        Ok(cidr)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }

    fn range(&self) -> Ipv4Range {
        let first = u32::from(self.network);
        Ipv4Range {
            first: self.network,
            last: Ipv4Addr::from(first | !self.mask()),
        }
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = RulesetError;

    fn from_str(text: &str) -> Result<Ipv4Cidr, RulesetError> {
        let invalid = || RulesetError::CidrSyntax {
            text: text.to_owned(),
        };
        let (address, prefix_len) = text.split_once('/').ok_or_else(invalid)?;
        let network: Ipv4Addr = address.parse().map_err(|_| invalid())?;
        let prefix_len: u8 = prefix_len.parse().map_err(|_| invalid())?;
        Ipv4Cidr::new(network, prefix_len)
    }
}

/// An inclusive range of IPv4 addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Range {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl Ipv4Range {
    /// The range as an aligned CIDR block, if it is exactly one.
    pub fn as_cidr(&self) -> Option<Ipv4Cidr> {
        let first = u32::from(self.first);
        let size = u64::from(u32::from(self.last)) - u64::from(first) + 1;
        if !size.is_power_of_two() || u64::from(first) % size != 0 {
            return None;
        }
        let prefix_len = 32 - size.trailing_zeros() as u8;
        Ipv4Cidr::new(self.first, prefix_len).ok()
    }

    /// The smallest list of aligned CIDR blocks covering exactly this range (iptables `-s`
    /// takes one block per rule).
    pub fn to_cidrs(&self) -> Vec<Ipv4Cidr> {
        let mut blocks = Vec::new();
        let mut next = u64::from(u32::from(self.first));
        let end = u64::from(u32::from(self.last));
        while next <= end {
            let alignment = if next == 0 {
                1u64 << 32
            } else {
                1u64 << next.trailing_zeros()
            };
            let mut size = alignment;
            while next + size - 1 > end {
                size /= 2;
            }
            let prefix_len = 32 - size.trailing_zeros() as u8;
            blocks.push(
                Ipv4Cidr::new(Ipv4Addr::from(next as u32), prefix_len)
                    .expect("an aligned block has no host bits"),
            );
            next += size;
        }
        blocks
    }
}

/// Why a ruleset could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesetError {
    #[error(
        "forwards: {protocol}/{public_port} is forwarded to both {first} and {second}; a public port has one target"
    )]
    ConflictingForwards {
        protocol: Protocol,
        public_port: u16,
        first: SocketAddrV4,
        second: SocketAddrV4,
    },
    #[error("forwards: public port 0 ({protocol} -> {target}) is not a port")]
    ZeroPublicPort {
        protocol: Protocol,
        target: SocketAddrV4,
    },
    #[error(
        "forwards: target {target} of {protocol}/{public_port} must be a unicast private address with a non-zero port, never loopback"
    )]
    InvalidTarget {
        protocol: Protocol,
        public_port: u16,
        target: SocketAddrV4,
    },
    #[error(
        "public_addresses: {address} must be a unicast address (not unspecified, loopback, multicast or broadcast)"
    )]
    InvalidPublicAddress { address: Ipv4Addr },
    #[error("container_networks: prefix length {prefix_len} is longer than 32")]
    CidrPrefixTooLong { prefix_len: u8 },
    #[error("container_networks: {network}/{prefix_len} has host bits set")]
    CidrHostBitsSet { network: Ipv4Addr, prefix_len: u8 },
    #[error("container_networks: {text:?} is not an IPv4 CIDR like 10.244.1.0/24")]
    CidrSyntax { text: String },
}

fn is_unicast(address: Ipv4Addr) -> bool {
    !(address.is_unspecified()
        || address.is_loopback()
        || address.is_multicast()
        || address.is_broadcast())
}

/// The complete desired forwarding state of one node.
///
/// Invariants (enforced by [`ForwardingRuleset::new`]): every list is sorted and free of
/// duplicates, and each (protocol, public port) has exactly one target, so two equal states
/// always render byte-identical rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ForwardingRuleset {
    public_addresses: Vec<Ipv4Addr>,
    container_networks: Vec<Ipv4Cidr>,
    forwards: Vec<Forward>,
}

impl ForwardingRuleset {
    /// Builds a ruleset.
    ///
    /// - `public_addresses`: the node's public addresses; forwards apply to every one of them and
    ///   to nothing else.
    /// - `container_networks`: the networks the node's containers live in (e.g. the node's pod
    ///   CIDR). DNATed traffic coming *from* these networks is masqueraded so hairpin connections
    ///   work even when the target answers the client directly over layer 2 (bridge CNIs). May be
    ///   empty: the forward targets themselves are always treated as container sources.
    /// - `forwards`: one entry per (protocol, public port).
    pub fn new(
        public_addresses: impl IntoIterator<Item = Ipv4Addr>,
        container_networks: impl IntoIterator<Item = Ipv4Cidr>,
        forwards: impl IntoIterator<Item = Forward>,
    ) -> Result<ForwardingRuleset, RulesetError> {
        let public_addresses: BTreeSet<Ipv4Addr> = public_addresses.into_iter().collect();
        if let Some(&address) = public_addresses.iter().find(|a| !is_unicast(**a)) {
            return Err(RulesetError::InvalidPublicAddress { address });
        }
        let container_networks: BTreeSet<Ipv4Cidr> = container_networks.into_iter().collect();
        let mut by_key: BTreeMap<(Protocol, u16), Forward> = BTreeMap::new();
        for forward in forwards {
            if forward.public_port == 0 {
                return Err(RulesetError::ZeroPublicPort {
                    protocol: forward.protocol,
                    target: forward.target,
                });
            }
            if forward.target.port() == 0 || !is_unicast(*forward.target.ip()) {
                return Err(RulesetError::InvalidTarget {
                    protocol: forward.protocol,
                    public_port: forward.public_port,
                    target: forward.target,
                });
            }
            if let Some(existing) = by_key.insert(forward.key(), forward)
                && existing.target != forward.target
            {
                return Err(RulesetError::ConflictingForwards {
                    protocol: forward.protocol,
                    public_port: forward.public_port,
                    first: existing.target.min(forward.target),
                    second: existing.target.max(forward.target),
                });
            }
        }
        Ok(ForwardingRuleset {
            public_addresses: public_addresses.into_iter().collect(),
            container_networks: container_networks.into_iter().collect(),
            forwards: by_key.into_values().collect(),
        })
    }

    /// Sorted, without duplicates.
    pub fn public_addresses(&self) -> &[Ipv4Addr] {
        &self.public_addresses
    }

    /// Sorted, without duplicates.
    pub fn container_networks(&self) -> &[Ipv4Cidr] {
        &self.container_networks
    }

    /// Sorted by (protocol, public port), one per key.
    pub fn forwards(&self) -> &[Forward] {
        &self.forwards
    }

    /// The target of `protocol`/`public_port`, if it is forwarded.
    pub fn target_of(&self, protocol: Protocol, public_port: u16) -> Option<SocketAddrV4> {
        self.forwards
            .binary_search_by(|f| f.key().cmp(&(protocol, public_port)))
            .ok()
            .map(|index| self.forwards[index].target)
    }

    /// Sources whose DNATed connections are masqueraded: the container networks plus every
    /// target address (a container reaching its own public port), merged into the fewest
    /// non-overlapping, non-adjacent ranges, sorted. nft interval sets refuse overlapping
    /// elements, so the merge is needed, not cosmetic.
    pub fn masquerade_sources(&self) -> Vec<Ipv4Range> {
        let mut ranges: Vec<(u32, u32)> = self
            .container_networks
            .iter()
            .map(|cidr| cidr.range())
            .chain(self.forwards.iter().map(|f| Ipv4Range {
                first: *f.target.ip(),
                last: *f.target.ip(),
            }))
            .map(|r| (u32::from(r.first), u32::from(r.last)))
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (first, last) in ranges {
            match merged.last_mut() {
                Some((_, previous_last)) if u64::from(first) <= u64::from(*previous_last) + 1 => {
                    *previous_last = (*previous_last).max(last);
                }
                _ => merged.push((first, last)),
            }
        }
        merged
            .into_iter()
            .map(|(first, last)| Ipv4Range {
                first: Ipv4Addr::from(first),
                last: Ipv4Addr::from(last),
            })
            .collect()
    }
}

/// The element-level difference between the ruleset last written and the desired one.
///
/// A forward whose target changed appears in both lists: its old form in `removed_forwards`,
/// its new form in `added_forwards`, so a renderer deletes the key and adds it again in the same
/// transaction. Every list is sorted and free of duplicates; applying the removals and then the
/// additions to `previous` gives exactly `desired` (property-tested).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RulesetDiff {
    pub removed_addresses: Vec<Ipv4Addr>,
    pub added_addresses: Vec<Ipv4Addr>,
    pub removed_forwards: Vec<Forward>,
    pub added_forwards: Vec<Forward>,
    /// Merged masquerade ranges ([`ForwardingRuleset::masquerade_sources`]) that go / come.
    pub removed_masquerade_sources: Vec<Ipv4Range>,
    pub added_masquerade_sources: Vec<Ipv4Range>,
}

impl RulesetDiff {
    /// What turns `previous` into `desired`. Linear in the size of both (they are sorted).
    pub fn between(previous: &ForwardingRuleset, desired: &ForwardingRuleset) -> RulesetDiff {
        let (removed_addresses, added_addresses) =
            sorted_difference(&previous.public_addresses, &desired.public_addresses);
        let (removed_forwards, added_forwards) =
            sorted_difference(&previous.forwards, &desired.forwards);
        let (removed_masquerade_sources, added_masquerade_sources) = sorted_difference(
            &previous.masquerade_sources(),
            &desired.masquerade_sources(),
        );
        RulesetDiff {
            removed_addresses,
            added_addresses,
            removed_forwards,
            added_forwards,
            removed_masquerade_sources,
            added_masquerade_sources,
        }
    }

    /// True when the two rulesets program the same rules.
    pub fn is_empty(&self) -> bool {
        self.changes() == 0
    }

    /// Number of element operations (deletions plus additions).
    pub fn changes(&self) -> usize {
        self.removed_addresses.len()
            + self.added_addresses.len()
            + self.removed_forwards.len()
            + self.added_forwards.len()
            + self.removed_masquerade_sources.len()
            + self.added_masquerade_sources.len()
    }
}

impl fmt::Display for RulesetDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} forwards removed, {} added; {} public addresses removed, {} added; {} masquerade ranges removed, {} added",
            self.removed_forwards.len(),
            self.added_forwards.len(),
            self.removed_addresses.len(),
            self.added_addresses.len(),
            self.removed_masquerade_sources.len(),
            self.added_masquerade_sources.len(),
        )
    }
}

/// `(only in a, only in b)` of two sorted, duplicate-free slices, by one merge walk.
fn sorted_difference<T: Ord + Copy>(a: &[T], b: &[T]) -> (Vec<T>, Vec<T>) {
    let (mut only_a, mut only_b) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                only_a.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                only_b.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                i += 1;
                j += 1;
            }
        }
    }
    only_a.extend_from_slice(&a[i..]);
    only_b.extend_from_slice(&b[j..]);
    (only_a, only_b)
}

/// A public UDP port on one public address whose conntrack entries are stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UdpFlowKey {
    pub public_address: Ipv4Addr,
    pub public_port: u16,
}

/// The UDP `(public address, public port)` pairs whose conntrack entries must be deleted when
/// the node moves from `installed` to `desired`.
///
/// UDP has no connection end, so a conntrack entry keeps its NAT binding (or its lack of one) for
/// as long as the client keeps sending. An entry is stale when the address:port it was created
/// for now leads somewhere else: the forward was removed, its target changed, the public address
/// went away, **or the forward is new** (packets that arrived before the forward existed created
/// an un-NATed entry that would keep swallowing the flow). TCP is left alone: a removed TCP
/// forward stops new connections, while established ones end by themselves.
pub fn stale_udp_flows(
    installed: &ForwardingRuleset,
    desired: &ForwardingRuleset,
) -> Vec<UdpFlowKey> {
    let udp_target = |ruleset: &ForwardingRuleset, address: Ipv4Addr, port: u16| {
        if ruleset.public_addresses.binary_search(&address).is_ok() {
            ruleset.target_of(Protocol::Udp, port)
        } else {
            None
        }
    };
    let addresses: BTreeSet<Ipv4Addr> = installed
        .public_addresses
        .iter()
        .chain(&desired.public_addresses)
        .copied()
        .collect();
    let udp_ports: BTreeSet<u16> = installed
        .forwards
        .iter()
        .chain(&desired.forwards)
        .filter(|f| f.protocol == Protocol::Udp)
        .map(|f| f.public_port)
        .collect();
    let mut stale = Vec::new();
    for &public_address in &addresses {
        for &public_port in &udp_ports {
            let before = udp_target(installed, public_address, public_port);
            let after = udp_target(desired, public_address, public_port);
            if before != after {
                stale.push(UdpFlowKey {
                    public_address,
                    public_port,
                });
            }
        }
    }
    stale
}

#[cfg(test)]
mod tests;
