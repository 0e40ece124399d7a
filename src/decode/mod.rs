//! Decode: turns an OTLP `ExportMetricsServiceRequest` (the one data model of both routes, in
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
//! # Bad input (the rules, tested in `tests/bad_input.rs` and fuzzed in `tests/fuzz/`)
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
//!
//! # Layout
//! Downward only: [`model`] (the point model and the attribute conventions) and [`settings`]
//! are leaves; [`values`] reads numbers and histograms; [`steps`] reads step attributes and
//! gives unstepped points their step; [`runs`] describes runs and admits them and their series;
//! `wire` (private) is the protobuf form a request is read from; [`request`] reads a request once
//! ([`parse`]) for every exporter; [`decoder`] applies one exporter's rules.

pub mod decoder;
pub mod model;
pub mod request;
pub mod runs;
pub mod settings;
pub mod steps;
pub mod values;
pub(crate) mod wire;

pub use decoder::Decoder;
pub use model::*;
pub use request::{count_data_points, parse, parse_protobuf, Parsed, ParsedPoint, ParsedResource};
pub use runs::{MAX_ATTRIBUTE_VALUE_CHARS, MAX_RUN_ATTRIBUTES};
pub use settings::*;
pub use steps::parse_step;
pub use values::CUMULATIVE_NOTICE;

#[cfg(test)]
pub(crate) mod tests;
