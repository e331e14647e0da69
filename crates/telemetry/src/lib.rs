//! Logs, metrics and health endpoints shared by the controller and the agent.
//!
//! Both programs serve `/healthz` (the process is alive and its work loop is not stuck: see
//! [`Health`]), `/readyz` (its caches are synced and it can act) and `/metrics` (Prometheus
//! text format) on one listen address.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

pub use prometheus_client;

/// Structured logs: JSON when `json` is set (in a cluster), human-readable otherwise.
/// `RUST_LOG`, when set, overrides `level`.
pub fn init_tracing(level: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Colours only for a person at a terminal: in a Pod's log they are escape codes.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// What `/healthz` answers: `Ok` (200) or why not (500 with the reason), e.g. "the last
/// successful sync was 312 s ago". A liveness probe on it restarts a program whose loop hangs.
pub type Health = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A [`Health`] that is fine as long as the process answers.
pub fn alive() -> Health {
    Arc::new(|| Ok(()))
}

#[derive(Clone)]
struct Endpoints {
    registry: Arc<Registry>,
    ready: watch::Receiver<bool>,
    health: Health,
}

/// Serves `/healthz`, `/readyz` and `/metrics` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    ready: watch::Receiver<bool>,
    health: Health,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Endpoints {
            registry,
            ready,
            health,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Binds the listen address; separate from [`serve`] so a bad address fails at start-up.
pub async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("binding {address}: {e}"))
}

async fn healthz(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    match (endpoints.health)() {
        Ok(()) => (StatusCode::OK, "ok".to_owned()),
        Err(why) => (StatusCode::INTERNAL_SERVER_ERROR, why),
    }
}

async fn readyz(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    if *endpoints.ready.borrow() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}

async fn metrics(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &endpoints.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
