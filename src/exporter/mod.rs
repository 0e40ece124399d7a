//! Exporters: plain "batch in, result out" parts, one per backend. Each takes an [`Batch`] (the
//! points of one run after cadence and aggregation) and writes it, or says whether trying again
//! can help. Queueing, cadence, retry, timeouts and shutdown are wrapped around every exporter
//! once, in [`crate::delivery`]; no exporter implements them itself.
//!
//! Each exporter folder has the same role files: `config.rs` (serde config → settings),
//! `exporter.rs` (the [`Exporter`] impl), an encoder or request builder (backend format), and a
//! transport (`record.rs` file framing / `client.rs` HTTP).
//!
//! This module is the contract only; [`crate::factory`] builds started exporters from settings.

pub mod mlflow;
pub mod tensorboard;

use std::time::Duration;

use crate::decode::RunInfo;
use crate::cadence::Batch;
use crate::stats::{DropReason, ExporterStats};

/// How a run ended, as the trainer (or the process) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// Clean end: MLflow status FINISHED.
    Finished,
    /// The trainer reported failure or panicked: MLflow status FAILED.
    Failed,
    /// The runs go on (a service shutting down while trainers run): statuses are left as they
    /// are, and a restarted service continues them.
    Running,
}

/// Result of one export.
#[derive(Debug, Default)]
pub struct Exported {
    /// Points of the batch (by index) that were refused without retry, and why. The rest were
    /// delivered.
    pub refused: Vec<(usize, DropReason)>,
}

/// Why an export failed, classified for the retry policy.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Transient (connection refused, timeout, HTTP 408/429/5xx, I/O error): retry with backoff.
    #[error("{message}")]
    Retryable {
        /// What failed, free of secrets.
        message: String,
        /// The backend's requested delay (`Retry-After`), if any.
        retry_after: Option<Duration>,
    },
    /// The backend refused the batch for good (e.g. HTTP 400): drop it, counted `rejected`.
    #[error("{message}")]
    Permanent {
        /// What failed, free of secrets.
        message: String,
    },
}

/// One backend. Called from the exporter's own worker thread, never from the trainer's.
pub trait Exporter: Send + 'static {
    /// Writes one batch. `timeout` bounds this call (network exporters pass it to their client).
    ///
    /// Must be idempotent for a retried batch (the same batch may be passed again after a
    /// `Retryable` error): TensorBoard skips steps already written, MLflow relies on the
    /// server's deduplication of identical (key, step, timestamp, value) rows.
    fn export(&mut self, batch: &Batch, timeout: Duration) -> Result<Exported, ExportError>;

    /// Ends every run this exporter started (MLflow: status per `outcome`; TensorBoard: flush and
    /// close files). Bounded by `timeout`.
    fn end_runs(&mut self, outcome: RunOutcome, timeout: Duration) -> Result<(), ExportError>;

    /// Sees each run's description (resource) as it arrives, in arrival order, before cadence
    /// holds the points back; lets an exporter judge params in the order they were sent. Must not
    /// block or do I/O.
    fn observe_run(&mut self, _run: &RunInfo) {}

    /// Gives the exporter the shared counters, for events that are not point drops (called once
    /// before the first export).
    fn attach_stats(&mut self, _stats: std::sync::Arc<ExporterStats>) {}
}

/// What a backend changes in the defaults of the keys every exporter has
/// ([`crate::delivery::DeliveryConfig`]); each backend's `config.rs` has its `DEFAULTS`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackendDefaults {
    /// `every_steps` when neither it nor `interval` is set.
    pub every_steps: u64,
    /// Whether `sending_queue.spool.enabled` defaults to true.
    pub spool: bool,
    /// The bound `nonfinite: clamp` clamps ±Inf to (the backend's largest finite value).
    pub clamp_limit: f64,
}
