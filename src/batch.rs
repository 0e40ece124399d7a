//! Batch: turns an OTLP `ExportMetricsServiceRequest` (the one data model of both routes, in
//! process and over the wire) into per-run points with a step, a series name and a value.
//!
//! # Runs
//! A resource is one run. Its identity comes from resource attributes (keys configurable, see
//! [`IdentityKeys`]): `ml.experiment.name`, `ml.run.name`, `ml.run.id`; `ml.param.<name>` become
//! params; every other resource attribute becomes a run tag. A run is keyed by its id, else its
//! name, else `service.name`/`service.instance.id`, else `default`.
//!
//! # Ranks
//! The processes of one distributed job (one process per GPU under `torchrun`, DeepSpeed or
//! Lightning's DDP) share the run's identity and tell themselves apart by a rank: an integer
//! attribute (key configurable, default `rank`; `ml.rank` or `RANK` are common alternatives) on
//! the resource or on a data point (a data point's wins). It is an int, or a string or a whole
//! double holding one; any other value is not a rank and stays an ordinary attribute (a run tag
//! or part of the series name). A rank is not a tag of the run: it is [`RunInfo::rank`], and
//! [`RunInfo::process_key`] (`<run key>#rank-<N>`) is what a process's steps, windows and files
//! hang on, so the ranks of one job are never taken for resumes of each other. The job (one
//! MLflow run) keeps the run key; see [`crate::jobs`] for how its ranks are shown.
//!
//! # Run end
//! A trainer ends its run by recording, once at its end, a gauge (or a sum) named
//! [`RUN_END_METRIC`] (`trainmetrics.run.end`) with the attribute `status` = `FINISHED`,
//! `FAILED` or `KILLED` (any letter case; no attribute means `FINISHED`); its value is not
//! used, its time is the end time, and a rank attribute on it ends that rank's process. Any
//! OTel SDK can send it through any collector. Its data points are not metric points: they are
//! not counted as received, and they become [`Decoded::ends`]. A `status` of any other value
//! ends nothing and is logged ([`Decoded::end_errors`]).
//!
//! # Steps
//! Every data point carries its step as the attribute `step` (key configurable). Accepted forms,
//! as other SDKs send them: an int, a double with no fractional part inside the int64 range, or
//! a string holding either. Anything else is dropped and counted as `invalid_step`. The attribute
//! is removed before the point is named.
//!
//! A data point without the attribute gets a step that never decreases and never piles up:
//! if any point of its run has carried a step, the step is `max(largest step seen in the run,
//! the step last given to this series)`; otherwise the series counts its own points `0, 1, 2, …`
//! (one per data point, i.e. one per collection in process). Within one request, stepped points
//! are seen first, so an unstepped point lands on the latest step of the same request.
//!
//! # Values
//! Gauge and sum points give scalars (int values converted to f64). Explicit-bucket histograms
//! keep their buckets. Exponential histograms become explicit ones (bucket `i` of scale `s`
//! covers `(base^i, base^(i+1)]`, `base = 2^(2^-s)`, negative buckets mirrored, the zero bucket
//! up to `zero_threshold`; OTLP metrics data model); more than 16 384 buckets or bounds that
//! overflow are `invalid_histogram`. Summaries become a one-bucket histogram of their count and
//! sum (quantiles cannot be aggregated over a window and are dropped). Points flagged "no recorded value" are skipped without counting. Points in
//! the SDK's cardinality overflow series (`otel.metric.overflow=true`) cannot be placed at a step
//! and are counted `cardinality_overflow`.
//!
//! The OTel SDK (0.33.1+) discards NaN and ±Inf measurements. [`crate::StepRecorder`] therefore
//! records them as `0.0` with the attribute `trainmetrics.nonfinite` = `NaN` | `Infinity` |
//! `-Infinity`; this module restores the value and removes the attribute.
//!
//! OTel instrument names must match `[A-Za-z][A-Za-z0-9_.\-/]{0,254}` (OTel API spec), so names
//! like `acc@1`, `timing(s)/gen` or `lossé` cannot be instruments. [`crate::StepRecorder`] records
//! them on a shared instrument with the attribute `trainmetrics.name` holding the real name; any
//! producer may do the same. The attribute's value replaces the metric name here.
//!
//! # Temporality
//! OTLP sums and histograms say their `aggregation_temporality`. Delta points (what
//! [`crate::Pipeline`]'s readers and `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=delta`
//! give) are values as recorded. A cumulative point is the producer's running total since its
//! `start_time_unix_nano` (the OTel SDKs' default), re-sent at every collection:
//! - with a step attribute, it is kept as the total at that step and marked
//!   ([`Point::cumulative`]), so the cadence replaces rather than adds it (see [`crate::cadence`]);
//! - without one, a monotonic sum or a histogram becomes the per-collection value a counter
//!   stands for: this total minus the series' previous total of the same start time (the total
//!   itself after a new start time or a total that went down); a non-monotonic sum's total is a
//!   level and is kept as it is.
//!
//! The first cumulative point of a run yields one [`Decoded::notices`] entry
//! ([`CUMULATIVE_NOTICE`]: what it costs in the SDK and the setting that switches to delta).
//!
//! # Names
//! A metric name that is empty or only `/` and white space ([`crate::names::maps_to_nothing`]),
//! also when it comes from `trainmetrics.name`, is `invalid_name`: no tag or key can stand for it.
//!
//! The SDK stamps data points with the collection time; [`crate::StepRecorder`] adds the record
//! time as `trainmetrics.time_unix_nano` (int), which, when present, is the point's time.
//!
//! # Bad input (the rules, tested in `tests/bad_input.rs` and fuzzed in `tests/fuzz.rs`)
//! - **Steps** are int64 (TensorBoard's `Event.step` and MLflow's `step` are both int64).
//!   Negative steps are accepted as they are. A double outside `[-2^63, 2^63)` (e.g. `1e30`), a
//!   numeric string outside that range (e.g. `"99999999999999999999"`), a fractional value, NaN,
//!   a bool, bytes or a list is `invalid_step`.
//! - **Times** are OTLP's `fixed64` ns since the Unix epoch, so nothing before 1970 can be
//!   expressed. `0` means "unset" (OTLP) and becomes the receive time. Every other value is kept:
//!   the largest, `u64::MAX` ns, is 2554-07-21, which TensorBoard's wall time (s, double) and
//!   MLflow's timestamp (ms, int64; within Python's year 9999) both hold exactly enough, so both
//!   backends show the same instant. A `trainmetrics.time_unix_nano` that is negative or not an
//!   integer is ignored (the data point's own time is used).
//! - **Kinds**: a series keeps the kind of its first point in a run, scalar (gauge, sum) or
//!   histogram (histogram, exponential histogram, summary): TensorBoard reads a tag's kind from
//!   its first value, and a histogram under a scalar tag makes its loaders fail on the whole run.
//!   Points of the other kind (the same name used by two instrument types) are `invalid_value`.
//! - **Non-finite values** follow the exporter's [`NonFinitePolicy`] (`nonfinite`, default
//!   `keep`). It applies to scalars (gauges, sums); a histogram's NaN sum means "no sum" in OTLP
//!   and is kept.
//! - **Cardinality**: each run keeps at most `max_series_per_run` distinct series (default
//!   10 000) and the decoder tracks at most `max_runs` runs (default 1 000) over its lifetime.
//!   Points of a further series, or of a run beyond `max_runs`, are dropped as `series_limit`
//!   (a run idle for an hour is forgotten to make room, so a long-lived service keeps admitting
//!   new runs);
//!   the first such point of each run (and the first run refused) produces one message, not one
//!   per point. Every per-series map downstream (cadence windows, TensorBoard tags, MLflow key
//!   mapping, this decoder's step state) only ever sees admitted series, so all of them are
//!   bounded by `max_runs × max_series_per_run`. Likewise a run passes on at most
//!   [`MAX_RUN_ATTRIBUTES`] distinct param and tag keys over its life, values cut to
//!   [`MAX_ATTRIBUTE_VALUE_CHARS`] characters; run keys, param and tag keys are bounded like
//!   series names ([`crate::names::bounded_name`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, HistogramDataPoint};

use crate::names::{self, bounded_name, series_name};
use crate::stats::DropReason;

/// Attribute that carries a non-finite value past the SDK (see the module docs).
pub const NONFINITE_ATTRIBUTE: &str = "trainmetrics.nonfinite";
/// Attribute that carries a metric name the OTel API cannot take as an instrument name (see the
/// module docs); its value replaces the instrument's name.
pub const NAME_ATTRIBUTE: &str = "trainmetrics.name";
/// Attribute with the time a value was recorded, int ns since the Unix epoch: the SDK stamps
/// data points with the collection time, so [`crate::StepRecorder`] carries the record time
/// here; it replaces the data point's time.
pub const TIME_ATTRIBUTE: &str = "trainmetrics.time_unix_nano";
/// The OTel SDK's attribute on its cardinality overflow series (OTel metrics SDK spec).
pub const OVERFLOW_ATTRIBUTE: &str = "otel.metric.overflow";
/// Name of the gauge a trainer records once at its end (see the module docs' "Run end").
pub const RUN_END_METRIC: &str = "trainmetrics.run.end";
/// Attribute of [`RUN_END_METRIC`] with the run's final status (`FINISHED`, `FAILED`, `KILLED`).
pub const RUN_END_STATUS_ATTRIBUTE: &str = "status";

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

/// How and when a run ended: by its process at shutdown ([`crate::cadence::OutBatch::ended`]) or
/// by the trainer's run-end gauge ([`RUN_END_METRIC`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunEnd {
    /// The status.
    pub status: EndStatus,
    /// When the process ended, ns since the Unix epoch.
    pub time_unix_nano: u64,
}

/// A final run status, as MLflow's `RunStatus` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndStatus {
    /// `FINISHED`: a clean end.
    Finished,
    /// `FAILED`: the trainer reported failure or panicked.
    Failed,
    /// `KILLED`.
    Killed,
}

impl EndStatus {
    /// The MLflow `RunStatus` name (`FINISHED`, `FAILED`, `KILLED`).
    pub fn as_str(self) -> &'static str {
        match self {
            EndStatus::Finished => "FINISHED",
            EndStatus::Failed => "FAILED",
            EndStatus::Killed => "KILLED",
        }
    }

    /// The status named by [`EndStatus::as_str`], in any letter case; `None` for any other text.
    pub fn parse(s: &str) -> Option<Self> {
        [EndStatus::Finished, EndStatus::Failed, EndStatus::Killed].into_iter().find(|e| e.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

/// One run as described by its resource.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunInfo {
    /// Stable key of the run (see the module docs): what windows, files and MLflow runs hang on.
    pub key: String,
    /// Experiment name, if the resource names one.
    pub experiment: Option<String>,
    /// Human run name, if the resource names one.
    pub run_name: Option<String>,
    /// The trainer's id of the run, if given.
    pub run_id: Option<String>,
    /// Hyperparameters (`ml.param.<name>` → `<name>`), values as text.
    pub params: BTreeMap<String, String>,
    /// Every other resource attribute, as text.
    pub tags: BTreeMap<String, String>,
    /// The process's rank in a distributed job, if it has one (see the module docs' "Ranks").
    pub rank: Option<i64>,
}

impl RunInfo {
    /// A display name: the run name, else the key.
    pub fn display_name(&self) -> &str {
        self.run_name.as_deref().unwrap_or(&self.key)
    }

    /// The key of this process of the run: the run key, with `#rank-<N>` appended for a rank.
    /// Windows, steps and TensorBoard files hang on it; the job (MLflow run) on [`RunInfo::key`].
    pub fn process_key(&self) -> std::borrow::Cow<'_, str> {
        match self.rank {
            Some(r) => format!("{}#rank-{r}", self.key).into(),
            None => self.key.as_str().into(),
        }
    }

    /// This run as its job: the same description without a rank.
    pub fn job(self: &Arc<Self>) -> Arc<Self> {
        if self.rank.is_none() {
            return self.clone();
        }
        Arc::new(RunInfo { rank: None, ..(**self).clone() })
    }
}

/// An OTel explicit-bucket histogram data point (bounds and counts as in OTLP: `counts.len() ==
/// bounds.len() + 1`, checked at decode time).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Number of measurements.
    pub count: u64,
    /// Sum of measurements (NaN when the producer sent none).
    pub sum: f64,
    /// Smallest measurement, if known.
    pub min: Option<f64>,
    /// Largest measurement, if known.
    pub max: Option<f64>,
    /// Upper bounds of all buckets but the last (strictly increasing in valid OTLP).
    pub bounds: Vec<f64>,
    /// Counts per bucket.
    pub counts: Vec<u64>,
}

impl Histogram {
    /// Mean of the measurements (`sum / count`), NaN when empty.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.sum / self.count as f64
        }
    }
}

/// The value of a point.
#[derive(Debug, Clone, PartialEq)]
pub enum PointValue {
    /// A scalar (gauge or sum), possibly NaN or ±Inf.
    Scalar(f64),
    /// A histogram.
    Histogram(Histogram),
}

/// One data point at one step of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The OTel metric name (for per-metric aggregation rules); shared by the points of a metric.
    pub metric: Arc<str>,
    /// The series name (see [`crate::names`]): TensorBoard tag, MLflow key before sanitizing;
    /// shared by the points of a series.
    pub series: Arc<str>,
    /// The training step.
    pub step: i64,
    /// Time of the data point, ns since the Unix epoch (the collection time in process). Assigned
    /// once here, so a retry re-sends identical timestamps.
    pub time_unix_nano: u64,
    /// The value.
    pub value: PointValue,
    /// `Some(start time, ns)` for a point of cumulative temporality that carries its step: the
    /// producer re-sends it at every collection, and a later one for the same series and step
    /// replaces it rather than adding to it (see [`crate::cadence`], "Cumulative points").
    /// `None` for delta and gauge points (and cumulative series without a step, which the
    /// decoder turns into per-collection deltas; see the module docs' "Temporality").
    pub cumulative: Option<u64>,
    /// The point is a gauge's without a record time ([`TIME_ATTRIBUTE`]): its time is the
    /// collection's. An SDK with cumulative temporality re-sends a synchronous gauge's last
    /// value at every collection with a new time (the OTel Python SDK does), so such a point's
    /// identity is its step and value (see [`crate::cadence`], "Duplicates").
    pub collected: bool,
}

/// The points of one run from one request.
#[derive(Debug, Clone)]
pub struct RunPoints {
    /// The run.
    pub run: Arc<RunInfo>,
    /// Its points, in request order.
    pub points: Vec<Point>,
}

/// What a request decoded to: points per run, plus data points that could not be used.
#[derive(Debug, Clone, Default)]
pub struct Decoded {
    /// Usable points, grouped by run in first-seen order.
    pub runs: Vec<RunPoints>,
    /// Data points dropped, by reason.
    pub dropped: Vec<(DropReason, u64)>,
    /// One message per reason, for the log (first offender). `series_limit` appears only the
    /// first time a run reaches its limit in this decoder's life, so logging every message
    /// logs that once per run.
    pub messages: Vec<(DropReason, String)>,
    /// Named events that are not drops, e.g. [`CLAMPED_EVENT`], with their counts (for
    /// `ExporterStats::add_event`).
    pub events: Vec<(&'static str, u64)>,
    /// Things to log once per run (not drops), e.g. the first cumulative point of a run
    /// ([`CUMULATIVE_NOTICE`]): (run key, message).
    pub notices: Vec<(String, String)>,
    /// Run ends the request carries ([`RUN_END_METRIC`]), per process, in request order.
    pub ends: Vec<(Arc<RunInfo>, RunEnd)>,
    /// Run-end data points that could not be read (a `status` of another value): one message
    /// per request, for the log. They end nothing.
    pub end_errors: Vec<String>,
}

impl Decoded {
    fn drop(&mut self, reason: DropReason, message: impl FnOnce() -> String) {
        match self.dropped.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => {
                self.dropped.push((reason, 1));
                self.messages.push((reason, message()));
            }
        }
    }

    /// Counts `n` drops for `reason` without a message.
    fn drop_quiet(&mut self, reason: DropReason, n: u64) {
        match self.dropped.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, c)) => *c += n,
            None => self.dropped.push((reason, n)),
        }
    }

    fn event(&mut self, name: &'static str) {
        match self.events.iter_mut().find(|(e, _)| *e == name) {
            Some((_, n)) => *n += 1,
            None => self.events.push((name, 1)),
        }
    }

    /// Data points this outcome accounts for: accepted into a point or dropped with a reason.
    /// Equals [`count_data_points`] of the request (points flagged "no recorded value" are in
    /// neither).
    pub fn accounted(&self) -> u64 {
        let accepted: usize = self.runs.iter().map(|r| r.points.len()).sum();
        accepted as u64 + self.dropped.iter().map(|(_, n)| n).sum::<u64>()
    }
}

/// The OTLP data point flag "no recorded value" (`DataPointFlags.FLAG_NO_RECORDED_VALUE`).
const NO_RECORDED_VALUE: u32 = 1;

/// Number of data points in a request (all types), as counted for "received". Points flagged
/// "no recorded value" carry nothing to deliver and are not counted (the decoder skips them
/// first), so `count_data_points(req)` equals [`Decoded::accounted`] for every request.
pub fn count_data_points(req: &ExportMetricsServiceRequest) -> u64 {
    fn valued<'a>(flags: impl Iterator<Item = &'a u32>) -> u64 {
        flags.filter(|f| *f & NO_RECORDED_VALUE == 0).count() as u64
    }
    let mut n = 0u64;
    for rm in &req.resource_metrics {
        for sm in &rm.scope_metrics {
            for m in sm.metrics.iter().filter(|m| m.name != RUN_END_METRIC) {
                n += match &m.data {
                    Some(metric::Data::Gauge(g)) => valued(g.data_points.iter().map(|p| &p.flags)),
                    Some(metric::Data::Sum(s)) => valued(s.data_points.iter().map(|p| &p.flags)),
                    Some(metric::Data::Histogram(h)) => valued(h.data_points.iter().map(|p| &p.flags)),
                    Some(metric::Data::ExponentialHistogram(h)) => valued(h.data_points.iter().map(|p| &p.flags)),
                    Some(metric::Data::Summary(s)) => valued(s.data_points.iter().map(|p| &p.flags)),
                    None => 0,
                };
            }
        }
    }
    n
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

#[derive(Debug, Default)]
struct RunSteps {
    max_step: Option<i64>,
    last_by_series: HashMap<Arc<str>, i64>,
    /// Series admitted under `max_series_per_run`, with their kind (true: histogram).
    series: HashMap<Arc<str>, bool>,
    /// Whether the series limit has been reported for this run.
    limit_reported: bool,
    /// Param (`p`) and tag (`t`) keys passed on for this run, at most [`MAX_RUN_ATTRIBUTES`].
    attribute_keys: HashSet<(char, String)>,
    /// Whether the attribute limit has been reported for this run.
    attributes_reported: bool,
    /// When the run last had points (for forgetting idle runs under `max_runs`).
    last_seen: Option<std::time::Instant>,
    /// Per unstepped cumulative series: (start time, last cumulative value), to turn it into
    /// per-collection deltas (see the module docs' "Temporality").
    last_cumulative: HashMap<Arc<str>, (u64, PointValue)>,
    /// Whether cumulative temporality has been noticed for this run.
    cumulative_noticed: bool,
}

/// A run without points for this long may be forgotten to make room under `max_runs` for a new
/// one (a long-lived service sees far more runs over its life than at once). A forgotten run
/// that comes back is a new run to the decoder: its series count again from zero.
pub const FORGET_IDLE_RUN_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Most distinct param and tag keys (together) a run passes on over its life; further keys are
/// left out (with one warning per run), so exporters' per-run param and tag maps stay bounded.
pub const MAX_RUN_ATTRIBUTES: usize = 1024;
/// Longest param or tag value passed on, in characters (MLflow keeps at most 8000 of a tag
/// value and 6000 of a param value, `mlflow/utils/validation.py`); longer values are cut.
pub const MAX_ATTRIBUTE_VALUE_CHARS: usize = 8000;

/// Applies [`MAX_RUN_ATTRIBUTES`] and [`MAX_ATTRIBUTE_VALUE_CHARS`] (keys are bounded like
/// series names); returns how many keys were left out.
fn bound_run_attributes(info: &mut RunInfo, state: &mut RunSteps) -> usize {
    let mut refused = 0;
    for (kind, map) in [('p', &mut info.params), ('t', &mut info.tags)] {
        let entries = std::mem::take(map);
        for (k, mut v) in entries {
            let k = bounded_name(&k).into_owned();
            let id = (kind, k);
            if !state.attribute_keys.contains(&id) {
                if state.attribute_keys.len() >= MAX_RUN_ATTRIBUTES {
                    refused += 1;
                    continue;
                }
                state.attribute_keys.insert(id.clone());
            }
            if let Some((i, _)) = v.char_indices().nth(MAX_ATTRIBUTE_VALUE_CHARS) {
                v.truncate(i);
            }
            map.insert(id.1, v);
        }
    }
    refused
}

/// Renders an attribute value as text (for names, params and tags).
pub fn any_value_text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => b.iter().map(|x| format!("{x:02x}")).collect(),
        Some(any_value::Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().map(|x| any_value_text(Some(x))).collect();
            format!("[{}]", items.join(","))
        }
        Some(any_value::Value::KvlistValue(kv)) => {
            let items: Vec<String> = kv
                .values
                .iter()
                .map(|x| format!("{}={}", x.key, any_value_text(x.value.as_ref())))
                .collect();
            format!("{{{}}}", items.join(","))
        }
        _ => String::new(),
    }
}

/// Parses a step attribute value by the rules in the module docs.
pub fn parse_step(v: Option<&AnyValue>) -> Option<i64> {
    fn whole(d: f64) -> Option<i64> {
        // ±2^63 are exactly representable; i64 holds [-2^63, 2^63).
        const TWO_63: f64 = 9_223_372_036_854_775_808.0;
        (d.fract() == 0.0 && (-TWO_63..TWO_63).contains(&d)).then_some(d as i64)
    }
    match v.and_then(|v| v.value.as_ref())? {
        any_value::Value::IntValue(i) => Some(*i),
        any_value::Value::DoubleValue(d) => whole(*d),
        any_value::Value::StringValue(s) => {
            let s = s.trim();
            s.parse::<i64>().ok().or_else(|| s.parse::<f64>().ok().filter(|_| decimal_is_whole(s)).and_then(whole))
        }
        _ => None,
    }
}

/// Whether a decimal string (`[+-]digits[.digits][e[+-]digits]`) denotes a whole number exactly,
/// judged on its digits: `"0.9999999999999999999"` is not whole even though it parses to the
/// f64 `1.0`. Anything that is not plain decimal notation is not whole.
fn decimal_is_whole(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exp) = match s.split_once(['e', 'E']) {
        Some((m, e)) => match e.parse::<i64>() {
            Ok(e) => (m, e),
            Err(_) => return false,
        },
        None => (s, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) || int.len() + frac.len() == 0 {
        return false;
    }
    // The digits after the decimal point once the exponent is applied must all be zero.
    let digits: Vec<u8> = int.bytes().chain(frac.bytes()).collect();
    let point = int.len() as i64 + exp;
    digits.iter().enumerate().all(|(i, d)| (i as i64) < point || *d == b'0')
}

/// A name cut to 200 characters for messages (logs and partial-success answers).
fn short(name: &str) -> std::borrow::Cow<'_, str> {
    match name.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &name[..i]).into(),
        None => name.into(),
    }
}

fn now_unix_nano() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// A data point's attributes, split by meaning.
struct Split {
    step: Option<i64>,
    rank: Option<i64>,
    rest: Vec<(String, String)>,
    nonfinite: Option<f64>,
    overflow: bool,
    name: Option<String>,
    time: Option<u64>,
}

/// What a cumulative data point says about its series (OTLP `aggregation_temporality`).
#[derive(Debug, Clone, Copy)]
struct Cumulative {
    /// `start_time_unix_nano`: a new one means the producer restarted (its totals reset).
    start: u64,
    /// A monotonic sum or a histogram (totals only grow within one start time); a
    /// non-monotonic sum's cumulative value is a level, not a total.
    monotonic: bool,
}

/// OTLP `AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE`.
const CUMULATIVE: i32 = 2;

/// What is logged once per run when its first cumulative data point arrives.
pub const CUMULATIVE_NOTICE: &str = "this run's producer sends cumulative temporality (the OTel SDKs' default): \
every collection re-sends every attribute set it ever recorded, so with a step attribute the SDK keeps one \
series per step in memory until its cardinality limit (2000 by default) folds new steps into otel.metric.overflow; \
trainmetrics replaces each (series, step) with its latest cumulative value and counts unchanged re-sends \
as duplicate. Set OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=delta in the trainer's environment \
(or a delta temporality selector on its exporter) to send each value once";

/// One usable data point as the shared [`parse`] reads it: the same for every exporter, before
/// any exporter's prefix, limits, non-finite policy and step state apply.
#[derive(Debug, Clone)]
pub struct ParsedPoint {
    /// The data point's own rank attribute (it beats the resource's).
    rank: Option<i64>,
    /// The metric name ([`TIME_ATTRIBUTE`]'s sibling [`NAME_ATTRIBUTE`] applied), bounded.
    metric: Arc<str>,
    /// The series name without prefix and not yet bounded: `metric[/k=v...]`. Bounding comes
    /// after the exporter's prefix, so a cut name hashes the whole name (see [`names::series_name`]).
    name: Arc<str>,
    step: Option<i64>,
    time_unix_nano: u64,
    /// The value, a non-finite one restored from [`NONFINITE_ATTRIBUTE`].
    value: PointValue,
    cumulative: Option<Cumulative>,
    /// A gauge's point whose time is the collection time (see [`Point::collected`]).
    collected: bool,
}

/// One resource of a parsed request: a run as described, its usable points and its ends.
#[derive(Debug, Clone)]
pub struct ParsedResource {
    /// The run as its resource describes it (attributes not yet bounded per run).
    run: RunInfo,
    points: Vec<ParsedPoint>,
    /// Run ends ([`RUN_END_METRIC`]), with the data point's own rank.
    ends: Vec<(Option<i64>, RunEnd)>,
}

/// A request read once for the whole pipeline ([`parse`]), shared by every exporter
/// (`Arc<Parsed>`): each exporter's [`Decoder::decode_parsed`] applies its own rules to it.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    resources: Vec<ParsedResource>,
    /// Drops and messages found by the parse (the same for every exporter).
    outcome: Decoded,
    /// Data points the request holds ([`count_data_points`]).
    pub data_points: u64,
    /// The request's protobuf size, bytes (what admission counts it for).
    pub bytes: u64,
}

impl Parsed {
    /// Data points that no exporter can use (invalid step, value, histogram or name), by reason.
    pub fn dropped(&self) -> &[(DropReason, u64)] {
        &self.outcome.dropped
    }

    /// One message per reason of [`Parsed::dropped`] (first offender).
    pub fn messages(&self) -> &[(DropReason, String)] {
        &self.outcome.messages
    }

    /// The newest step of each process (run key with its rank, [`RunInfo::process_key`]) among
    /// the points that carry one.
    pub fn newest_steps(&self) -> Vec<(String, i64)> {
        let mut newest: Vec<(String, i64)> = Vec::new();
        for res in &self.resources {
            // By rank first, so a key is built once per process, not once per point.
            let mut by_rank: Vec<(Option<i64>, i64)> = Vec::new();
            for p in &res.points {
                let Some(step) = p.step else { continue };
                let rank = p.rank.or(res.run.rank);
                match by_rank.iter_mut().find(|(r, _)| *r == rank) {
                    Some((_, m)) => *m = (*m).max(step),
                    None => by_rank.push((rank, step)),
                }
            }
            for (rank, step) in by_rank {
                let key = RunInfo { key: res.run.key.clone(), rank, ..Default::default() }.process_key().into_owned();
                match newest.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, m)) => *m = (*m).max(step),
                    None => newest.push((key, step)),
                }
            }
        }
        newest
    }

    /// Run keys whose points are of cumulative temporality (for [`CUMULATIVE_NOTICE`]).
    pub fn cumulative_runs(&self) -> impl Iterator<Item = &str> {
        self.resources.iter().filter(|r| r.points.iter().any(|p| p.cumulative.is_some())).map(|r| r.run.key.as_str())
    }
}

/// Reads a request once into the point model (module docs: runs, ranks, run end, steps,
/// values, names). Only `settings.step_key` and `settings.identity` are used: they are the
/// pipeline's, while prefix, limits and the non-finite policy belong to each exporter's
/// [`Decoder`]. Never fails: unusable data points are counted in [`Parsed::dropped`].
pub fn parse(req: &ExportMetricsServiceRequest, settings: &DecodeSettings) -> Parsed {
    let mut outcome = Decoded::default();
    let received_at = now_unix_nano();
    let mut resources = Vec::with_capacity(req.resource_metrics.len());
    for rm in &req.resource_metrics {
        let attrs = rm.resource.as_ref().map(|r| r.attributes.as_slice()).unwrap_or(&[]);
        let mut res = ParsedResource { run: run_info(attrs, &settings.identity), points: Vec::new(), ends: Vec::new() };
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                if m.name == RUN_END_METRIC {
                    run_ends(settings, m, received_at, &mut res.ends, &mut outcome);
                } else {
                    parse_metric(settings, m, received_at, &mut res.points, &mut outcome);
                }
            }
        }
        resources.push(res);
    }
    Parsed { resources, outcome, data_points: count_data_points(req), bytes: prost::Message::encoded_len(req) as u64 }
}

/// The run a resource describes (module docs' "Runs"); its key bounded, the rest as sent.
fn run_info(attrs: &[KeyValue], keys: &IdentityKeys) -> RunInfo {
    let mut info = RunInfo::default();
    let mut service = (None, None);
    for kv in attrs {
        let text = any_value_text(kv.value.as_ref());
        if kv.key == keys.experiment {
            info.experiment = Some(text);
        } else if kv.key == keys.run_name {
            info.run_name = Some(text);
        } else if kv.key == keys.run_id {
            info.run_id = Some(text);
        } else if let Some(p) = kv.key.strip_prefix(keys.param_prefix.as_str()) {
            info.params.insert(p.to_string(), text);
        } else if let Some(rank) = (kv.key == keys.rank).then(|| parse_step(kv.value.as_ref())).flatten() {
            info.rank = Some(rank);
        } else {
            if kv.key == "service.name" {
                service.0 = Some(text.clone());
            } else if kv.key == "service.instance.id" {
                service.1 = Some(text.clone());
            }
            info.tags.insert(kv.key.clone(), text);
        }
    }
    info.key = match (&info.run_id, &info.run_name, service) {
        (Some(id), _, _) if !id.is_empty() => id.clone(),
        (_, Some(name), _) if !name.is_empty() => name.clone(),
        (_, _, (Some(s), Some(i))) => format!("{s}/{i}"),
        (_, _, (Some(s), None)) => s,
        _ => "default".to_string(),
    };
    info.key = bounded_name(&info.key).into_owned();
    info
}

/// Splits attributes into step, name override, non-finite override, overflow and the rest.
fn split_attributes(settings: &DecodeSettings, attrs: &[KeyValue]) -> Result<Split, (DropReason, String)> {
    let mut split = Split { step: None, rank: None, rest: Vec::new(), nonfinite: None, overflow: false, name: None, time: None };
    for kv in attrs {
        if kv.key == settings.step_key {
            split.step = Some(parse_step(kv.value.as_ref()).ok_or_else(|| {
                (DropReason::InvalidStep, format!("step attribute {:?} is not an integer", short(&any_value_text(kv.value.as_ref()))))
            })?);
        } else if let Some(r) = (kv.key == settings.identity.rank).then(|| parse_step(kv.value.as_ref())).flatten() {
            split.rank = Some(r);
        } else if kv.key == NONFINITE_ATTRIBUTE {
            split.nonfinite = match any_value_text(kv.value.as_ref()).as_str() {
                "NaN" => Some(f64::NAN),
                "Infinity" => Some(f64::INFINITY),
                "-Infinity" => Some(f64::NEG_INFINITY),
                other => {
                    return Err((
                        DropReason::InvalidValue,
                        format!("{NONFINITE_ATTRIBUTE}={:?} is not NaN, Infinity or -Infinity", short(other)),
                    ))
                }
            };
        } else if kv.key == OVERFLOW_ATTRIBUTE {
            split.overflow = true;
        } else if kv.key == NAME_ATTRIBUTE {
            split.name = Some(any_value_text(kv.value.as_ref()));
        } else if kv.key == TIME_ATTRIBUTE {
            split.time = parse_step(kv.value.as_ref()).and_then(|t| u64::try_from(t).ok());
        } else {
            split.rest.push((kv.key.clone(), any_value_text(kv.value.as_ref())));
        }
    }
    Ok(split)
}

/// Reads the data points of a [`RUN_END_METRIC`] (see the module docs' "Run end").
fn run_ends(
    settings: &DecodeSettings,
    m: &opentelemetry_proto::tonic::metrics::v1::Metric,
    received_at: u64,
    ends: &mut Vec<(Option<i64>, RunEnd)>,
    out: &mut Decoded,
) {
    let points: Vec<(&[KeyValue], u64)> = match &m.data {
        Some(metric::Data::Gauge(g)) => g.data_points.iter().map(|p| (p.attributes.as_slice(), p.time_unix_nano)).collect(),
        Some(metric::Data::Sum(s)) => s.data_points.iter().map(|p| (p.attributes.as_slice(), p.time_unix_nano)).collect(),
        _ => {
            out.end_errors.push(format!("{RUN_END_METRIC} must be a gauge or a sum; this one ends nothing"));
            return;
        }
    };
    for (attrs, time) in points {
        let rank = attrs.iter().find(|kv| kv.key == settings.identity.rank).and_then(|kv| parse_step(kv.value.as_ref()));
        let status = match attrs.iter().find(|kv| kv.key == RUN_END_STATUS_ATTRIBUTE) {
            None => Some(EndStatus::Finished),
            Some(kv) => EndStatus::parse(&any_value_text(kv.value.as_ref())),
        };
        match status {
            Some(status) => ends.push((rank, RunEnd { status, time_unix_nano: if time == 0 { received_at } else { time } })),
            None if out.end_errors.is_empty() => out.end_errors.push(format!(
                "{RUN_END_METRIC} has {RUN_END_STATUS_ATTRIBUTE}={:?}, not FINISHED, FAILED or KILLED; it ends nothing",
                attrs
                    .iter()
                    .find(|kv| kv.key == RUN_END_STATUS_ATTRIBUTE)
                    .map(|kv| short(&any_value_text(kv.value.as_ref())).into_owned())
                    .unwrap_or_default()
            )),
            None => {}
        }
    }
}

/// The series name of the previous data point of a metric, reused while the next one has the
/// same name override and attributes (the common case: one attribute set over many steps), so
/// a name is built and allocated once per attribute set, not once per point.
#[derive(Default)]
struct LastName {
    over: Option<String>,
    rest: Vec<(String, String)>,
    names: Option<(Arc<str>, Arc<str>)>,
}

fn parse_metric(
    settings: &DecodeSettings,
    m: &opentelemetry_proto::tonic::metrics::v1::Metric,
    received_at: u64,
    points: &mut Vec<ParsedPoint>,
    out: &mut Decoded,
) {
    // Bounded once per metric: its name is shared by all its data points (see `names`).
    let metric_name: Arc<str> = Arc::from(bounded_name(&m.name));
    let gauge = matches!(m.data, Some(metric::Data::Gauge(_)));
    let mut last = LastName::default();
    let mut push = |attrs: &[KeyValue], time: u64, flags: u32, value: PointValue, cumulative: Option<Cumulative>, out: &mut Decoded| {
        if flags & NO_RECORDED_VALUE != 0 {
            return;
        }
        let split = match split_attributes(settings, attrs) {
            Err((reason, msg)) => return out.drop(reason, || format!("metric {:?}: {msg}", short(&m.name))),
            Ok(Split { overflow: true, .. }) => {
                return out.drop(DropReason::CardinalityOverflow, || {
                    format!(
                        "metric {:?}: the SDK folded attribute sets into {OVERFLOW_ATTRIBUTE}; raise cardinality_limit or collect more often",
                        short(&m.name)
                    )
                })
            }
            Ok(s) => s,
        };
        let Split { step, rank, rest, nonfinite, name, time: recorded_at, .. } = split;
        let value = match (value, nonfinite) {
            (PointValue::Scalar(_), Some(v)) => PointValue::Scalar(v),
            (v, _) => v,
        };
        let (metric, name) = match &last.names {
            Some(names) if last.over == name && last.rest == rest => names.clone(),
            _ => {
                let metric: Arc<str> = match &name {
                    Some(n) => Arc::from(bounded_name(n)),
                    None => metric_name.clone(),
                };
                if names::maps_to_nothing(&metric) {
                    return out.drop(DropReason::InvalidName, || {
                        format!("metric name {:?} is empty or only '/' and white space: no TensorBoard tag or MLflow key can stand for it", short(&metric))
                    });
                }
                let full: Arc<str> = if rest.is_empty() { metric.clone() } else { Arc::from(names::unbounded_series_name(&metric, &rest)) };
                last = LastName { over: name, rest, names: Some((metric.clone(), full.clone())) };
                (metric, full)
            }
        };
        points.push(ParsedPoint {
            rank,
            metric,
            name,
            step,
            time_unix_nano: match recorded_at.unwrap_or(time) {
                0 => received_at,
                t => t,
            },
            value,
            cumulative,
            collected: gauge && recorded_at.is_none(),
        });
    };
    match &m.data {
        Some(metric::Data::Gauge(metric_data)) => numbers(m, &metric_data.data_points, None, &mut push, out),
        Some(metric::Data::Sum(metric_data)) => {
            let monotonic = (metric_data.aggregation_temporality == CUMULATIVE).then_some(metric_data.is_monotonic);
            numbers(m, &metric_data.data_points, monotonic, &mut push, out)
        }
        Some(metric::Data::Histogram(h)) => {
            let cumulative = h.aggregation_temporality == CUMULATIVE;
            for dp in h.data_points.iter().filter(|dp| dp.flags & NO_RECORDED_VALUE == 0) {
                let cum = cumulative.then_some(Cumulative { start: dp.start_time_unix_nano, monotonic: true });
                match histogram(dp) {
                    Ok(v) => push(&dp.attributes, dp.time_unix_nano, dp.flags, PointValue::Histogram(v), cum, out),
                    Err(msg) => out.drop(DropReason::InvalidHistogram, || format!("metric {:?}: {msg}", short(&m.name))),
                }
            }
        }
        Some(metric::Data::ExponentialHistogram(h)) => {
            let cumulative = h.aggregation_temporality == CUMULATIVE;
            for dp in h.data_points.iter().filter(|dp| dp.flags & NO_RECORDED_VALUE == 0) {
                let cum = cumulative.then_some(Cumulative { start: dp.start_time_unix_nano, monotonic: true });
                match exponential_histogram(dp) {
                    Ok(v) => push(&dp.attributes, dp.time_unix_nano, dp.flags, PointValue::Histogram(v), cum, out),
                    Err(msg) => out.drop(DropReason::InvalidHistogram, || format!("metric {:?}: {msg}", short(&m.name))),
                }
            }
        }
        Some(metric::Data::Summary(sm)) => {
            for dp in &sm.data_points {
                // Quantiles cannot be aggregated across windows; count and sum can.
                let v = Histogram { count: dp.count, sum: dp.sum, min: None, max: None, bounds: vec![], counts: vec![dp.count] };
                push(&dp.attributes, dp.time_unix_nano, dp.flags, PointValue::Histogram(v), None, out);
            }
        }
        None => {}
    }
}

fn numbers(
    m: &opentelemetry_proto::tonic::metrics::v1::Metric,
    points: &[opentelemetry_proto::tonic::metrics::v1::NumberDataPoint],
    cumulative_monotonic: Option<bool>,
    push: &mut impl FnMut(&[KeyValue], u64, u32, PointValue, Option<Cumulative>, &mut Decoded),
    out: &mut Decoded,
) {
    for dp in points {
        let cum = cumulative_monotonic.map(|monotonic| Cumulative { start: dp.start_time_unix_nano, monotonic });
        match number(dp.value) {
            Some(v) => push(&dp.attributes, dp.time_unix_nano, dp.flags, PointValue::Scalar(v), cum, out),
            // A point flagged "no recorded value" legitimately has none: skipped uncounted.
            None if dp.flags & NO_RECORDED_VALUE != 0 => {}
            None => out.drop(DropReason::InvalidValue, || format!("metric {:?}: data point without a value", short(&m.name))),
        }
    }
}

/// A data point after an exporter's prefix and non-finite policy, before its step is final.
struct Pending {
    metric: Arc<str>,
    series: Arc<str>,
    step: Option<i64>,
    time_unix_nano: u64,
    value: PointValue,
    cumulative: Option<Cumulative>,
    collected: bool,
}

/// One exporter's decoding of parsed requests ([`parse`]): prefix, `max_runs`,
/// `max_series_per_run`, the non-finite policy, the step of unstepped points and the deltas of
/// unstepped cumulative series. Stateful, one per exporter, because the step given to
/// unstepped points depends on what that exporter has seen.
#[derive(Debug, Default)]
pub struct Decoder {
    settings: DecodeSettings,
    steps: HashMap<String, RunSteps>,
    runs: HashMap<String, Arc<RunInfo>>,
    /// Whether the `max_runs` limit has been reported.
    run_limit_reported: bool,
    /// Until when no tracked run can be idle long enough to forget (see `run_admitted`).
    no_idle_run_until: Option<std::time::Instant>,
}

impl Decoder {
    /// A decoder with these settings.
    pub fn new(settings: DecodeSettings) -> Self {
        Self { settings, steps: HashMap::new(), runs: HashMap::new(), run_limit_reported: false, no_idle_run_until: None }
    }

    /// [`parse`]s and decodes one request (for a single consumer; a pipeline parses once and
    /// calls [`Decoder::decode_parsed`] per exporter). Never fails: unusable data points are
    /// counted in [`Decoded::dropped`].
    pub fn decode(&mut self, req: &ExportMetricsServiceRequest) -> Decoded {
        let parsed = parse(req, &self.settings);
        self.decode_parsed(&parsed)
    }

    /// Applies this exporter's rules to a parsed request. Its drops include the parse's.
    pub fn decode_parsed(&mut self, parsed: &Parsed) -> Decoded {
        let mut out = Decoded {
            dropped: parsed.outcome.dropped.clone(),
            messages: parsed.outcome.messages.clone(),
            end_errors: parsed.outcome.end_errors.clone(),
            ..Default::default()
        };
        // Where each run's points are in `out.runs`: a request may hold many resources (a
        // linear search per resource made one request of 100 000 runs take minutes).
        let mut index: HashMap<String, usize> = HashMap::new();
        for res in &parsed.resources {
            let run = self.run_info(&res.run);
            // Points of one resource may carry ranks of their own: each rank is a process.
            let mut by_rank: Vec<(Option<i64>, Vec<Pending>)> = Vec::new();
            for p in &res.points {
                let Some(pending) = self.pending(p, &mut out) else { continue };
                let rank = p.rank.or(run.rank);
                match by_rank.iter_mut().find(|(r, _)| *r == rank) {
                    Some((_, v)) => v.push(pending),
                    None => by_rank.push((rank, vec![pending])),
                }
            }
            for (rank, pending) in by_rank {
                let process = match rank {
                    Some(r) => self.with_rank(&run, r),
                    None => Some(run.clone()),
                };
                let Some(process) = process else {
                    out.drop_quiet(DropReason::SeriesLimit, pending.len() as u64);
                    continue;
                };
                let key = process.process_key().into_owned();
                let Some(pending) = self.admit(&key, pending, &mut out) else {
                    continue;
                };
                let points = self.assign_steps(&key, pending, &mut out);
                match index.get(&key) {
                    Some(&i) => out.runs[i].points.extend(points),
                    None => {
                        index.insert(key, out.runs.len());
                        out.runs.push(RunPoints { run: process, points });
                    }
                }
            }
            for (rank, end) in &res.ends {
                let process = match rank.or(run.rank) {
                    Some(r) => self.with_rank(&run, r).unwrap_or_else(|| Arc::new(RunInfo { rank: Some(r), ..(*run).clone() })),
                    None => run.clone(),
                };
                out.ends.push((process, *end));
            }
        }
        out
    }

    /// A parsed point under this exporter's non-finite policy and prefix; `None` when the
    /// policy drops it.
    fn pending(&self, p: &ParsedPoint, out: &mut Decoded) -> Option<Pending> {
        let value = match &p.value {
            PointValue::Scalar(v) if !v.is_finite() && self.settings.nonfinite != NonFinitePolicy::Keep => {
                let policy = self.settings.nonfinite;
                if policy == NonFinitePolicy::Clamp && !v.is_nan() {
                    out.event(CLAMPED_EVENT);
                    let limit = self.settings.clamp_limit;
                    PointValue::Scalar(if *v > 0.0 { limit } else { -limit })
                } else {
                    out.drop(DropReason::NonFinite, || format!("metric {:?}: value {v} (nonfinite: {policy:?})", short(&p.metric)));
                    return None;
                }
            }
            v => v.clone(),
        };
        let prefix = self.settings.prefix.as_deref().filter(|p| !p.is_empty());
        let series = match prefix {
            None if p.name.len() <= names::MAX_SERIES_NAME_BYTES => p.name.clone(),
            _ => Arc::from(series_name(prefix, &p.name, &[])),
        };
        Some(Pending {
            metric: p.metric.clone(),
            series,
            step: p.step,
            time_unix_nano: p.time_unix_nano,
            value,
            cumulative: p.cumulative,
            collected: p.collected,
        })
    }

    /// Whether a run with this key is tracked, or may be under `max_runs`; when the limit is
    /// reached, the run idle longest is forgotten if it has been idle for
    /// [`DecodeSettings::forget_idle_runs_after`].
    fn run_admitted(&mut self, key: &str) -> bool {
        if self.steps.contains_key(key) || self.steps.len() < self.settings.max_runs {
            return true;
        }
        let now = std::time::Instant::now();
        // A scan that found nobody idle enough is not repeated before someone can be: a
        // request of 100 000 new runs must not scan `max_runs` runs for each of them.
        if self.no_idle_run_until.is_some_and(|t| now < t) {
            return false;
        }
        let idlest = self
            .steps
            .iter()
            .map(|(k, st)| (st.last_seen.map_or(std::time::Duration::MAX, |t| now.saturating_duration_since(t)), k))
            .max_by_key(|(idle, _)| *idle)
            .map(|(idle, k)| (idle, k.clone()));
        let forget = self.settings.forget_idle_runs_after;
        match idlest {
            Some((idle, k)) if idle >= forget => {
                self.steps.remove(&k);
                self.runs.remove(&k);
                true
            }
            Some((idle, _)) => {
                // Nobody can be forgotten before the idlest run reaches `forget`.
                self.no_idle_run_until = now.checked_add(forget - idle);
                false
            }
            None => false,
        }
    }

    /// The run of a parsed resource under this exporter's `max_runs` and per-run attribute
    /// bounds: the shared `Arc` when nothing changed, so downstream maps see one run object.
    fn run_info(&mut self, described: &RunInfo) -> Arc<RunInfo> {
        let mut info = described.clone();
        let process = info.process_key().into_owned();
        if !self.run_admitted(&process) {
            // Not tracked: its points are all dropped, so nothing may be kept for it.
            return Arc::new(info);
        }
        // The run takes its slot under `max_runs` now, so `runs` and `steps` hold the same keys.
        let state = self.steps.entry(process.clone()).or_default();
        let refused = bound_run_attributes(&mut info, state);
        if refused > 0 && !state.attributes_reported {
            state.attributes_reported = true;
            tracing::warn!(
                run = %short(&info.key),
                refused,
                "run has {MAX_RUN_ATTRIBUTES} distinct params and tags; further keys are not passed on"
            );
        }
        match self.runs.get(&process) {
            Some(existing) if **existing == info => existing.clone(),
            _ => {
                let arc = Arc::new(info);
                self.runs.insert(process, arc.clone());
                arc
            }
        }
    }

    /// `run` as the process of `rank` (a data point's rank attribute), admitted under
    /// `max_runs` like a resource of its own; `None` when it is not admitted.
    fn with_rank(&mut self, run: &Arc<RunInfo>, rank: i64) -> Option<Arc<RunInfo>> {
        if run.rank == Some(rank) {
            return Some(run.clone());
        }
        let info = RunInfo { rank: Some(rank), ..(**run).clone() };
        let process = info.process_key().into_owned();
        match self.runs.get(&process) {
            Some(existing) if **existing == info => return Some(existing.clone()),
            _ => {}
        }
        if !self.run_admitted(&process) {
            return None;
        }
        self.steps.entry(process.clone()).or_default();
        let arc = Arc::new(info);
        self.runs.insert(process, arc.clone());
        Some(arc)
    }

    /// Applies `max_runs` and `max_series_per_run`: returns the points of admitted series, or
    /// `None` when none is left. Dropped points count `series_limit`.
    fn admit(&mut self, run_key: &str, pending: Vec<Pending>, out: &mut Decoded) -> Option<Vec<Pending>> {
        let max_series = self.settings.max_series_per_run;
        if !self.run_admitted(run_key) {
            out.drop_quiet(DropReason::SeriesLimit, pending.len() as u64);
            if !self.run_limit_reported {
                self.run_limit_reported = true;
                out.messages.push((
                    DropReason::SeriesLimit,
                    format!("run {:?}: already tracking max_runs={} runs; points of further runs are dropped", short(run_key), self.settings.max_runs),
                ));
            }
            return None;
        }
        let state = self.steps.entry(run_key.to_string()).or_default();
        state.last_seen = Some(std::time::Instant::now());
        let mut kept = Vec::with_capacity(pending.len());
        let mut refused = 0u64;
        let mut first_refused = None;
        for p in pending {
            let histogram = matches!(p.value, PointValue::Histogram(_));
            match state.series.get(&p.series) {
                Some(&kind) if kind == histogram => kept.push(p),
                Some(&kind) => {
                    let (was, is) = if kind { ("histograms", "a scalar") } else { ("scalars", "a histogram") };
                    out.drop(DropReason::InvalidValue, || {
                        format!("series {:?} holds {was}; {is} point cannot share its TensorBoard tag", short(&p.series))
                    });
                }
                None if state.series.len() < max_series => {
                    state.series.insert(p.series.clone(), histogram);
                    kept.push(p);
                }
                None => {
                    refused += 1;
                    if first_refused.is_none() {
                        first_refused = Some(p.series);
                    }
                }
            }
        }
        if refused > 0 {
            out.drop_quiet(DropReason::SeriesLimit, refused);
            if !state.limit_reported {
                state.limit_reported = true;
                let series: String = first_refused.unwrap_or_default().chars().take(200).collect();
                out.messages.push((
                    DropReason::SeriesLimit,
                    format!("run {:?} reached max_series_per_run={max_series}; points of further series (first: {series:?}) are dropped", short(run_key)),
                ));
            }
        }
        (!kept.is_empty()).then_some(kept)
    }

    fn assign_steps(&mut self, run_key: &str, pending: Vec<Pending>, out: &mut Decoded) -> Vec<Point> {
        let state = self.steps.entry(run_key.to_string()).or_default();
        for p in &pending {
            if let Some(s) = p.step {
                state.max_step = Some(state.max_step.map_or(s, |m| m.max(s)));
            }
        }
        if !state.cumulative_noticed && pending.iter().any(|p| p.cumulative.is_some()) {
            state.cumulative_noticed = true;
            out.notices.push((run_key.to_string(), CUMULATIVE_NOTICE.to_string()));
        }
        pending
            .into_iter()
            .map(|mut p| {
                let cumulative = match p.cumulative {
                    Some(c) if p.step.is_some() => Some(c.start),
                    Some(c) if c.monotonic => {
                        p.value = per_collection(&mut state.last_cumulative, &p.series, c.start, p.value);
                        None
                    }
                    // A non-monotonic cumulative sum is a level: its value is what to show.
                    _ => None,
                };
                let step = match p.step {
                    Some(s) => s,
                    None => {
                        let last = state.last_by_series.get(&p.series).copied();
                        let s = match (state.max_step, last) {
                            (Some(max), Some(l)) => max.max(l),
                            (Some(max), None) => max,
                            (None, Some(l)) => l.saturating_add(1),
                            (None, None) => 0,
                        };
                        state.last_by_series.insert(p.series.clone(), s);
                        s
                    }
                };
                Point { metric: p.metric, series: p.series, step, time_unix_nano: p.time_unix_nano, value: p.value, cumulative, collected: p.collected }
            })
            .collect()
    }
}

/// The per-collection value of an unstepped cumulative series (see the module docs'
/// "Temporality"): this total minus the previous one of the same start time; the total itself
/// after a restart of the producer (new start time) or a total that went down (a reset).
/// Histograms subtract count, sum and buckets; their min and max cannot be subtracted and
/// are left out.
fn per_collection(last: &mut HashMap<Arc<str>, (u64, PointValue)>, series: &Arc<str>, start: u64, value: PointValue) -> PointValue {
    let delta = match (last.get(series), &value) {
        (Some((s, PointValue::Scalar(prev))), PointValue::Scalar(v)) if *s == start && v >= prev => PointValue::Scalar(v - prev),
        (Some((s, PointValue::Histogram(prev))), PointValue::Histogram(h))
            if *s == start
                && prev.bounds == h.bounds
                && h.count >= prev.count
                && h.counts.iter().zip(&prev.counts).all(|(a, b)| a >= b) =>
        {
            PointValue::Histogram(Histogram {
                count: h.count - prev.count,
                sum: h.sum - prev.sum,
                min: None,
                max: None,
                bounds: h.bounds.clone(),
                counts: h.counts.iter().zip(&prev.counts).map(|(a, b)| a - b).collect(),
            })
        }
        _ => value.clone(),
    };
    last.insert(series.clone(), (start, value));
    delta
}

fn number(v: Option<number_data_point::Value>) -> Option<f64> {
    match v? {
        number_data_point::Value::AsDouble(d) => Some(d),
        number_data_point::Value::AsInt(i) => Some(i as f64),
    }
}

/// Most buckets an exponential histogram may expand to (bounds memory per point).
const MAX_EXPONENTIAL_BUCKETS: usize = 16_384;

fn exponential_histogram(
    dp: &opentelemetry_proto::tonic::metrics::v1::ExponentialHistogramDataPoint,
) -> Result<Histogram, String> {
    let empty = Default::default();
    let pos = dp.positive.as_ref().unwrap_or(&empty);
    let neg = dp.negative.as_ref().unwrap_or(&empty);
    if pos.bucket_counts.len() + neg.bucket_counts.len() > MAX_EXPONENTIAL_BUCKETS {
        return Err(format!("more than {MAX_EXPONENTIAL_BUCKETS} buckets"));
    }
    if !(-10..=20).contains(&dp.scale) {
        return Err(format!("scale {} outside -10..=20", dp.scale));
    }
    let base = 2f64.powf(2f64.powi(-dp.scale));
    let edge = |index: i64| base.powf(index as f64);
    // (upper edge, count) in ascending order; the last bucket's upper edge is +inf in the
    // explicit form, so only the others become bounds.
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for (k, c) in neg.bucket_counts.iter().enumerate().rev() {
        buckets.push((-edge(i64::from(neg.offset) + k as i64), *c));
    }
    if dp.zero_count > 0 || buckets.is_empty() || pos.bucket_counts.is_empty() {
        buckets.push((dp.zero_threshold.abs(), dp.zero_count));
    }
    for (k, c) in pos.bucket_counts.iter().enumerate() {
        buckets.push((edge(i64::from(pos.offset) + k as i64 + 1), *c));
    }
    let bounds: Vec<f64> = buckets[..buckets.len() - 1].iter().map(|b| b.0).collect();
    let counts: Vec<u64> = buckets.iter().map(|b| b.1).collect();
    histogram(&HistogramDataPoint {
        count: dp.count,
        sum: dp.sum,
        bucket_counts: counts,
        explicit_bounds: bounds,
        min: dp.min,
        max: dp.max,
        ..Default::default()
    })
}

fn histogram(dp: &HistogramDataPoint) -> Result<Histogram, String> {
    let (bounds, counts) = if dp.bucket_counts.is_empty() {
        (Vec::new(), vec![dp.count])
    } else if dp.bucket_counts.len() == dp.explicit_bounds.len() + 1 {
        (dp.explicit_bounds.clone(), dp.bucket_counts.clone())
    } else {
        return Err(format!(
            "{} bucket counts for {} bounds (OTLP requires bounds + 1)",
            dp.bucket_counts.len(),
            dp.explicit_bounds.len()
        ));
    };
    if bounds.iter().any(|b| !b.is_finite()) || bounds.windows(2).any(|w| w[0] >= w[1]) {
        return Err("bucket bounds are not finite and strictly increasing".into());
    }
    let total: u128 = counts.iter().map(|c| u128::from(*c)).sum();
    if total != u128::from(dp.count) {
        return Err(format!("bucket counts add up to {total}, count is {}", dp.count));
    }
    Ok(Histogram {
        count: dp.count,
        sum: dp.sum.unwrap_or(f64::NAN),
        min: dp.min,
        max: dp.max,
        bounds,
        counts,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn decimal_step_strings_must_be_whole_by_their_digits() {
        for w in ["1e3", "1.5e1", "+7", "-4.0", "100.000", "12e0", "0.5e1"] {
            assert!(decimal_is_whole(w), "{w}");
        }
        for f in ["0.9999999999999999999", "1.5", "1e-1", "15e-1", "x", "", "1e", "0x10", "."] {
            assert!(!decimal_is_whole(f), "{f}");
        }
        let step = |t: &str| parse_step(Some(&AnyValue { value: Some(any_value::Value::StringValue(t.into())) }));
        assert_eq!(step("0.9999999999999999999"), None);
        assert_eq!((step("1e3"), step(" 5"), step("-4.0")), (Some(1000), Some(5), Some(-4)));
    }
    use opentelemetry_proto::tonic::metrics::v1::{Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics};
    use opentelemetry_proto::tonic::resource::v1::Resource;

    pub(crate) fn kv(k: &str, v: any_value::Value) -> KeyValue {
        KeyValue { key: k.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
    }
    pub(crate) fn s(v: &str) -> any_value::Value {
        any_value::Value::StringValue(v.into())
    }

    /// A request with one gauge metric of (attributes, value) points, run `r1`.
    pub(crate) fn gauge_request(name: &str, points: Vec<(Vec<KeyValue>, f64)>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![kv("ml.run.name", s("r1")), kv("ml.param.lr", s("0.1")), kv("host", s("h"))],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric {
                        name: name.into(),
                        data: Some(metric::Data::Gauge(Gauge {
                            data_points: points
                                .into_iter()
                                .map(|(attributes, v)| NumberDataPoint {
                                    attributes,
                                    time_unix_nano: 1_700_000_000_000_000_000,
                                    value: Some(number_data_point::Value::AsDouble(v)),
                                    ..Default::default()
                                })
                                .collect(),
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn ranks_make_processes_of_one_run_and_leave_the_names_alone() {
        let i = any_value::Value::IntValue;
        let mut req = gauge_request(
            "train.loss",
            vec![
                (vec![kv("step", i(1))], 1.0),
                (vec![kv("step", i(1)), kv("rank", i(2))], 2.0),
                (vec![kv("step", i(1)), kv("rank", s("x"))], 3.0),
            ],
        );
        let res = req.resource_metrics[0].resource.as_mut().expect("resource");
        res.attributes.push(kv("rank", s("1")));
        let d = Decoder::new(DecodeSettings::default()).decode(&req);
        let got: Vec<(Option<i64>, String, Vec<String>)> = d
            .runs
            .iter()
            .map(|r| (r.run.rank, r.run.process_key().into_owned(), r.points.iter().map(|p| p.series.to_string()).collect()))
            .collect();
        // The resource's rank 1, a data point's own rank 2; a rank that is no integer is an
        // ordinary attribute.
        assert_eq!(
            got,
            [
                (Some(1), "r1#rank-1".to_string(), vec!["train.loss".to_string(), "train.loss/rank=x".to_string()]),
                (Some(2), "r1#rank-2".to_string(), vec!["train.loss".to_string()]),
            ]
        );
        assert!(d.runs.iter().all(|r| r.run.key == "r1" && !r.run.tags.contains_key("rank")));
        assert_eq!(d.accounted(), count_data_points(&req));
    }

    #[test]
    fn the_run_end_gauge_ends_and_is_no_metric_point() {
        let i = any_value::Value::IntValue;
        let mut req = gauge_request(
            RUN_END_METRIC,
            vec![(vec![kv("status", s("failed")), kv("rank", i(3))], 1.0), (vec![], 1.0), (vec![kv("status", s("DONE"))], 1.0)],
        );
        assert_eq!(count_data_points(&req), 0);
        let other = gauge_request("train.loss", vec![(vec![kv("step", i(1))], 1.0)]);
        req.resource_metrics[0].scope_metrics[0].metrics.extend(other.resource_metrics[0].scope_metrics[0].metrics.clone());
        assert_eq!(count_data_points(&req), 1);
        let d = Decoder::new(DecodeSettings::default()).decode(&req);
        let ends: Vec<(String, EndStatus, u64)> = d.ends.iter().map(|(r, e)| (r.process_key().into_owned(), e.status, e.time_unix_nano)).collect();
        let t = 1_700_000_000_000_000_000;
        assert_eq!(ends, [("r1#rank-3".to_string(), EndStatus::Failed, t), ("r1".to_string(), EndStatus::Finished, t)]);
        assert_eq!(d.end_errors.len(), 1, "{:?}", d.end_errors);
        assert!(d.end_errors[0].contains("\"DONE\""), "{:?}", d.end_errors);
        assert_eq!(d.accounted(), 1);
        assert!(d.dropped.is_empty());
    }

    #[test]
    fn step_forms() {
        let v = |x| Some(AnyValue { value: Some(x) });
        assert_eq!(parse_step(v(any_value::Value::IntValue(7)).as_ref()), Some(7));
        assert_eq!(parse_step(v(any_value::Value::DoubleValue(7.0)).as_ref()), Some(7));
        assert_eq!(parse_step(v(any_value::Value::DoubleValue(7.5)).as_ref()), None);
        assert_eq!(parse_step(v(any_value::Value::DoubleValue(9.3e18)).as_ref()), None);
        assert_eq!(parse_step(v(any_value::Value::DoubleValue(f64::NAN)).as_ref()), None);
        assert_eq!(parse_step(v(s(" 42 ")).as_ref()), Some(42));
        assert_eq!(parse_step(v(s("42.0")).as_ref()), Some(42));
        assert_eq!(parse_step(v(s("abc")).as_ref()), None);
        assert_eq!(parse_step(v(s("99999999999999999999")).as_ref()), None);
        assert_eq!(parse_step(v(any_value::Value::BoolValue(true)).as_ref()), None);
        assert_eq!(parse_step(None), None);
    }

    #[test]
    fn run_identity_params_tags_and_names() {
        let req = gauge_request(
            "eval.accuracy",
            vec![(vec![kv("step", any_value::Value::IntValue(3)), kv("split", s("val"))], 0.5)],
        );
        let mut d = Decoder::new(DecodeSettings::default());
        let out = d.decode(&req);
        assert!(out.dropped.is_empty());
        let run = &out.runs[0].run;
        assert_eq!(run.key, "r1");
        assert_eq!(run.params.get("lr").map(String::as_str), Some("0.1"));
        assert_eq!(run.tags.get("host").map(String::as_str), Some("h"));
        let p = &out.runs[0].points[0];
        assert_eq!((&*p.series, p.step, p.value.clone()), ("eval.accuracy/split=val", 3, PointValue::Scalar(0.5)));
    }

    #[test]
    fn unstepped_points_never_decrease_and_never_pile_up() {
        let mut d = Decoder::new(DecodeSettings::default());
        // No step anywhere yet: the series counts its own points.
        let steps: Vec<i64> = (0..3)
            .map(|_| d.decode(&gauge_request("gpu.util", vec![(vec![], 1.0)])).runs[0].points[0].step)
            .collect();
        assert_eq!(steps, vec![0, 1, 2]);
        // Once the run carries steps, unstepped points follow the latest step, never going back.
        let mixed = d.decode(&gauge_request(
            "gpu.util",
            vec![(vec![kv("step", any_value::Value::IntValue(1))], 1.0), (vec![], 2.0)],
        ));
        let pts = &mixed.runs[0].points;
        assert_eq!(pts[1].step, 2, "max(run step 1, series last 2)");
        let later = d.decode(&gauge_request(
            "gpu.util",
            vec![(vec![kv("step", any_value::Value::IntValue(50))], 1.0), (vec![], 2.0)],
        ));
        assert_eq!(later.runs[0].points[1].step, 50);
    }

    #[test]
    fn bad_points_are_counted_not_fatal() {
        let req = gauge_request(
            "x",
            vec![
                (vec![kv("step", s("abc"))], 1.0),
                (vec![kv(OVERFLOW_ATTRIBUTE, any_value::Value::BoolValue(true))], 1.0),
                (vec![kv("step", any_value::Value::IntValue(1)), kv(NONFINITE_ATTRIBUTE, s("-Infinity"))], 0.0),
            ],
        );
        let out = Decoder::new(DecodeSettings::default()).decode(&req);
        assert_eq!(out.dropped, vec![(DropReason::InvalidStep, 1), (DropReason::CardinalityOverflow, 1)]);
        assert_eq!(out.runs[0].points.len(), 1);
        assert_eq!(out.runs[0].points[0].value, PointValue::Scalar(f64::NEG_INFINITY));
        assert_eq!(&*out.runs[0].points[0].series, "x");
    }

    #[test]
    fn missing_and_unreadable_values_are_invalid_values() {
        let mut req = gauge_request("x", vec![(vec![kv("step", any_value::Value::IntValue(1)), kv(NONFINITE_ATTRIBUTE, s("nan"))], 0.0)]);
        if let Some(metric::Data::Gauge(g)) = &mut req.resource_metrics[0].scope_metrics[0].metrics[0].data {
            let mut no_value = g.data_points[0].clone();
            no_value.value = None;
            no_value.attributes.truncate(1);
            g.data_points.push(no_value);
        }
        let out = Decoder::new(DecodeSettings::default()).decode(&req);
        assert_eq!(out.dropped, vec![(DropReason::InvalidValue, 2)]);
        assert!(out.runs.is_empty());
    }

    #[test]
    fn exponential_histograms_become_explicit_ones() {
        use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
        use opentelemetry_proto::tonic::metrics::v1::ExponentialHistogramDataPoint;
        // The official example: scale 0 (base 2), zero bucket 1, positive offset 1 counts [0, 2].
        let dp = ExponentialHistogramDataPoint {
            count: 3,
            sum: Some(10.0),
            scale: 0,
            zero_count: 1,
            positive: Some(Buckets { offset: 1, bucket_counts: vec![0, 2] }),
            min: Some(0.0),
            max: Some(5.0),
            ..Default::default()
        };
        let h = exponential_histogram(&dp).map_err(|e| e.to_string());
        assert_eq!(h.map(|h| (h.bounds, h.counts, h.count)), Ok((vec![0.0, 4.0], vec![1, 0, 2], 3)));
        let neg = ExponentialHistogramDataPoint {
            count: 2,
            scale: 1,
            negative: Some(Buckets { offset: 0, bucket_counts: vec![1, 1] }),
            ..Default::default()
        };
        let h = exponential_histogram(&neg).map_err(|e| e.to_string());
        let two = 2f64.sqrt();
        assert_eq!(h.map(|h| (h.bounds, h.counts)), Ok((vec![-two, -1.0], vec![1, 1, 0])));
        let huge = ExponentialHistogramDataPoint { count: 0, positive: Some(Buckets { offset: 0, bucket_counts: vec![0; 20_000] }), ..Default::default() };
        assert!(exponential_histogram(&huge).is_err());
        let overflow = ExponentialHistogramDataPoint { count: 2, scale: -10, positive: Some(Buckets { offset: 5, bucket_counts: vec![1, 1] }), ..Default::default() };
        assert!(exponential_histogram(&overflow).is_err(), "bounds of 2^(1024·6) are not finite");
    }

    #[test]
    fn histogram_shapes_are_checked() {
        let dp = |counts: Vec<u64>, bounds: Vec<f64>, count| HistogramDataPoint {
            count,
            sum: Some(3.0),
            bucket_counts: counts,
            explicit_bounds: bounds,
            ..Default::default()
        };
        assert!(histogram(&dp(vec![1, 2], vec![1.0], 3)).is_ok());
        assert!(histogram(&dp(vec![1, 2, 3], vec![1.0], 6)).is_err());
        assert!(histogram(&dp(vec![1, 2], vec![1.0], 4)).is_err());
        assert!(histogram(&dp(vec![1, 2, 0], vec![2.0, 1.0], 3)).is_err());
        assert_eq!(histogram(&dp(vec![], vec![], 5)).map(|h| h.counts), Ok(vec![5]));
    }

    fn stepped(n: usize, series_of: impl Fn(usize) -> String) -> ExportMetricsServiceRequest {
        gauge_request("m", (0..n).map(|i| (vec![kv("step", any_value::Value::IntValue(1)), kv("k", s(&series_of(i)))], 1.0)).collect())
    }

    #[test]
    fn series_beyond_the_limit_are_dropped_and_reported_once_per_run() {
        let settings = DecodeSettings { max_series_per_run: 3, ..Default::default() };
        let mut d = Decoder::new(settings);
        let out = d.decode(&stepped(5, |i| i.to_string()));
        let series: Vec<&str> = out.runs[0].points.iter().map(|p| &*p.series).collect();
        assert_eq!(series, ["m/k=0", "m/k=1", "m/k=2"]);
        assert_eq!(out.dropped, vec![(DropReason::SeriesLimit, 2)]);
        assert_eq!(out.messages.len(), 1);
        assert!(out.messages[0].1.contains("max_series_per_run=3"), "{}", out.messages[0].1);
        // Admitted series keep flowing; further ones stay out, and the run is not reported again.
        let out = d.decode(&stepped(6, |i| i.to_string()));
        assert_eq!(out.runs[0].points.len(), 3);
        assert_eq!(out.dropped, vec![(DropReason::SeriesLimit, 3)]);
        assert!(out.messages.is_empty());
        assert_eq!(d.steps["r1"].series.len(), 3);
        assert!(d.steps["r1"].last_by_series.len() <= 3);
    }

    #[test]
    fn runs_beyond_max_runs_are_dropped_and_not_remembered() {
        let settings = DecodeSettings { max_runs: 2, ..Default::default() };
        let mut d = Decoder::new(settings);
        let run = |name: &str| {
            let mut req = gauge_request("m", vec![(vec![kv("step", any_value::Value::IntValue(1))], 1.0)]);
            if let Some(r) = req.resource_metrics[0].resource.as_mut() {
                r.attributes[0] = kv("ml.run.name", s(name));
            }
            req
        };
        for name in ["a", "b"] {
            assert_eq!(d.decode(&run(name)).runs.len(), 1);
        }
        let out = d.decode(&run("c"));
        assert!(out.runs.is_empty());
        assert_eq!(out.dropped, vec![(DropReason::SeriesLimit, 1)]);
        assert_eq!(out.messages.len(), 1);
        let out = d.decode(&run("d"));
        assert_eq!((out.dropped.clone(), out.messages.len()), (vec![(DropReason::SeriesLimit, 1)], 0));
        assert_eq!((d.runs.len(), d.steps.len()), (2, 2));
        // A tracked run still gets through.
        assert_eq!(d.decode(&run("a")).runs.len(), 1);

        // Runs idle past forget_idle_runs_after make room for new ones, idlest first.
        let settings = DecodeSettings { max_runs: 2, forget_idle_runs_after: Duration::from_millis(50), ..Default::default() };
        let mut d = Decoder::new(settings);
        assert_eq!(d.decode(&run("a")).runs.len(), 1);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(d.decode(&run("b")).runs.len(), 1);
        assert!(d.decode(&run("c")).runs.is_empty(), "nobody idle long enough yet");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(d.decode(&run("c")).runs.len(), 1, "a (idle 60 ms) is forgotten");
        let mut kept: Vec<&String> = d.steps.keys().collect();
        kept.sort();
        assert_eq!(kept, vec!["b", "c"]);
    }

    #[test]
    fn nonfinite_policies() {
        let req = || {
            gauge_request(
                "x",
                [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 2.5]
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| (vec![kv("step", any_value::Value::IntValue(i as i64))], v))
                    .collect(),
            )
        };
        let run = |policy| Decoder::new(DecodeSettings { nonfinite: policy, ..Default::default() }).decode(&req());
        let values = |out: &Decoded| -> Vec<String> {
            out.runs.iter().flat_map(|r| &r.points).map(|p| format!("{:?}", p.value)).collect()
        };
        let keep = run(NonFinitePolicy::Keep);
        assert_eq!(values(&keep), ["Scalar(NaN)", "Scalar(inf)", "Scalar(-inf)", "Scalar(2.5)"]);
        assert!(keep.dropped.is_empty() && keep.events.is_empty());
        let drop = run(NonFinitePolicy::Drop);
        assert_eq!(values(&drop), ["Scalar(2.5)"]);
        assert_eq!(drop.dropped, vec![(DropReason::NonFinite, 3)]);
        let clamp = run(NonFinitePolicy::Clamp);
        let pts: Vec<(i64, PointValue)> = clamp.runs[0].points.iter().map(|p| (p.step, p.value.clone())).collect();
        assert_eq!(pts, vec![(1, PointValue::Scalar(f64::MAX)), (2, PointValue::Scalar(f64::MIN)), (3, PointValue::Scalar(2.5))]);
        assert_eq!(clamp.dropped, vec![(DropReason::NonFinite, 1)]);
        assert_eq!(clamp.events, vec![(CLAMPED_EVENT, 2)]);
        for out in [keep, drop, clamp] {
            assert_eq!(out.accounted(), 4);
        }
    }

    #[test]
    fn out_of_range_steps_and_times() {
        let v = |x| Some(AnyValue { value: Some(x) });
        assert_eq!(parse_step(v(any_value::Value::DoubleValue(1e30)).as_ref()), None);
        assert_eq!(parse_step(v(any_value::Value::DoubleValue(-9_223_372_036_854_775_808.0)).as_ref()), Some(i64::MIN));
        assert_eq!(parse_step(v(any_value::Value::IntValue(-5)).as_ref()), Some(-5));
        assert_eq!(parse_step(v(s("-99999999999999999999")).as_ref()), None);
        assert_eq!(parse_step(v(s("1e30")).as_ref()), None);
        assert_eq!(parse_step(v(s("inf")).as_ref()), None);
        let mut req = gauge_request("t", vec![(vec![kv("step", any_value::Value::IntValue(1))], 1.0), (vec![kv("step", any_value::Value::IntValue(2))], 1.0)]);
        if let Some(metric::Data::Gauge(g)) = &mut req.resource_metrics[0].scope_metrics[0].metrics[0].data {
            g.data_points[0].time_unix_nano = 0;
            g.data_points[1].time_unix_nano = u64::MAX;
        }
        let before = now_unix_nano();
        let out = Decoder::new(DecodeSettings::default()).decode(&req);
        let times: Vec<u64> = out.runs[0].points.iter().map(|p| p.time_unix_nano).collect();
        assert!(times[0] >= before && times[0] <= now_unix_nano(), "0 becomes the receive time");
        assert_eq!(times[1], u64::MAX);
    }

    #[test]
    fn run_attributes_are_bounded() {
        let mut req = gauge_request("m", vec![(vec![kv("step", any_value::Value::IntValue(1))], 1.0)]);
        let attrs = &mut req.resource_metrics[0].resource.as_mut().expect("resource").attributes;
        attrs.push(kv("long", s(&"v".repeat(MAX_ATTRIBUTE_VALUE_CHARS + 5))));
        let out = Decoder::new(DecodeSettings::default()).decode(&req);
        assert_eq!(out.runs[0].run.tags["long"].chars().count(), MAX_ATTRIBUTE_VALUE_CHARS);

        let mut d = Decoder::new(DecodeSettings::default());
        let attrs = &mut req.resource_metrics[0].resource.as_mut().expect("resource").attributes;
        attrs.extend((0..MAX_RUN_ATTRIBUTES + 10).map(|i| kv(&format!("ml.param.p{i:04}"), s("x"))));
        let out = d.decode(&req);
        let run = &out.runs[0].run;
        // Params first (in key order), then tags, until the slots are taken.
        assert_eq!(run.params.len() + run.tags.len(), MAX_RUN_ATTRIBUTES);
        assert_eq!(run.params["lr"], "0.1");
        assert!(run.tags.is_empty());
        // Keys passed on stay; new keys stay out, in later requests too.
        let again = d.decode(&req);
        assert_eq!(again.runs[0].run.params, run.params);
    }

    #[test]
    fn a_series_keeps_the_kind_of_its_first_point() {
        let mut req = gauge_request("loss", vec![(vec![kv("step", any_value::Value::IntValue(1))], 1.0)]);
        let hist = Metric {
            name: "loss".into(),
            data: Some(metric::Data::Histogram(opentelemetry_proto::tonic::metrics::v1::Histogram {
                data_points: vec![HistogramDataPoint {
                    attributes: vec![kv("step", any_value::Value::IntValue(2))],
                    count: 1,
                    sum: Some(1.0),
                    ..Default::default()
                }],
                ..Default::default()
            })),
            ..Default::default()
        };
        req.resource_metrics[0].scope_metrics[0].metrics.push(hist);
        let mut d = Decoder::new(DecodeSettings::default());
        let out = d.decode(&req);
        assert_eq!(out.runs[0].points.len(), 1);
        assert_eq!(out.runs[0].points[0].value, PointValue::Scalar(1.0));
        assert_eq!(out.dropped, vec![(DropReason::InvalidValue, 1)]);
        assert!(out.messages[0].1.contains("holds scalars"), "{}", out.messages[0].1);
    }

    fn cumulative_sum(name: &str, monotonic: bool, points: Vec<(Vec<KeyValue>, u64, f64)>) -> ExportMetricsServiceRequest {
        let mut req = gauge_request(name, vec![]);
        let dps = points
            .into_iter()
            .map(|(attributes, start, v)| NumberDataPoint {
                attributes,
                start_time_unix_nano: start,
                time_unix_nano: 1_700_000_000_000_000_000,
                value: Some(number_data_point::Value::AsDouble(v)),
                ..Default::default()
            })
            .collect();
        req.resource_metrics[0].scope_metrics[0].metrics[0].data = Some(metric::Data::Sum(
            opentelemetry_proto::tonic::metrics::v1::Sum { data_points: dps, aggregation_temporality: CUMULATIVE, is_monotonic: monotonic },
        ));
        req
    }

    fn scalars(d: &Decoded) -> Vec<(i64, f64, Option<u64>)> {
        d.runs.iter().flat_map(|r| &r.points).map(|p| match p.value {
            PointValue::Scalar(v) => (p.step, v, p.cumulative),
            PointValue::Histogram(_) => (p.step, f64::NAN, p.cumulative),
        }).collect()
    }

    #[test]
    fn cumulative_points_keep_their_step_or_become_per_collection_values() {
        let mut d = Decoder::new(DecodeSettings::default());
        // With a step: kept as the total at that step, marked with its start time.
        let out = d.decode(&cumulative_sum("tokens", true, vec![(vec![kv("step", any_value::Value::IntValue(3))], 5, 7.0)]));
        assert_eq!(scalars(&out), vec![(3, 7.0, Some(5))]);
        assert_eq!(out.notices.len(), 1, "one notice per run");
        assert!(out.notices[0].1.contains("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=delta"));
        // Without a step: per-collection deltas, reset on a new start time or a lower total.
        let mut got = Vec::new();
        for (start, total) in [(5, 10.0), (5, 15.0), (5, 15.0), (9, 4.0), (9, 1.0)] {
            let out = d.decode(&cumulative_sum("seen", true, vec![(vec![], start, total)]));
            assert!(out.notices.is_empty());
            got.extend(scalars(&out).into_iter().map(|(_, v, c)| (v, c)));
        }
        assert_eq!(got, vec![(10.0, None), (5.0, None), (0.0, None), (4.0, None), (1.0, None)]);
        // A non-monotonic cumulative sum (an up-down counter) is a level.
        let out = d.decode(&cumulative_sum("queue", false, vec![(vec![], 5, 3.0)]));
        let out2 = d.decode(&cumulative_sum("queue", false, vec![(vec![], 5, 2.0)]));
        assert_eq!((scalars(&out)[0].1, scalars(&out2)[0].1), (3.0, 2.0));
    }

    /// Case 020 at the decoder: empty names (and names of only `/` and spaces) are refused.
    #[test]
    fn names_that_map_to_nothing_are_invalid_names() {
        let mut d = Decoder::new(DecodeSettings::default());
        for name in ["", "/", " / ", "\t"] {
            let out = d.decode(&gauge_request(name, vec![(vec![kv("step", any_value::Value::IntValue(1))], 1.0)]));
            assert!(out.runs.is_empty(), "{name:?}");
            assert_eq!(out.dropped, vec![(DropReason::InvalidName, 1)], "{name:?}");
        }
        // The name attribute counts as the name.
        let out = d.decode(&gauge_request("trainmetrics.other", vec![(vec![kv(NAME_ATTRIBUTE, s(""))], 1.0)]));
        assert_eq!(out.dropped, vec![(DropReason::InvalidName, 1)]);
        let out = d.decode(&gauge_request("a/b", vec![(vec![], 1.0)]));
        assert_eq!(out.accounted(), 1);
        assert!(out.dropped.is_empty());
    }
}
