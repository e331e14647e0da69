//! Two controller processes that both act as leader (`--leader-elect=false`, what a lease that
//! lapsed during a long pause makes of two replicas), under a random mix of creates, resizes
//! and deletes on a few small Servers, one of them repeatedly frozen (SIGSTOP) in the middle of
//! whatever it was doing and thawed (SIGCONT) later with its stale view. An auditor watching
//! every revision of every ledger finds Σ reserved ≤ capacity at each one, and no container's
//! uid ever changes or goes to two containers.

mod faults;

use std::time::{Duration, Instant};

use faults::*;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use uwsgi_it_api::Container;

/// How long the random mix runs.
const MIX: Duration = Duration::from_secs(60);

#[tokio::test]
async fn two_acting_leaders_one_repeatedly_frozen_never_oversell_nor_reuse_a_uid() {
    let Setup {
        plane,
        client,
        system,
        config,
        auditor,
        work: _work,
    } = setup().await;

    let servers = servers_and_customer(&client, "twin", 3, 1500, 8000).await;
    let steady = ControllerProcess::start(plane, &system, &config, "steady");
    let frozen = ControllerProcess::start(plane, &system, &config, "frozen");
    let containers: Api<Container> = Api::namespaced(client.clone(), "twin");
    wait_namespace(&client, "twin").await;

    let mut random = Random::from_env();
    let mut pause_random = Random::seeded(random.next());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pauser = {
        let done = std::sync::Arc::clone(&done);
        tokio::spawn(async move {
            let mut pauses = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(pause_random.millis(200, 1500)).await;
                frozen.pause();
                tokio::time::sleep(pause_random.millis(300, 3000)).await;
                frozen.resume();
                pauses += 1;
            }
            (frozen, pauses)
        })
    };

    let (mut creates, mut resizes, mut deletes) = (0, 0, 0);
    let mut live: Vec<String> = Vec::new();
    let started = Instant::now();
    let mut next = 0;
    while started.elapsed() < MIX {
        let roll = random.range(0, 100);
        if roll < 50 || live.len() < 5 {
            let name = format!("c{next:04}");
            next += 1;
            let server = &servers[random.range(0, servers.len() as u64) as usize];
            let c = container(
                &name,
                server,
                random.range(1, 9) * 50,
                random.range(1, 9) * 250,
            );
            if containers.create(&PostParams::default(), &c).await.is_ok() {
                live.push(name);
                creates += 1;
            }
        } else if roll < 80 {
            let name = &live[random.range(0, live.len() as u64) as usize];
            let patch = json!({"spec": {
                "memory": random.range(1, 9) * 50,
                "storage": random.range(1, 9) * 250,
            }});
            if containers
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .is_ok()
            {
                resizes += 1;
            }
        } else {
            let name = live.swap_remove(random.range(0, live.len() as u64) as usize);
            if containers
                .delete(&name, &DeleteParams::default())
                .await
                .is_ok()
            {
                deletes += 1;
            }
        }
        tokio::time::sleep(random.millis(10, 80)).await;
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut frozen, pauses) = pauser.await.unwrap();
    frozen.resume();

    let settled = settled(&client, "twin").await;
    let mut steady = steady;
    assert!(
        steady.alive() && frozen.alive(),
        "a controller died on its own"
    );
    let settled = assert_consistent(&client, &settled).await;
    let findings = auditor.finish().await;
    let admitted = settled
        .iter()
        .filter(|c| c.status.as_ref().is_some_and(|s| s.reserved.is_some()))
        .count();
    eprintln!(
        "[two-leaders] {creates} creates, {resizes} resizes, {deletes} deletes, {pauses} freezes; \
         {} ledger and {} container revisions audited; {admitted} of {} containers hold a reservation at the end",
        findings.revisions,
        findings.container_revisions,
        settled.len()
    );
    assert!(
        findings.violations.is_empty(),
        "guarantees broken:\n{}",
        findings.violations.join("\n")
    );
    assert!(
        findings.revisions > 100,
        "the mix hardly touched the ledgers"
    );
    assert!(
        pauses >= 10,
        "the frozen controller was frozen only {pauses} times"
    );
}
