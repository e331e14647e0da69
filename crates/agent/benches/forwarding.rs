//! Sync time of the forwarding backends for 100, 1,000 and 10,000 mappings, against two
//! baselines, inside a throwaway network namespace (the process `unshare`s its own, so the
//! host's rules are never touched). Needs root.
//!
//! Run: `CARGO_TARGET_DIR=/tmp/target-fwd cargo bench -p uwsgi-it-agent --bench forwarding`
//!
//! Figures (wall time, median of the runs shown):
//! - agent nft full: `NftBackend::apply` onto an empty table (list, compare, render, `nft -j -f -`).
//! - agent nft no-op: `NftBackend::apply` when already in sync (list + compare, nothing written).
//! - floor nft -j -f: the same JSON transaction prepared in advance as a file.
//! - floor nft -f (text): the same table in nft's text syntax, prepared as a file.
//! - agent iptables full: `IptablesBackend::apply` (iptables-save, compare, iptables-restore).
//! - admin iptables -A: one `iptables -t nat -A` process per rule; for 10,000 the time is
//!   extrapolated from the first 1,000 (marked `~`).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::time::{Duration, Instant};

use uwsgi_it_agent::forwarding::{CommandScope, ForwardingBackend, IptablesBackend, NftBackend};
use uwsgi_it_domain::forwarding::{Forward, ForwardingRuleset, Protocol, nft};

const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

fn ruleset(mappings: usize) -> ForwardingRuleset {
    ForwardingRuleset::new(
        [PUBLIC],
        ["10.244.0.0/16".parse().unwrap()],
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
        }),
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

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
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

    let nft_backend = NftBackend::new(CommandScope::CurrentNamespace);
    let iptables_backend = IptablesBackend::new(CommandScope::CurrentNamespace);

    println!(
        "{:>8} | {:>14} | {:>13} | {:>15} | {:>16} | {:>19} | {:>17} | {:>10} | {:>12}",
        "mappings",
        "agent nft full",
        "agent nft no-op",
        "floor nft -j -f",
        "floor nft -f text",
        "agent iptables full",
        "admin iptables -A",
        "nft/floor",
        "iptables-A/nft"
    );
    for mappings in [100usize, 1_000, 10_000] {
        let desired = ruleset(mappings);
        let runs = if mappings >= 10_000 { 3 } else { 5 };

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

        let agent_iptables = measure(runs.min(3), reset, || {
            assert!(iptables_backend.apply(&desired).unwrap().rewritten);
        });

        let sample = mappings.min(1_000);
        reset();
        let started = Instant::now();
        for forward in &desired.forwards()[..sample] {
            run(
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-d",
                    &PUBLIC.to_string(),
                    "-p",
                    forward.protocol.as_str(),
                    "--dport",
                    &forward.public_port.to_string(),
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &forward.target.to_string(),
                ],
            );
        }
        let admin = started.elapsed().mul_f64(mappings as f64 / sample as f64);
        let admin_label = if sample < mappings {
            format!("~{}", ms(admin))
        } else {
            ms(admin)
        };

        println!(
            "{:>8} | {:>11} ms | {:>12} ms | {:>12} ms | {:>13} ms | {:>16} ms | {:>14} ms | {:>9.2}x | {:>11.1}x",
            mappings,
            ms(agent_full),
            ms(agent_noop),
            ms(floor_json),
            ms(floor_text),
            ms(agent_iptables),
            admin_label,
            agent_full.as_secs_f64() / floor_json.as_secs_f64(),
            admin.as_secs_f64() / agent_full.as_secs_f64(),
        );
    }

    // Incremental change: one mapping added to 10,000 already installed.
    let base = ruleset(10_000);
    let mut grown = base.forwards().to_vec();
    grown.push(Forward::new(
        Protocol::Tcp,
        65_000,
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 99, 2), 8000),
    ));
    let grown =
        ForwardingRuleset::new([PUBLIC], ["10.244.0.0/16".parse().unwrap()], grown).unwrap();
    let incremental = measure(
        3,
        || {
            reset();
            nft_backend.apply(&base).unwrap();
        },
        || assert!(nft_backend.apply(&grown).unwrap().rewritten),
    );
    let incremental_iptables = measure(
        3,
        || {
            reset();
            iptables_backend.apply(&base).unwrap();
        },
        || assert!(iptables_backend.apply(&grown).unwrap().rewritten),
    );
    let admin_one = measure(
        1,
        || {},
        || {
            run(
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-d",
                    &PUBLIC.to_string(),
                    "-p",
                    "tcp",
                    "--dport",
                    "65001",
                    "-j",
                    "DNAT",
                    "--to-destination",
                    "10.244.99.2:8000",
                ],
            );
        },
    );
    println!();
    println!("incremental: +1 mapping onto 10,000 installed");
    println!(
        "  agent nft (whole-table transaction): {} ms",
        ms(incremental)
    );
    println!(
        "  agent iptables (owned chains restore): {} ms",
        ms(incremental_iptables)
    );
    println!(
        "  admin iptables -A (one rule, 10,000 already in nat): {} ms",
        ms(admin_one)
    );

    reset();
    let _ = std::fs::remove_dir_all(&directory);
}
