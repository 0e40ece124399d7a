//! Stats: per-exporter counters of data points (received, delivered, dropped by reason, retried)
//! and the report a shutdown returns. Counted in input data points: a window that aggregates 100
//! data points into one MLflow point counts 100 delivered when it lands. So at any time
//! `received = delivered + dropped + pending` for every exporter.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Why data points were not delivered. The `Display` form (snake_case) is what reports show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// The exporter's queue was full when the batch arrived (the trainer is never blocked).
    QueueFull,
    /// The SDK folded new attribute sets into its overflow series (cardinality limit reached).
    CardinalityOverflow,
    /// The step attribute was not an integer (see [`crate::decode`]).
    InvalidStep,
    /// A number data point without a value, or with an unreadable `trainmetrics.nonfinite`.
    InvalidValue,
    /// A histogram data point whose buckets do not match its bounds or count.
    InvalidHistogram,
    /// A data point type that is not mapped (exponential histogram, summary).
    UnsupportedType,
    /// The point's step is at or below one already written for its series (its window had
    /// closed), so writing it would make TensorBoard discard newer points.
    Late,
    /// Output waiting for delivery exceeded `sending_queue.queue_size`; the oldest was dropped.
    PendingFull,
    /// The backend kept failing with retryable errors past `retry_on_failure.max_elapsed_time`.
    RetryExhausted,
    /// The backend rejected the batch with a permanent error (e.g. HTTP 400).
    Rejected,
    /// Shutdown's timeout expired before these points could be delivered (and no spool took
    /// them).
    ShutdownTimeout,
    /// The on-disk spool reached `sending_queue.spool.max_size`; the documented policy dropped
    /// these points (see [`crate::spool`]).
    SpoolFull,
    /// The run already has `max_series_per_run` distinct series; points of further series are
    /// dropped so memory stays bounded.
    SeriesLimit,
    /// A NaN or ±Inf value dropped by the exporter's `nonfinite: drop` policy.
    NonFinite,
    /// Points of an earlier session of a run at or above the step the run resumed from
    /// (checkpoint resume): the resumed session's points replace them.
    Superseded,
    /// A data point identical to one already taken for its series and step (a collector's
    /// retry of a request whose answer was lost; an unchanged cumulative re-send): not
    /// aggregated again (see [`crate::cadence`], "Duplicates").
    Duplicate,
    /// The metric name is empty or maps to no name (only `/` and white space): no TensorBoard
    /// tag or MLflow key can stand for it (see [`crate::decode`]).
    InvalidName,
    /// A point of a rank that the exporter's job view does not show (`ranks: rank0` shows rank
    /// 0 of a distributed job; see [`crate::jobs`]).
    OtherRank,
}

impl DropReason {
    /// Every reason, in report order.
    pub const ALL: [DropReason; 18] = [
        DropReason::QueueFull,
        DropReason::CardinalityOverflow,
        DropReason::InvalidStep,
        DropReason::InvalidValue,
        DropReason::InvalidHistogram,
        DropReason::UnsupportedType,
        DropReason::Late,
        DropReason::PendingFull,
        DropReason::RetryExhausted,
        DropReason::Rejected,
        DropReason::ShutdownTimeout,
        DropReason::SpoolFull,
        DropReason::SeriesLimit,
        DropReason::NonFinite,
        DropReason::Superseded,
        DropReason::Duplicate,
        DropReason::InvalidName,
        DropReason::OtherRank,
    ];

    /// The snake_case name used in reports and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::CardinalityOverflow => "cardinality_overflow",
            DropReason::InvalidStep => "invalid_step",
            DropReason::InvalidValue => "invalid_value",
            DropReason::InvalidHistogram => "invalid_histogram",
            DropReason::UnsupportedType => "unsupported_type",
            DropReason::Late => "late",
            DropReason::PendingFull => "pending_full",
            DropReason::RetryExhausted => "retry_exhausted",
            DropReason::Rejected => "rejected",
            DropReason::ShutdownTimeout => "shutdown_timeout",
            DropReason::SpoolFull => "spool_full",
            DropReason::SeriesLimit => "series_limit",
            DropReason::NonFinite => "non_finite",
            DropReason::Superseded => "superseded",
            DropReason::Duplicate => "duplicate",
            DropReason::InvalidName => "invalid_name",
            DropReason::OtherRank => "other_rank",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Live counters of one exporter, shared between whoever submits batches and its worker.
#[derive(Debug, Default)]
pub struct ExporterStats {
    received: AtomicU64,
    delivered: AtomicU64,
    retried: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    /// Named events that are not point drops (e.g. `param_conflict`): counted and reported.
    events: Mutex<BTreeMap<String, u64>>,
    last_error: Mutex<Option<String>>,
}

impl ExporterStats {
    /// Counts `n` data points handed to the exporter.
    pub fn add_received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
    }
    /// Counts `n` data points delivered to the backend.
    pub fn add_delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
    }
    /// Counts one retried export attempt.
    pub fn add_retry(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }
    /// Counts `n` data points dropped for `reason`.
    pub fn add_dropped(&self, reason: DropReason, n: u64) {
        self.dropped[reason.index()].fetch_add(n, Ordering::Relaxed);
    }
    /// Counts one named event (e.g. `param_conflict`).
    pub fn add_event(&self, name: &str, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut e) = self.events.lock() {
            *e.entry(name.to_string()).or_default() += n;
        }
    }
    /// Remembers the last error message (already free of secrets).
    pub fn set_last_error(&self, message: String) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(message);
        }
    }
    /// A snapshot as a report, with `pending` data points still held by the exporter.
    pub fn report(&self, name: &str, pending: u64) -> ExporterReport {
        let dropped = DropReason::ALL
            .iter()
            .filter_map(|r| {
                let n = self.dropped[r.index()].load(Ordering::Relaxed);
                (n > 0).then(|| (r.as_str().to_string(), n))
            })
            .collect();
        ExporterReport {
            name: name.to_string(),
            received: self.received.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped,
            pending,
            spooled: 0,
            spool_bytes: 0,
            retried: self.retried.load(Ordering::Relaxed),
            events: self.events.lock().map(|e| e.clone()).unwrap_or_default(),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

/// What happened to one exporter's data points.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExporterReport {
    /// The exporter's configured name (`tensorboard`, `mlflow/fast`, …).
    pub name: String,
    /// Data points handed to the exporter.
    pub received: u64,
    /// Data points delivered (written to an event file / accepted by the MLflow server).
    pub delivered: u64,
    /// Data points dropped, by reason (only reasons with a non-zero count).
    pub dropped: BTreeMap<String, u64>,
    /// Data points still held (queued, in an open window, or awaiting retry).
    pub pending: u64,
    /// Of `pending`, data points whose batches are in the on-disk spool (after shutdown: what the
    /// next start will deliver).
    pub spooled: u64,
    /// Bytes of the spool on disk.
    pub spool_bytes: u64,
    /// Export attempts that were retried.
    pub retried: u64,
    /// Named events that are not point drops, e.g. `param_conflict`.
    pub events: BTreeMap<String, u64>,
    /// The last error the exporter saw, if any.
    pub last_error: Option<String>,
}

impl ExporterReport {
    /// Total dropped over all reasons.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }
}

impl fmt::Display for ExporterReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: received {} delivered {} dropped {}",
            self.name,
            self.received,
            self.delivered,
            self.dropped_total()
        )?;
        if !self.dropped.is_empty() {
            let parts: Vec<String> = self.dropped.iter().map(|(k, v)| format!("{k}={v}")).collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        if self.pending > 0 {
            write!(f, " pending {}", self.pending)?;
        }
        if self.spooled > 0 || self.spool_bytes > 0 {
            write!(f, " (spooled {} in {} bytes)", self.spooled, self.spool_bytes)?;
        }
        if self.retried > 0 {
            write!(f, " retried {}", self.retried)?;
        }
        for (k, v) in &self.events {
            write!(f, " {k} {v}")?;
        }
        if let Some(e) = &self.last_error {
            write!(f, " last error: {e}")?;
        }
        Ok(())
    }
}
