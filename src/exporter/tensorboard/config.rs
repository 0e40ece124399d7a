//! The TensorBoard exporter's own config keys ([`TensorBoardConfig`]) and their validation into
//! [`TensorBoardSettings`]. The keys every exporter has (cadence, queue, retry) are
//! [`crate::delivery::DeliveryConfig`]'s; [`crate::config`] puts both side by side in one YAML
//! mapping.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::exporter::BackendDefaults;
use crate::problems:: Problems;

/// Default logdir when none is configured.
pub const DEFAULT_LOGDIR: &str = "runs";

/// What differs from other backends in the keys every exporter has: every step by default,
/// no spool (the backend is the disk), and non-finite values clamped to `f32`'s range
/// (TensorBoard stores scalars as `float`).
pub const DEFAULTS: BackendDefaults = BackendDefaults {
    every_steps: 1,
    spool: false,
    clamp_limit: f32::MAX as f64,
};

/// The keys only a TensorBoard exporter has. Unknown keys are refused by the enclosing
/// [`crate::config::ExporterConfig`] (flattened structs cannot refuse them themselves).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TensorBoardConfig {
    /// The logdir; default `runs`.
    #[serde(default)]
    pub logdir: Option<PathBuf>,
}

/// Validated TensorBoard settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorBoardSettings {
    /// Root directory; each run writes into `<logdir>/<run dir>/`, named after the run by
    /// [`crate::names::run_dir_name`] and claimed per run key (see
    /// [`super::exporter`]).
    pub logdir: PathBuf,
}

impl TensorBoardConfig {
    /// Validates these keys (at config path `path`), adding problems to `p`.
    pub fn settings( &self, path: &str, p: &mut Problems) -> TensorBoardSettings {
        let logdir = self.logdir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_LOGDIR));
        if logdir.as_os_str().is_empty() {
            p.add(format!("{path}.logdir"), "must not be empty");
        }
        TensorBoardSettings { logdir }
    }
}

impl TensorBoardSettings {
    /// Where this exporter writes, for logs and spool headers: `tensorboard <logdir>`.
    pub fn destination(&self) -> String {
        format!("tensorboard {}", self.logdir.display())
    }
}
