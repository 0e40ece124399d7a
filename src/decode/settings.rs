//! Settings of the decoding (validated once from config): which resource attributes identify a
//! run ([`IdentityKeys`]), the step key, the limits, and the non-finite policy.

/// A run without points for this long may be forgotten to make room under `max_runs` for a new
/// one (a long-lived service sees far more runs over its life than at once). A forgotten run
/// that comes back is a new run to the decoder: its series count again from zero.
pub const FORGET_IDLE_RUN_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Which resource attributes identify a run (defaults in [`Default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityKeys {
    /// Experiment name key; default `ml.experiment.name`.
    pub experiment: String,
    /// Run name key; default `ml.run.name`.
    pub run_name: String,
    /// Run id key (the trainer's own id for the run, not MLflow's); default `ml.run.id`.
    pub run_id: String,
    /// Prefix of param keys; default `ml.param.`.
    pub param_prefix: String,
    /// Rank key, on the resource or a data point (see the module docs' "Ranks"); default `rank`.
    pub rank: String,
}

impl Default for IdentityKeys {
    fn default() -> Self {
        Self {
            experiment: "ml.experiment.name".into(),
            run_name: "ml.run.name".into(),
            run_id: "ml.run.id".into(),
            param_prefix: "ml.param.".into(),
            rank: "rank".into(),
        }
    }
}

/// What an exporter does with NaN and ±Inf scalar values (config key `nonfinite`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    /// Deliver them as they are (default): TensorBoard stores the raw float32 NaN/±Inf; MLflow
    /// gets the strings `NaN`/`Infinity`/`-Infinity` (see [`crate::exporter::mlflow`]).
    #[default]
    Keep,
    /// Drop them, counted `non_finite`.
    Drop,
    /// `±Inf` → the largest / smallest finite value the exporter's backend stores
    /// ([`DecodeSettings::clamp_limit`]: `±f32::MAX` = `±3.4028235e38` for TensorBoard, whose
    /// scalars are float32 (clamping to `f64::MAX` would round back to `±inf` there), `±f64::MAX`
    /// for MLflow), counted as the event [`CLAMPED_EVENT`]; NaN has no nearest finite value and is
    /// dropped, counted `non_finite`.
    Clamp,
}

/// Name of the event counted for each value [`NonFinitePolicy::Clamp`] changed.
pub const CLAMPED_EVENT: &str = "nonfinite_clamped";

/// Default of [`DecodeSettings::max_series_per_run`].
pub const DEFAULT_MAX_SERIES_PER_RUN: usize = 10_000;
/// Default of [`DecodeSettings::max_runs`].
pub const DEFAULT_MAX_RUNS: usize = 1_000;

/// Settings of the decoder (validated once from config).
#[derive(Debug, Clone)]
pub struct DecodeSettings {
    /// The step attribute's key; default `step`.
    pub step_key: String,
    /// Resource keys of the run identity.
    pub identity: IdentityKeys,
    /// Optional prefix of every series name.
    pub prefix: Option<String>,
    /// Distinct series a run may have (config `max_series_per_run`); points of further series
    /// are dropped as `series_limit`. Default [`DEFAULT_MAX_SERIES_PER_RUN`].
    pub max_series_per_run: usize,
    /// Runs the decoder tracks over its lifetime (config `max_runs`); points of further runs
    /// are dropped as `series_limit`. Default [`DEFAULT_MAX_RUNS`].
    pub max_runs: usize,
    /// What to do with NaN and ±Inf scalars (config `nonfinite`); default `keep`.
    pub nonfinite: NonFinitePolicy,
    /// Magnitude `±Inf` is clamped to under `nonfinite: clamp`: the backend's largest finite
    /// value. Default `f64::MAX`; `f32::MAX` for TensorBoard (set by the config).
    pub clamp_limit: f64,
    /// A run idle this long may be forgotten to admit a new one under `max_runs`. Default
    /// [`FORGET_IDLE_RUN_AFTER`] (not in the config file).
    pub forget_idle_runs_after: std::time::Duration,
}

impl Default for DecodeSettings {
    fn default() -> Self {
        Self {
            step_key: "step".into(),
            identity: IdentityKeys::default(),
            prefix: None,
            max_series_per_run: DEFAULT_MAX_SERIES_PER_RUN,
            max_runs: DEFAULT_MAX_RUNS,
            nonfinite: NonFinitePolicy::Keep,
            forget_idle_runs_after: FORGET_IDLE_RUN_AFTER,
            clamp_limit: f64::MAX,
        }
    }
}
