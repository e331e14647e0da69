//! Rendering of a [`ForwardingRuleset`] as one nftables transaction for `table ip uwsgi_it`.
//!
//! The agent owns exactly this table and nothing else: the transaction starts with
//! `add table; delete table; add table` and then recreates every object, so the kernel swaps the
//! old table for the new one atomically (packets see either the old or the new rules, never a
//! half-built table) and other tables (kube-proxy, Docker, the admin's firewall) are never read
//! or written. A plain `flush table` would not do: it empties chains but keeps set and map
//! elements and cannot change a base chain's hook or priority, so stale mappings would survive.
//! Established connections are unaffected by the swap: their NAT bindings live in conntrack.
//!
//! Rendered ruleset (text form of what the JSON says):
//!
//! ```text
//! table ip uwsgi_it {
//!   set public_addresses { type ipv4_addr }
//!   set masquerade_sources { type ipv4_addr; flags interval }
//!   map forward_addresses { type inet_proto . inet_service : ipv4_addr }
//!   map forward_ports { type inet_proto . inet_service : inet_service }
//!   chain prerouting { type nat hook prerouting priority dstnat
//!     ip daddr @public_addresses dnat to meta l4proto . th dport map @forward_addresses : meta l4proto . th dport map @forward_ports }
//!   chain output { type nat hook output priority -100
//!     ip daddr @public_addresses dnat to ... (same) }
//!   chain postrouting { type nat hook postrouting priority srcnat
//!     ct status dnat ct original ip daddr @public_addresses fib saddr type local masquerade
//!     ct status dnat ct original ip daddr @public_addresses ip saddr @masquerade_sources masquerade }
//! }
//! ```
//!
//! Why two maps instead of one `inet_proto . inet_service : ipv4_addr . inet_service` map: nft
//! 1.0.6 (Debian 12) cannot read a map with concatenated *data* from JSON (it silently creates a
//! set, and the DNAT rule using it crashes the parser). Two maps with the same key cost two hash
//! lookups per packet, still independent of the number of mappings, and stay expressible with the
//! `nftables` crate's schema types, so no text rendering is needed.
//!
//! Between full writes, [`incremental_transaction`] turns a [`RulesetDiff`] into one transaction
//! of `delete element` / `add element` commands on the two maps and two sets (deletions first, so
//! a changed target or a regrown masquerade range is a delete plus an add of the same key). It
//! never touches chains or rules, costs the same at 10 or 10,000 mappings, and fails as a whole
//! (nothing applied) when the table is not what the diff assumes: a missing table or element
//! (`ENOENT`) or an element already present (`EEXIST`); the agent then falls back to a full
//! rewrite.
//!
//! The text form is also what [`inspect_listing`] expects back from `nft -j list table`: the
//! objects are built in the exact shape nft prints them, so "in sync" is a structural equality
//! (ignoring handles and element order), not a heuristic.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use nftables::expr::{
    CT, CTDir, Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload,
    PayloadField, Prefix, Range,
};
use nftables::schema::{
    Chain, Element, Map, NfCmd, NfListObject, NfObject, Nftables, Rule, Set, SetFlag, SetType,
    SetTypeValue, Table,
};
use nftables::stmt::{Match, NAT, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde_json::Value;

use super::{Forward, ForwardingRuleset, Ipv4Range, Protocol, RulesetDiff};

/// The only table the agent ever writes.
pub const TABLE: &str = "uwsgi_it";
pub const PUBLIC_ADDRESSES_SET: &str = "public_addresses";
pub const MASQUERADE_SOURCES_SET: &str = "masquerade_sources";
pub const FORWARD_ADDRESSES_MAP: &str = "forward_addresses";
pub const FORWARD_PORTS_MAP: &str = "forward_ports";
pub const PREROUTING_CHAIN: &str = "prerouting";
pub const OUTPUT_CHAIN: &str = "output";
pub const POSTROUTING_CHAIN: &str = "postrouting";

/// Standard NAT priorities (`dstnat` = -100, `srcnat` = 100), spelled as numbers because that
/// is how nft lists them.
const DSTNAT_PRIORITY: i32 = -100;
const SRCNAT_PRIORITY: i32 = 100;

fn table() -> Table<'static> {
    Table {
        family: NfFamily::IP,
        name: TABLE.into(),
        handle: None,
    }
}

fn string(text: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(text.into()))
}

fn set_reference(name: &str) -> Expression<'static> {
    string(format!("@{name}"))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

/// `meta l4proto . th dport`: the forwarding key of a packet, whatever its transport protocol.
fn forwarding_key() -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![
        Expression::Named(NamedExpression::Meta(Meta {
            key: MetaKey::L4proto,
        })),
        payload("th", "dport"),
    ]))
}

fn map_lookup(map: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Map(Box::new(nftables::expr::Map {
        key: forwarding_key(),
        data: set_reference(map),
    })))
}

fn forward_address_element(forward: &Forward) -> Expression<'static> {
    Expression::List(vec![
        forward_key_element(forward),
        string(forward.target.ip().to_string()),
    ])
}

fn forward_port_element(forward: &Forward) -> Expression<'static> {
    Expression::List(vec![
        forward_key_element(forward),
        Expression::Number(u32::from(forward.target.port())),
    ])
}

fn forward_key_element(forward: &Forward) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![
        string(forward.protocol.as_str()),
        Expression::Number(u32::from(forward.public_port)),
    ]))
}

fn nat_chain(name: &'static str, hook: NfHook, priority: i32) -> Chain<'static> {
    Chain {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: name.into(),
        _type: Some(NfChainType::NAT),
        hook: Some(hook),
        prio: Some(priority),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }
}

fn rule(chain: &'static str, statements: Vec<Statement<'static>>) -> Rule<'static> {
    Rule {
        family: NfFamily::IP,
        table: TABLE.into(),
        chain: chain.into(),
        expr: statements.into(),
        ..Rule::default()
    }
}

fn non_empty(elements: Vec<Expression<'static>>) -> Option<Cow<'static, [Expression<'static>]>> {
    // nft omits `elem` for an empty set in its listing; rendering the same keeps the
    // listing comparison exact.
    (!elements.is_empty()).then(|| elements.into())
}

fn masquerade_source_element(range: &Ipv4Range) -> Expression<'static> {
    // The shape nft lists an interval element in: a single address, else an aligned prefix,
    // else a range.
    if range.first == range.last {
        string(range.first.to_string())
    } else if let Some(cidr) = range.as_cidr() {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(string(cidr.network().to_string())),
            len: u32::from(cidr.prefix_len()),
        }))
    } else {
        Expression::Range(Box::new(Range {
            range: [
                string(range.first.to_string()),
                string(range.last.to_string()),
            ],
        }))
    }
}

fn dnat_rule(chain: &'static str) -> Rule<'static> {
    rule(
        chain,
        vec![
            matches(
                payload("ip", "daddr"),
                Operator::EQ,
                set_reference(PUBLIC_ADDRESSES_SET),
            ),
            Statement::DNAT(Some(NAT {
                addr: Some(map_lookup(FORWARD_ADDRESSES_MAP)),
                family: None,
                port: Some(map_lookup(FORWARD_PORTS_MAP)),
                flags: None,
            })),
        ],
    )
}

/// `ct status dnat ct original ip daddr @public_addresses`: a connection this table DNATed.
/// Matching the original destination keeps the masquerade away from anyone else's DNAT.
fn dnated_by_us() -> Vec<Statement<'static>> {
    vec![
        matches(
            Expression::Named(NamedExpression::CT(CT {
                key: "status".into(),
                family: None,
                dir: None,
            })),
            Operator::IN,
            string("dnat"),
        ),
        matches(
            Expression::Named(NamedExpression::CT(CT {
                key: "ip daddr".into(),
                family: None,
                dir: Some(CTDir::Original),
            })),
            Operator::EQ,
            set_reference(PUBLIC_ADDRESSES_SET),
        ),
    ]
}

/// Every object of the table, in the shape `nft -j list table ip uwsgi_it` prints them
/// (without handles).
pub fn table_objects(ruleset: &ForwardingRuleset) -> Vec<NfListObject<'static>> {
    let forward_key_type =
        SetTypeValue::Concatenated(vec![SetType::InetProto, SetType::InetService].into());

    let public_addresses = Set {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: PUBLIC_ADDRESSES_SET.into(),
        handle: None,
        set_type: SetTypeValue::Single(SetType::Ipv4Addr),
        policy: None,
        flags: None,
        elem: non_empty(
            ruleset
                .public_addresses()
                .iter()
                .map(|a| string(a.to_string()))
                .collect(),
        ),
        timeout: None,
        gc_interval: None,
        size: None,
        comment: None,
    };
    let masquerade_sources = Set {
        name: MASQUERADE_SOURCES_SET.into(),
        flags: Some(HashSet::from([SetFlag::Interval])),
        elem: non_empty(
            ruleset
                .masquerade_sources()
                .iter()
                .map(masquerade_source_element)
                .collect(),
        ),
        ..public_addresses.clone()
    };
    let forward_addresses = Map {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: FORWARD_ADDRESSES_MAP.into(),
        handle: None,
        set_type: forward_key_type.clone(),
        map: SetTypeValue::Single(SetType::Ipv4Addr),
        policy: None,
        flags: None,
        elem: non_empty(
            ruleset
                .forwards()
                .iter()
                .map(forward_address_element)
                .collect(),
        ),
        timeout: None,
        gc_interval: None,
        size: None,
        comment: None,
    };
    let forward_ports = Map {
        name: FORWARD_PORTS_MAP.into(),
        map: SetTypeValue::Single(SetType::InetService),
        elem: non_empty(
            ruleset
                .forwards()
                .iter()
                .map(forward_port_element)
                .collect(),
        ),
        ..forward_addresses.clone()
    };

    // Node-local clients: the kernel picked a local source address for a local destination;
    // after DNAT the packet leaves towards the container with that source, which the container
    // may not route back through this node (127.0.0.1 with route_localnet, an address of another
    // interface, policy routing). Masquerading to the address facing the container guarantees
    // the reply comes back here to be un-DNATed. Only local-origin connections pay for it.
    let mut local_source = dnated_by_us();
    local_source.push(matches(
        Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Type,
            flags: HashSet::from([FibFlag::Saddr]),
        })),
        Operator::EQ,
        string("local"),
    ));
    local_source.push(Statement::Masquerade(None));

    // Hairpin: a container connecting to a public address of its own node. Without SNAT the
    // target sees the container's own address as source and answers it directly (over the
    // bridge, or through its own loopback when it is the target itself), bypassing this node,
    // so the reply is never un-DNATed and the client drops it. Masquerading makes the reply
    // return through the node. External clients are not masqueraded: containers see their
    // real address.
    let mut container_source = dnated_by_us();
    container_source.push(matches(
        payload("ip", "saddr"),
        Operator::EQ,
        set_reference(MASQUERADE_SOURCES_SET),
    ));
    container_source.push(Statement::Masquerade(None));

    vec![
        NfListObject::Table(table()),
        NfListObject::Set(Box::new(public_addresses)),
        NfListObject::Set(Box::new(masquerade_sources)),
        NfListObject::Map(Box::new(forward_addresses)),
        NfListObject::Map(Box::new(forward_ports)),
        NfListObject::Chain(nat_chain(
            PREROUTING_CHAIN,
            NfHook::Prerouting,
            DSTNAT_PRIORITY,
        )),
        // Locally generated packets skip prerouting; the output hook is where they are DNATed.
        NfListObject::Chain(nat_chain(OUTPUT_CHAIN, NfHook::Output, DSTNAT_PRIORITY)),
        NfListObject::Chain(nat_chain(
            POSTROUTING_CHAIN,
            NfHook::Postrouting,
            SRCNAT_PRIORITY,
        )),
        NfListObject::Rule(dnat_rule(PREROUTING_CHAIN)),
        NfListObject::Rule(dnat_rule(OUTPUT_CHAIN)),
        NfListObject::Rule(rule(POSTROUTING_CHAIN, local_source)),
        NfListObject::Rule(rule(POSTROUTING_CHAIN, container_source)),
    ]
}

/// The whole table as one transaction for `nft -j -f -`: create-if-missing, delete, recreate.
pub fn transaction(ruleset: &ForwardingRuleset) -> Nftables<'static> {
    let mut commands = vec![
        // `add` first so the `delete` cannot fail on a host where the table does not exist yet.
        NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
        NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table()))),
    ];
    commands.extend(
        table_objects(ruleset)
            .into_iter()
            .map(|object| NfObject::CmdObject(NfCmd::Add(object))),
    );
    Nftables {
        objects: commands.into(),
    }
}

/// The transaction that removes the agent's table (and with it every rule, set and map of it);
/// run only when the table exists. Other tables are not touched.
pub fn cleanup_json() -> String {
    let batch = Nftables {
        objects: Cow::Owned(vec![NfObject::CmdObject(NfCmd::Delete(
            NfListObject::Table(table()),
        ))]),
    };
    serde_json::to_string(&batch).expect("an nftables batch serializes")
}

/// [`transaction`] serialised for `nft -j -f -`.
pub fn transaction_json(ruleset: &ForwardingRuleset) -> String {
    serde_json::to_string(&transaction(ruleset)).expect("nftables schema types always serialise")
}

/// `add`/`delete element` of `elements` in set or map `name`, or nothing when there are none
/// (nft refuses an empty element list).
fn element_command(
    command: fn(NfListObject<'static>) -> NfCmd<'static>,
    name: &'static str,
    elements: Vec<Expression<'static>>,
) -> Option<NfObject<'static>> {
    (!elements.is_empty()).then(|| {
        NfObject::CmdObject(command(NfListObject::Element(Element {
            family: NfFamily::IP,
            table: TABLE.into(),
            name: name.into(),
            elem: elements.into(),
        })))
    })
}

/// The difference as one transaction of element operations on the installed table: every
/// deletion, then every addition. `None` when the diff is empty (nothing to write).
pub fn incremental_transaction(diff: &RulesetDiff) -> Option<Nftables<'static>> {
    let keys = |forwards: &[Forward]| forwards.iter().map(forward_key_element).collect();
    let addresses =
        |addresses: &[Ipv4Addr]| addresses.iter().map(|a| string(a.to_string())).collect();
    let ranges = |ranges: &[Ipv4Range]| ranges.iter().map(masquerade_source_element).collect();
    let commands: Vec<NfObject<'static>> = [
        element_command(
            NfCmd::Delete,
            PUBLIC_ADDRESSES_SET,
            addresses(&diff.removed_addresses),
        ),
        element_command(
            NfCmd::Delete,
            FORWARD_ADDRESSES_MAP,
            keys(&diff.removed_forwards),
        ),
        element_command(
            NfCmd::Delete,
            FORWARD_PORTS_MAP,
            keys(&diff.removed_forwards),
        ),
        element_command(
            NfCmd::Delete,
            MASQUERADE_SOURCES_SET,
            ranges(&diff.removed_masquerade_sources),
        ),
        element_command(
            NfCmd::Add,
            MASQUERADE_SOURCES_SET,
            ranges(&diff.added_masquerade_sources),
        ),
        element_command(
            NfCmd::Add,
            FORWARD_ADDRESSES_MAP,
            diff.added_forwards
                .iter()
                .map(forward_address_element)
                .collect(),
        ),
        element_command(
            NfCmd::Add,
            FORWARD_PORTS_MAP,
            diff.added_forwards
                .iter()
                .map(forward_port_element)
                .collect(),
        ),
        element_command(
            NfCmd::Add,
            PUBLIC_ADDRESSES_SET,
            addresses(&diff.added_addresses),
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    (!commands.is_empty()).then(|| Nftables {
        objects: commands.into(),
    })
}

/// [`incremental_transaction`] serialised for `nft -j -f -`.
pub fn incremental_transaction_json(diff: &RulesetDiff) -> Option<String> {
    incremental_transaction(diff).map(|transaction| {
        serde_json::to_string(&transaction).expect("nftables schema types always serialise")
    })
}

/// What the kernel holds, compared with the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftInspection {
    /// `None` when the table is exactly the rendered one; else the first difference found.
    pub difference: Option<String>,
    /// The public addresses and forwards found in the table (empty if it is missing).
    /// `container_networks` cannot be recovered from the merged masquerade set and is left
    /// empty; it plays no part in conntrack cleanup.
    pub installed: ForwardingRuleset,
}

impl NftInspection {
    pub fn in_sync(&self) -> bool {
        self.difference.is_none()
    }
}

/// Why an `nft -j list` output could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ListingError {
    #[error("nft listing is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("nft listing has no top-level \"nftables\" array")]
    Shape,
}

/// Comparable form of one listed object: kind, name, body without handle, elements sorted.
fn normalise(object: &Value) -> Option<(String, String)> {
    /// A body field as compared: as it is, or (`elem`) its elements in a canonical order.
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Field<'a> {
        Plain(&'a Value),
        Sorted(Vec<&'a Value>),
    }
    let (kind, body) = object.as_object()?.iter().next()?;
    if kind == "metainfo" {
        return None;
    }
    let label = match (kind.as_str(), body.get("name"), body.get("chain")) {
        (_, Some(Value::String(name)), _) => format!("{kind} {name}"),
        ("rule", _, Some(Value::String(chain))) => format!("rule in chain {chain}"),
        _ => kind.clone(),
    };
    // Borrowed, not cloned: a big table's maps are megabytes. Keys sorted (a BTreeMap), the
    // handle left out, elements sorted: the same text for the same content on both sides.
    let text = match body.as_object() {
        Some(fields) => {
            let canonical: BTreeMap<&str, Field<'_>> = fields
                .iter()
                .filter(|(name, _)| name.as_str() != "handle")
                .map(|(name, value)| {
                    let field = match (name.as_str(), value) {
                        ("elem", Value::Array(elements)) => {
                            let mut sorted: Vec<&Value> = elements.iter().collect();
                            sorted.sort_by_cached_key(|e| e.to_string());
                            Field::Sorted(sorted)
                        }
                        _ => Field::Plain(value),
                    };
                    (name.as_str(), field)
                })
                .collect();
            serde_json::to_string(&canonical).expect("JSON values serialise")
        }
        None => body.to_string(),
    };
    Some((label, format!("{kind}:{text}")))
}

/// Compares `nft -j list table ip uwsgi_it` output with the rendering of `desired`.
///
/// Pass `None` when the table does not exist (nft exits with an error in that case).
pub fn inspect_listing(
    desired: &ForwardingRuleset,
    listing_json: Option<&str>,
) -> Result<NftInspection, ListingError> {
    inspect_listing_against(desired, &ExpectedListing::of(desired), listing_json)
}

/// What [`inspect_listing`] compares a listing with: `desired` rendered and normalised, which
/// costs as much as reading the listing; the agent keeps it while `desired` does not change, so
/// a periodic resync pays only for the read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedListing {
    /// Normalised object text → (label for messages, how many times).
    wanted: BTreeMap<String, (String, usize)>,
}

impl ExpectedListing {
    pub fn of(desired: &ForwardingRuleset) -> ExpectedListing {
        let mut wanted: BTreeMap<String, (String, usize)> = BTreeMap::new();
        for object in table_objects(desired)
            .iter()
            .map(|o| serde_json::to_value(o).expect("nftables schema types always serialise"))
        {
            if let Some((label, text)) = normalise(&object) {
                wanted.entry(text).or_insert((label, 0)).1 += 1;
            }
        }
        ExpectedListing { wanted }
    }
}

/// [`inspect_listing`] with `expected` = `ExpectedListing::of(desired)` already made.
pub fn inspect_listing_against(
    desired: &ForwardingRuleset,
    expected: &ExpectedListing,
    listing_json: Option<&str>,
) -> Result<NftInspection, ListingError> {
    // Owned all the way: the listing of a big table is megabytes, copied nowhere.
    let listed: Vec<Value> = match listing_json {
        None => Vec::new(),
        Some(text) => {
            let mut document: Value = serde_json::from_str(text)?;
            match document.get_mut("nftables").map(Value::take) {
                Some(Value::Array(objects)) => objects,
                _ => return Err(ListingError::Shape),
            }
        }
    };
    if listed.is_empty() {
        return Ok(NftInspection {
            difference: Some(format!("table ip {TABLE} is missing")),
            installed: installed_ruleset(&listed),
        });
    }

    let wanted = &expected.wanted;
    let mut present: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for (label, text) in listed.iter().filter_map(normalise) {
        present.entry(text).or_insert((label, 0)).1 += 1;
    }
    let difference = wanted
        .iter()
        .find(|(text, (_, count))| present.get(*text).map(|p| p.1) != Some(*count))
        .map(|(_, (label, _))| format!("{label} is missing or differs"))
        .or_else(|| {
            present
                .iter()
                .find(|(text, _)| !wanted.contains_key(*text))
                .map(|(_, (label, _))| format!("unexpected {label}"))
        });
    // What is installed is needed only to clean conntrack after a rewrite: read it only then.
    let installed = match difference {
        Some(_) => installed_ruleset(&listed),
        None => desired.clone(),
    };
    Ok(NftInspection {
        difference,
        installed,
    })
}

fn map_elements<'v>(listed: &'v [Value], kind: &str, name: &str) -> Vec<&'v Value> {
    listed
        .iter()
        .filter_map(|o| o.get(kind))
        .filter(|body| body.get("name").and_then(Value::as_str) == Some(name))
        .filter_map(|body| body.get("elem").and_then(Value::as_array))
        .flatten()
        .collect()
}

fn parse_forward_key(key: &Value) -> Option<(Protocol, u16)> {
    let parts = key.get("concat")?.as_array()?;
    let protocol = Protocol::from_name(parts.first()?.as_str()?)?;
    let port = u16::try_from(parts.get(1)?.as_u64()?).ok()?;
    Some((protocol, port))
}

/// Best-effort reading of the forwards a (possibly tampered) table holds; anything it cannot
/// read is skipped, which at worst causes an extra conntrack cleanup.
fn installed_ruleset(listed: &[Value]) -> ForwardingRuleset {
    let public_addresses: BTreeSet<Ipv4Addr> = map_elements(listed, "set", PUBLIC_ADDRESSES_SET)
        .into_iter()
        .filter_map(|e| e.as_str()?.parse().ok())
        .collect();
    let pair = |element: &Value| -> Option<((Protocol, u16), Value)> {
        let pair = element.as_array()?;
        Some((parse_forward_key(pair.first()?)?, pair.get(1)?.clone()))
    };
    let addresses: BTreeMap<(Protocol, u16), Ipv4Addr> =
        map_elements(listed, "map", FORWARD_ADDRESSES_MAP)
            .into_iter()
            .filter_map(pair)
            .filter_map(|(key, value)| Some((key, value.as_str()?.parse().ok()?)))
            .collect();
    let ports: BTreeMap<(Protocol, u16), u16> = map_elements(listed, "map", FORWARD_PORTS_MAP)
        .into_iter()
        .filter_map(pair)
        .filter_map(|(key, value)| Some((key, u16::try_from(value.as_u64()?).ok()?)))
        .collect();
    let forwards = addresses
        .into_iter()
        .filter_map(|((protocol, public_port), address)| {
            let port = *ports.get(&(protocol, public_port))?;
            Some(Forward::new(
                protocol,
                public_port,
                SocketAddrV4::new(address, port),
            ))
        })
        .collect();
    ForwardingRuleset {
        public_addresses: public_addresses.into_iter().collect(),
        container_networks: Vec::new(),
        forwards,
    }
}
