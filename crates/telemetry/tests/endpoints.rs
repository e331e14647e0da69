//! The health and metrics endpoints over real HTTP on loopback.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};

async fn get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("an HTTP status line");
    (status, response)
}

#[tokio::test]
async fn healthz_readyz_and_metrics() {
    let mut registry = Registry::default();
    let syncs = Counter::<u64>::default();
    registry.register("syncs", "Syncs done", syncs.clone());
    syncs.inc();
    let (ready, ready_rx) = watch::channel(false);
    let (stop, stopped) = oneshot::channel::<()>();
    let listener = uwsgi_it_telemetry::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let address = listener.local_addr().unwrap();
    let stuck = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let health: uwsgi_it_telemetry::Health = {
        let stuck = stuck.clone();
        Arc::new(move || {
            if stuck.load(std::sync::atomic::Ordering::SeqCst) {
                Err("the loop is stuck".to_owned())
            } else {
                Ok(())
            }
        })
    };
    let server = tokio::spawn(uwsgi_it_telemetry::serve(
        listener,
        Arc::new(registry),
        ready_rx,
        health,
        async {
            let _ = stopped.await;
        },
    ));

    assert_eq!(get(address, "/healthz").await.0, 200);
    stuck.store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = get(address, "/healthz").await;
    assert_eq!(status, 500);
    assert!(body.ends_with("the loop is stuck"), "{body}");
    stuck.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(get(address, "/healthz").await.0, 200);
    let (status, body) = get(address, "/readyz").await;
    assert_eq!(status, 503, "not ready before the caches synced: {body}");
    ready.send_replace(true);
    assert_eq!(get(address, "/readyz").await.0, 200);
    let (status, body) = get(address, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("syncs_total 1"), "{body}");

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
