//! Reserved ports and port-mapping conflicts.
//!
//! A PortMapping forwards `<server address>:<publicPort>/<proto>` to a container. The public
//! address is the server's own, shared by every customer on it and by the node's Kubernetes
//! services, so two rules protect it:
//!
//! - a public port must be inside the range customers may map (`publicPorts`) and never one
//!   the node itself needs (`reservedPorts`): a forward would capture that traffic, which for
//!   an API server, etcd or an overlay network is the cluster's ([`PortPolicy`]);
//! - one `(server, proto, publicPort)` has one owner, across customers. The earliest mapping
//!   gets it, and a mapping that holds it keeps it: a mapping that sorts earlier but shows up
//!   later (restored from a backup, for example) must not steal live traffic.
//!
//! uwsgi.it only checked conflicts per container; this operator checks per server.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::identity::ObjectKey;

/// The lowest public port a mapping may use: ports below it are the server's own services
/// (and binding them needs privileges customers do not get). `publicPorts` may not start lower.
pub const MIN_PUBLIC_PORT: u16 = 1025;

/// Which public ports customers may map: inside `public`, outside every `reserved` entry.
/// The controller decides with it and the agent checks again with it before it programs a
/// forward, so a mapping accepted under an older configuration is not forwarded either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPolicy {
    /// `publicPorts`: the range customers may map.
    pub public: PortRange,
    /// `reservedPorts`: ports inside it that no mapping may take.
    pub reserved: ReservedPorts,
}

impl Default for PortPolicy {
    /// `1025-65535` with [`ReservedPorts::default`].
    fn default() -> Self {
        PortPolicy {
            public: PortRange {
                start: MIN_PUBLIC_PORT,
                end: u16::MAX,
            },
            reserved: ReservedPorts::default(),
        }
    }
}

impl PortPolicy {
    /// Why `port` may not be a public port, if it may not.
    pub fn refusal(&self, port: u16) -> Option<MappingRefusal> {
        if !self.public.contains(port) {
            return Some(MappingRefusal::OutOfRange {
                port,
                allowed: self.public,
            });
        }
        self.reserved
            .reserving(port)
            .map(|entry| MappingRefusal::ReservedPort { port, entry })
    }
}

/// An inclusive range of ports, `start..=end`, with `1 <= start <= end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    /// The ports `start..=end`. Port 0 is not a port, and the start may not exceed the end.
    pub fn new(start: u16, end: u16) -> Result<Self, PortRangeError> {
        if start == 0 {
            return Err(PortRangeError::OutOfRange {
                value: start.to_string(),
            });
        }
        if start > end {
            return Err(PortRangeError::Reversed { start, end });
        }
        Ok(Self { start, end })
    }

    /// The single port `port` (which must not be 0).
    pub fn single(port: u16) -> Result<Self, PortRangeError> {
        Self::new(port, port)
    }

    /// First port.
    pub fn start(&self) -> u16 {
        self.start
    }

    /// Last port (inclusive).
    pub fn end(&self) -> u16 {
        self.end
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

impl fmt::Display for PortRange {
    /// `"10250"` or `"30000-32767"`: the form [`FromStr`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    /// Reads `"10250"` or `"30000-32767"` (blanks around the numbers are ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(PortRangeError::Empty);
        }
        match s.split_once('-') {
            Some((start, end)) => Self::new(parse_port(start)?, parse_port(end)?),
            None => {
                let port = parse_port(s)?;
                Self::new(port, port)
            }
        }
    }
}

fn parse_port(text: &str) -> Result<u16, PortRangeError> {
    let text = text.trim();
    // Digits only: `u16::from_str` would take "+80", and "-" is the range separator.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortRangeError::NotANumber {
            text: text.to_owned(),
        });
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(PortRangeError::OutOfRange {
            value: text.to_owned(),
        }),
        Ok(port) => Ok(port),
    }
}

/// Why a port or port range is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    /// Nothing was given.
    #[error("empty entry: expected a port like \"10250\" or a range like \"30000-32767\"")]
    Empty,
    /// A part is not a decimal number.
    #[error(
        "{text:?} is not a port number: expected a port like \"10250\" or a range like \"30000-32767\""
    )]
    NotANumber {
        /// The offending part.
        text: String,
    },
    /// A number outside 1–65535.
    #[error("port {value} is outside the range 1-65535")]
    OutOfRange {
        /// The number as written.
        value: String,
    },
    /// `start-end` with start > end.
    #[error("range start {start} is greater than its end {end}")]
    Reversed {
        /// The start.
        start: u16,
        /// The end.
        end: u16,
    },
}

/// An invalid entry in the operator's `reservedPorts` list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reservedPorts[{index}] {entry:?}: {problem}")]
pub struct ReservedPortsError {
    /// Position of the entry in the list.
    pub index: usize,
    /// The entry as written.
    pub entry: String,
    /// What is wrong with it.
    pub problem: PortRangeError,
}

/// Ports no PortMapping may use as its public port (configuration key `reservedPorts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservedPorts {
    /// The configured entries, sorted, duplicates removed, not merged (so a refusal can name
    /// the entry that reserves a port).
    ranges: Vec<PortRange>,
}

impl ReservedPorts {
    /// Reads the `reservedPorts` list: each entry a port (`"10250"`) or an inclusive range
    /// (`"30000-32767"`). The first invalid entry is reported with its position. An empty list
    /// reserves nothing (the operator's configuration applies [`ReservedPorts::default`] when
    /// the key is absent).
    pub fn parse<I, S>(entries: I) -> Result<Self, ReservedPortsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut ranges = entries
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                let entry = entry.as_ref();
                entry.parse().map_err(|problem| ReservedPortsError {
                    index,
                    entry: entry.to_owned(),
                    problem,
                })
            })
            .collect::<Result<Vec<PortRange>, _>>()?;
        ranges.sort();
        ranges.dedup();
        Ok(Self { ranges })
    }

    /// The entries, sorted.
    pub fn ranges(&self) -> &[PortRange] {
        &self.ranges
    }

    /// Whether `port` is reserved.
    pub fn contains(&self, port: u16) -> bool {
        self.reserving(port).is_some()
    }

    /// The first entry that reserves `port`, if any.
    pub fn reserving(&self, port: u16) -> Option<PortRange> {
        self.ranges.iter().copied().find(|r| r.contains(port))
    }
}

/// The default `reservedPorts`: every port that a Kubernetes node's own infrastructure listens
/// on or receives from other nodes, with why. A forward on one of them would take that traffic
/// (for an overlay network, the Pod traffic other nodes send this one, in clear for VXLAN and
/// Geneve). The chart lists the same entries in `values.yaml`.
pub const DEFAULT_RESERVED_PORTS: &[(&str, &str)] = &[
    (
        "2379-2381",
        "etcd client, peer and metrics (control-plane servers)",
    ),
    ("4240", "Cilium health checks between nodes"),
    ("4244", "Hubble (Cilium) server"),
    ("4789", "VXLAN (Calico, Cilium, Antrea; IANA port)"),
    ("5473", "Calico Typha"),
    ("6081", "Geneve (Cilium, Antrea, OVN-Kubernetes)"),
    ("6443", "kube-apiserver (control-plane servers)"),
    ("6783-6784", "Weave Net"),
    ("7946", "memberlist (MetalLB speakers, Docker Swarm)"),
    ("8285", "flannel UDP backend"),
    ("8472", "VXLAN (flannel, Cilium: the Linux default port)"),
    ("9099", "Calico Felix health"),
    ("9100", "Prometheus node exporter"),
    (
        "9180",
        "this operator's agent endpoints (the chart also adds agent.port)",
    ),
    ("9345", "RKE2 supervisor"),
    ("10248", "kubelet health"),
    ("10249", "kube-proxy metrics"),
    ("10250", "kubelet API (exec, logs, metrics)"),
    ("10255", "kubelet read-only port"),
    ("10256", "kube-proxy health, probed by load balancers"),
    ("10257", "kube-controller-manager (control-plane servers)"),
    ("10259", "kube-scheduler (control-plane servers)"),
    ("30000-32767", "Service NodePorts (kube-proxy)"),
    ("51820-51821", "WireGuard (Calico, flannel; IPv4 and IPv6)"),
    ("51871", "WireGuard (Cilium)"),
];

impl Default for ReservedPorts {
    /// [`DEFAULT_RESERVED_PORTS`].
    fn default() -> Self {
        Self::parse(DEFAULT_RESERVED_PORTS.iter().map(|(entry, _)| entry))
            .expect("the default reserved ports are valid")
    }
}

/// Transport protocol of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// The state of the container a mapping points at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum MappingTarget {
    /// Admitted on `server`, which its customer owns.
    Admitted {
        /// The server's **node name** (`status.server`), never an address, so that mappings
        /// on one server always compare equal.
        server: String,
    },
    /// No Container of that name in the namespace.
    NotFound,
    /// The Container exists but is not admitted.
    NotAdmitted,
    /// The Container is admitted on `server`, but its customer no longer owns the server.
    ServerNotOwned {
        /// The server's node name.
        server: String,
    },
}

/// One PortMapping.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MappingCandidate {
    /// Ordering key: earlier mappings win a free port.
    pub key: ObjectKey,
    /// `spec.container`, for messages.
    pub container: String,
    /// Where that container is.
    pub target: MappingTarget,
    /// `spec.proto`.
    pub proto: Proto,
    /// `spec.publicPort`.
    pub public_port: u16,
    /// Whether the mapping is accepted now (condition `Accepted=True`): an accepted mapping
    /// keeps its port against earlier-keyed newcomers.
    pub accepted: bool,
}

/// The decision for one mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingDecision {
    /// Which mapping.
    pub key: ObjectKey,
    /// The server it forwards on (for `status.server`), when its container is admitted.
    pub server: Option<String>,
    /// Accepted, or why not.
    pub result: Result<(), MappingRefusal>,
}

impl MappingDecision {
    /// Whether the mapping is accepted (condition `Accepted=True`).
    pub fn is_accepted(&self) -> bool {
        self.result.is_ok()
    }
}

/// Why a mapping is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingRefusal {
    /// No Container of that name.
    #[error("container {container} does not exist in this namespace")]
    ContainerNotFound {
        /// `spec.container`.
        container: String,
    },
    /// The Container is not admitted, so it has no server and no address yet.
    #[error("container {container} is not admitted")]
    ContainerNotAdmitted {
        /// `spec.container`.
        container: String,
    },
    /// The customer does not own the container's server.
    #[error("customer namespace {namespace} does not own server {server}")]
    ServerNotOwned {
        /// The mapping's namespace.
        namespace: String,
        /// The server's node name.
        server: String,
    },
    /// `publicPort` outside `publicPorts`.
    #[error("publicPort {port} is outside the operator's publicPorts {allowed}")]
    OutOfRange {
        /// `spec.publicPort`.
        port: u16,
        /// `publicPorts`.
        allowed: PortRange,
    },
    /// `publicPort` is in the operator's reserved list.
    #[error("publicPort {port} is reserved by the operator (reservedPorts entry {entry})")]
    ReservedPort {
        /// `spec.publicPort`.
        port: u16,
        /// The `reservedPorts` entry that reserves it.
        entry: PortRange,
    },
    /// An earlier or already accepted mapping holds `(server, proto, publicPort)`.
    #[error("server {server}: {proto}/{port} is already mapped by {}", holder_name(holder, *same_customer))]
    PortInUse {
        /// The server's node name.
        server: String,
        /// `spec.proto`.
        proto: Proto,
        /// `spec.publicPort`.
        port: u16,
        /// The mapping that holds the port.
        holder: ObjectKey,
        /// Whether the holder is in the refused mapping's namespace. If not, the message says
        /// "another customer" rather than naming another customer's object to this customer;
        /// the supplier still has `holder`.
        same_customer: bool,
    },
}

fn holder_name(holder: &ObjectKey, same_customer: bool) -> String {
    if same_customer {
        holder.to_string()
    } else {
        "another customer".to_owned()
    }
}

impl MappingRefusal {
    /// The `reason` of the `Accepted=False` condition.
    pub fn reason(&self) -> &'static str {
        match self {
            MappingRefusal::ContainerNotFound { .. } => "ContainerNotFound",
            MappingRefusal::ContainerNotAdmitted { .. } => "ContainerNotAdmitted",
            MappingRefusal::ServerNotOwned { .. } => "ServerNotOwned",
            MappingRefusal::OutOfRange { .. } => "PortOutOfRange",
            MappingRefusal::ReservedPort { .. } => "ReservedPort",
            MappingRefusal::PortInUse { .. } => "PortInUse",
        }
    }
}

/// Decides every mapping (of every server: pass them all, the function groups them).
///
/// A mapping is accepted when its container is admitted on a server its customer owns, its
/// public port is in `1025-65535` and not reserved, and it holds `(server, proto, publicPort)`.
/// Among the mappings that pass the other rules, the holder of a port is the earliest-keyed
/// one that is already accepted, or, if none is, the earliest-keyed one. A mapping that fails
/// another rule (its port became reserved, its container is gone) releases the port.
///
/// The result is in key order, depends only on the set of inputs, and is a fixed point:
/// feeding the decisions back as `accepted` changes nothing.
pub fn decide_mappings(policy: &PortPolicy, mappings: &[MappingCandidate]) -> Vec<MappingDecision> {
    let mut ordered: Vec<&MappingCandidate> = mappings.iter().collect();
    ordered.sort();

    let mut results: Vec<Result<(), MappingRefusal>> =
        ordered.iter().map(|m| own_rules(policy, m)).collect();

    // Per (server, proto, port): the holder, as an index into `ordered`. Iterating in key order
    // means the first candidate seen is the earliest; an accepted one replaces a non-accepted
    // holder but never an earlier accepted one.
    let mut holders: BTreeMap<(&str, Proto, u16), usize> = BTreeMap::new();
    for (i, m) in ordered.iter().enumerate() {
        let (MappingTarget::Admitted { server }, Ok(())) = (&m.target, &results[i]) else {
            continue;
        };
        holders
            .entry((server.as_str(), m.proto, m.public_port))
            .and_modify(|held| {
                if m.accepted && !ordered[*held].accepted {
                    *held = i;
                }
            })
            .or_insert(i);
    }
    let mut refusals = Vec::new();
    for (i, m) in ordered.iter().enumerate() {
        let (MappingTarget::Admitted { server }, Ok(())) = (&m.target, &results[i]) else {
            continue;
        };
        let held = holders[&(server.as_str(), m.proto, m.public_port)];
        if held != i {
            let holder = &ordered[held].key;
            refusals.push((
                i,
                MappingRefusal::PortInUse {
                    server: server.clone(),
                    proto: m.proto,
                    port: m.public_port,
                    holder: holder.clone(),
                    same_customer: holder.namespace == m.key.namespace,
                },
            ));
        }
    }
    for (i, refusal) in refusals {
        results[i] = Err(refusal);
    }

    ordered
        .iter()
        .zip(results)
        .map(|(m, result)| MappingDecision {
            key: m.key.clone(),
            server: match &m.target {
                MappingTarget::Admitted { server } => Some(server.clone()),
                _ => None,
            },
            result,
        })
        .collect()
}

/// The rules a mapping passes or fails on its own, without looking at other mappings.
fn own_rules(policy: &PortPolicy, m: &MappingCandidate) -> Result<(), MappingRefusal> {
    match &m.target {
        MappingTarget::Admitted { .. } => {}
        MappingTarget::NotFound => {
            return Err(MappingRefusal::ContainerNotFound {
                container: m.container.clone(),
            });
        }
        MappingTarget::NotAdmitted => {
            return Err(MappingRefusal::ContainerNotAdmitted {
                container: m.container.clone(),
            });
        }
        MappingTarget::ServerNotOwned { server } => {
            return Err(MappingRefusal::ServerNotOwned {
                namespace: m.key.namespace.clone(),
                server: server.clone(),
            });
        }
    }
    match policy.refusal(m.public_port) {
        Some(refusal) => Err(refusal),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn range(start: u16, end: u16) -> PortRange {
        PortRange::new(start, end).unwrap()
    }

    #[test]
    fn port_range_parses_single_ports_and_ranges() {
        assert_eq!("10250".parse(), Ok(range(10250, 10250)));
        assert_eq!("30000-32767".parse(), Ok(range(30000, 32767)));
        assert_eq!(" 1 - 65535 ".parse(), Ok(range(1, 65535)));
        assert_eq!("8080-8080".parse(), Ok(range(8080, 8080)));
    }

    #[test]
    fn port_range_displays_as_it_parses() {
        assert_eq!(range(10250, 10250).to_string(), "10250");
        assert_eq!(range(30000, 32767).to_string(), "30000-32767");
    }

    #[test]
    fn port_range_rejects_bad_entries_with_the_rule() {
        let cases: [(&str, PortRangeError); 9] = [
            ("", PortRangeError::Empty),
            ("  ", PortRangeError::Empty),
            (
                "http",
                PortRangeError::NotANumber {
                    text: "http".into(),
                },
            ),
            ("+80", PortRangeError::NotANumber { text: "+80".into() }),
            ("-80", PortRangeError::NotANumber { text: "".into() }),
            ("80-", PortRangeError::NotANumber { text: "".into() }),
            ("1-2-3", PortRangeError::NotANumber { text: "2-3".into() }),
            ("0", PortRangeError::OutOfRange { value: "0".into() }),
            (
                "65536",
                PortRangeError::OutOfRange {
                    value: "65536".into(),
                },
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(text.parse::<PortRange>(), Err(expected), "{text:?}");
        }
        assert_eq!(
            "32767-30000".parse::<PortRange>(),
            Err(PortRangeError::Reversed {
                start: 32767,
                end: 30000
            })
        );
        assert_eq!(
            "99999999999999999999".parse::<PortRange>(),
            Err(PortRangeError::OutOfRange {
                value: "99999999999999999999".into()
            })
        );
    }

    #[test]
    fn reserved_ports_errors_name_the_entry_its_position_and_the_rule() {
        let err = ReservedPorts::parse(["10250", "70000"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reservedPorts[1] \"70000\": port 70000 is outside the range 1-65535"
        );
        let err = ReservedPorts::parse(["32767-30000"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reservedPorts[0] \"32767-30000\": range start 32767 is greater than its end 30000"
        );
        let err = ReservedPorts::parse(["ssh"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reservedPorts[0] \"ssh\": \"ssh\" is not a port number: expected a port like \
             \"10250\" or a range like \"30000-32767\""
        );
    }

    #[test]
    fn reserved_ports_parse_sorts_and_deduplicates() {
        let reserved = ReservedPorts::parse(["9000", "8000-8010", "9000"]).unwrap();
        assert_eq!(reserved.ranges(), &[range(8000, 8010), range(9000, 9000)]);
        assert!(reserved.contains(8005));
        assert!(!reserved.contains(8011));
        assert_eq!(reserved.reserving(9000), Some(range(9000, 9000)));
    }

    #[test]
    fn an_empty_reserved_list_reserves_nothing() {
        let reserved = ReservedPorts::parse(Vec::<String>::new()).unwrap();
        assert!((1..=u16::MAX).all(|p| !reserved.contains(p)));
    }

    #[test]
    fn default_reserves_every_infrastructure_port() {
        let reserved = ReservedPorts::default();
        // NodePorts, kubelet, kube-proxy, control plane, etcd, overlays, WireGuard, exporters.
        for port in [
            30000, 31000, 32767, 10248, 10249, 10250, 10255, 10256, 10257, 10259, 6443, 2379, 2380,
            2381, 8472, 4789, 6081, 51820, 51821, 51871, 9100, 7946, 9180, 4240, 5473,
        ] {
            assert!(reserved.contains(port), "{port}");
        }
        for port in [29999, 32768, 10251, 10258, 8080, 8000, 9000, 2378, 2382] {
            assert!(!reserved.contains(port), "{port}");
        }
        let written: Vec<String> = reserved.ranges().iter().map(ToString::to_string).collect();
        assert_eq!(
            ReservedPorts::parse(&written).unwrap(),
            reserved,
            "the default must round-trip through its written form"
        );
    }

    fn mapping(
        created: i64,
        ns: &str,
        name: &str,
        server: &str,
        proto: Proto,
        port: u16,
        accepted: bool,
    ) -> MappingCandidate {
        MappingCandidate {
            key: ObjectKey::new(created, ns, name),
            container: "web".into(),
            target: MappingTarget::Admitted {
                server: server.into(),
            },
            proto,
            public_port: port,
            accepted,
        }
    }

    fn result<'a>(out: &'a [MappingDecision], name: &str) -> &'a Result<(), MappingRefusal> {
        &out.iter().find(|d| d.key.name == name).unwrap().result
    }

    #[test]
    fn the_earliest_mapping_gets_a_free_port() {
        let out = decide_mappings(
            &PortPolicy::default(),
            &[
                mapping(2, "a", "second", "node-a", Proto::Tcp, 8080, false),
                mapping(1, "a", "first", "node-a", Proto::Tcp, 8080, false),
            ],
        );
        assert_eq!(result(&out, "first"), &Ok(()));
        let err = result(&out, "second").clone().unwrap_err();
        assert_eq!(err.reason(), "PortInUse");
        assert_eq!(
            err.to_string(),
            "server node-a: tcp/8080 is already mapped by a/first"
        );
        assert_eq!(out[0].key.name, "first", "decisions are in key order");
        assert_eq!(out[0].server.as_deref(), Some("node-a"));
    }

    #[test]
    fn an_accepted_mapping_keeps_its_port_against_an_earlier_keyed_newcomer() {
        let out = decide_mappings(
            &PortPolicy::default(),
            &[
                mapping(1, "a", "restored", "node-a", Proto::Tcp, 8080, false),
                mapping(9, "b", "live", "node-a", Proto::Tcp, 8080, true),
            ],
        );
        assert_eq!(result(&out, "live"), &Ok(()));
        assert_eq!(
            result(&out, "restored").clone().unwrap_err().to_string(),
            "server node-a: tcp/8080 is already mapped by another customer"
        );
    }

    #[test]
    fn of_two_accepted_mappings_on_one_port_the_earliest_keeps_it() {
        let out = decide_mappings(
            &PortPolicy::default(),
            &[
                mapping(2, "a", "late", "node-a", Proto::Udp, 5000, true),
                mapping(1, "a", "early", "node-a", Proto::Udp, 5000, true),
            ],
        );
        assert_eq!(result(&out, "early"), &Ok(()));
        assert!(result(&out, "late").is_err());
    }

    #[test]
    fn tcp_and_udp_on_the_same_number_and_the_same_port_on_two_servers_are_all_fine() {
        let out = decide_mappings(
            &PortPolicy::default(),
            &[
                mapping(1, "a", "tcp", "node-a", Proto::Tcp, 5353, false),
                mapping(2, "a", "udp", "node-a", Proto::Udp, 5353, false),
                mapping(3, "b", "other-server", "node-b", Proto::Tcp, 5353, false),
            ],
        );
        assert!(out.iter().all(MappingDecision::is_accepted), "{out:?}");
    }

    #[test]
    fn public_ports_outside_public_ports_are_out_of_range() {
        let reserved = PortPolicy::default();
        for port in [0, 22, 80, 1024] {
            let out = decide_mappings(
                &reserved,
                &[mapping(1, "a", "m", "n", Proto::Tcp, port, false)],
            );
            let err = out[0].result.clone().unwrap_err();
            assert_eq!(
                err,
                MappingRefusal::OutOfRange {
                    port,
                    allowed: range(1025, 65535)
                }
            );
            assert_eq!(err.reason(), "PortOutOfRange");
        }
        let narrow = PortPolicy {
            public: range(20000, 29999),
            reserved: ReservedPorts::default(),
        };
        for (port, accepted) in [(19999, false), (20000, true), (29999, true), (30000, false)] {
            let out = decide_mappings(
                &narrow,
                &[mapping(1, "a", "m", "n", Proto::Tcp, port, false)],
            );
            assert_eq!(out[0].is_accepted(), accepted, "{port}: {out:?}");
        }
        let err = narrow.refusal(8000).unwrap();
        assert_eq!(
            err.to_string(),
            "publicPort 8000 is outside the operator's publicPorts 20000-29999"
        );
        let out = decide_mappings(
            &reserved,
            &[mapping(1, "a", "m", "n", Proto::Tcp, 1025, false)],
        );
        assert!(out[0].is_accepted());
        let out = decide_mappings(
            &reserved,
            &[mapping(1, "a", "m", "n", Proto::Tcp, 65535, false)],
        );
        assert!(out[0].is_accepted());
    }

    #[test]
    fn reserved_ports_are_refused_naming_the_entry_even_when_already_accepted() {
        let out = decide_mappings(
            &PortPolicy::default(),
            &[mapping(1, "a", "m", "node-a", Proto::Tcp, 30080, true)],
        );
        let err = out[0].result.clone().unwrap_err();
        assert_eq!(err.reason(), "ReservedPort");
        assert_eq!(
            err.to_string(),
            "publicPort 30080 is reserved by the operator (reservedPorts entry 30000-32767)"
        );
    }

    #[test]
    fn a_refused_holder_releases_the_port_to_the_next_mapping() {
        let mut gone = mapping(1, "a", "gone", "node-a", Proto::Tcp, 8080, true);
        gone.target = MappingTarget::NotFound;
        let out = decide_mappings(
            &PortPolicy::default(),
            &[
                gone,
                mapping(2, "a", "next", "node-a", Proto::Tcp, 8080, false),
            ],
        );
        assert_eq!(
            result(&out, "gone").clone().unwrap_err().to_string(),
            "container web does not exist in this namespace"
        );
        assert_eq!(result(&out, "next"), &Ok(()));
    }

    #[test]
    fn the_container_must_be_admitted_on_a_server_its_customer_owns() {
        let mut not_admitted = mapping(1, "a", "na", "node-a", Proto::Tcp, 8080, false);
        not_admitted.target = MappingTarget::NotAdmitted;
        let mut not_owned = mapping(2, "a", "no", "node-a", Proto::Tcp, 8081, true);
        not_owned.target = MappingTarget::ServerNotOwned {
            server: "node-a".into(),
        };
        let out = decide_mappings(&PortPolicy::default(), &[not_admitted, not_owned]);
        let na = result(&out, "na").clone().unwrap_err();
        assert_eq!(na.reason(), "ContainerNotAdmitted");
        assert_eq!(na.to_string(), "container web is not admitted");
        let no = result(&out, "no").clone().unwrap_err();
        assert_eq!(no.reason(), "ServerNotOwned");
        assert_eq!(
            no.to_string(),
            "customer namespace a does not own server node-a"
        );
        assert!(out.iter().all(|d| d.server.is_none()));
    }

    #[test]
    fn proto_serializes_lowercase() {
        assert_eq!(Proto::Tcp.to_string(), "tcp");
        assert_eq!(Proto::Udp.to_string(), "udp");
    }

    fn candidates() -> impl Strategy<Value = Vec<MappingCandidate>> {
        let target = prop_oneof![
            6 => prop_oneof![Just("node-a"), Just("node-b")]
                .prop_map(|s| MappingTarget::Admitted { server: s.into() }),
            1 => Just(MappingTarget::NotFound),
            1 => Just(MappingTarget::NotAdmitted),
            1 => Just(MappingTarget::ServerNotOwned { server: "node-a".into() }),
        ];
        let port = prop_oneof![
            Just(80u16),
            Just(1025),
            Just(8080),
            Just(8081),
            Just(10250),
            Just(30001),
        ];
        proptest::collection::vec(
            (
                0i64..3,
                prop_oneof![Just("a"), Just("b")],
                target,
                any::<bool>(),
                port,
                any::<bool>(),
            ),
            0..14,
        )
        .prop_map(|raw| {
            raw.into_iter()
                .enumerate()
                .map(
                    |(i, (created, ns, target, udp, public_port, accepted))| MappingCandidate {
                        key: ObjectKey::new(created, ns, format!("m{i}")),
                        container: "web".into(),
                        target,
                        proto: if udp { Proto::Udp } else { Proto::Tcp },
                        public_port,
                        accepted,
                    },
                )
                .collect()
        })
    }

    fn rerun(input: &[MappingCandidate], out: &[MappingDecision]) -> Vec<MappingCandidate> {
        input
            .iter()
            .map(|m| MappingCandidate {
                accepted: out.iter().find(|d| d.key == m.key).unwrap().is_accepted(),
                ..m.clone()
            })
            .collect()
    }

    proptest! {
        #[test]
        fn never_two_accepted_owners_of_one_server_proto_port(input in candidates()) {
            let out = decide_mappings(&PortPolicy::default(), &input);
            let mut slots = BTreeSet::new();
            for (d, m) in out.iter().zip({
                let mut sorted: Vec<&MappingCandidate> = input.iter().collect();
                sorted.sort();
                sorted
            }) {
                prop_assert_eq!(&d.key, &m.key);
                if d.is_accepted() {
                    prop_assert!(m.public_port >= MIN_PUBLIC_PORT);
                    prop_assert!(!ReservedPorts::default().contains(m.public_port));
                    prop_assert!(
                        slots.insert((d.server.clone().unwrap(), m.proto, m.public_port)),
                        "two owners of {:?}/{}/{}", d.server, m.proto, m.public_port
                    );
                }
            }
        }

        #[test]
        fn every_contested_slot_has_exactly_one_owner_and_accepted_ones_are_not_robbed(
            input in candidates(),
        ) {
            let out = decide_mappings(&PortPolicy::default(), &input);
            for m in &input {
                let d = out.iter().find(|d| d.key == m.key).unwrap();
                let Err(MappingRefusal::PortInUse { holder, .. }) = &d.result else { continue };
                let h = input.iter().find(|x| &x.key == holder).unwrap();
                prop_assert!(out.iter().find(|d| &d.key == holder).unwrap().is_accepted());
                // The holder was accepted already, or neither was and the holder is earlier.
                prop_assert!(h.accepted && (!m.accepted || h.key < m.key) || (!m.accepted && h.key < m.key));
            }
        }

        #[test]
        fn the_input_order_does_not_matter(
            (input, shuffled) in candidates().prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
        ) {
            let reserved = PortPolicy::default();
            prop_assert_eq!(decide_mappings(&reserved, &input), decide_mappings(&reserved, &shuffled));
        }

        #[test]
        fn deciding_the_output_again_changes_nothing(input in candidates()) {
            let reserved = PortPolicy::default();
            let first = decide_mappings(&reserved, &input);
            let second = decide_mappings(&reserved, &rerun(&input, &first));
            prop_assert_eq!(first, second);
        }

        #[test]
        fn any_valid_range_round_trips_through_its_text(start in 1u16.., len in 0u16..) {
            let end = start.saturating_add(len);
            let r = range(start, end);
            prop_assert_eq!(r.to_string().parse::<PortRange>(), Ok(r));
        }
    }
}
