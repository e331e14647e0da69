//! Reserved ports and port-mapping conflicts.
//!
//! A PortMapping forwards `<server address>:<publicPort>/<proto>` to a container. The public
//! address is the server's own, shared by every customer on it and by the node's Kubernetes
//! services, so two rules protect it:
//!
//! - ports the node itself needs ([`ReservedPorts`]) are never forwarded: a forward would
//!   capture their traffic;
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
/// (and binding them needs privileges customers do not get).
pub const MIN_PUBLIC_PORT: u16 = 1025;

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

impl Default for ReservedPorts {
    /// The NodePort range and the ports Kubernetes components listen on:
    ///
    /// - `30000-32767`: the NodePort range; kube-proxy answers Service NodePorts there.
    /// - `10250`: the kubelet API (exec, logs, metrics); a forward would cut the API server off
    ///   from the node's Pods.
    /// - `10255`: the kubelet's read-only port (disabled by many distributions, still reserved
    ///   so enabling it never collides with a customer).
    /// - `10256`: kube-proxy's health check, which cloud load balancers probe.
    /// - `10249`: kube-proxy's metrics (loopback by default, but commonly opened to all
    ///   addresses for Prometheus).
    /// - `10257`: kube-controller-manager's secure port, when the server is a control-plane node.
    /// - `10259`: kube-scheduler's secure port, likewise.
    fn default() -> Self {
        let entries = [
            (30000, 32767),
            (10250, 10250),
            (10255, 10255),
            (10256, 10256),
            (10249, 10249),
            (10257, 10257),
            (10259, 10259),
        ];
        let mut ranges: Vec<PortRange> = entries
            .iter()
            .map(|&(start, end)| PortRange { start, end })
            .collect();
        ranges.sort();
        Self { ranges }
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
    /// `publicPort` below [`MIN_PUBLIC_PORT`].
    #[error("publicPort {port} is outside the range {MIN_PUBLIC_PORT}-65535")]
    OutOfRange {
        /// `spec.publicPort`.
        port: u16,
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
pub fn decide_mappings(
    reserved: &ReservedPorts,
    mappings: &[MappingCandidate],
) -> Vec<MappingDecision> {
    let mut ordered: Vec<&MappingCandidate> = mappings.iter().collect();
    ordered.sort();

    let mut results: Vec<Result<(), MappingRefusal>> =
        ordered.iter().map(|m| own_rules(reserved, m)).collect();

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
fn own_rules(reserved: &ReservedPorts, m: &MappingCandidate) -> Result<(), MappingRefusal> {
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
    if m.public_port < MIN_PUBLIC_PORT {
        return Err(MappingRefusal::OutOfRange {
            port: m.public_port,
        });
    }
    if let Some(entry) = reserved.reserving(m.public_port) {
        return Err(MappingRefusal::ReservedPort {
            port: m.public_port,
            entry,
        });
    }
    Ok(())
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
    fn default_reserves_nodeports_and_the_kubelet_and_kube_proxy_ports() {
        let reserved = ReservedPorts::default();
        for port in [
            30000, 31000, 32767, 10249, 10250, 10255, 10256, 10257, 10259,
        ] {
            assert!(reserved.contains(port), "{port}");
        }
        for port in [29999, 32768, 10248, 10251, 10258, 8080] {
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
            &ReservedPorts::default(),
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
            &ReservedPorts::default(),
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
            &ReservedPorts::default(),
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
            &ReservedPorts::default(),
            &[
                mapping(1, "a", "tcp", "node-a", Proto::Tcp, 5353, false),
                mapping(2, "a", "udp", "node-a", Proto::Udp, 5353, false),
                mapping(3, "b", "other-server", "node-b", Proto::Tcp, 5353, false),
            ],
        );
        assert!(out.iter().all(MappingDecision::is_accepted), "{out:?}");
    }

    #[test]
    fn public_ports_below_1025_are_out_of_range() {
        let reserved = ReservedPorts::default();
        for port in [0, 22, 80, 1024] {
            let out = decide_mappings(
                &reserved,
                &[mapping(1, "a", "m", "n", Proto::Tcp, port, false)],
            );
            let err = out[0].result.clone().unwrap_err();
            assert_eq!(err, MappingRefusal::OutOfRange { port });
            assert_eq!(err.reason(), "PortOutOfRange");
        }
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
            &ReservedPorts::default(),
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
            &ReservedPorts::default(),
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
        let out = decide_mappings(&ReservedPorts::default(), &[not_admitted, not_owned]);
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
            let out = decide_mappings(&ReservedPorts::default(), &input);
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
            let out = decide_mappings(&ReservedPorts::default(), &input);
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
            let reserved = ReservedPorts::default();
            prop_assert_eq!(decide_mappings(&reserved, &input), decide_mappings(&reserved, &shuffled));
        }

        #[test]
        fn deciding_the_output_again_changes_nothing(input in candidates()) {
            let reserved = ReservedPorts::default();
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
