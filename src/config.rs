//! Config: what users write (serde structs, YAML or built in code), validated once at startup
//! into runtime settings, with every problem reported at once. Keys follow the OpenTelemetry
//! Collector's where they mean the same (`exporters`, `timeout`, `retry_on_failure`,
//! `sending_queue`); durations are strings like `500ms`, `30s`, `5m`.
//!
//! ```yaml
//! receivers:                 # service only (trainmetrics serve)
//!   otlp:
//!     protocols:             # the protocols listed are enabled; none listed: both
//!       grpc: {endpoint: 127.0.0.1:14317, max_recv_msg_size_mib: 64}
//!       http: {endpoint: 127.0.0.1:14318, max_request_body_size_mib: 64}
//!       # each protocol also: tls: {cert_file, key_file, client_ca_file}  (default: plaintext)
//!       #                     rate_limit: {requests_per_second, burst}    (default: off)
//!     # auth: {bearer_token_file: PATH}  or {bearer_token_env: VAR}      (default: off)
//! service:                   # service only
//!   telemetry: {endpoint: 127.0.0.1:14319}   # GET /metrics, GET /health; null: off
//! run:                       # in-process only: the identity of this process's run
//!   experiment: iris         # default: MLFLOW_EXPERIMENT_NAME, else none (exporter default)
//!   name: mlp-1              # default: run-<UTC date>-<time>
//!   # id: <run id>           # default: generated, unique per process; the same id continues
//!                            # the same MLflow run (so never copy one between runs)
//!   params: {lr: 0.01}       # → ml.param.<name> → MLflow params, TensorBoard hparams
//!   tags: {team: vision}     # → resource attributes → MLflow run tags
//! step_attribute: step       # data point attribute that carries the step
//! identity:                  # resource attribute keys of the run identity
//!   experiment: ml.experiment.name
//!   run_name: ml.run.name
//!   run_id: ml.run.id
//!   param_prefix: ml.param.
//!   rank: rank               # a distributed job's rank (resource or data point attribute)
//! cardinality_limit: 20000   # SDK attribute sets per instrument per collection (in process)
//! shutdown_timeout: 10s      # bound of Pipeline::shutdown, for all exporters together
//! exporters:                 # "<type>" or "<type>/<name>"; types: tensorboard, mlflow
//!   tensorboard:
//!     logdir: runs           # tensorboard only; default runs
//!     every_steps: 1         # cadence; default tensorboard 1, mlflow 100 (when no interval)
//!   mlflow:
//!     tracking_uri: http://127.0.0.1:5000   # mlflow only; default MLFLOW_TRACKING_URI
//!     every_steps: 100
//!     interval: 30s          # also write every 30 s; default none
//!     aggregation: last      # last | mean | min | max | sum; default last
//!     metrics: {train.loss: mean}   # per metric or series name
//!     resume: log_again      # mlflow only: log_again | skip_logged; default log_again
//!     end_idle_runs: {enabled: true, after: 1h, status: KILLED}   # mlflow only; defaults
//!     ranks: {view: rank0, metrics: {train.loss: mean}, wait: 10s}  # mlflow only: a job's
//!                            # ranks (rank0 | mean | min | max | each); see crate::jobs
//! ```
//! Every exporter also takes: `prefix` (series name prefix, default none), `linger` (2s),
//! `reorder_window` (0s; how long windows wait for out-of-order points),
//! `reader_interval` (in process: the SDK PeriodicReader's interval, default 1s), `timeout`
//! (10s per export call), `retry_on_failure` (`enabled` true, `initial_interval` 1s,
//! `max_interval` 30s, `max_elapsed_time` 300s; with a spool, failing batches wait while it has
//! room), `sending_queue` (`queue_size` 1000 requests, `max_queued_mib` 256, `max_pending_points` 100000, `spool`: see
//! [`SpoolConfig`]), and mlflow `experiment` (default experiment), `run_id`, and
//! `token_file` / `password_file` (credentials from a file, see [`crate::exporter::mlflow::config`]).
//! Bad input (see [`crate::decode`]): `nonfinite` (`keep` | `drop` | `clamp`, default `keep`),
//! `max_series_per_run` (10000) and `max_runs` (1000), each at least 1.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::decode::{DecodeSettings, IdentityKeys};
use crate::delivery::{DeliverySettings, FromBackend};
use crate::exporter::mlflow::config::{self as mlflow_config, MlflowRunPolicy};
use crate::exporter::mlflow::MlflowSettings;
use crate::exporter::tensorboard::config as tensorboard_config;
use crate::exporter::tensorboard::TensorBoardSettings;

// Each component owns its config type; they are re-exported here, where they are composed.
pub use crate::delivery::{DeliveryConfig, QueueConfig, MAX_QUEUE_SIZE};
pub use crate::exporter::mlflow::config::MlflowConfig;
pub use crate::exporter::tensorboard::config::TensorBoardConfig;
pub use crate::problems::{Problem, Problems, MAX_DURATION};
pub use crate::receiver::security::{AuthConfig, RateLimitConfig, TlsConfig};
pub
use crate::retry::RetryConfig;
pub use crate::spool::{default_spool_root, SpoolConfig};

/// A param or tag value as written in YAML (number, bool or text); kept as text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ScalarValue {
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// Text.
    Text(String),
}

impl fmt::Display for ScalarValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScalarValue::Bool(b) => write!(f, "{b}"),
            ScalarValue::Int(i) => write!(f, "{i}"),
            ScalarValue::Float(x) => write!(f, "{x}"),
            ScalarValue::Text(s) => f.write_str(s),
        }
    }
}

/// The in-process run's identity (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Experiment name; default `MLFLOW_EXPERIMENT_NAME`, else left to the exporter.
    #[serde(default)]
    pub experiment: Option<String>,
    /// Run name; default `run-<UTC yyyymmdd-hhmmss>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Run id; default generated (unique per process).
    #[serde(default)]
    pub id: Option<String>,
    /// Hyperparameters.
    #[serde(default)]
    pub params: BTreeMap<String, ScalarValue>,
    /// Extra resource attributes (become MLflow run tags).
    #[serde(default)]
    pub tags: BTreeMap<String, ScalarValue>,
}

/// Resource attribute keys of the run identity (defaults as in [`IdentityKeys`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Default `ml.experiment.name`.
    pub experiment: String,
    /// Default `ml.run.name`.
    pub run_name: String,
    /// Default `ml.run.id`.
    pub run_id: String,
    /// Default `ml.param.`.
    pub param_prefix: String,
    /// The rank of a process in a distributed job, on the resource or a data point (see
    /// [`crate::decode`] "Ranks"); default `rank` (`ml.rank`, `RANK` are usual alternatives).
    pub rank: String,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        let k = IdentityKeys::default();
        Self { experiment: k.experiment, run_name: k.run_name, run_id: k.run_id, param_prefix: k.param_prefix, rank: k.rank }
    }
}

/// `receivers.otlp.protocols.grpc` (service only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// `host:port` to listen on; default `127.0.0.1:14317` (the collector's own default is 4317,
    /// so both can run on one host).
    pub endpoint: String,
    /// Largest accepted message, MiB, before and after decompression; default 64.
    pub max_recv_msg_size_mib: usize,
    /// TLS; default none (plaintext).
    pub tls: Option<TlsConfig>,
    /// Request rate limit; default none (off).
    pub rate_limit: Option<RateLimitConfig>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self { endpoint: "127.0.0.1:14317".into(), max_recv_msg_size_mib: 64, tls: None, rate_limit: None }
    }
}

/// `receivers.otlp.protocols.http` (service only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `host:port` to listen on; default `127.0.0.1:14318`.
    pub endpoint: String,
    /// Largest accepted body, MiB, before and after decompression; default 64.
    pub max_request_body_size_mib: usize,
    /// TLS; default none (plaintext).
    pub tls: Option<TlsConfig>,
    /// Request rate limit; default none (off).
    pub rate_limit: Option<RateLimitConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { endpoint: "127.0.0.1:14318".into(), max_request_body_size_mib: 64, tls: None, rate_limit: None }
    }
}

/// `service.telemetry` (service only): the self-telemetry listener, see [`crate::telemetry`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `host:port` of `GET /metrics` and `GET /health`; default `127.0.0.1:14319`; `null`
    /// turns the listener off.
    #[serde(default = "default_telemetry_endpoint")]
    pub endpoint: Option<String>,
}

fn default_telemetry_endpoint() -> Option<String> {
    Some("127.0.0.1:14319".into())
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { endpoint: default_telemetry_endpoint() }
    }
}

/// `service` (service only).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Self-telemetry.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// `receivers.otlp.protocols`: the protocols listed are enabled; with none listed, both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolsConfig {
    /// OTLP/gRPC.
    #[serde(default)]
    pub grpc: Option<GrpcConfig>,
    /// OTLP/HTTP (`POST /v1/metrics`, protobuf or JSON).
    #[serde(default)]
    pub http: Option<HttpConfig>,
}

impl Default for ProtocolsConfig {
    fn default() -> Self {
        Self { grpc: Some(GrpcConfig::default()), http: Some(HttpConfig::default()) }
    }
}

/// `receivers.otlp` (service only).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpReceiverConfig {
    /// Protocols.
    #[serde(default)]
    pub protocols: ProtocolsConfig,
    /// Bearer-token authentication of both protocols; default none (off).
    #[serde(default)]
    pub auth: Option<AuthConfig>,
}

/// `receivers` (service only; the in-process library ignores it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiversConfig {
    /// The OTLP receiver.
    #[serde(default)]
    pub otlp: OtlpReceiverConfig,
}

/// One exporter as users write it: the backend's own keys (`B`: [`TensorBoardConfig`] or
/// [`MlflowConfig`]) and the keys every exporter has ([`DeliveryConfig`]), side by side in one
/// YAML mapping. A key that neither has is refused (`unknown field`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExporterConfig<B> {
    /// The backend's own keys.
    #[serde(flatten)]
    pub backend: B,
    /// Cadence, queue, retry, timeout and bad-input keys.
    #[serde(flatten)]
    pub delivery: DeliveryConfig,
}

/// The config of an exporter of any type. In YAML the type is the `<type>` part of the
/// exporter's name (`tensorboard`, `mlflow/slow`); built in code, the name's type must match.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AnyExporterConfig {
    /// `tensorboard[/<name>]`.
    TensorBoard(ExporterConfig<TensorBoardConfig>),
    /// `mlflow[/<name>]`.
    Mlflow(ExporterConfig<MlflowConfig>),
}

impl From<ExporterConfig<TensorBoardConfig>> for AnyExporterConfig {
    fn from(c: ExporterConfig<TensorBoardConfig>) -> Self {
        Self::TensorBoard(c)
    }
}

impl From<ExporterConfig<MlflowConfig>> for AnyExporterConfig {
    fn from(c: ExporterConfig<MlflowConfig>) -> Self {
        Self::Mlflow(c)
    }
}

/// The top-level keys of a serde struct, read from its default value (so no list is kept by
/// hand next to the struct).
fn keys_of<T: Serialize + Default>() -> Vec<String> {
    let value = serde_yaml_ng::to_value(T::default()).unwrap_or_default();
    value
        .as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

impl AnyExporterConfig {
    /// The exporter type: `tensorboard` or `mlflow`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TensorBoard(_) => "tensorboard",
            Self::Mlflow(_) => "mlflow",
        }
    }

    /// The keys every exporter has.
    pub fn delivery(&self) -> &DeliveryConfig {
        match self {
            Self::TensorBoard(c) => &c.delivery,
            Self::Mlflow(c) => &c.delivery,
        }
    }

    /// Parses the YAML of the exporter `name`, its type taken from the name's `<type>` part.
    /// Returns the config, if one could be read, and every problem found, each at its dotted
    /// path: an unknown type, a key of another type (`is an mlflow key, not valid here`; the
    /// key is left out so the rest is still read and validated), or the parser's message.
    pub fn from_yaml(name: &str, mut value: serde_yaml_ng::Value) -> (Option<Self>, Vec<Problem>) {
        let path = format!("exporters.{name}");
        let kind = name.split_once('/').map_or(name, |(k, _)| k);
        let mut problems = Vec::new();
        let others: Vec<(&str, Vec<String>)> = match kind {
            "tensorboard" => vec![("an mlflow", keys_of::<MlflowConfig>())],
            "mlflow" => vec![("a tensorboard", keys_of::<TensorBoardConfig>())],
            other => {
                problems.push(Problem {
                    path,
                    message: format!(
                        "unknown exporter type {other:?} (known: tensorboard, mlflow)"
                    ),
                });
                return (None, problems);
            }
        };
        if let Some(m) = value.as_mapping_mut() {
            m.retain(|k, _| {
                let Some(k) = k.as_str() else { return true };
                let Some((what, _)) = others.iter().find(|(_, keys)| keys.iter().any(|o| o == k))
                else {
                    return true;
                };
                let why = if kind == "tensorboard" && k == "ranks" {
                    " (TensorBoard writes one run directory per rank)"
                } else {
                    ""
                };
                problems.push(Problem {
                    path: format!("{path}.{k}"),
                    message: format!("is {what} key, not valid here{why}"),
                });
                false
            });
        }
        let parsed = match kind {
            "tensorboard" => serde_yaml_ng::from_value(value).map(Self::TensorBoard),
            _ => serde_yaml_ng::from_value(value).map(Self::Mlflow),
        };
        match parsed {
            Ok(c) => (Some(c), problems),
            Err(e) => {
                problems.push(Problem {
                    path,
                    message: e.to_string(),
                });
                (None, problems)
            }
        }
    }
}

/// `exporters` through serde: each entry read by [`AnyExporterConfig::from_yaml`]; any problem
/// fails the whole config (use [`PipelineConfig::from_yaml_str`] to see every problem at once).
fn deserialize_exporters<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, AnyExporterConfig>, D::Error> {
    let raw = BTreeMap::<String, serde_yaml_ng::Value>::deserialize(d)?;
    let mut out = BTreeMap::new();
    for (name, value) in raw {
        match AnyExporterConfig::from_yaml(&name, value) {
            (Some(c), problems) if problems.is_empty() => {
                out.insert(name, c);
            }
            (_, problems) => {
                let text: Vec<String> = problems
                    .iter()
                    .map(|p| format!("{}: {}", p.path, p.message))
                    .collect();
                return Err(serde::de::Error::custom(text.join("; ")));
            }
        }
    }
    Ok(out)
}

/// The whole pipeline as written by users (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Service only: where OTLP is received.
    #[serde(default)]
    pub receivers: ReceiversConfig,
    /// Service only: self-telemetry.
    #[serde(default)]
    pub service: ServiceConfig,
    /// The in-process run.
    #[serde(default)]
    pub run: RunConfig,
    /// Step attribute key; default `step`.
    #[serde(default = "default_step_attribute")]
    pub step_attribute: String,
    /// Run identity keys.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// SDK cardinality limit per instrument; default 20000.
    #[serde(default = "default_cardinality_limit")]
    pub cardinality_limit: usize,
    /// Bound of shutdown; default 10s.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Exporters by `<type>[/<name>]`.
    #[serde(default, deserialize_with = "deserialize_exporters")]
    pub exporters: BTreeMap<String, AnyExporterConfig>,
}

fn default_step_attribute() -> String {
    "step".into()
}
fn default_cardinality_limit() -> usize {
    20_000
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            receivers: ReceiversConfig::default(),
            service: ServiceConfig::default(),
            run: RunConfig::default(),
            step_attribute: default_step_attribute(),
            identity: IdentityConfig::default(),
            cardinality_limit: default_cardinality_limit(),
            shutdown_timeout: default_shutdown_timeout(),
            exporters: BTreeMap::new(),
        }
    }
}

/// Why a config could not be loaded or validated.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML for this schema (unknown key, wrong type, …).
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The config parsed but has invalid values; every problem is listed.
    #[error("invalid config:{}", .0.iter().map(|p| if p.path.is_empty() { format!("\n  {}", p.message) } else { format!("\n  {}: {}", p.path, p.message) }).collect::<String>())]
    Invalid(Vec<Problem>),
}

/// Which backend an exporter writes to.
#[derive(Debug, Clone)]
pub enum Backend {
    /// TensorBoard event files.
    TensorBoard(TensorBoardSettings),
    /// An MLflow tracking server.
    Mlflow(MlflowSettings),
}

/// One validated exporter.
#[derive(Debug, Clone)]
pub struct ExporterSettings {
    /// Its config name (`tensorboard`, `mlflow/slow`, …).
    pub name: String,
    /// Its backend.
    pub backend: Backend,
    /// Queue, cadence, retry, timeout.
    pub delivery: DeliverySettings,
    /// In process: the PeriodicReader interval.
    pub reader_interval: Duration,
    /// mlflow: resume policy and idle status (defaults for tensorboard, which ignores them).
    pub run_policy:MlflowRunPolicy,
}

/// The in-process run, with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSettings {
    /// Experiment name, if any.
    pub experiment: Option<String>,
    /// Run name.
    pub name: String,
    /// Run id.
    pub id: String,
    /// Params as text.
    pub params: BTreeMap<String, String>,
    /// Tags as text.
    pub tags: BTreeMap<String, String>,
}

/// TLS and rate limit of one receiver protocol, validated.
#[derive(Debug, Clone, Default)]
pub struct ProtocolSecurity {
    /// TLS identity; `None`: plaintext.
    pub tls: Option<crate::receiver::security::TlsSettings>,
    /// Rate limit; `None`: off.
    pub rate_limit: Option<crate::receiver::security::RateLimitSettings>,
}

/// What protects the receivers, validated (see [`crate::receiver::security`]).
#[derive(Debug, Clone, Default)]
pub struct ReceiverSecurity {
    /// OTLP/gRPC.
    pub grpc: ProtocolSecurity,
    /// OTLP/HTTP.
    pub http: ProtocolSecurity,
    /// The bearer token both protocols require; `None`: no authentication.
    pub auth: Option<crate::receiver::security::BearerToken>,
}

/// A validated pipeline.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// Service only: OTLP/gRPC listen address and message limit (bytes), if enabled.
    pub grpc: Option<(String, usize)>,
    /// Service only: OTLP/HTTP listen address and body limit (bytes), if enabled.
    pub http: Option<(String, usize)>,
    /// Service only: TLS, rate limits and authentication of the receivers.
    pub security: ReceiverSecurity,
    /// Service only: the self-telemetry listen address, if enabled.
    pub telemetry: Option<String>,
    /// The in-process run.
    pub run: RunSettings,
    /// Step key and identity keys (prefix, limits and the non-finite policy are set per
    /// exporter). Its limits are unbounded: the receiver decodes each request alone with it to
    /// answer `partial_success`, and cannot know an exporter's series and runs.
    pub decode: DecodeSettings,
    /// SDK cardinality limit.
    pub cardinality_limit: usize,
    /// Bound of shutdown.
    pub shutdown_timeout: Duration,
    /// Exporters in name order.
    pub exporters: Vec<ExporterSettings>,
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `run-YYYYMMDD-HHMMSS` in UTC for `secs` since the epoch.
pub fn default_run_name(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("run-{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

impl PipelineConfig {
    /// Reads and parses a YAML file (see [`PipelineConfig::from_yaml_str`]).
    pub fn from_yaml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::from_yaml_str(&text, path)
    }

    /// Parses YAML. Each exporter is parsed on its own, so a mistake in one (unknown key, wrong
    /// type) is listed together with every other problem, including the value checks of
    /// [`PipelineConfig::validate`]; `origin` names the text in messages.
    pub fn from_yaml_str(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        Self::from_yaml_with_overrides(text, origin, &[])
    }

    /// Like [`PipelineConfig::from_yaml_str`], after applying `--set` style overrides
    /// `dotted.key.path=value` (the value parsed as YAML, e.g. `5s`, `100`, `true`; keys are
    /// split on `.`, so a key that itself contains a dot cannot be set this way), as the
    /// Collector's `--set` does.
    pub fn from_yaml_with_overrides(text: &str, origin: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        use serde_yaml_ng::Value;
        let parse_err = |e: serde_yaml_ng::Error| ConfigError::Parse { path: origin.into(), message: e.to_string() };
        let mut value: Value = serde_yaml_ng::from_str(text).map_err(parse_err)?;
        if value.is_null() {
            value = Value::Mapping(Default::default());
        }
        let mut problems = Vec::new();
        for o in overrides {
            if let Err(message) = set_path(&mut value, o) {
                problems.push(Problem { path: format!("--set {o}"), message });
            }
        }
        let mut exporters = BTreeMap::new();
        let mut failed = Vec::new();
        let raw = value.as_mapping_mut().and_then(|m| m.remove("exporters"));
        match raw {
            None | Some(Value::Null) => {}
            Some(Value::Mapping(m)) => {
                for (k, v) in m {
                    let name = k.as_str().map(str::to_string).unwrap_or_else(|| format!("{k:?}"));
                    let (config, found) = AnyExporterConfig::from_yaml(&name, v);
                    problems.extend(found);
                    match config {
                        Some(c) => {
                            exporters.insert(name, c);
                        }
                        None => failed.push(format!("exporters.{name}")),
                    }
                }
            }
            Some(_) => problems.push(Problem { path: "exporters".into(), message: "must be a mapping".into() }),
        }
        let mut config = match serde_yaml_ng::from_value::<PipelineConfig>(value) {
            Ok(c) => c,
            Err(e) => {
                problems.push(Problem { path: String::new(), message: e.to_string() });
                PipelineConfig::default()
            }
        };
        config.exporters = exporters;
        if problems.is_empty() {
            return Ok(config);
        }
        if let Err(ConfigError::Invalid(more)) = config.validate() {
            // Skip what only follows from an exporter that did not parse.
            problems.extend(more.into_iter().filter(|p| p.path != "exporters" || failed.is_empty()));
        }
        Err(ConfigError::Invalid(problems))
    }

    /// Validates everything, returning all problems at once.
    pub fn validate(&self) -> Result<PipelineSettings, ConfigError> {
        let mut p = Problems::default();
        if self.step_attribute.is_empty() {
            p.add("step_attribute", "must not be empty");
        }
        if self.cardinality_limit == 0 {
            p.add("cardinality_limit", "must be at least 1");
        }
        p.positive("", "shutdown_timeout", Some(self.shutdown_timeout));
        if self.exporters.is_empty() {
            p.add("exporters", "no exporter configured (add tensorboard and/or mlflow)");
        }
        let protocols = &self.receivers.otlp.protocols;
        let listeners = [
            ("receivers.otlp.protocols.grpc", protocols.grpc.as_ref().map(|g| (&g.endpoint, g.max_recv_msg_size_mib))),
            ("receivers.otlp.protocols.http", protocols.http.as_ref().map(|h| (&h.endpoint, h.max_request_body_size_mib))),
        ];
        for (path, l) in listeners {
            let Some((endpoint, mib)) = l else { continue };
            check_endpoint(&mut p, &format!("{path}.endpoint"), endpoint);
            if mib == 0 || mib > 1024 {
                p.add(path.to_string(), "the size limit must be 1..=1024 MiB");
            }
        }
        if let Some(endpoint) = &self.service.telemetry.endpoint {
            check_endpoint(&mut p, "service.telemetry.endpoint", endpoint);
        }
        let security = self.receiver_security(&mut p);
        let id = &self.identity;
        for (k, v) in [("experiment", &id.experiment), ("run_name", &id.run_name), ("run_id", &id.run_id), ("param_prefix", &id.param_prefix), ("rank", &id.rank)] {
            if v.is_empty() {
                p.add(format!("identity.{k}"), "must not be empty");
            }
        }
        let decode = DecodeSettings {
            step_key: self.step_attribute.clone(),
            identity: IdentityKeys {
                experiment: id.experiment.clone(),
                run_name: id.run_name.clone(),
                run_id: id.run_id.clone(),
                param_prefix: id.param_prefix.clone(),
                rank: id.rank.clone(),
            },
            prefix: None,
            max_series_per_run: usize::MAX,
            max_runs: usize::MAX,
            ..DecodeSettings::default()
        };
        let exporters: Vec<ExporterSettings> = self
            .exporters
            .iter()
            .filter_map(|(name, c)| exporter_settings(name, c, &decode, &mut p))
            .collect();
        if !p.is_empty() {
            return Err(ConfigError::Invalid(p.into_vec()));
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let run = RunSettings {
            experiment: self.run.experiment.clone().or_else(|| std::env::var("MLFLOW_EXPERIMENT_NAME").ok().filter(|s| !s.is_empty())),
            name: self.run.name.clone().unwrap_or_else(|| default_run_name(now.as_secs())),
            id: self.run.id.clone().unwrap_or_else(|| {
                format!("{:x}-{:x}-{:08x}", now.as_secs(), std::process::id(), rand::random::<u32>())
            }),
            params: self.run.params.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
            tags: self.run.tags.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
        };
        let p = &self.receivers.otlp.protocols;
        Ok(PipelineSettings {
            grpc: p.grpc.as_ref().map(|g| (g.endpoint.clone(), g.max_recv_msg_size_mib.saturating_mul(1 << 20))),
            http: p.http.as_ref().map(|h| (h.endpoint.clone(), h.max_request_body_size_mib.saturating_mul(1 << 20))),
            security,
            telemetry: self.service.telemetry.endpoint.clone(),
            run,
            decode,
            cardinality_limit: self.cardinality_limit,
            shutdown_timeout: self.shutdown_timeout,
            exporters,
        })
    }
}

impl PipelineConfig {
    /// Reads the TLS files and the bearer token the receivers need, adding problems to `p`.
    fn receiver_security(&self, p: &mut Problems) -> ReceiverSecurity {
        use crate::receiver::security::{load_rate_limit, load_tls, load_token};
        let otlp = &self.receivers.otlp;
        let mut s = ReceiverSecurity::default();
        let protocols = [
            ("grpc", otlp.protocols.grpc.as_ref().map(|g| (&g.tls, &g.rate_limit)), &mut s.grpc),
            ("http", otlp.protocols.http.as_ref().map(|h| (&h.tls, &h.rate_limit)), &mut s.http),
        ];
        for (name, c, out) in protocols {
            let Some((tls, rate)) = c else { continue };
            let path = format!("receivers.otlp.protocols.{name}");
            out.tls = tls.as_ref().and_then(|t| load_tls(t, &format!("{path}.tls"), p));
            out.rate_limit = rate.as_ref().and_then(|r| load_rate_limit(r, &format!("{path}.rate_limit"), p));
        }
        s.auth = otlp.auth.as_ref().and_then(|a| load_token(a, "receivers.otlp.auth", p));
        s
    }
}

fn check_endpoint(p: &mut Problems, at: &str, endpoint: &str) {
    if endpoint.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err()) {
        p.add(at, format!("{endpoint:?} is not host:port"));
    }
}

/// Applies one `a.b.c=value` override to a YAML tree, creating mappings on the way.
fn set_path(root: &mut serde_yaml_ng::Value, assignment: &str) -> Result<(), String> {
    use serde_yaml_ng::Value;
    let (path, raw) = assignment.split_once('=').ok_or("expected key.path=value")?;
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err("empty key in the path".into());
    }
    let value: Value = serde_yaml_ng::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
    let mut cur = root;
    for (i, k) in keys.iter().enumerate() {
        if cur.is_null() {
            *cur = Value::Mapping(Default::default());
        }
        let Some(map) = cur.as_mapping_mut() else {
            return Err(format!("{} is not a mapping", keys[..i].join(".")));
        };
        let key = Value::String((*k).to_string());
        if i + 1 == keys.len() {
            map.insert(key, value);
            return Ok(());
        }
        if !map.contains_key(&key) {
            map.insert(key.clone(), Value::Null);
        }
        let Some(next) = map.get_mut(&key) else { return Err("internal: key vanished".into()) };
        cur = next;
    }
    Ok(())
}

/// Validates one exporter: its type (the name's `<type>` part) picks the backend's validation,
/// and the keys every exporter has are validated by [`DeliveryConfig`]. `None` when the name's
/// type is not the config's.
fn exporter_settings(name: &str, c: &AnyExporterConfig, decode: &DecodeSettings, p: &mut Problems) -> Option<ExporterSettings> {
    let path = format!("exporters.{name}");
    let (kind, instance) = name.split_once('/').unwrap_or((name, ""));
    if name.contains('/') && instance.is_empty() {
        p.add(&path, "the name after '/' must not be empty");
    }
    if kind != c.kind() {
        p.add(&path, format!("is named as a {kind:?} exporter but holds a {} exporter's config", c.kind()));
        return None;
    }
    let (backend, from_backend, run_policy, delivery) = match c {
        AnyExporterConfig::TensorBoard(c) => {
            let tb = c.backend.settings(&path, p);
            let from = FromBackend { defaults: tensorboard_config::DEFAULTS, destination: tb.destination(), jobs: None, idle_after: None };
            (Backend::TensorBoard(tb), from, MlflowRunPolicy::default(), &c.delivery)
        }
        AnyExporterConfig::Mlflow(c) => {
            let (run_policy, idle_after) = c.backend.run_policy(&path, p);
            let jobs = Some(c.backend.ranks.clone().unwrap_or_default().settings(&path, p));
            let m = c.backend.settings(&path, p);
            let from = FromBackend { defaults: mlflow_config::DEFAULTS, destination: m.destination(), jobs, idle_after };
            (Backend::Mlflow(m), from, run_policy, &c.delivery)
        }
    };
    Some(ExporterSettings {
        name: name.to_string(),
        backend,
        delivery: delivery.settings(&path, name, from_backend, decode, p),
        reader_interval: delivery.reader_interval(),
        run_policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_with_every_key_parses_and_validates() {
        let yaml = r#"
run: {experiment: e, name: n, id: i, params: {lr: 0.01, layers: 3, opt: adam, bn: true}}
exporters:
  tensorboard: {logdir: /tmp/x, every_steps: 1}
  mlflow/slow:
    tracking_uri: http://u:p@127.0.0.1:5000/
    every_steps: 100
    interval: 30s
    aggregation: mean
    metrics: {train.lr: last}
    timeout: 5s
    retry_on_failure: {enabled: true, initial_interval: 500ms, max_interval: 10s, max_elapsed_time: 2m}
    sending_queue: {queue_size: 10, max_pending_points: 50}
"#;
        let c: PipelineConfig = match serde_yaml_ng::from_str(yaml) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let s = match c.validate() {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(s.run.params.get("lr").map(String::as_str), Some("0.01"));
        assert_eq!(s.run.params.get("bn").map(String::as_str), Some("true"));
        let ml = &s.exporters[0];
        assert_eq!(ml.name, "mlflow/slow");
        match &ml.backend {
            Backend::Mlflow(m) => {
                assert_eq!(m.tracking_uri, "http://127.0.0.1:5000");
                assert_eq!(m.authorization.as_deref(), Some("Basic dTpw"));
                assert!(!format!("{m:?}").contains("dTpw"), "credentials must not be printed");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ml.delivery.cadence.every_steps, Some(100));
        assert_eq!(ml.delivery.cadence.interval, Some(Duration::from_secs(30)));
        assert_eq!(ml.delivery.retry.max_elapsed_time, Duration::from_secs(120));
        assert_eq!(ml.delivery.queue_size, 10);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let yaml = r#"
step_attribute: ""
exporters:
  tensorboard: {every_steps: 0, tracking_uri: "http://x"}
  mlflow: {tracking_uri: "ftp://secret@host", timeout: 0s}
  prometheus: {}
"#;
        // Parsed and validated together: a key of the other type and an unknown type are found
        // while parsing, the bad values while validating.
        let msg = match PipelineConfig::from_yaml_str(yaml, Path::new("c.yaml")) {
            Err(e) => e.to_string(),
            Ok(c) => panic!("must fail: {c:?}"),
        };
        for needle in [
            "step_attribute",
            "exporters.tensorboard.every_steps",
            "exporters.tensorboard.tracking_uri",
            "exporters.mlflow.tracking_uri: must start with http",
            "exporters.mlflow.timeout",
            "unknown exporter type \"prometheus\"",
        ] {
            assert!(msg.contains(needle), "{needle:?} missing in {msg}");
        }
        assert!(!msg.contains("secret"), "the URI may hold credentials: {msg}");
    }

    #[test]
    fn unknown_keys_are_rejected_and_listed_with_every_other_problem() {
        let yaml = "shutdown_timeout: 0s\nexporters:\n  tensorboard: {logdri: x}\n  mlflow: {aggregation: median, every_steps: -5}\n  mlflow/b: {every_steps: 0}\n";
        let msg = match PipelineConfig::from_yaml_str(yaml, Path::new("c.yaml")) {
            Err(e) => e.to_string(),
            Ok(c) => panic!("must fail: {c:?}"),
        };
        for needle in ["exporters.tensorboard: unknown field `logdri`", "exporters.mlflow: ", "exporters.mlflow/b.every_steps", "shutdown_timeout: must be positive"] {
            assert!(msg.contains(needle), "{needle:?} missing in {msg}");
        }
        let empty = PipelineConfig::from_yaml_str("exporters: {}", Path::new("c.yaml")).map(|c| c.validate().map(|_| ()));
        assert!(matches!(empty, Ok(Err(ConfigError::Invalid(ref p))) if p[0].path == "exporters"), "{empty:?}");
        let over = "exporters: {tensorboard: {linger: 1000d, retry_on_failure: {initial_interval: 10s, max_interval: 1s}}}";
        let msg = PipelineConfig::from_yaml_str(over, Path::new("c.yaml")).map(|c| c.validate().map(|_| ()));
        let msg = format!("{msg:?}");
        assert!(msg.contains("at most 24h") && msg.contains("must not exceed max_interval"), "{msg}");
    }

    #[test]
    fn overrides_set_nested_keys_with_yaml_values() {
        let yaml = "exporters:\n  tensorboard: {logdir: runs}\n";
        let sets = [
            "exporters.tensorboard.logdir=/tmp/x".to_string(),
            "exporters.mlflow.tracking_uri=http://127.0.0.1:5999".to_string(),
            "exporters.mlflow.every_steps=10".to_string(),
            "receivers.otlp.protocols.grpc.endpoint=127.0.0.1:24317".to_string(),
        ];
        let c = match PipelineConfig::from_yaml_with_overrides(yaml, Path::new("c.yaml"), &sets) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert!(
            matches!(&c.exporters["tensorboard"], AnyExporterConfig::TensorBoard(t) if t.backend.logdir.as_deref() == Some(Path::new("/tmp/x"))));
        assert_eq!(c.exporters["mlflow"].delivery().every_steps, Some(10));
        assert_eq!(c.receivers.otlp.protocols.grpc.map(|g| g.endpoint), Some("127.0.0.1:24317".to_string()));
        let bad = PipelineConfig::from_yaml_with_overrides(yaml, Path::new("c.yaml"), &["exporters.tensorboard.logdir.x=1".into(), "nokey".into()]);
        let msg = format!("{:?}", bad.map(|_| ()));
        assert!(msg.contains("is not a mapping") && msg.contains("expected key.path=value"), "{msg}");
    }

    #[test]
    fn default_run_names_are_utc_dates() {
        assert_eq!(default_run_name(0), "run-19700101-000000");
        assert_eq!(default_run_name(1_795_965_104), "run-20261129-151144");
    }

    #[test]
    fn resume_and_end_idle_runs_keys_validate_with_their_defaults() {
        let parse = |yaml: &str| PipelineConfig::from_yaml_str(yaml, Path::new("c.yaml")).and_then(|c| c.validate());
        let s = match parse("exporters: {mlflow: {tracking_uri: 'http://h:1', resume: skip_logged, end_idle_runs: {after: 2s, status: FAILED}}}") {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        use crate::exporter::mlflow::config::{IdleStatus, MlflowRunPolicy, ResumePolicy};
        assert_eq!(s.exporters[0].run_policy, MlflowRunPolicy { resume: ResumePolicy::SkipLogged, idle_status: IdleStatus::Failed });
        assert_eq!(s.exporters[0].delivery.cadence.idle_after, Some(Duration::from_secs(2)));
        let s = match parse("exporters: {mlflow: {tracking_uri: 'http://h:1'}, tensorboard: {}}") {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(s.exporters[0].run_policy, MlflowRunPolicy::default());
        assert_eq!(s.exporters[0].delivery.cadence.idle_after, Some(Duration::from_secs(3600)), "on by default, 1h");
        assert_eq!(s.exporters[1].delivery.cadence.idle_after, None, "tensorboard never ends runs");
        let off = parse("exporters: {mlflow: {tracking_uri: 'http://h:1', end_idle_runs: {enabled: false}}}");
        assert!(matches!(off, Ok(ref s) if s.exporters[0].delivery.cadence.idle_after.is_none()));
        let bad = "exporters: {tensorboard: {resume: log_again, end_idle_runs: {after: 1m}}, mlflow: {tracking_uri: 'http://h:1', end_idle_runs: {after: 0s, status: DONE}}}";
        let msg = match parse(bad) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("must fail"),
        };
        for needle in ["exporters.tensorboard.resume", "exporters.tensorboard.end_idle_runs", "exporters.mlflow", "DONE"] {
            assert!(msg.contains(needle), "{needle} missing in {msg}");
        }
        let zero = parse("exporters: {mlflow: {tracking_uri: 'http://h:1', end_idle_runs: {after: 0s}}}").map(|_| ());
        assert!(matches!(zero, Err(ref e) if e.to_string().contains("exporters.mlflow.end_idle_runs.after")), "{zero:?}");
    }

    #[test]
    fn bad_input_keys_per_exporter() {
        let yaml = r#"
exporters:
  tensorboard: {nonfinite: clamp, max_series_per_run: 5, max_runs: 2}
  mlflow: {tracking_uri: "http://127.0.0.1:5000", nonfinite: drop}
"#;
        let c: PipelineConfig = serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{e}"));
        let s = c.validate().unwrap_or_else(|e| panic!("{e}"));
        let by_name = |n: &str| s.exporters.iter().find(|e| e.name == n).map(|e| e.delivery.decode.clone());
        let tb = by_name("tensorboard").expect("tensorboard");
        assert_eq!((tb.nonfinite, tb.max_series_per_run, tb.max_runs), (crate::decode::NonFinitePolicy::Clamp, 5, 2));
        let ml = by_name("mlflow").expect("mlflow");
        assert_eq!((ml.nonfinite, ml.max_series_per_run, ml.max_runs), (crate::decode::NonFinitePolicy::Drop, 10_000, 1_000));
        // The receiver's per-request pass cannot know an exporter's series: no limits there.
        assert_eq!((s.decode.max_series_per_run, s.decode.max_runs), (usize::MAX, usize::MAX));

        let bad = "exporters:\n  tensorboard: {max_series_per_run: 0, max_runs: 0}\n";
        let c: PipelineConfig = serde_yaml_ng::from_str(bad).unwrap_or_else(|e| panic!("{e}"));
        let msg = c.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("exporters.tensorboard.max_series_per_run") && msg.contains("exporters.tensorboard.max_runs"), "{msg}");
        assert!(serde_yaml_ng::from_str::<PipelineConfig>("exporters:\n  tensorboard: {nonfinite: zero}\n").is_err());
    }

    /// Every problem of a config, as `path: message` lines (the path omitted when empty).
    fn problems_of(yaml: &str) -> Vec<String> {
        match PipelineConfig::from_yaml_str(yaml, Path::new("c.yaml")).and_then(|c| c.validate()) {
            Err(ConfigError::Invalid(p)) => p.iter().map(|p| if p.path.is_empty() { p.message.clone() } else { format!("{}: {}", p.path, p.message) }).collect(),
            other => panic!("{yaml}: expected problems, got {other:?}"),
        }
    }

    #[test]
    fn invalid_configs_and_their_exact_messages() {
        let ml = "tracking_uri: 'http://127.0.0.1:1'";
        let cases: Vec<(String, Vec<&str>)> = vec![
            ("exporters: {}".into(), vec!["exporters: no exporter configured (add tensorboard and/or mlflow)"]),
            ("exporters: {prometheus: {}}".into(), vec!["exporters.prometheus: unknown exporter type \"prometheus\" (known: tensorboard, mlflow)"]),
            ("exporters: {tensorboard: {logdri: x}}".into(), vec!["exporters.tensorboard: unknown field `logdri`"]),
            ("exporters: {tensorboard: {tracking_uri: 'http://h:1', every_steps: 0}}".into(), vec!["exporters.tensorboard.tracking_uri: is an mlflow key, not valid here", "exporters.tensorboard.every_steps: must be at least 1"]),
            ("exporters: {tensorboard: {ranks: {view: mean}}}".into(), vec!["exporters.tensorboard.ranks: is an mlflow key, not valid here (TensorBoard writes one run directory per rank)"]),
            (format!("exporters: {{mlflow: {{{ml}, logdir: x}}}}"), vec!["exporters.mlflow.logdir: is a tensorboard key, not valid here"]),
            (format!("exporters: {{mlflow/: {{{ml}}}}}"), vec!["exporters.mlflow/: the name after '/' must not be empty"]),
            ("exporters: {mlflow: {tracking_uri: 'ftp://h'}}".into(), vec!["exporters.mlflow.tracking_uri: must start with http:// or https://"]),
            ("exporters: {tensorboard: {logdir: ''}}".into(), vec!["exporters.tensorboard.logdir: must not be empty"]),
            ("exporters: {tensorboard: {linger: 1000d, timeout: 0s}}".into(), vec!["exporters.tensorboard.linger: must be at most 24h", "exporters.tensorboard.timeout: must be positive"]),
            ("exporters: {tensorboard: {retry_on_failure: {initial_interval: 10s, max_interval: 1s}}}".into(), vec!["exporters.tensorboard.retry_on_failure.initial_interval: must not exceed max_interval"]),
            ("exporters: {tensorboard: {sending_queue: {queue_size: 2000000, max_queued_mib: 0, spool: {max_size_mib: 0}}}}".into(), vec!["exporters.tensorboard.sending_queue.queue_size: must be at most 1000000", "exporters.tensorboard.sending_queue.max_queued_mib: must be at least 1", "exporters.tensorboard.sending_queue.spool.max_size_mib: must be at least 1"]),
            ("exporters: {tensorboard: {max_series_per_run: 0, max_runs: 0}}".into(), vec!["exporters.tensorboard.max_series_per_run: must be at least 1", "exporters.tensorboard.max_runs: must be at least 1"]),
            (format!("exporters: {{mlflow: {{{ml}, end_idle_runs: {{after: 0s}}, ranks: {{wait: 0s}}}}}}"), vec!["exporters.mlflow.end_idle_runs.after: must be positive and at most 24h", "exporters.mlflow.ranks.wait: must be positive"]),
            ("shutdown_timeout: 0s\nstep_attribute: ''\nexporters: {tensorboard: {}}".into(), vec!["step_attribute: must not be empty", "shutdown_timeout: must be positive"]),
            ("receivers: {otlp: {protocols: {grpc: {endpoint: nope}}}}\nexporters: {tensorboard: {}}".into(), vec!["receivers.otlp.protocols.grpc.endpoint: \"nope\" is not host:port"]),
        ];
        for (yaml, want) in cases {
            assert_eq!(problems_of(&yaml), want, "{yaml}");
        }
    }

    #[test]
    fn an_exporter_built_in_code_must_be_named_after_its_type() {
        let exporters = [("mlflow".to_string(), AnyExporterConfig::TensorBoard(Default::default()))].into();
        let got = match (PipelineConfig { exporters, ..Default::default() }).validate() {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("{other:?}"),
        };
        let message = "is named as a \"mlflow\" exporter but holds a tensorboard exporter's config".to_string();
        assert_eq!(got, vec![Problem { path: "exporters.mlflow".into(), message }]);
    }
}
