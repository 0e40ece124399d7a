//! The point model every exporter receives: runs ([`RunInfo`], [`RunEnd`]), points ([`Point`],
//! [`PointValue`], [`Histogram`]), a decoded request ([`Decoded`]), and the attribute conventions
//! producers use to pass what OTel instruments cannot carry (module docs of [`crate::decode`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue};

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

/// How and when a run ended: by its process at shutdown ([`crate::cadence::Batch::ended`]) or
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
    Histogram(Box<Histogram>),
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
    /// Named events that are not drops, e.g. [`CLAMPED_EVENT`](super::CLAMPED_EVENT), with their counts (for
    /// `ExporterStats::add_event`).
    pub events: Vec<(&'static str, u64)>,
    /// Things to log once per run (not drops), e.g. the first cumulative point of a run
    /// ([`CUMULATIVE_NOTICE`](super::CUMULATIVE_NOTICE)): (run key, message).
    pub notices: Vec<(String, String)>,
    /// Run ends the request carries ([`RUN_END_METRIC`]), per process, in request order.
    pub ends: Vec<(Arc<RunInfo>, RunEnd)>,
    /// Run-end data points that could not be read (a `status` of another value): one message
    /// per request, for the log. They end nothing.
    pub end_errors: Vec<String>,
}

impl Decoded {
    /// Counts one drop for `reason`; the first of each reason keeps its message.
    pub(crate) fn drop(&mut self, reason: DropReason, message: impl FnOnce() -> String) {
        match self.dropped.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => {
                self.dropped.push((reason, 1));
                self.messages.push((reason, message()));
            }
        }
    }

    /// Counts `n` drops for `reason` without a message.
    pub(crate) fn drop_quiet(&mut self, reason: DropReason, n: u64) {
        match self.dropped.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, c)) => *c += n,
            None => self.dropped.push((reason, n)),
        }
    }

    /// Counts one event named `name`.
    pub(crate) fn event(&mut self, name: &'static str) {
        match self.events.iter_mut().find(|(e, _)| *e == name) {
            Some((_, n)) => *n += 1,
            None => self.events.push((name, 1)),
        }
    }

    /// Data points this outcome accounts for: accepted into a point or dropped with a reason.
    /// Equals [`count_data_points`](super::count_data_points) of the request (points flagged "no recorded value" are in
    /// neither).
    pub fn accounted(&self) -> u64 {
        let accepted: usize = self.runs.iter().map(|r| r.points.len()).sum();
        accepted as u64 + self.dropped.iter().map(|(_, n)| n).sum::<u64>()
    }
}

/// What a cumulative data point says about its series (OTLP `aggregation_temporality`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cumulative {
    /// `start_time_unix_nano`: a new one means the producer restarted (its totals reset).
    pub(crate) start: u64,
    /// A monotonic sum or a histogram (totals only grow within one start time); a
    /// non-monotonic sum's cumulative value is a level, not a total.
    pub(crate) monotonic: bool,
}

/// A data point after an exporter's prefix and non-finite policy, before its step is final.
pub(crate) struct Pending {
    pub(crate) metric: Arc<str>,
    pub(crate) series: Arc<str>,
    pub(crate) step: Option<i64>,
    pub(crate) time_unix_nano: u64,
    pub(crate) value: PointValue,
    pub(crate) cumulative: Option<Cumulative>,
    pub(crate) collected: bool,
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

/// A name cut to 200 characters for messages (logs and partial-success answers).
pub(crate) fn short(name: &str) -> std::borrow::Cow<'_, str> {
    match name.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &name[..i]).into(),
        None => name.into(),
    }
}
