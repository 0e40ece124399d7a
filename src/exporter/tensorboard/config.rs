//! TensorBoard exporter settings, validated from [`crate::config::ExporterConfig`].

use std::path::PathBuf;

use crate::config::{ExporterConfig, Problems};

/// Default logdir when none is configured.
pub const DEFAULT_LOGDIR: &str = "runs";

/// Validated TensorBoard settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorBoardSettings {
    /// Root directory; each run writes into `<logdir>/<run dir>/`, named after the run by
    /// [`crate::names::run_dir_name`] and claimed per run key (see
    /// [`super::exporter`]).
    pub logdir: PathBuf,
}

impl TensorBoardSettings {
    /// Validates the TensorBoard keys of `c` (at config path `path`), adding problems to `p`.
    pub fn from_config(c: &ExporterConfig, path: &str, p: &mut Problems) -> Self {
        p.reject_key(path, "tracking_uri", c.tracking_uri.is_some(), "an mlflow key");
        p.reject_key(path, "experiment", c.experiment.is_some(), "an mlflow key");
        p.reject_key(path, "run_id", c.run_id.is_some(), "an mlflow key");
        let logdir = c.logdir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_LOGDIR));
        if logdir.as_os_str().is_empty() {
            p.add(format!("{path}.logdir"), "must not be empty");
        }
        Self { logdir }
    }
}
