use super::*;
use proptest::prelude::*;

fn target(text: &str) -> SocketAddrV4 {
    text.parse().unwrap()
}

fn public() -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 10)
}

fn ruleset(forwards: &[(Protocol, u16, &str)]) -> ForwardingRuleset {
    ForwardingRuleset::new(
        [public()],
        [],
        forwards
            .iter()
            .map(|(p, port, t)| Forward::new(*p, *port, target(t))),
    )
    .unwrap()
}

#[test]
fn rulesets_are_sorted_and_deduplicated() {
    let a = ForwardingRuleset::new(
        [Ipv4Addr::new(203, 0, 113, 11), public(), public()],
        [
            "10.244.2.0/24".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
        ],
        [
            Forward::new(Protocol::Udp, 9000, target("10.244.1.2:8000")),
            Forward::new(Protocol::Tcp, 9001, target("10.244.1.3:8000")),
            Forward::new(Protocol::Tcp, 9000, target("10.244.1.2:8000")),
            Forward::new(Protocol::Tcp, 9000, target("10.244.1.2:8000")),
        ],
    )
    .unwrap();
    assert_eq!(
        a.public_addresses(),
        [public(), Ipv4Addr::new(203, 0, 113, 11)]
    );
    assert_eq!(
        a.forwards().iter().map(Forward::key).collect::<Vec<_>>(),
        [
            (Protocol::Tcp, 9000),
            (Protocol::Tcp, 9001),
            (Protocol::Udp, 9000)
        ]
    );
    assert_eq!(a.container_networks()[0].to_string(), "10.244.1.0/24");
    assert_eq!(
        a.target_of(Protocol::Udp, 9000),
        Some(target("10.244.1.2:8000"))
    );
    assert_eq!(a.target_of(Protocol::Udp, 9001), None);
}

#[test]
fn refuses_invalid_rulesets() {
    let conflict = ForwardingRuleset::new(
        [public()],
        [],
        [
            Forward::new(Protocol::Tcp, 9000, target("10.244.1.3:8000")),
            Forward::new(Protocol::Tcp, 9000, target("10.244.1.2:8000")),
        ],
    );
    assert_eq!(
        conflict,
        Err(RulesetError::ConflictingForwards {
            protocol: Protocol::Tcp,
            public_port: 9000,
            first: target("10.244.1.2:8000"),
            second: target("10.244.1.3:8000"),
        })
    );
    let bad_target = |t: &str| {
        ForwardingRuleset::new(
            [public()],
            [],
            [Forward::new(Protocol::Tcp, 9000, target(t))],
        )
    };
    assert!(matches!(
        bad_target("127.0.0.1:8000"),
        Err(RulesetError::InvalidTarget { .. })
    ));
    assert!(matches!(
        bad_target("0.0.0.0:8000"),
        Err(RulesetError::InvalidTarget { .. })
    ));
    assert!(matches!(
        bad_target("10.0.0.1:0"),
        Err(RulesetError::InvalidTarget { .. })
    ));
    assert!(matches!(
        ForwardingRuleset::new(
            [],
            [],
            [Forward::new(Protocol::Tcp, 0, target("10.0.0.1:1"))]
        ),
        Err(RulesetError::ZeroPublicPort { .. })
    ));
    assert!(matches!(
        ForwardingRuleset::new([Ipv4Addr::LOCALHOST], [], []),
        Err(RulesetError::InvalidPublicAddress { .. })
    ));
    assert!(matches!(
        "10.0.0.1/24".parse::<Ipv4Cidr>(),
        Err(RulesetError::CidrHostBitsSet { .. })
    ));
    assert!(matches!(
        "10.0.0.0/33".parse::<Ipv4Cidr>(),
        Err(RulesetError::CidrPrefixTooLong { .. })
    ));
    assert!(matches!(
        "10.0.0.0".parse::<Ipv4Cidr>(),
        Err(RulesetError::CidrSyntax { .. })
    ));
    assert!(
        RulesetError::ZeroPublicPort {
            protocol: Protocol::Tcp,
            target: target("10.0.0.1:1")
        }
        .to_string()
        .starts_with("forwards:")
    );
}

#[test]
fn masquerade_sources_merge_networks_and_targets() {
    let r = ForwardingRuleset::new(
        [public()],
        [
            "10.244.1.0/24".parse().unwrap(),
            "10.244.3.0/25".parse().unwrap(),
        ],
        [
            Forward::new(Protocol::Tcp, 1, target("10.244.1.2:1")), // inside a network
            Forward::new(Protocol::Tcp, 2, target("10.244.3.128:1")), // adjacent to a network
            Forward::new(Protocol::Tcp, 3, target("10.9.0.1:1")),
            Forward::new(Protocol::Tcp, 4, target("10.9.0.2:1")),
        ],
    )
    .unwrap();
    let ranges: Vec<(String, String)> = r
        .masquerade_sources()
        .iter()
        .map(|r| (r.first.to_string(), r.last.to_string()))
        .collect();
    assert_eq!(
        ranges,
        [
            ("10.9.0.1".into(), "10.9.0.2".into()),
            ("10.244.1.0".into(), "10.244.1.255".into()),
            ("10.244.3.0".into(), "10.244.3.128".into()),
        ]
    );
    let cidrs: Vec<String> = r.masquerade_sources()[2]
        .to_cidrs()
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(cidrs, ["10.244.3.0/25", "10.244.3.128/32"]);
    assert_eq!(
        r.masquerade_sources()[1].as_cidr().unwrap().to_string(),
        "10.244.1.0/24"
    );
    assert_eq!(r.masquerade_sources()[0].as_cidr(), None);
}

proptest! {
    #[test]
    fn to_cidrs_covers_exactly_the_range(a in any::<u32>(), b in any::<u32>()) {
        let (first, last) = (a.min(b), a.max(b));
        let range = Ipv4Range { first: first.into(), last: last.into() };
        let blocks = range.to_cidrs();
        let mut next = u64::from(first);
        for block in &blocks {
            let covered = block.range();
            prop_assert_eq!(u64::from(u32::from(covered.first)), next);
            next = u64::from(u32::from(covered.last)) + 1;
        }
        prop_assert_eq!(next, u64::from(last) + 1);
        prop_assert!(blocks.len() <= 62);
    }
}

#[test]
fn unchanged_rulesets_reset_nothing() {
    let r = ruleset(&[
        (Protocol::Udp, 9000, "10.244.1.2:8000"),
        (Protocol::Tcp, 9000, "10.244.1.2:8000"),
    ]);
    assert!(stale_udp_flows(&r, &r).is_empty());
}

#[test]
fn removed_changed_and_added_udp_forwards_are_stale_tcp_never() {
    let before = ruleset(&[
        (Protocol::Udp, 9000, "10.244.1.2:8000"),
        (Protocol::Udp, 9001, "10.244.1.2:8001"),
        (Protocol::Udp, 9002, "10.244.1.2:8002"),
        (Protocol::Tcp, 9003, "10.244.1.2:8003"),
    ]);
    let after = ruleset(&[
        (Protocol::Udp, 9001, "10.244.1.3:8001"), // target changed
        (Protocol::Udp, 9002, "10.244.1.2:8002"), // unchanged
        (Protocol::Udp, 9004, "10.244.1.2:8004"), // added
                                                  // tcp 9003 removed, udp 9000 removed
    ]);
    let ports: Vec<u16> = stale_udp_flows(&before, &after)
        .iter()
        .map(|k| k.public_port)
        .collect();
    assert_eq!(ports, [9000, 9001, 9004]);
}

#[test]
fn a_removed_public_address_makes_its_udp_flows_stale() {
    let before = ruleset(&[(Protocol::Udp, 9000, "10.244.1.2:8000")]);
    let moved = ForwardingRuleset::new(
        [Ipv4Addr::new(203, 0, 113, 20)],
        [],
        before.forwards().iter().copied(),
    )
    .unwrap();
    let stale = stale_udp_flows(&before, &moved);
    assert_eq!(
        stale,
        [
            UdpFlowKey {
                public_address: public(),
                public_port: 9000
            },
            UdpFlowKey {
                public_address: Ipv4Addr::new(203, 0, 113, 20),
                public_port: 9000
            },
        ]
    );
}

fn arbitrary_ruleset() -> impl Strategy<Value = ForwardingRuleset> {
    (
        proptest::collection::vec(1u8..4, 0..3),
        proptest::collection::vec((any::<bool>(), 1u16..6, 1u8..4, 1u16..3), 0..8),
    )
        .prop_map(|(addresses, forwards)| {
            let mut seen = BTreeSet::new();
            ForwardingRuleset::new(
                addresses.into_iter().map(|a| Ipv4Addr::new(203, 0, 113, a)),
                [],
                forwards
                    .into_iter()
                    .map(|(udp, port, host, target_port)| {
                        let protocol = if udp { Protocol::Udp } else { Protocol::Tcp };
                        Forward::new(
                            protocol,
                            port,
                            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, host), target_port),
                        )
                    })
                    .filter(|f| seen.insert(f.key()))
                    .collect::<Vec<_>>(),
            )
            .unwrap()
        })
}

proptest! {
    /// A UDP flow towards address:port survives a change exactly when that address:port keeps
    /// leading to the same target.
    #[test]
    fn stale_flows_are_exactly_the_changed_udp_destinations(
        before in arbitrary_ruleset(),
        after in arbitrary_ruleset(),
    ) {
        let stale: BTreeSet<UdpFlowKey> = stale_udp_flows(&before, &after).into_iter().collect();
        for address in (1u8..4).map(|a| Ipv4Addr::new(203, 0, 113, a)) {
            for port in 1u16..6 {
                let lookup = |r: &ForwardingRuleset| {
                    r.public_addresses().contains(&address).then(|| r.target_of(Protocol::Udp, port)).flatten()
                };
                let key = UdpFlowKey { public_address: address, public_port: port };
                prop_assert_eq!(stale.contains(&key), lookup(&before) != lookup(&after));
            }
        }
        prop_assert!(stale_udp_flows(&after, &after).is_empty());
    }

    #[test]
    fn renderings_are_deterministic(r in arbitrary_ruleset()) {
        let shuffled = ForwardingRuleset::new(
            r.public_addresses().iter().rev().copied(),
            [],
            r.forwards().iter().rev().copied(),
        ).unwrap();
        prop_assert_eq!(nft::transaction_json(&r), nft::transaction_json(&shuffled));
        prop_assert_eq!(iptables::restore_input(&r, &[]), iptables::restore_input(&shuffled, &[]));
    }

    #[test]
    fn listings_of_the_rendered_table_are_in_sync_and_read_back(r in arbitrary_ruleset()) {
        // A listing is the list-form objects with handles and reordered elements, as nft prints.
        let mut objects: Vec<serde_json::Value> = nft::table_objects(&r)
            .iter()
            .enumerate()
            .map(|(handle, o)| {
                let mut v = serde_json::to_value(o).unwrap();
                let body = v.as_object_mut().unwrap().values_mut().next().unwrap();
                body["handle"] = serde_json::json!(handle);
                if let Some(serde_json::Value::Array(e)) = body.get_mut("elem") { e.reverse(); }
                v
            })
            .collect();
        objects.insert(0, serde_json::json!({"metainfo": {"version": "1.0.6"}}));
        let listing = serde_json::json!({ "nftables": objects }).to_string();
        let inspection = nft::inspect_listing(&r, Some(&listing)).unwrap();
        prop_assert_eq!(&inspection.difference, &None);
        prop_assert_eq!(inspection.installed.forwards(), r.forwards());
        prop_assert_eq!(inspection.installed.public_addresses(), r.public_addresses());

        let save = format!(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:UWSGI-IT-PREROUTING - [0:0]\n:UWSGI-IT-OUTPUT - [0:0]\n:UWSGI-IT-FORWARDS - [0:0]\n:UWSGI-IT-POSTROUTING - [0:0]\n{}\n{}\nCOMMIT\n",
            iptables::JUMP_RULES.iter().map(|j| j.save_line()).collect::<Vec<_>>().join("\n"),
            iptables::owned_rules(&r).join("\n"),
        );
        let inspection = iptables::inspect_save(&r, &save);
        prop_assert_eq!(&inspection.difference, &None);
        prop_assert_eq!(inspection.installed.forwards(), r.forwards());
        prop_assert_eq!(inspection.installed.public_addresses(), r.public_addresses());
    }
}

#[test]
fn a_missing_table_or_element_is_drift() {
    let r = ruleset(&[(Protocol::Tcp, 9000, "10.244.1.2:8000")]);
    let missing = nft::inspect_listing(&r, None).unwrap();
    assert_eq!(
        missing.difference.as_deref(),
        Some("table ip uwsgi_it is missing")
    );
    assert!(missing.installed.forwards().is_empty());

    let fewer = ruleset(&[]);
    let listing = serde_json::json!({ "nftables": nft::table_objects(&fewer) }).to_string();
    let drift = nft::inspect_listing(&r, Some(&listing)).unwrap();
    assert!(
        drift.difference.unwrap().contains("forward_"),
        "map difference expected"
    );

    let flushed = "*nat\n:PREROUTING ACCEPT [0:0]\n:UWSGI-IT-PREROUTING - [0:0]\n:UWSGI-IT-OUTPUT - [0:0]\n:UWSGI-IT-FORWARDS - [0:0]\n:UWSGI-IT-POSTROUTING - [0:0]\nCOMMIT\n";
    let inspection = iptables::inspect_save(&r, flushed);
    assert_eq!(inspection.missing_jumps.len(), 3);
    assert_eq!(
        inspection.difference.as_deref(),
        Some("rules of chain UWSGI-IT-PREROUTING differ")
    );
    let absent = iptables::inspect_save(&r, "*nat\nCOMMIT\n");
    assert_eq!(
        absent.difference.as_deref(),
        Some("chain UWSGI-IT-PREROUTING is missing")
    );
}

#[test]
fn an_unchanged_ruleset_has_an_empty_diff_and_no_transaction() {
    let r = ruleset(&[
        (Protocol::Udp, 9000, "10.244.1.2:8000"),
        (Protocol::Tcp, 9000, "10.244.1.2:8000"),
    ]);
    let diff = RulesetDiff::between(&r, &r);
    assert!(diff.is_empty(), "{diff:?}");
    assert!(nft::incremental_transaction(&diff).is_none());
    assert!(iptables::incremental_restore_input(&r, &r).is_none());
}

#[test]
fn a_changed_target_is_deleted_and_added_in_one_transaction() {
    let before = ruleset(&[
        (Protocol::Tcp, 9000, "10.244.1.2:8000"),
        (Protocol::Tcp, 9001, "10.244.1.2:8001"),
        (Protocol::Udp, 9002, "10.244.1.2:8002"),
    ]);
    let after = ruleset(&[
        (Protocol::Tcp, 9000, "10.244.1.2:8000"), // unchanged
        (Protocol::Tcp, 9001, "10.244.1.3:8001"), // target changed
        (Protocol::Udp, 9003, "10.244.1.2:8003"), // added; udp 9002 removed
    ]);
    let diff = RulesetDiff::between(&before, &after);
    assert_eq!(
        diff.removed_forwards,
        [
            Forward::new(Protocol::Tcp, 9001, target("10.244.1.2:8001")),
            Forward::new(Protocol::Udp, 9002, target("10.244.1.2:8002")),
        ]
    );
    assert_eq!(
        diff.added_forwards,
        [
            Forward::new(Protocol::Tcp, 9001, target("10.244.1.3:8001")),
            Forward::new(Protocol::Udp, 9003, target("10.244.1.2:8003")),
        ]
    );
    // 10.244.1.2 alone becomes 10.244.1.2-10.244.1.3: one range out, one in.
    assert_eq!(diff.removed_masquerade_sources.len(), 1);
    assert_eq!(diff.added_masquerade_sources.len(), 1);
    assert!(diff.removed_addresses.is_empty() && diff.added_addresses.is_empty());

    let transaction = serde_json::to_value(nft::incremental_transaction(&diff).unwrap()).unwrap();
    let commands: Vec<(String, String)> = transaction["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let (verb, body) = c.as_object().unwrap().iter().next().unwrap();
            (
                verb.clone(),
                body["element"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("delete", nft::FORWARD_ADDRESSES_MAP),
        ("delete", nft::FORWARD_PORTS_MAP),
        ("delete", nft::MASQUERADE_SOURCES_SET),
        ("add", nft::MASQUERADE_SOURCES_SET),
        ("add", nft::FORWARD_ADDRESSES_MAP),
        ("add", nft::FORWARD_PORTS_MAP),
    ]
    .map(|(v, n)| (v.to_owned(), n.to_owned()));
    assert_eq!(commands, expected);

    let restore = iptables::incremental_restore_input(&before, &after).unwrap();
    let lines: Vec<&str> = restore.lines().collect();
    assert_eq!(lines.first(), Some(&"*nat"));
    assert_eq!(lines.last(), Some(&"COMMIT"));
    let deletions = lines.iter().filter(|l| l.starts_with("-D ")).count();
    let additions = lines.iter().filter(|l| l.starts_with("-A ")).count();
    // Two forwards and one masquerade rule each way.
    assert_eq!((deletions, additions), (3, 3), "{restore}");
    let first_addition = lines.iter().position(|l| l.starts_with("-A ")).unwrap();
    assert!(
        lines[first_addition..]
            .iter()
            .all(|l| !l.starts_with("-D "))
    );
}

#[test]
fn iptables_rule_order_within_an_owned_chain_is_not_drift() {
    let r = ruleset(&[
        (Protocol::Tcp, 9000, "10.244.1.2:8000"),
        (Protocol::Tcp, 9001, "10.244.1.3:8001"),
    ]);
    let mut rules = iptables::owned_rules(&r);
    rules.reverse();
    let save = format!(
        "*nat\n:UWSGI-IT-PREROUTING - [0:0]\n:UWSGI-IT-OUTPUT - [0:0]\n:UWSGI-IT-FORWARDS - [0:0]\n:UWSGI-IT-POSTROUTING - [0:0]\n{}\n{}\nCOMMIT\n",
        iptables::JUMP_RULES
            .iter()
            .map(|j| j.save_line())
            .collect::<Vec<_>>()
            .join("\n"),
        rules.join("\n"),
    );
    assert_eq!(iptables::inspect_save(&r, &save).difference, None);
    // A duplicated rule still is.
    let doubled = save.replace("COMMIT", &format!("{}\nCOMMIT", rules[0]));
    assert!(iptables::inspect_save(&r, &doubled).difference.is_some());
}

fn arbitrary_ruleset_with_networks() -> impl Strategy<Value = ForwardingRuleset> {
    (arbitrary_ruleset(), proptest::collection::vec(0u8..4, 0..2)).prop_map(|(r, networks)| {
        ForwardingRuleset::new(
            r.public_addresses().iter().copied(),
            networks
                .into_iter()
                .map(|n| Ipv4Cidr::new(Ipv4Addr::new(10, 0, n, 0), 24).unwrap()),
            r.forwards().iter().copied(),
        )
        .unwrap()
    })
}

fn apply_sorted<T: Ord + Copy>(previous: &[T], removed: &[T], added: &[T]) -> Vec<T> {
    let mut result: BTreeSet<T> = previous.iter().copied().collect();
    for item in removed {
        assert!(result.remove(item), "removed element not present");
    }
    for item in added {
        assert!(result.insert(*item), "added element already present");
    }
    result.into_iter().collect()
}

proptest! {
    /// Deleting the removed elements then adding the added ones turns the previous table's
    /// elements into exactly the desired ones, and never deletes a missing element or adds a
    /// present one (either would make nft refuse the transaction).
    #[test]
    fn a_diff_turns_the_previous_elements_into_the_desired_ones(
        previous in arbitrary_ruleset_with_networks(),
        desired in arbitrary_ruleset_with_networks(),
    ) {
        let diff = RulesetDiff::between(&previous, &desired);
        prop_assert_eq!(
            apply_sorted(previous.public_addresses(), &diff.removed_addresses, &diff.added_addresses),
            desired.public_addresses().to_vec()
        );
        prop_assert_eq!(
            apply_sorted(previous.forwards(), &diff.removed_forwards, &diff.added_forwards),
            desired.forwards().to_vec()
        );
        prop_assert_eq!(
            apply_sorted(
                &previous.masquerade_sources(),
                &diff.removed_masquerade_sources,
                &diff.added_masquerade_sources,
            ),
            desired.masquerade_sources()
        );
        // Per map key: after the deletions a key is absent, so each addition is a fresh key.
        let mut keys: BTreeSet<(Protocol, u16)> = previous.forwards().iter().map(Forward::key).collect();
        for forward in &diff.removed_forwards {
            prop_assert!(keys.remove(&forward.key()));
        }
        for forward in &diff.added_forwards {
            prop_assert!(keys.insert(forward.key()));
        }
        prop_assert_eq!(diff.is_empty(), previous == desired);
        prop_assert_eq!(nft::incremental_transaction(&diff).is_none(), diff.is_empty());
    }

    /// The iptables incremental restore, replayed on the previous owned rules, gives the desired
    /// ones (as a set: order within a chain does not matter).
    #[test]
    fn the_iptables_incremental_restore_reaches_the_desired_rules(
        previous in arbitrary_ruleset_with_networks(),
        desired in arbitrary_ruleset_with_networks(),
    ) {
        let mut rules: BTreeSet<String> = iptables::owned_rules(&previous).into_iter().collect();
        match iptables::incremental_restore_input(&previous, &desired) {
            None => prop_assert_eq!(&iptables::owned_rules(&previous), &iptables::owned_rules(&desired)),
            Some(input) => {
                for line in input.lines() {
                    if let Some(spec) = line.strip_prefix("-D ") {
                        prop_assert!(rules.remove(&format!("-A {spec}")), "deleting a missing rule: {}", line);
                    } else if line.starts_with("-A ") {
                        prop_assert!(rules.insert(line.to_owned()), "adding a present rule: {}", line);
                    } else {
                        prop_assert!(line == "*nat" || line == "COMMIT", "unexpected line {}", line);
                    }
                }
                let wanted: BTreeSet<String> = iptables::owned_rules(&desired).into_iter().collect();
                prop_assert_eq!(rules, wanted);
            }
        }
    }
}

#[test]
fn cleanup_removes_every_jump_and_owned_chain_and_nothing_else() {
    let save = "*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:UWSGI-IT-PREROUTING - [0:0]
:UWSGI-IT-FORWARDS - [0:0]
-A PREROUTING -j UWSGI-IT-PREROUTING
-A PREROUTING -j KUBE-SERVICES
-A PREROUTING -j UWSGI-IT-PREROUTING
-A OUTPUT -m comment --comment x -j UWSGI-IT-OUTPUT
-A UWSGI-IT-PREROUTING -d 203.0.113.10/32 -j UWSGI-IT-FORWARDS
-A UWSGI-IT-FORWARDS -p tcp -m tcp --dport 9000 -j DNAT --to-destination 10.244.1.2:8000
COMMIT
";
    let input = iptables::cleanup_input(save).unwrap();
    assert_eq!(
        input,
        "*nat
:UWSGI-IT-PREROUTING - [0:0]
:UWSGI-IT-FORWARDS - [0:0]
-D PREROUTING -j UWSGI-IT-PREROUTING
-D PREROUTING -j UWSGI-IT-PREROUTING
-D OUTPUT -m comment --comment x -j UWSGI-IT-OUTPUT
-X UWSGI-IT-PREROUTING
-X UWSGI-IT-FORWARDS
COMMIT
"
    );
    assert!(!input.contains("KUBE"));
    assert_eq!(
        iptables::cleanup_input("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"),
        None
    );
}

#[test]
fn the_forward_accept_chain_is_written_only_when_it_differs() {
    let public: Vec<std::net::Ipv4Addr> = vec!["203.0.113.10".parse().unwrap()];
    let input =
        iptables::forward_accept_input(&public, "*filter\n:FORWARD DROP [0:0]\nCOMMIT\n").unwrap();
    assert_eq!(
        input,
        "*filter
:UWSGI-IT-FORWARD - [0:0]
-A UWSGI-IT-FORWARD -m conntrack --ctstate DNAT --ctorigdst 203.0.113.10 -j ACCEPT
-A FORWARD -j UWSGI-IT-FORWARD
COMMIT
"
    );
    let saved = "*filter
:FORWARD DROP [0:0]
:UWSGI-IT-FORWARD - [0:0]
-A FORWARD -j UWSGI-IT-FORWARD
-A FORWARD -j DOCKER-USER
-A UWSGI-IT-FORWARD -m conntrack --ctstate DNAT --ctorigdst 203.0.113.10 -j ACCEPT
COMMIT
";
    assert_eq!(iptables::forward_accept_input(&public, saved), None);
    // Another address: rewritten, the jump kept as it is.
    let other: Vec<std::net::Ipv4Addr> = vec!["203.0.113.20".parse().unwrap()];
    let input = iptables::forward_accept_input(&other, saved).unwrap();
    assert!(input.contains("--ctorigdst 203.0.113.20"), "{input}");
    assert!(!input.contains("-A FORWARD -j"), "{input}");
    let cleanup = iptables::forward_accept_cleanup_input(saved).unwrap();
    assert_eq!(
        cleanup,
        "*filter
:UWSGI-IT-FORWARD - [0:0]
-D FORWARD -j UWSGI-IT-FORWARD
-X UWSGI-IT-FORWARD
COMMIT
"
    );
    assert_eq!(
        iptables::forward_accept_cleanup_input("*filter\n:FORWARD DROP [0:0]\nCOMMIT\n"),
        None
    );
}
