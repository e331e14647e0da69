//! The controller SIGKILLed (no cooperative stop: mid-request, mid-commit, mid-projection) at 20
//! random points of a burst of creates and resizes, restarted each time: every ledger revision
//! stays within capacity, no uid changes or repeats, and once a last controller has settled
//! everything, the statuses are exactly the ledgers' projection.

mod faults;

use std::collections::HashSet;
use std::time::Duration;

use faults::*;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use uwsgi_it_api::Container;

const KILLS: usize = 20;

#[tokio::test]
async fn a_controller_killed_at_random_points_never_oversells_nor_reuses_a_uid() {
    let Setup {
        plane,
        client,
        system,
        config,
        auditor,
        work: _work,
    } = setup().await;
    let servers = servers_and_customer(&client, "burst", 2, 1000, 100000).await;
    let containers: Api<Container> = Api::namespaced(client.clone(), "burst");
    let mut random = Random::from_env();

    // 20 rounds of 3 creates (150 MB each: 6 fit on a server) and a resize, the controller
    // killed at a random moment of each.
    let mut names = Vec::new();
    for round in 0..KILLS {
        let mut controller =
            ControllerProcess::start(plane, &system, &config, &format!("life-{round}"));
        controller.wait_ready().await;
        if round == 0 {
            wait_namespace(&client, "burst").await;
        }
        for i in 0..3 {
            let name = format!("c{round:02}-{i}");
            let server = &servers[(round * 3 + i) % servers.len()];
            containers
                .create(&PostParams::default(), &container(&name, server, 150, 100))
                .await
                .unwrap();
            names.push(name);
        }
        if round > 2 {
            let name = &names[random.range(0, names.len() as u64) as usize];
            let patch = json!({"spec": {"memory": random.range(1, 4) * 100}});
            containers
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
        // Anywhere in the work these writes started: a commit, a projection, a finalizer.
        tokio::time::sleep(random.millis(0, 400)).await;
        controller.kill();
    }

    let _last = ControllerProcess::start(plane, &system, &config, "last");
    let settled = settled(&client, "burst").await;
    assert_eq!(settled.len(), KILLS * 3);
    let settled = assert_consistent(&client, &settled).await;
    let mut uids = HashSet::new();
    for server in &servers {
        let reserved: i64 = settled
            .iter()
            .filter_map(|c| c.status.as_ref())
            .filter(|s| s.server.as_deref() == Some(server.as_str()))
            .filter_map(|s| s.reserved.as_ref())
            .map(|r| r.memory)
            .sum();
        assert!(
            reserved <= 1000,
            "{server}: {reserved} MB of 1000 MB reserved"
        );
        assert!(
            reserved >= 700,
            "{server}: only {reserved} MB reserved: room left unused"
        );
    }
    for c in &settled {
        if let Some(uid) = c.status.as_ref().and_then(|s| s.uid) {
            assert!(uids.insert(uid), "uid {uid} twice");
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let findings = auditor.finish().await;
    eprintln!(
        "[sigkill] {KILLS} kills; {} ledger and {} container revisions audited",
        findings.revisions, findings.container_revisions
    );
    assert!(
        findings.violations.is_empty(),
        "guarantees broken:\n{}",
        findings.violations.join("\n")
    );
}
