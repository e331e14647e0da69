//! A tool that hangs: `nft` replaced by a script that sleeps while a flag file exists. Every
//! child is killed at `portForward.commandTimeout`, the syncs fail with that in the error, the
//! agent's `/healthz` (over real HTTP) fails within `portForward.maxSyncAge`, and once the tool
//! works again the next sync succeeds and `/healthz` is fine.
//!
//! Its own test binary: it puts the fake `nft` first on this process's `PATH`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use support::*;

/// An argument no other process uses, to find leftover sleepers.
const SLEEP_MARK: &str = "3600.0417";

async fn healthz(address: std::net::SocketAddr) -> (u16, String) {
    let response = uwsgi_it_testbed::alerts::http_get_local(address, "/healthz")
        .await
        .unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("an HTTP status line");
    (status, response)
}

fn real(program: &str) -> std::path::PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{program} not on PATH"))
}

#[tokio::test]
async fn a_hung_nft_fails_healthz_within_the_bound_and_the_agent_recovers() {
    let fake = tempfile::tempdir().unwrap();
    let flag = fake.path().join("hang");
    let script = fake.path().join("nft");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ -e {flag} ]; then echo 'nft: pretending to hang' >&2; exec sleep {SLEEP_MARK}; fi\nexec {real} \"$@\"\n",
            flag = flag.display(),
            real = real("nft").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = std::env::var_os("PATH").unwrap();
    let mut dirs = vec![fake.path().to_owned()];
    dirs.extend(std::env::split_paths(&path));
    // SAFETY: nothing else runs in this test binary yet (one test, set before any thread or
    // child starts); `ip netns exec` finds `nft` through this PATH.
    unsafe { std::env::set_var("PATH", std::env::join_paths(dirs).unwrap()) };

    let plane = plane_with_crds().await;
    let world = World::new(plane, Backend::Nftables, 1, vec![8000]).await;
    let timeout = Duration::from_secs(1);
    let max_sync_age = Duration::from_secs(4);
    let mut agent = world.start_agent_with(1, "  commandTimeout: 1s\n  maxSyncAge: 4s\n");
    agent.wait_ready().await;

    let listener = uwsgi_it_telemetry::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(uwsgi_it_telemetry::serve(
        listener,
        agent.registry.clone(),
        agent.ready.clone(),
        agent.health.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    assert_eq!(healthz(address).await.0, 200);
    // The chart's alerts on what this agent's /metrics says, with a staleness bound this test
    // can wait for (the chart's default is 300 s).
    let rules = uwsgi_it_testbed::alerts::chart_rules(&["prometheusRule.agentStaleSeconds=3"])
        .expect("the chart's alert rules");
    let mut scrapes = uwsgi_it_testbed::alerts::Scrapes::new().unwrap();
    async fn scrape(
        scrapes: &mut uwsgi_it_testbed::alerts::Scrapes,
        address: std::net::SocketAddr,
    ) -> std::time::SystemTime {
        let text = uwsgi_it_testbed::alerts::scrape(address).await.unwrap();
        scrapes.record("agent", &text).unwrap()
    }
    let healthy = scrape(&mut scrapes, address).await;
    let alerts = scrapes.evaluate(&rules, healthy).unwrap();
    for alert in ["UwsgiItAgentSyncFailing", "UwsgiItAgentSyncStale"] {
        assert_eq!(
            alerts.get(alert),
            Some(&false),
            "{alert} on a healthy agent: {alerts:?}"
        );
    }

    let failures_before = agent.metrics.sync_failures();
    std::fs::write(&flag, "").unwrap();
    let hung = Instant::now();
    let response = eventually("/healthz fails", || async {
        let (status, body) = healthz(address).await;
        (status == 500).then_some(body)
    })
    .await;
    let took = hung.elapsed();
    assert!(
        response.contains("no successful forwarding sync for"),
        "{response}"
    );
    // The last success was at most one resync before the hang; then the age must pass the
    // bound, checked by the next probe.
    let bound = max_sync_age + RESYNC + timeout + Duration::from_secs(2);
    assert!(
        took <= bound,
        "/healthz failed {took:?} after the hang (bound {bound:?})"
    );
    assert!(
        agent.metrics.sync_failures() > failures_before,
        "the killed syncs count as failures"
    );
    assert!(agent.is_running(), "a hung tool never stops the agent");
    // Scraped every half second while the tool hangs: both agent alerts fire.
    let mut last = healthy;
    while last.duration_since(healthy).unwrap_or_default() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        last = scrape(&mut scrapes, address).await;
    }
    let alerts = scrapes.evaluate(&rules, last).unwrap();
    for alert in ["UwsgiItAgentSyncFailing", "UwsgiItAgentSyncStale"] {
        assert_eq!(
            alerts.get(alert),
            Some(&true),
            "{alert} with a hung nft: {alerts:?}"
        );
    }

    std::fs::remove_file(&flag).unwrap();
    eventually("/healthz recovers", || async {
        (healthz(address).await.0 == 200).then_some(())
    })
    .await;
    // Recovered: syncing again, so not stale; the failures stay in the 10-minute window.
    let recovered = scrape(&mut scrapes, address).await;
    let alerts = scrapes.evaluate(&rules, recovered).unwrap();
    assert_eq!(
        alerts.get("UwsgiItAgentSyncStale"),
        Some(&false),
        "{alerts:?}"
    );
    assert_eq!(
        alerts.get("UwsgiItAgentSyncFailing"),
        Some(&true),
        "{alerts:?}"
    );
    let leftovers = std::process::Command::new("pgrep")
        .args(["-f", &format!("sleep {SLEEP_MARK}")])
        .output()
        .unwrap();
    assert!(
        leftovers.stdout.is_empty(),
        "a killed tool left a process behind: {}",
        String::from_utf8_lossy(&leftovers.stdout)
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    agent.stop().await.unwrap();
}
