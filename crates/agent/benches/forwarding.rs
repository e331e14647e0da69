//! Sync time and first-packet latency of the forwarding backends for 100, 1,000 and 10,000
//! mappings, against two baselines, inside throwaway network namespaces (the process
//! `unshare`s its own, and the latency part builds a `ForwardingTopology`, so the host's rules
//! are never touched). Needs root.
//!
//! Run: `CARGO_TARGET_DIR=/tmp/target-perf cargo bench -p uwsgi-it-agent --bench forwarding`
//!
//! Figures (wall time, median of the runs shown):
//! - agent nft full: `NftBackend::apply` onto an empty table (list, compare, render, `nft -j -f -`).
//! - floor nft -j -f: the same JSON transaction prepared in advance as a file.
//! - floor nft -f: the same table in nft's text syntax, prepared as a file.
//! - full/floor: agent nft full against the `nft -f` (text) floor.
//! - agent nft resync no-op: `NftBackend::apply` when already in sync (the periodic resync:
//!   list + compare, nothing written).
//! - floor nft -j list: `nft -j list table` of the installed table alone, the read the no-op
//!   resync cannot avoid; no-op/list is the resync against it.
//! - agent iptables full: `IptablesBackend::apply` (iptables-save, compare, iptables-restore).
//! - floor iptables-restore: the same restore input prepared in advance as a file, one
//!   `iptables-restore --noflush` (the same work without the agent's read, compare and render);
//!   agent/floor is the agent against it.
//!
//! Then the event path at 10,000 mappings (`apply_incremental`, one change at a time), and the
//! first-packet latency: the time a fresh TCP connection from a client namespace takes to be
//! established through the forward (SYN DNATed to the container, SYN/ACK back), median of many
//! connections, with 10 and with 10,000 mappings installed.

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use uwsgi_it_agent::forwarding::{CommandScope, ForwardingBackend, IptablesBackend, NftBackend};
use uwsgi_it_domain::forwarding::{Forward, ForwardingRuleset, Protocol, nft};
use uwsgi_it_testbed::netns::{
    CONTAINER_ADDRESS, CONTAINER_NETWORK, ForwardingTopology, NODE_PUBLIC_ADDRESS, Netns,
    tcp_echo_server,
};

const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// `mappings` forwards on ports 10,000 and up, alternating tcp and udp, to distinct targets.
fn forwards(mappings: usize) -> impl Iterator<Item = Forward> {
    (0..mappings).map(|i| {
        let protocol = if i % 2 == 0 {
            Protocol::Tcp
        } else {
            Protocol::Udp
        };
        let target = Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250 + 2) as u8);
        Forward::new(
            protocol,
            10_000 + (i / 2) as u16 * 2 + (i % 2) as u16,
            SocketAddrV4::new(target, 8000),
        )
    })
}

fn ruleset(mappings: usize) -> ForwardingRuleset {
    ForwardingRuleset::new(
        [PUBLIC],
        ["10.244.0.0/16".parse().unwrap()],
        forwards(mappings),
    )
    .unwrap()
}

fn plus(base: &ForwardingRuleset, forward: Forward) -> ForwardingRuleset {
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

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap();
    assert!(status.success(), "{program} {args:?}");
}

fn quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

fn reset() {
    quiet("nft", &["delete", "table", "ip", nft::TABLE]);
    quiet("iptables", &["-t", "nat", "-F"]);
    quiet("iptables", &["-t", "nat", "-X"]);
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn measure(runs: usize, mut prepare: impl FnMut(), mut work: impl FnMut()) -> Duration {
    median(
        (0..runs)
            .map(|_| {
                prepare();
                let started = Instant::now();
                work();
                started.elapsed()
            })
            .collect(),
    )
}

/// Median time of `change` then of `undo`, alternating, each an incremental apply that must
/// write (not fall back).
fn incremental(
    backend: &dyn ForwardingBackend,
    base: &ForwardingRuleset,
    changed: &ForwardingRuleset,
    runs: usize,
) -> (Duration, Duration) {
    let (mut forth, mut back) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        for (target, samples) in [(changed, &mut forth), (base, &mut back)] {
            let started = Instant::now();
            let report = backend.apply_incremental(target).unwrap();
            samples.push(started.elapsed());
            assert!(
                report.incremental && report.incremental_failure.is_none(),
                "{report:?}"
            );
        }
    }
    (median(forth), median(back))
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn main() {
    // SAFETY: called before any thread exists; the new namespace is this process's alone and
    // disappears with it.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "forwarding bench needs root (unshare CLONE_NEWNET failed: {})",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    run("ip", &["link", "set", "lo", "up"]);
    let directory = std::env::temp_dir().join(format!("uit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();

    full_syncs(&directory);
    incremental_changes();
    first_packet_latency();

    reset();
    let _ = std::fs::remove_dir_all(&directory);
}

fn full_syncs(directory: &std::path::Path) {
    let nft_backend = NftBackend::new(CommandScope::CurrentNamespace);
    let iptables_backend = IptablesBackend::new(CommandScope::CurrentNamespace);

    println!("full sync (whole owned table written onto an empty one)");
    println!(
        "{:>8} | {:>14} | {:>15} | {:>13} | {:>10} | {:>22} | {:>17} | {:>11} | {:>19} | {:>24} | {:>14}",
        "mappings",
        "agent nft full",
        "floor nft -j -f",
        "floor nft -f",
        "full/floor",
        "agent nft resync no-op",
        "floor nft -j list",
        "no-op/list",
        "agent iptables full",
        "floor iptables-restore",
        "agent/floor"
    );
    for mappings in [100usize, 1_000, 10_000] {
        let desired = ruleset(mappings);
        let runs = if mappings >= 10_000 { 5 } else { 7 };

        let agent_full = measure(runs, reset, || {
            assert!(nft_backend.apply(&desired).unwrap().rewritten);
        });
        let agent_noop = measure(
            runs,
            || {},
            || {
                assert!(!nft_backend.apply(&desired).unwrap().rewritten);
            },
        );

        let json_file = directory.join(format!("table-{mappings}.json"));
        std::fs::write(&json_file, nft::transaction_json(&desired)).unwrap();
        let json_path = json_file.to_str().unwrap().to_owned();
        let floor_json = measure(runs, reset, || run("nft", &["-j", "-f", &json_path]));

        // nft's own text form of the installed table, as an admin's prepared file would be.
        reset();
        nft_backend.apply(&desired).unwrap();
        let listed = Command::new("nft")
            .args(["list", "table", "ip", nft::TABLE])
            .output()
            .unwrap();
        let text_file = directory.join(format!("table-{mappings}.nft"));
        let mut text = format!("table ip {0}\ndelete table ip {0}\n", nft::TABLE).into_bytes();
        text.extend_from_slice(&listed.stdout);
        std::fs::write(&text_file, text).unwrap();
        let text_path = text_file.to_str().unwrap().to_owned();
        let floor_text = measure(runs, reset, || run("nft", &["-f", &text_path]));

        // The read alone, of the table the agent installed.
        reset();
        nft_backend.apply(&desired).unwrap();
        let floor_list = measure(
            runs,
            || {},
            || {
                let listed = Command::new("nft")
                    .args(["-j", "list", "table", "ip", nft::TABLE])
                    .output()
                    .unwrap();
                assert!(listed.status.success());
            },
        );

        let agent_iptables = measure(runs.min(3), reset, || {
            assert!(iptables_backend.apply(&desired).unwrap().rewritten);
        });
        // The same restore, prepared: what the agent writes onto an empty nat table (its chains
        // and the three jumps).
        let restore_file = directory.join(format!("nat-{mappings}.restore"));
        std::fs::write(
            &restore_file,
            uwsgi_it_domain::forwarding::iptables::restore_input(
                &desired,
                &uwsgi_it_domain::forwarding::iptables::JUMP_RULES,
            ),
        )
        .unwrap();
        let floor_restore = measure(runs.min(3), reset, || {
            let input = std::fs::File::open(&restore_file).unwrap();
            let status = Command::new("iptables-restore")
                .arg("--noflush")
                .stdin(input)
                .status()
                .unwrap();
            assert!(status.success());
        });

        println!(
            "{:>8} | {:>11} ms | {:>12} ms | {:>10} ms | {:>9.2}x | {:>19} ms | {:>14} ms | {:>10.2}x | {:>16} ms | {:>21} ms | {:>13.2}x",
            mappings,
            ms(agent_full),
            ms(floor_json),
            ms(floor_text),
            agent_full.as_secs_f64() / floor_text.as_secs_f64(),
            ms(agent_noop),
            ms(floor_list),
            agent_noop.as_secs_f64() / floor_list.as_secs_f64(),
            ms(agent_iptables),
            ms(floor_restore),
            agent_iptables.as_secs_f64() / floor_restore.as_secs_f64(),
        );
    }

    reset();
}

fn incremental_changes() {
    const RUNS: usize = 11;
    let base = ruleset(10_000);
    let new_target = SocketAddrV4::new(Ipv4Addr::new(10, 244, 99, 2), 8000);
    let added_tcp = plus(&base, Forward::new(Protocol::Tcp, 65_000, new_target));
    let added_udp = plus(&base, Forward::new(Protocol::Udp, 65_001, new_target));
    let first = base.forwards()[0];
    let retargeted = plus(
        &base,
        Forward::new(first.protocol, first.public_port, new_target),
    );

    println!();
    println!("event path at 10,000 mappings installed (apply_incremental, median of {RUNS})");
    println!(
        "{:>9} | {:>13} | {:>13} | {:>15} | {:>18}",
        "backend", "+1 tcp", "-1 tcp", "+1 udp (+ct -D)", "target changed"
    );
    reset();
    let nft_backend = NftBackend::new(CommandScope::CurrentNamespace);
    let iptables_backend = IptablesBackend::new(CommandScope::CurrentNamespace);
    for (name, backend) in [
        ("nftables", &nft_backend as &dyn ForwardingBackend),
        ("iptables", &iptables_backend as &dyn ForwardingBackend),
    ] {
        reset();
        backend.apply(&base).unwrap();
        let (add, remove) = incremental(backend, &base, &added_tcp, RUNS);
        let (add_udp, _) = incremental(backend, &base, &added_udp, RUNS);
        let (change, _) = incremental(backend, &base, &retargeted, RUNS);
        assert!(backend.is_in_sync(&base).unwrap());
        println!(
            "{:>9} | {:>10} ms | {:>10} ms | {:>12} ms | {:>15} ms",
            name,
            ms(add),
            ms(remove),
            ms(add_udp),
            ms(change)
        );
    }
    println!("target: +1 mapping at 10,000 in under 50 ms");
    reset();
}

/// Medians of `connections` fresh TCP connections from `client` to `address`, after a few
/// unmeasured ones (ARP, route caches).
fn connect_times(client: &Netns, address: SocketAddrV4, connections: usize) -> Vec<Duration> {
    client
        .enter(move || {
            for _ in 0..5 {
                TcpStream::connect_timeout(&address.into(), Duration::from_secs(2)).unwrap();
            }
            (0..connections)
                .map(|_| {
                    let started = Instant::now();
                    let stream =
                        TcpStream::connect_timeout(&address.into(), Duration::from_secs(2))
                            .unwrap();
                    let elapsed = started.elapsed();
                    drop(stream);
                    elapsed
                })
                .collect()
        })
        .unwrap()
}

fn first_packet_latency() {
    const ROUNDS: usize = 4;
    const CONNECTIONS: usize = 50;
    // The measured forward sorts after every other one, so iptables' linear chain is walked to
    // its end (nft looks it up in a map either way).
    const MEASURED_PORT: u16 = 60_000;
    let topology = ForwardingTopology::create().unwrap();
    let target = SocketAddrV4::new(CONTAINER_ADDRESS, 8000);
    let _server = tcp_echo_server(&topology.container, target).unwrap();
    let with = |others: usize| {
        ForwardingRuleset::new(
            [NODE_PUBLIC_ADDRESS],
            [CONTAINER_NETWORK.parse().unwrap()],
            forwards(others).chain([Forward::new(Protocol::Tcp, MEASURED_PORT, target)]),
        )
        .unwrap()
    };
    let (small, large) = (with(9), with(9_999));
    let public = SocketAddrV4::new(NODE_PUBLIC_ADDRESS, MEASURED_PORT);
    let scope = CommandScope::Netns(topology.node.name().to_owned());

    println!();
    println!(
        "first-packet latency: TCP connect from a client netns through the forward, median of {} fresh connections ({ROUNDS} alternating rounds of {CONNECTIONS})",
        ROUNDS * CONNECTIONS
    );
    println!(
        "{:>9} | {:>15} | {:>19} | {:>7}",
        "backend", "10 mappings", "10,000 mappings", "ratio"
    );
    let backends: [(&str, Box<dyn ForwardingBackend>); 2] = [
        ("nftables", Box::new(NftBackend::new(scope.clone()))),
        ("iptables", Box::new(IptablesBackend::new(scope))),
    ];
    for (name, backend) in backends {
        let (mut at_small, mut at_large) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            backend.apply(&small).unwrap();
            at_small.extend(connect_times(&topology.client, public, CONNECTIONS));
            backend.apply(&large).unwrap();
            at_large.extend(connect_times(&topology.client, public, CONNECTIONS));
        }
        let (small_median, large_median) = (median(at_small), median(at_large));
        println!(
            "{:>9} | {:>12} µs | {:>16} µs | {:>6.2}x",
            name,
            us(small_median),
            us(large_median),
            large_median.as_secs_f64() / small_median.as_secs_f64()
        );
        // Leave the hooks to the next backend.
        match name {
            "nftables" => {
                let _ = topology
                    .node
                    .run("nft", &["delete", "table", "ip", nft::TABLE]);
            }
            _ => {
                let _ = topology.node.run("iptables", &["-t", "nat", "-F"]);
            }
        }
    }
    println!("target: nftables ratio <= 1.2x");
}
