//! A controller killed in the middle of admitting a burst of containers, then started again:
//! no server is oversold and no uid is handed out twice. A test binary of its own, because it
//! owns the controller's life.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use futures::future::join_all;
use kube::api::{Api, PostParams};
use serde_json::json;
use support::*;
use uwsgi_it_api::Container;
use uwsgi_it_testbed::control_plane::ControlPlane;

#[tokio::test]
async fn killing_the_controller_mid_burst_never_oversells_nor_reuses_a_uid() {
    let plane = tokio::task::spawn_blocking(ControlPlane::shared)
        .await
        .unwrap();
    plane.install_crds(&uwsgi_it_api::crds()).await.unwrap();
    let client = plane.client().await.unwrap();
    let system = plane.namespace("uwsgi-it-system").await.unwrap();
    let servers = ["burst-1", "burst-2"];
    for (i, server) in servers.iter().enumerate() {
        server_node(
            &client,
            server,
            1000,
            100000,
            &format!("203.0.113.{}", 40 + i),
        )
        .await;
    }

    let first = RunningController::start(plane, system.clone());
    customer(&client, "burst", &servers, &[]).await;
    let containers: Api<Container> = Api::namespaced(client.clone(), "burst");
    // 2 servers × 1000 MB; 24 containers of 150 MB: at most 6 fit on each.
    let names: Vec<String> = (0..24).map(|i| format!("c{i:02}")).collect();
    let create = |names: Vec<String>| {
        let containers = containers.clone();
        async move {
            join_all(names.iter().enumerate().map(|(i, name)| {
                let containers = containers.clone();
                let c = container(
                    name,
                    json!({"server": servers[i % 2], "memory": 150, "storage": 100}),
                );
                async move { containers.create(&PostParams::default(), &c).await.unwrap() }
            }))
            .await;
        }
    };
    create(names[..12].to_vec()).await;
    // Kill it while it is working on the first half: wait for the first admission, no more.
    wait_for(&containers, &names[0], decided).await;
    first.kill();
    create(names[12..].to_vec()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let _second = RunningController::start(plane, system);
    let mut decided_all = Vec::new();
    for name in &names {
        decided_all.push(wait_for(&containers, name, decided).await);
    }
    for c in &decided_all {
        let s = c.status.as_ref().unwrap();
        eprintln!(
            "{} server={:?} uid={:?} reserved={:?} admitted={:?}",
            c.metadata.name.as_deref().unwrap(),
            s.server,
            s.uid,
            s.reserved,
            admission(c)
        );
    }
    let mut uids = BTreeSet::new();
    for server in servers {
        let on_server: Vec<&Container> = decided_all
            .iter()
            .filter(|c| admitted(c))
            .filter(|c| c.status.as_ref().unwrap().server.as_deref() == Some(server))
            .collect();
        let memory: i64 = on_server
            .iter()
            .map(|c| c.status.as_ref().unwrap().reserved.as_ref().unwrap().memory)
            .sum();
        assert!(
            memory <= 1000,
            "{server} oversold: {memory} MB reserved of 1000 MB"
        );
        assert_eq!(
            on_server.len(),
            6,
            "{server}: exactly the containers that fit are admitted"
        );
        for c in on_server {
            let uid = c.status.as_ref().unwrap().uid.unwrap();
            assert!(uids.insert(uid), "uid {uid} handed out twice");
        }
    }
    for refused in decided_all.iter().filter(|c| !admitted(c)) {
        let (_, reason, message) = admission(refused);
        assert_eq!(reason, "InsufficientMemory", "{message}");
    }
}
