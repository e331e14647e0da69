//! The agent's Prometheus metrics, served on `/metrics` by `uwsgi_it_telemetry::serve`.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use uwsgi_it_telemetry::prometheus_client::metrics::counter::Counter;
use uwsgi_it_telemetry::prometheus_client::metrics::family::Family;
use uwsgi_it_telemetry::prometheus_client::metrics::gauge::Gauge;
use uwsgi_it_telemetry::prometheus_client::metrics::histogram::Histogram;
use uwsgi_it_telemetry::prometheus_client::registry::Registry;

/// Everything the agent counts. Cheap to share (`Arc<Metrics>`); every handle is atomic.
#[derive(Debug)]
pub struct Metrics {
    sync_duration: Histogram,
    forwards_programmed: Gauge,
    sync_failures: Counter,
    drift_repairs: Counter,
    last_successful_sync: Gauge<f64, AtomicU64>,
    homes: Gauge,
    home_storage_used: Family<Vec<(String, String)>, Gauge>,
}

/// Labels of a home's series. Not `namespace` and `container`: Prometheus' Kubernetes
/// discovery gives every scraped series those of the agent's own Pod, and a clash would rename
/// ours `exported_*`.
fn home_labels(namespace: &str, container: &str) -> Vec<(String, String)> {
    vec![
        ("container_namespace".to_owned(), namespace.to_owned()),
        ("container_name".to_owned(), container.to_owned()),
    ]
}

impl Metrics {
    /// Creates the metrics and registers them under the `uwsgi_it_agent` prefix.
    pub fn register(registry: &mut Registry) -> Metrics {
        // Syncs are one nft/iptables transaction: a few ms normally, seconds only when the host
        // is in trouble.
        let buckets = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
        ];
        let metrics = Metrics {
            sync_duration: Histogram::new(buckets),
            forwards_programmed: Gauge::default(),
            sync_failures: Counter::default(),
            drift_repairs: Counter::default(),
            last_successful_sync: Gauge::default(),
            homes: Gauge::default(),
            home_storage_used: Family::default(),
        };
        let registry = registry.sub_registry_with_prefix("uwsgi_it_agent");
        registry.register(
            "forwarding_sync_duration_seconds",
            "Time to compare and, when needed, rewrite the node's port forwards",
            metrics.sync_duration.clone(),
        );
        registry.register(
            "forwards_programmed",
            "Port forwards currently programmed on the node",
            metrics.forwards_programmed.clone(),
        );
        registry.register(
            "forwarding_sync_failures",
            "Forwarding syncs that failed (the previous rules stay in place)",
            metrics.sync_failures.clone(),
        );
        registry.register(
            "forwarding_drift_repairs",
            "Times the kernel's rules differed from what the agent had programmed and were rewritten",
            metrics.drift_repairs.clone(),
        );
        registry.register(
            "forwarding_last_success_timestamp_seconds",
            "Unix time of the last successful forwarding sync",
            metrics.last_successful_sync.clone(),
        );
        registry.register(
            "homes",
            "Container homes the agent manages on the node",
            metrics.homes.clone(),
        );
        registry.register(
            "home_storage_used_mb",
            "Storage a container's home uses on the node (MB), as last measured, by Container (container_namespace, container_name)",
            metrics.home_storage_used.clone(),
        );
        metrics
    }

    pub(crate) fn sync_succeeded(&self, duration: Duration, forwards: usize) {
        self.sync_duration.observe(duration.as_secs_f64());
        self.forwards_programmed
            .set(i64::try_from(forwards).unwrap_or(i64::MAX));
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_successful_sync.set(now.as_secs_f64());
    }

    pub(crate) fn sync_failed(&self, duration: Duration) {
        self.sync_duration.observe(duration.as_secs_f64());
        self.sync_failures.inc();
    }

    pub(crate) fn drift_repaired(&self) {
        self.drift_repairs.inc();
    }

    pub(crate) fn set_homes(&self, homes: usize) {
        self.homes.set(i64::try_from(homes).unwrap_or(i64::MAX));
    }

    /// Records what a container's home uses (MB), as measured.
    pub(crate) fn set_home_storage_used(&self, namespace: &str, container: &str, used_mb: i64) {
        self.home_storage_used
            .get_or_create(&home_labels(namespace, container))
            .set(used_mb);
    }

    /// Forgets a released home's usage, so the series ends with the home.
    pub(crate) fn forget_home(&self, namespace: &str, container: &str) {
        self.home_storage_used
            .remove(&home_labels(namespace, container));
    }

    /// Drift repairs so far.
    pub fn drift_repairs(&self) -> u64 {
        self.drift_repairs.get()
    }

    /// Failed forwarding syncs so far.
    pub fn sync_failures(&self) -> u64 {
        self.sync_failures.get()
    }

    /// Forwards programmed by the last successful sync.
    pub fn forwards_programmed(&self) -> i64 {
        self.forwards_programmed.get()
    }

    /// Homes present after the last homes pass.
    pub fn homes(&self) -> i64 {
        self.homes.get()
    }
}
