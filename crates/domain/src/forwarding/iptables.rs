//! Rendering of a [`ForwardingRuleset`] as `iptables-restore --noflush` input for table `nat`.
//!
//! The agent owns four chains and three jump rules, nothing else:
//!
//! - `UWSGI-IT-PREROUTING` / `UWSGI-IT-OUTPUT` (jumped to from `PREROUTING` / `OUTPUT`): one
//!   rule per public address, `-d <address>/32 -j UWSGI-IT-FORWARDS`;
//! - `UWSGI-IT-FORWARDS`: one DNAT rule per forward. iptables has no maps, so a packet walks this
//!   chain linearly; the per-address split at least keeps non-public traffic out of it;
//! - `UWSGI-IT-POSTROUTING` (from `POSTROUTING`): the same two masquerade cases as the nft
//!   backend (node-local sources, container sources), per public address because
//!   `--ctorigdst` takes one address.
//!
//! Declaring a chain (`:NAME - [0:0]`) in a `--noflush` restore creates it if missing and flushes
//! it if present, and the whole input commits atomically, so the owned chains are replaced in one
//! step while every other chain and table is left alone. Jump rules cannot be declared that way;
//! the agent adds them only when [`inspect_save`] reports them missing, at the top of the built-in
//! chain so other software's catch-all rules cannot shadow the forwards.
//!
//! Between full writes, [`incremental_restore_input`] changes only the rules that differ: one
//! `--noflush` restore of `-D <rule>` lines (deleted by specification) followed by `-A <rule>`
//! lines, committed atomically; a `-D` of a rule that is not there fails the whole restore, and
//! the agent falls back to a full rewrite. Appended rules end up after the existing ones, which
//! is harmless: no two owned rules of a chain match the same packet differently (one rule per
//! protocol and port, one per address, masquerade rules all do the same), so the in-sync check
//! compares each chain's rules as a sorted list.
//!
//! Rules are rendered exactly as `iptables-save` prints them, so the in-sync check is a plain
//! line comparison (order-insensitive within a chain, see above).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};

use super::{Forward, ForwardingRuleset, Protocol};

pub const PREROUTING_CHAIN: &str = "UWSGI-IT-PREROUTING";
pub const OUTPUT_CHAIN: &str = "UWSGI-IT-OUTPUT";
pub const FORWARDS_CHAIN: &str = "UWSGI-IT-FORWARDS";
pub const POSTROUTING_CHAIN: &str = "UWSGI-IT-POSTROUTING";

/// Every chain the agent owns, in the order the restore input declares them.
pub const OWNED_CHAINS: [&str; 4] = [
    PREROUTING_CHAIN,
    OUTPUT_CHAIN,
    FORWARDS_CHAIN,
    POSTROUTING_CHAIN,
];

/// A rule in a built-in chain that sends packets to one of the agent's chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JumpRule {
    pub builtin_chain: &'static str,
    pub target_chain: &'static str,
}

impl JumpRule {
    /// The line `iptables-save` prints for this jump.
    pub fn save_line(&self) -> String {
        format!("-A {} -j {}", self.builtin_chain, self.target_chain)
    }
}

/// The three jumps, one per hook the forwards need.
pub const JUMP_RULES: [JumpRule; 3] = [
    JumpRule {
        builtin_chain: "PREROUTING",
        target_chain: PREROUTING_CHAIN,
    },
    JumpRule {
        builtin_chain: "OUTPUT",
        target_chain: OUTPUT_CHAIN,
    },
    JumpRule {
        builtin_chain: "POSTROUTING",
        target_chain: POSTROUTING_CHAIN,
    },
];

/// The rules of the owned chains, as `iptables-save` lines, grouped by chain in
/// [`OWNED_CHAINS`] order.
pub fn owned_rules(ruleset: &ForwardingRuleset) -> Vec<String> {
    let mut rules = Vec::new();
    for address in ruleset.public_addresses() {
        rules.push(format!(
            "-A {PREROUTING_CHAIN} -d {address}/32 -j {FORWARDS_CHAIN}"
        ));
    }
    for address in ruleset.public_addresses() {
        rules.push(format!(
            "-A {OUTPUT_CHAIN} -d {address}/32 -j {FORWARDS_CHAIN}"
        ));
    }
    for forward in ruleset.forwards() {
        let protocol = forward.protocol;
        rules.push(format!(
            "-A {FORWARDS_CHAIN} -p {protocol} -m {protocol} --dport {} -j DNAT --to-destination {}",
            forward.public_port, forward.target
        ));
    }
    // See the nft module for why these two cases, and only these, are masqueraded.
    let container_sources: Vec<_> = ruleset
        .masquerade_sources()
        .iter()
        .flat_map(|range| range.to_cidrs())
        .collect();
    for address in ruleset.public_addresses() {
        rules.push(format!(
            "-A {POSTROUTING_CHAIN} -m conntrack --ctstate DNAT --ctorigdst {address} -m addrtype --src-type LOCAL -j MASQUERADE"
        ));
        for source in &container_sources {
            rules.push(format!(
                "-A {POSTROUTING_CHAIN} -s {source} -m conntrack --ctstate DNAT --ctorigdst {address} -j MASQUERADE"
            ));
        }
    }
    rules
}

/// The complete `iptables-restore --noflush` input: owned chains flushed and refilled, plus the
/// jumps listed in `missing_jumps` inserted at the top of their built-in chains.
pub fn restore_input(ruleset: &ForwardingRuleset, missing_jumps: &[JumpRule]) -> String {
    let mut input = String::from("*nat\n");
    for chain in OWNED_CHAINS {
        let _ = writeln!(input, ":{chain} - [0:0]");
    }
    for rule in owned_rules(ruleset) {
        input.push_str(&rule);
        input.push('\n');
    }
    for jump in missing_jumps {
        let _ = writeln!(
            input,
            "-I {} 1 -j {}",
            jump.builtin_chain, jump.target_chain
        );
    }
    input.push_str("COMMIT\n");
    input
}

/// The chain of table `filter` that accepts the agent's forwarded connections, jumped to from
/// the end of `FORWARD`, so that the host's own filter rules before it (`DOCKER-USER`, ufw's,
/// a supplier's drops) still decide first and only the chain's policy is overridden. Hosts whose filter policy drops what nothing accepted (Docker sets
/// `FORWARD` to DROP, ufw does too) would otherwise drop every forward after its DNAT; the CNI
/// portmap plugin adds the same kind of accept. Whichever backend does the DNAT, this is
/// iptables' table, so both backends keep it.
pub const FORWARD_ACCEPT_CHAIN: &str = "UWSGI-IT-FORWARD";

/// The jump into [`FORWARD_ACCEPT_CHAIN`].
pub const FORWARD_ACCEPT_JUMP: JumpRule = JumpRule {
    builtin_chain: "FORWARD",
    target_chain: FORWARD_ACCEPT_CHAIN,
};

/// The rules of [`FORWARD_ACCEPT_CHAIN`], as `iptables-save -t filter` prints them: both
/// directions of every connection DNATed from a public address (conntrack's original
/// destination). That includes other DNATs to the same address (NodePorts, hostPorts): they
/// reach this chain only when no rule of the host's decided before it, as above.
pub fn forward_accept_rules(public_addresses: &[Ipv4Addr]) -> Vec<String> {
    public_addresses
        .iter()
        .map(|address| {
            format!(
                "-A {FORWARD_ACCEPT_CHAIN} -m conntrack --ctstate DNAT --ctorigdst {address} -j ACCEPT"
            )
        })
        .collect()
}

/// `iptables-restore --noflush` input for table `filter` that makes [`FORWARD_ACCEPT_CHAIN`]
/// accept `public_addresses`' forwards, or `None` when `save_output` (`iptables-save -t
/// filter`) already shows exactly that.
pub fn forward_accept_input(public_addresses: &[Ipv4Addr], save_output: &str) -> Option<String> {
    let lines: Vec<&str> = save_output.lines().map(str::trim_end).collect();
    let declared = lines.iter().any(|l| {
        l.strip_prefix(':')
            .and_then(|l| l.split_whitespace().next())
            == Some(FORWARD_ACCEPT_CHAIN)
    });
    let prefix = format!("-A {FORWARD_ACCEPT_CHAIN} ");
    let mut found: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with(&prefix))
        .collect();
    found.sort_unstable();
    let mut wanted = forward_accept_rules(public_addresses);
    wanted.sort_unstable();
    let jump = FORWARD_ACCEPT_JUMP.save_line();
    let jumped = lines.contains(&jump.as_str());
    if declared && jumped && found == wanted {
        return None;
    }
    let mut input = format!("*filter\n:{FORWARD_ACCEPT_CHAIN} - [0:0]\n");
    for rule in &wanted {
        input.push_str(rule);
        input.push('\n');
    }
    if !jumped {
        let _ = writeln!(input, "-A FORWARD -j {FORWARD_ACCEPT_CHAIN}");
    }
    input.push_str("COMMIT\n");
    Some(input)
}

/// `iptables-restore --noflush` input that removes everything the agent owns in table `nat`, as
/// `iptables-save -t nat` shows it: every jump to an owned chain (`-D`, however often it is
/// there), then the owned chains (flushed by their declaration, then `-X`), in one commit. `None`
/// when nothing of the agent's is there. For switching to the nft backend, or a node that stops
/// being a server (`agent --cleanup`).
pub fn cleanup_input(save_output: &str) -> Option<String> {
    let lines: Vec<&str> = save_output.lines().map(str::trim_end).collect();
    let present: Vec<&str> = OWNED_CHAINS
        .into_iter()
        .filter(|chain| {
            lines.iter().any(|l| {
                l.strip_prefix(':')
                    .and_then(|l| l.split_whitespace().next())
                    == Some(*chain)
            })
        })
        .collect();
    // A jump is any rule of a chain that is not the agent's whose target is one of the agent's.
    let jumps: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|line| {
            let Some(rule) = line.strip_prefix("-A ") else {
                return false;
            };
            let chain = rule.split_whitespace().next().unwrap_or_default();
            let target = rule.rsplit_once(" -j ").map(|(_, t)| t.trim());
            !OWNED_CHAINS.contains(&chain) && target.is_some_and(|t| OWNED_CHAINS.contains(&t))
        })
        .collect();
    if present.is_empty() && jumps.is_empty() {
        return None;
    }
    let mut input = String::from("*nat\n");
    for chain in &present {
        let _ = writeln!(input, ":{chain} - [0:0]");
    }
    for jump in jumps {
        let _ = writeln!(input, "-D {}", &jump["-A ".len()..]);
    }
    for chain in &present {
        let _ = writeln!(input, "-X {chain}");
    }
    input.push_str("COMMIT\n");
    Some(input)
}

/// Like [`cleanup_input`], for table `filter` (`iptables-save -t filter`): the jump and
/// [`FORWARD_ACCEPT_CHAIN`]. For `agent --cleanup` only: switching backends keeps it.
pub fn forward_accept_cleanup_input(save_output: &str) -> Option<String> {
    let lines: Vec<&str> = save_output.lines().map(str::trim_end).collect();
    let declared = lines.iter().any(|l| {
        l.strip_prefix(':')
            .and_then(|l| l.split_whitespace().next())
            == Some(FORWARD_ACCEPT_CHAIN)
    });
    let jumps: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("-A ") && !l.starts_with(&format!("-A {FORWARD_ACCEPT_CHAIN} ")))
        .filter(|l| l.ends_with(&format!(" -j {FORWARD_ACCEPT_CHAIN}")))
        .collect();
    if !declared && jumps.is_empty() {
        return None;
    }
    let mut input = String::from("*filter\n");
    if declared {
        let _ = writeln!(input, ":{FORWARD_ACCEPT_CHAIN} - [0:0]");
    }
    for jump in jumps {
        let _ = writeln!(input, "-D {}", &jump["-A ".len()..]);
    }
    if declared {
        let _ = writeln!(input, "-X {FORWARD_ACCEPT_CHAIN}");
    }
    input.push_str("COMMIT\n");
    Some(input)
}

/// `iptables-restore --noflush` input that turns the owned rules of `previous` into those of
/// `desired` without flushing a chain: deletions first, then additions. `None` when the two
/// render the same rules. Jumps and chain declarations are left to the full rewrite.
pub fn incremental_restore_input(
    previous: &ForwardingRuleset,
    desired: &ForwardingRuleset,
) -> Option<String> {
    let before = owned_rules(previous);
    let after = owned_rules(desired);
    let before_set: BTreeSet<&str> = before.iter().map(String::as_str).collect();
    let after_set: BTreeSet<&str> = after.iter().map(String::as_str).collect();
    let mut input = String::from("*nat\n");
    let mut changes = 0usize;
    for rule in before.iter().filter(|r| !after_set.contains(r.as_str())) {
        let spec = rule.strip_prefix("-A ").expect("owned rules are appends");
        let _ = writeln!(input, "-D {spec}");
        changes += 1;
    }
    for rule in after.iter().filter(|r| !before_set.contains(r.as_str())) {
        input.push_str(rule);
        input.push('\n');
        changes += 1;
    }
    input.push_str("COMMIT\n");
    (changes > 0).then_some(input)
}

/// What `iptables-save -t nat` shows, compared with the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesInspection {
    /// `None` when the owned chains hold exactly the rendered rules and every jump exists.
    pub difference: Option<String>,
    /// Jumps to add in the next restore.
    pub missing_jumps: Vec<JumpRule>,
    /// Public addresses and forwards found in the owned chains (`container_networks` empty).
    pub installed: ForwardingRuleset,
}

impl IptablesInspection {
    pub fn in_sync(&self) -> bool {
        self.difference.is_none()
    }
}

/// Compares `iptables-save -t nat` output with the rendering of `desired`.
pub fn inspect_save(desired: &ForwardingRuleset, save_output: &str) -> IptablesInspection {
    let lines: Vec<&str> = save_output.lines().map(str::trim_end).collect();
    let declared: BTreeSet<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let present: BTreeSet<&str> = lines.iter().copied().collect();
    let missing_jumps: Vec<JumpRule> = JUMP_RULES
        .into_iter()
        .filter(|jump| !present.contains(jump.save_line().as_str()))
        .collect();

    let owned_chain_of = |line: &str| -> Option<&'static str> {
        let chain = line.strip_prefix("-A ")?.split_whitespace().next()?;
        OWNED_CHAINS.into_iter().find(|owned| *owned == chain)
    };
    let mut found: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in &lines {
        if let Some(chain) = owned_chain_of(line) {
            found.entry(chain).or_default().push(line);
        }
    }
    // Order within a chain does not matter (see the module documentation); duplicates do.
    fn sorted<'a>(rules: Option<&Vec<&'a str>>) -> Vec<&'a str> {
        let mut rules = rules.cloned().unwrap_or_default();
        rules.sort_unstable();
        rules
    }
    let wanted_rules = owned_rules(desired);
    let mut wanted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in &wanted_rules {
        if let Some(chain) = owned_chain_of(line) {
            wanted.entry(chain).or_default().push(line);
        }
    }

    let difference = OWNED_CHAINS
        .into_iter()
        .find(|chain| !declared.contains(chain))
        .map(|chain| format!("chain {chain} is missing"))
        .or_else(|| {
            OWNED_CHAINS
                .into_iter()
                .find(|chain| sorted(found.get(chain)) != sorted(wanted.get(chain)))
                .map(|chain| format!("rules of chain {chain} differ"))
        })
        .or_else(|| {
            missing_jumps
                .first()
                .map(|jump| format!("jump \"{}\" is missing", jump.save_line()))
        });

    IptablesInspection {
        difference,
        missing_jumps,
        installed: installed_ruleset(&found),
    }
}

/// Best-effort reading of the public addresses and forwards in the owned chains.
fn installed_ruleset(found: &BTreeMap<&str, Vec<&str>>) -> ForwardingRuleset {
    let rules_of = |chain: &str| found.get(chain).into_iter().flatten().copied();
    let public_addresses: BTreeSet<Ipv4Addr> = rules_of(PREROUTING_CHAIN)
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "-d")?;
            words.get(at + 1)?.strip_suffix("/32")?.parse().ok()
        })
        .collect();
    let mut forwards: BTreeMap<(Protocol, u16), Forward> = BTreeMap::new();
    for line in rules_of(FORWARDS_CHAIN) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let value_after = |flag: &str| {
            let at = words.iter().position(|w| *w == flag)?;
            words.get(at + 1).copied()
        };
        let parsed = (|| {
            let protocol = Protocol::from_name(value_after("-p")?)?;
            let public_port: u16 = value_after("--dport")?.parse().ok()?;
            let target: SocketAddrV4 = value_after("--to-destination")?.parse().ok()?;
            Some(Forward::new(protocol, public_port, target))
        })();
        if let Some(forward) = parsed {
            // iptables applies the first matching rule, so the first one is what is installed.
            forwards.entry(forward.key()).or_insert(forward);
        }
    }
    ForwardingRuleset {
        public_addresses: public_addresses.into_iter().collect(),
        container_networks: Vec::new(),
        forwards: forwards.into_values().collect(),
    }
}
