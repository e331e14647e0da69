//! Golden renderings of a small ruleset. Run with `UPDATE_GOLDEN=1` to rewrite the files after
//! an intended change, then review the diff.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use uwsgi_it_domain::forwarding::{
    Forward, ForwardingRuleset, Protocol, RulesetDiff, iptables, nft,
};

fn sample() -> ForwardingRuleset {
    ForwardingRuleset::new(
        [
            Ipv4Addr::new(203, 0, 113, 10),
            Ipv4Addr::new(203, 0, 113, 11),
        ],
        ["10.244.1.0/24".parse().unwrap()],
        [
            Forward::new(
                Protocol::Udp,
                9000,
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 8000),
            ),
            Forward::new(
                Protocol::Tcp,
                9000,
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 8000),
            ),
            Forward::new(
                Protocol::Tcp,
                2222,
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 3), 22),
            ),
            Forward::new(
                Protocol::Tcp,
                8443,
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 7, 9), 443),
            ),
        ],
    )
    .unwrap()
}

fn check(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs from the rendering (run with UPDATE_GOLDEN=1 to accept):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

#[test]
fn nft_transaction_matches_golden() {
    let pretty = serde_json::to_string_pretty(&nft::transaction(&sample())).unwrap();
    check("nft-transaction.json", &(pretty + "\n"));
}

#[test]
fn iptables_restore_input_matches_golden() {
    check(
        "iptables-restore.txt",
        &iptables::restore_input(&sample(), &iptables::JUMP_RULES),
    );
}

/// `sample()` after one forward added, one removed, one target changed and a public address
/// replaced: the event path's transaction.
fn changed() -> ForwardingRuleset {
    ForwardingRuleset::new(
        [
            Ipv4Addr::new(203, 0, 113, 10),
            Ipv4Addr::new(203, 0, 113, 12),
        ],
        ["10.244.1.0/24".parse().unwrap()],
        [
            Forward::new(
                Protocol::Udp,
                9000,
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 8000),
            ),
            Forward::new(
                Protocol::Tcp,
                9000,
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 8000),
            ),
            // 2222 removed; 8443 moved to another container; 8080 added.
            Forward::new(
                Protocol::Tcp,
                8443,
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 7, 10), 443),
            ),
            Forward::new(
                Protocol::Tcp,
                8080,
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 4), 80),
            ),
        ],
    )
    .unwrap()
}

#[test]
fn nft_incremental_transaction_matches_golden() {
    let diff = RulesetDiff::between(&sample(), &changed());
    let transaction = nft::incremental_transaction(&diff).unwrap();
    let pretty = serde_json::to_string_pretty(&transaction).unwrap();
    check("nft-incremental.json", &(pretty + "\n"));
}

#[test]
fn iptables_incremental_restore_input_matches_golden() {
    check(
        "iptables-incremental.txt",
        &iptables::incremental_restore_input(&sample(), &changed()).unwrap(),
    );
}
