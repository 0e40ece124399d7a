//! Exporters: plain "batch in, result out" parts, one per backend. Each takes an [`OutBatch`] (the
//! points of one run after cadence and aggregation) and writes it, or says whether trying again
//! can help. Queueing, cadence, retry, timeouts and shutdown are wrapped around every exporter
//! once, in [`crate::delivery`]; no exporter implements them itself.
//!
//! Each exporter folder has the same role files: `config.rs` (serde config → settings),
//! `exporter.rs` (the [`Exporter`] impl), an encoder or request builder (backend format), and a
//! transport (`record.rs` file framing / `client.rs` HTTP).

pub mod mlflow;
pub mod tensorboard;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Backend, ExporterSettings};
use crate::delivery::Delivery;

use crate::batch::RunInfo;
use crate::cadence::OutBatch;
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
    fn export(&mut self, batch: &OutBatch, timeout: Duration) -> Result<Exported, ExportError>;

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

/// Where a started exporter puts runs, readable while it runs (for [`crate::Location`]).
#[derive(Debug, Clone)]
pub enum Target {
    /// TensorBoard: the logdir and the directory each run key claimed.
    TensorBoard {
        /// The logdir.
        logdir: PathBuf,
        /// Run key → run directory.
        run_dirs: tensorboard::exporter::RunDirs,
    },
    /// MLflow: the server and the MLflow run of each run key.
    Mlflow {
        /// Tracking URI (no credentials).
        tracking_uri: String,
        /// Run key → MLflow run.
        run_ids: mlflow::exporter::RunIds,
    },
}

/// Starts one configured exporter behind its [`Delivery`] (the same for the in-process library
/// and the service).
///
/// Errors: the OS refused to spawn the delivery thread.
pub fn start(e: &ExporterSettings) -> std::io::Result<(Arc<Delivery>, Target)> {
    let (delivery, target) = match &e.backend {
        Backend::TensorBoard(tb) => {
            let exporter = tensorboard::TensorBoardExporter::new(tb.clone());
            let run_dirs = exporter.run_dirs();
            let target = Target::TensorBoard { logdir: tb.logdir.clone(), run_dirs };
            (Delivery::start(&e.name, exporter, e.delivery.clone())?, target)
        }
        Backend::Mlflow(m) => {
            let exporter = mlflow::MlflowExporter::new(m.clone()).with_run_policy(e.run_policy);
            let run_ids = exporter.run_ids();
            let target = Target::Mlflow { tracking_uri: m.tracking_uri.clone(), run_ids };
            (Delivery::start(&e.name, exporter, e.delivery.clone())?, target)
        }
    };
    Ok((Arc::new(delivery), target))
}
