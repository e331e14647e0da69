//! Prometheus metrics of the controller.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use uwsgi_it_domain::capacity::Usage;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabel {
    controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabel {
    server: String,
}

/// The controller's metrics, registered in one registry served at `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    reconciles: Family<ControllerLabel, Counter>,
    failures: Family<ControllerLabel, Counter>,
    durations: Family<ControllerLabel, Histogram>,
    admission_passes: Histogram,
    status_writes: Counter,
    ledger_conflicts: Counter,
    finalizer_writes: Counter,
    admission_failures: Counter,
    leading: Gauge,
    memory_reserved: Family<ServerLabel, Gauge>,
    storage_reserved: Family<ServerLabel, Gauge>,
    memory_capacity: Family<ServerLabel, Gauge>,
    storage_capacity: Family<ServerLabel, Gauge>,
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Metrics {
    /// Creates the metrics and registers them under the `uwsgi_it_controller` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            reconciles: Family::default(),
            failures: Family::default(),
            durations: Family::new_with_constructor(seconds_histogram),
            admission_passes: seconds_histogram(),
            status_writes: Counter::default(),
            ledger_conflicts: Counter::default(),
            finalizer_writes: Counter::default(),
            admission_failures: Counter::default(),
            leading: Gauge::default(),
            memory_reserved: Family::default(),
            storage_reserved: Family::default(),
            memory_capacity: Family::default(),
            storage_capacity: Family::default(),
        };
        let registry = registry.sub_registry_with_prefix("uwsgi_it_controller");
        registry.register(
            "reconciles",
            "Reconciliations run",
            metrics.reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconciliations that failed and were retried with backoff",
            metrics.failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation",
            metrics.durations.clone(),
        );
        registry.register(
            "admission_pass_duration_seconds",
            "Time spent in one per-server admission pass",
            metrics.admission_passes.clone(),
        );
        registry.register(
            "status_writes",
            "Ledger commits and status writes (admission projections, Ready and Stalled summaries)",
            metrics.status_writes.clone(),
        );
        registry.register(
            "ledger_conflicts",
            "Ledger commits refused because the Server changed since it was read (decided again)",
            metrics.ledger_conflicts.clone(),
        );
        registry.register(
            "finalizer_writes",
            "Finalizers added to or removed from Containers",
            metrics.finalizer_writes.clone(),
        );
        registry.register(
            "admission_failures",
            "Admissions that could not be completed (no uid could be handed out)",
            metrics.admission_failures.clone(),
        );
        registry.register(
            "leading",
            "1 while this replica leads (or runs without leader election) and reconciles, else 0",
            metrics.leading.clone(),
        );
        registry.register(
            "memory_reserved_mb",
            "Memory reserved by admitted containers, per server (MB)",
            metrics.memory_reserved.clone(),
        );
        registry.register(
            "storage_reserved_mb",
            "Storage reserved by admitted containers, per server (MB)",
            metrics.storage_reserved.clone(),
        );
        registry.register(
            "memory_capacity_mb",
            "Memory capacity of the server (Server spec.memory, MB)",
            metrics.memory_capacity.clone(),
        );
        registry.register(
            "storage_capacity_mb",
            "Storage capacity of the server (Server spec.storage, MB)",
            metrics.storage_capacity.clone(),
        );
        metrics
    }

    /// Starts timing a reconciliation; the returned guard records it when dropped.
    pub fn reconcile_started(&self, controller: &'static str) -> ReconcileTimer {
        self.reconciles
            .get_or_create(&ControllerLabel { controller })
            .inc();
        ReconcileTimer {
            histogram: self
                .durations
                .get_or_create(&ControllerLabel { controller })
                .clone(),
            started: Instant::now(),
        }
    }

    /// Counts a failed reconciliation.
    pub fn reconcile_failed(&self, controller: &'static str) {
        self.failures
            .get_or_create(&ControllerLabel { controller })
            .inc();
    }

    /// Starts timing an admission pass.
    pub fn admission_pass_started(&self) -> ReconcileTimer {
        ReconcileTimer {
            histogram: self.admission_passes.clone(),
            started: Instant::now(),
        }
    }

    /// Counts a status write (a ledger commit, an admission projection, a summary).
    pub fn status_written(&self) {
        self.status_writes.inc();
    }

    /// Counts a ledger commit that met a conflict.
    pub fn ledger_conflict(&self) {
        self.ledger_conflicts.inc();
    }

    /// Counts a Container finalizer write.
    pub fn finalizer_written(&self) {
        self.finalizer_writes.inc();
    }

    /// Says this replica now leads and reconciles.
    pub fn set_leading(&self) {
        self.leading.set(1);
    }

    /// Counts an admission that could not be completed.
    pub fn admission_failed(&self) {
        self.admission_failures.inc();
    }

    /// Records a server's capacity and reservations after a pass.
    pub fn record_usage(&self, usage: &Usage) {
        let label = ServerLabel {
            server: usage.server.clone(),
        };
        let set = |family: &Family<ServerLabel, Gauge>, value: u64| {
            family
                .get_or_create(&label)
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        set(&self.memory_reserved, usage.used.memory_mb);
        set(&self.storage_reserved, usage.used.storage_mb);
        set(&self.memory_capacity, usage.capacity.memory_mb);
        set(&self.storage_capacity, usage.capacity.storage_mb);
    }
}

/// Observes the elapsed time into a histogram when dropped.
pub struct ReconcileTimer {
    histogram: Histogram,
    started: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}
