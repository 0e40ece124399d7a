//! The factory: builds started exporters from validated settings, the same for the in-process
//! library and the service. It is the one place that matches on the backend: a new backend
//! touches its folder under [`crate::exporter`], [`crate::config`]'s dispatch on the type key,
//! and this match.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{Backend, ExporterSettings};
use crate::delivery::Delivery;
use crate::exporter::{mlflow, tensorboard};

/// Where a started exporter puts runs, readable while it runs (for [`crate::RunDestination`]).
#[derive(Debug, Clone)]
pub enum Destination {
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

/// Starts one configured exporter behind its [`Delivery`].
///
/// Errors: the OS refused to spawn the delivery thread.
pub fn start(e: &ExporterSettings) -> std::io::Result<(Arc<Delivery>, Destination)> {
    let (delivery, destination) = match &e.backend {
        Backend::TensorBoard(tb) => {
            let exporter = tensorboard::TensorBoardExporter::new(tb.clone());
            let run_dirs = exporter.run_dirs();
            let destination = Destination::TensorBoard {
                logdir: tb.logdir.clone(),
                run_dirs,
            };
            (
                Delivery::start(&e.name, exporter, e.delivery.clone())?,
                destination,
            )
        }
        Backend::Mlflow(m) => {
            let exporter = mlflow::MlflowExporter::new(m.clone()).with_run_policy(e.run_policy);
            let run_ids = exporter.run_ids();
            let destination = Destination::Mlflow {
                tracking_uri: m.tracking_uri.clone(),
                run_ids,
            };
            (
                Delivery::start(&e.name, exporter, e.delivery.clone())?,
                destination,
            )
        }
    };
    Ok((Arc::new(delivery), destination))
}

/// One line on where an exporter writes, for the service's startup log (never a secret: MLflow
/// credentials show as set or not).
pub fn describe(backend: &Backend) -> String {
    match backend {
        Backend::TensorBoard(t) => format!("logdir {}", t.logdir.display()),
        Backend::Mlflow(m) => format!(
            "tracking URI {} ({}), experiment {} for runs that name none (ml.experiment.name)",
            m.tracking_uri,
            if m.authorization.is_some() {
                "credentials set"
            } else {
                "no credentials"
            },
            m.experiment
        ),
    }
}
