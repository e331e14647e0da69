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
);
