//! Real traffic through both forwarding backends, inside throwaway network namespaces
//! (see `uwsgi_it_testbed::netns::ForwardingTopology`). Needs root.
//!
//! Each test builds its own topology, so tests run in parallel and clean up on failure (the
//! namespaces are deleted when the topology drops, also while a failed test unwinds).

use std::net::SocketAddrV4;
use std::time::Duration;

use uwsgi_it_agent::forwarding::{CommandScope, ForwardingBackend, IptablesBackend, NftBackend};
use uwsgi_it_domain::forwarding::{Forward, ForwardingRuleset, Protocol};
use uwsgi_it_testbed::netns::{
    CLIENT_ADDRESS, CONTAINER_ADDRESS, CONTAINER_NETWORK, EchoServer, ForwardingTopology,
    NODE_CONTAINER_GATEWAY, NODE_PUBLIC_ADDRESS, TcpSession, UdpFlow, tcp_echo_server,
    tcp_exchange, udp_echo_server,
};

/// Generous bound for traffic that must get through; it only matters when a test fails.
const PATIENCE: Duration = Duration::from_secs(3);
/// Bound for traffic that must *not* get through (an ICMP refusal usually ends it sooner).
const REFUSAL_PATIENCE: Duration = Duration::from_millis(700);

const PUBLIC_PORT: u16 = 9000;
const PRIVATE_PORT: u16 = 8000;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Nft,
    Iptables,
}

fn backend(kind: Kind, topology: &ForwardingTopology) -> Box<dyn ForwardingBackend> {
    let scope = CommandScope::Netns(topology.node.name().to_owned());
    match kind {
        Kind::Nft => Box::new(NftBackend::new(scope)),
        Kind::Iptables => Box::new(IptablesBackend::new(scope)),
    }
}

fn public(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(NODE_PUBLIC_ADDRESS, port)
}

fn ruleset(forwards: &[(Protocol, u16, u16)]) -> ForwardingRuleset {
    ForwardingRuleset::new(
        [NODE_PUBLIC_ADDRESS],
        [CONTAINER_NETWORK.parse().unwrap()],
        forwards
            .iter()
            .map(|&(protocol, public_port, private_port)| {
                Forward::new(
                    protocol,
                    public_port,
                    SocketAddrV4::new(CONTAINER_ADDRESS, private_port),
                )
            }),
    )
    .unwrap()
}

fn both_on_9000() -> ForwardingRuleset {
    ruleset(&[
        (Protocol::Tcp, PUBLIC_PORT, PRIVATE_PORT),
        (Protocol::Udp, PUBLIC_PORT, PRIVATE_PORT),
    ])
}

struct Servers {
    _tcp: EchoServer,
    _udp: EchoServer,
}

fn container_servers(topology: &ForwardingTopology) -> Servers {
    let address = SocketAddrV4::new(CONTAINER_ADDRESS, PRIVATE_PORT);
    Servers {
        _tcp: tcp_echo_server(&topology.container, address).unwrap(),
        _udp: udp_echo_server(&topology.container, address).unwrap(),
    }
}

fn flush_everything(kind: Kind, topology: &ForwardingTopology) {
    match kind {
        Kind::Nft => topology.node.run("nft", &["flush", "ruleset"]).unwrap(),
        Kind::Iptables => topology.node.run("iptables", &["-t", "nat", "-F"]).unwrap(),
    };
}

fn traffic_reaches_the_container_from_everywhere(kind: Kind) {
    let topology = ForwardingTopology::create().unwrap();
    let _servers = container_servers(&topology);
    let backend = backend(kind, &topology);
    let desired = both_on_9000();

    assert!(!backend.is_in_sync(&desired).unwrap());
    let report = backend.apply(&desired).unwrap();
    assert!(report.rewritten && report.forwards == 2, "{report:?}");
    assert!(
        backend.is_in_sync(&desired).unwrap(),
        "{:?}",
        backend.inspect(&desired).unwrap()
    );
    let again = backend.apply(&desired).unwrap();
    assert!(
        !again.rewritten,
        "an unchanged state must not be rewritten: {again:?}"
    );

    // External client: its own address reaches the container (no masquerade).
    let external = format!("from {CLIENT_ADDRESS}");
    let reply = tcp_exchange(&topology.client, public(PUBLIC_PORT), "tcp", PATIENCE).unwrap();
    assert_eq!(reply, format!("tcp {external}"));
    let flow = UdpFlow::open(&topology.client, public(PUBLIC_PORT), PATIENCE).unwrap();
    assert_eq!(flow.exchange("udp").unwrap(), format!("udp {external}"));

    // Node-local client and hairpin (the container reaching its own public port): masqueraded
    // to the node's address on the container network, so replies come back through the node.
    let masqueraded = format!("from {NODE_CONTAINER_GATEWAY}");
    for (who, netns) in [("node", &topology.node), ("hairpin", &topology.container)] {
        let reply = tcp_exchange(netns, public(PUBLIC_PORT), who, PATIENCE)
            .unwrap_or_else(|e| panic!("{who} over tcp: {e}"));
        assert_eq!(reply, format!("{who} {masqueraded}"));
        let flow = UdpFlow::open(netns, public(PUBLIC_PORT), PATIENCE).unwrap();
        let reply = flow
            .exchange(who)
            .unwrap_or_else(|e| panic!("{who} over udp: {e}"));
        assert_eq!(reply, format!("{who} {masqueraded}"));
    }

    // Ports that are not forwarded stay closed.
    assert!(tcp_exchange(&topology.client, public(9001), "x", REFUSAL_PATIENCE).is_err());
}

fn removing_a_mapping_stops_new_and_ongoing_traffic(kind: Kind) {
    let topology = ForwardingTopology::create().unwrap();
    let _servers = container_servers(&topology);
    let backend = backend(kind, &topology);

    // A UDP flow that starts before its forward exists gets an un-NATed conntrack entry; the
    // apply that adds the forward must clear it, or the flow would never reach the container.
    let flow = UdpFlow::open(&topology.client, public(PUBLIC_PORT), REFUSAL_PATIENCE).unwrap();
    assert!(flow.exchange("too early").is_err());
    let report = backend.apply(&both_on_9000()).unwrap();
    assert_eq!(report.cleared_udp_flows.len(), 1, "{report:?}");
    assert!(report.conntrack_failures.is_empty(), "{report:?}");
    assert!(
        flow.exchange("on time")
            .unwrap()
            .starts_with("on time from ")
    );

    let report = backend.apply(&ruleset(&[])).unwrap();
    assert!(report.rewritten, "{report:?}");
    assert_eq!(report.cleared_udp_flows.len(), 1, "{report:?}");
    assert!(report.conntrack_entries_deleted >= 1, "{report:?}");
    assert!(
        flow.exchange("after removal").is_err(),
        "the ongoing UDP flow must stop with its forward"
    );
    assert!(tcp_exchange(&topology.client, public(PUBLIC_PORT), "x", REFUSAL_PATIENCE).is_err());
    assert!(backend.is_in_sync(&ruleset(&[])).unwrap());
}

fn drift_is_detected_and_repaired(kind: Kind) {
    let topology = ForwardingTopology::create().unwrap();
    let _servers = container_servers(&topology);
    let backend = backend(kind, &topology);
    let desired = both_on_9000();
    backend.apply(&desired).unwrap();
    tcp_exchange(&topology.client, public(PUBLIC_PORT), "before", PATIENCE).unwrap();

    flush_everything(kind, &topology);
    assert!(tcp_exchange(&topology.client, public(PUBLIC_PORT), "x", REFUSAL_PATIENCE).is_err());
    let inspection = backend.inspect(&desired).unwrap();
    assert!(
        inspection.difference.is_some(),
        "drift must be detected: {inspection:?}"
    );

    let report = backend.apply(&desired).unwrap();
    assert!(report.rewritten, "{report:?}");
    assert!(backend.is_in_sync(&desired).unwrap());
    let reply = tcp_exchange(&topology.client, public(PUBLIC_PORT), "after", PATIENCE).unwrap();
    assert_eq!(reply, format!("after from {CLIENT_ADDRESS}"));

    if let Kind::Iptables = kind {
        // The repair re-added each jump exactly once.
        let save = topology.node.run("iptables-save", &["-t", "nat"]).unwrap();
        for jump in ["PREROUTING", "OUTPUT", "POSTROUTING"] {
            let line = format!("-A {jump} -j UWSGI-IT-{jump}");
            assert_eq!(save.lines().filter(|l| *l == line).count(), 1, "{save}");
        }
    }
}

fn reapplying_keeps_an_open_tcp_connection(kind: Kind) {
    let topology = ForwardingTopology::create().unwrap();
    let _servers = container_servers(&topology);
    let second = tcp_echo_server(
        &topology.container,
        SocketAddrV4::new(CONTAINER_ADDRESS, 8001),
    )
    .unwrap();
    let backend = backend(kind, &topology);
    backend.apply(&both_on_9000()).unwrap();

    let mut session = TcpSession::connect(&topology.client, public(PUBLIC_PORT), PATIENCE).unwrap();
    assert!(session.exchange("one").unwrap().starts_with("one from "));

    // Same state again: nothing is written (what an agent restart does).
    let report = backend.apply(&both_on_9000()).unwrap();
    assert!(!report.rewritten, "{report:?}");
    assert!(session.exchange("two").unwrap().starts_with("two from "));

    // A different state rewrites the owned rules; the open connection keeps its conntrack
    // NAT binding and continues.
    let mut more = both_on_9000().forwards().to_vec();
    more.push(Forward::new(
        Protocol::Tcp,
        9001,
        SocketAddrV4::new(CONTAINER_ADDRESS, second.address.port()),
    ));
    let bigger = ForwardingRuleset::new(
        [NODE_PUBLIC_ADDRESS],
        [CONTAINER_NETWORK.parse().unwrap()],
        more,
    )
    .unwrap();
    let report = backend.apply(&bigger).unwrap();
    assert!(report.rewritten, "{report:?}");
    assert!(
        session
            .exchange("three")
            .unwrap()
            .starts_with("three from ")
    );
    let reply = tcp_exchange(&topology.client, public(9001), "new", PATIENCE).unwrap();
    assert_eq!(reply, format!("new from {CLIENT_ADDRESS}"));
}

/// Only the backend's own table / chains are touched: a foreign table survives an apply.
fn foreign_rules_are_left_alone(kind: Kind) {
    let topology = ForwardingTopology::create().unwrap();
    let backend = backend(kind, &topology);
    match kind {
        Kind::Nft => {
            topology
                .node
                .run("nft", &["add", "table", "ip", "someone_else"])
                .unwrap();
        }
        Kind::Iptables => {
            topology
                .node
                .run(
                    "iptables",
                    &[
                        "-t",
                        "nat",
                        "-A",
                        "POSTROUTING",
                        "-s",
                        "192.0.2.0/24",
                        "-j",
                        "MASQUERADE",
                    ],
                )
                .unwrap();
        }
    }
    backend.apply(&both_on_9000()).unwrap();
    backend.apply(&ruleset(&[])).unwrap();
    match kind {
        Kind::Nft => {
            topology
                .node
                .run("nft", &["list", "table", "ip", "someone_else"])
                .unwrap();
        }
        Kind::Iptables => {
            let save = topology.node.run("iptables-save", &["-t", "nat"]).unwrap();
            assert!(
                save.contains("-A POSTROUTING -s 192.0.2.0/24 -j MASQUERADE"),
                "{save}"
            );
        }
    }
}

/// Installs `rules` with a full apply, as the first sync does; the incremental path then
/// builds on the state the backend remembers.
fn installed(
    kind: Kind,
    topology: &ForwardingTopology,
    rules: &ForwardingRuleset,
) -> Box<dyn ForwardingBackend> {
    let backend = backend(kind, topology);
    let report = backend.apply(rules).unwrap();
    assert!(report.rewritten && !report.incremental, "{report:?}");
    backend
}

fn with_forward(base: &ForwardingRuleset, forward: Forward) -> ForwardingRuleset {
    let mut forwards = base.forwards().to_vec();
    forwards.retain(|f| f.key() != forward.key());
    forwards.push(forward);
    ForwardingRuleset::new(
        base.public_addresses().iter().copied(),
        base.container_networks().iter().copied(),
        forwards,
    )
    .unwrap()
}

fn incremental_add_carries_traffic_and_keeps_open_connections(kind: Kind) {
    let topology = ForwardingTopology::create().unwrap();
    let _servers = container_servers(&topology);
    // A second container address, and no container network: the new target must join the
    // masquerade sources (nft: the interval 10.244.1.2 becomes 10.244.1.2-10.244.1.3 in the same
    // transaction) for its hairpin to work.
    let second_address = "10.244.1.3".parse().unwrap();
    topology
        .container
        .add_address("eth0", &format!("{second_address}/24"))
        .unwrap();
    let second =
        tcp_echo_server(&topology.container, SocketAddrV4::new(second_address, 8001)).unwrap();
    let base = ForwardingRuleset::new(
        [NODE_PUBLIC_ADDRESS],
        [],
        both_on_9000().forwards().iter().copied(),
    )
    .unwrap();
    let backend = installed(kind, &topology, &base);
    let mut session = TcpSession::connect(&topology.client, public(PUBLIC_PORT), PATIENCE).unwrap();
    assert!(session.exchange("one").unwrap().starts_with("one from "));
    assert!(tcp_exchange(&topology.client, public(9001), "x", REFUSAL_PATIENCE).is_err());

    let bigger = with_forward(&base, Forward::new(Protocol::Tcp, 9001, second.address));
    let report = backend.apply_incremental(&bigger).unwrap();
    assert!(report.rewritten && report.incremental, "{report:?}");
    assert_eq!(report.incremental_failure, None, "{report:?}");
    assert!(report.cleared_udp_flows.is_empty(), "{report:?}");

    let reply = tcp_exchange(&topology.client, public(9001), "new", PATIENCE).unwrap();
    assert_eq!(reply, format!("new from {CLIENT_ADDRESS}"));
    let hairpin = tcp_exchange(&topology.container, public(9001), "hairpin", PATIENCE).unwrap();
    assert_eq!(hairpin, format!("hairpin from {NODE_CONTAINER_GATEWAY}"));
    assert!(session.exchange("two").unwrap().starts_with("two from "));
    // What the incremental transaction left is exactly what a full write would have written.
    assert!(
        backend.is_in_sync(&bigger).unwrap(),
        "{:?}",
        backend.inspect(&bigger).unwrap()
    );
    // Nothing changed since: nothing is written.
    let again = backend.apply_incremental(&bigger).unwrap();
    assert!(!again.rewritten, "{again:?}");
}

fn incremental_removal_stops_traffic_and_clears_udp_conntrack(kind: Kind) {
    let topology = ForwardingTopology::create().unwrap();
    let _servers = container_servers(&topology);
    let backend = installed(kind, &topology, &both_on_9000());
    let flow = UdpFlow::open(&topology.client, public(PUBLIC_PORT), PATIENCE).unwrap();
    assert!(flow.exchange("before").unwrap().starts_with("before from "));

    let tcp_only = ruleset(&[(Protocol::Tcp, PUBLIC_PORT, PRIVATE_PORT)]);
    let report = backend.apply_incremental(&tcp_only).unwrap();
    assert!(report.rewritten && report.incremental, "{report:?}");
    assert_eq!(report.cleared_udp_flows.len(), 1, "{report:?}");
    assert!(report.conntrack_entries_deleted >= 1, "{report:?}");
    assert!(report.conntrack_failures.is_empty(), "{report:?}");
    assert!(
        flow.exchange("after removal").is_err(),
        "the ongoing UDP flow must stop with its forward"
    );
    let reply = tcp_exchange(&topology.client, public(PUBLIC_PORT), "tcp", PATIENCE).unwrap();
    assert_eq!(reply, format!("tcp from {CLIENT_ADDRESS}"));
    assert!(backend.is_in_sync(&tcp_only).unwrap());

    let report = backend.apply_incremental(&ruleset(&[])).unwrap();
    assert!(report.incremental, "{report:?}");
    assert!(tcp_exchange(&topology.client, public(PUBLIC_PORT), "x", REFUSAL_PATIENCE).is_err());
    assert!(backend.is_in_sync(&ruleset(&[])).unwrap());
}

fn incremental_target_change_moves_new_and_udp_traffic(kind: Kind) {
    let topology = ForwardingTopology::create().unwrap();
    // A second container address: the old and new targets differ in address and port.
    let moved_to = "10.244.1.3".parse().unwrap();
    topology
        .container
        .add_address("eth0", &format!("{moved_to}/24"))
        .unwrap();
    let old_servers = container_servers(&topology);
    let new_target = SocketAddrV4::new(moved_to, 8005);
    let _new_tcp = tcp_echo_server(&topology.container, new_target).unwrap();
    let _new_udp = udp_echo_server(&topology.container, new_target).unwrap();
    let backend = installed(kind, &topology, &both_on_9000());
    let flow = UdpFlow::open(&topology.client, public(PUBLIC_PORT), PATIENCE).unwrap();
    assert!(flow.exchange("old").unwrap().starts_with("old from "));
    tcp_exchange(&topology.client, public(PUBLIC_PORT), "old", PATIENCE).unwrap();
    // The old target goes away, so any answer from now on comes from the new one.
    drop(old_servers);

    let moved = ruleset(&[]);
    let moved = with_forward(&moved, Forward::new(Protocol::Tcp, PUBLIC_PORT, new_target));
    let moved = with_forward(&moved, Forward::new(Protocol::Udp, PUBLIC_PORT, new_target));
    let report = backend.apply_incremental(&moved).unwrap();
    assert!(report.rewritten && report.incremental, "{report:?}");
    assert_eq!(report.cleared_udp_flows.len(), 1, "{report:?}");
    assert!(report.conntrack_entries_deleted >= 1, "{report:?}");

    let reply = tcp_exchange(&topology.client, public(PUBLIC_PORT), "new", PATIENCE).unwrap();
    assert_eq!(reply, format!("new from {CLIENT_ADDRESS}"));
    // The same UDP flow (same source port) now reaches the new target: its old conntrack
    // entry, bound to the old target, was deleted.
    assert_eq!(
        flow.exchange("moved").unwrap(),
        format!("moved from {CLIENT_ADDRESS}")
    );
    assert!(
        backend.is_in_sync(&moved).unwrap(),
        "{:?}",
        backend.inspect(&moved).unwrap()
    );
}

/// A table changed behind the agent's back makes the incremental transaction fail as a whole;
/// the backend then inspects and rewrites, and the change still lands.
fn a_refused_incremental_update_falls_back_to_a_full_rewrite(kind: Kind) {
    let topology = ForwardingTopology::create().unwrap();
    let _servers = container_servers(&topology);
    let second = tcp_echo_server(
        &topology.container,
        SocketAddrV4::new(CONTAINER_ADDRESS, 8001),
    )
    .unwrap();
    let backend = installed(kind, &topology, &both_on_9000());
    flush_everything(kind, &topology);

    // Removing the UDP forward needs its element / rule, which the flush took.
    let changed = with_forward(
        &ruleset(&[(Protocol::Tcp, PUBLIC_PORT, PRIVATE_PORT)]),
        Forward::new(Protocol::Tcp, 9001, second.address),
    );
    let report = backend.apply_incremental(&changed).unwrap();
    assert!(report.incremental_failure.is_some(), "{report:?}");
    assert!(report.rewritten && !report.incremental, "{report:?}");
    assert!(backend.is_in_sync(&changed).unwrap());
    for port in [PUBLIC_PORT, 9001] {
        tcp_exchange(&topology.client, public(port), "x", PATIENCE)
            .unwrap_or_else(|e| panic!("port {port}: {e}"));
    }
    // And the memory is good again: the next change is incremental.
    let report = backend.apply_incremental(&both_on_9000()).unwrap();
    assert!(report.incremental, "{report:?}");
}

macro_rules! for_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod nft {
            $( #[test] fn $scenario() { super::$scenario(super::Kind::Nft) } )*
        }
        mod iptables {
            $( #[test] fn $scenario() { super::$scenario(super::Kind::Iptables) } )*
        }
    };
}

for_both_backends!(
    traffic_reaches_the_container_from_everywhere,
    removing_a_mapping_stops_new_and_ongoing_traffic,
    drift_is_detected_and_repaired,
    reapplying_keeps_an_open_tcp_connection,
    foreign_rules_are_left_alone,
    incremental_add_carries_traffic_and_keeps_open_connections,
    incremental_removal_stops_traffic_and_clears_udp_conntrack,
    incremental_target_change_moves_new_and_udp_traffic,
    a_refused_incremental_update_falls_back_to_a_full_rewrite,
);
