//! The shared read of a request ([`parse`]): once per request for the whole pipeline, into
//! what every exporter's [`super::Decoder`] starts from (module docs: run end, values, names,
//! temporality, bad input).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric;
use prost::bytes::Bytes;
use prost::{DecodeError, Message};

use super::model::*;
use super::runs::run_info;
use super::settings::DecodeSettings;
use super::steps::parse_step;
use super::values::{exponential_histogram, histogram, number};
use super::wire;
use crate::names::{self, bounded_name};
use crate::stats::DropReason;

/// The OTLP data point flag "no recorded value" (`DataPointFlags.FLAG_NO_RECORDED_VALUE`).
const NO_RECORDED_VALUE: u32 = 1;

/// Number of data points in a request (all types), as counted for "received". Points flagged
/// "no recorded value" carry nothing to deliver and are not counted (the decoder skips them
/// first), so `count_data_points(req)` equals [`Decoded::accounted`] for every request.
pub fn count_data_points(req: &ExportMetricsServiceRequest) -> u64 {
    let metrics = req.resource_metrics.iter().flat_map(|rm| &rm.scope_metrics).flat_map(|sm| &sm.metrics);
    let points = |m: &opentelemetry_proto::tonic::metrics::v1::Metric| match &m.data {
        Some(metric::Data::Gauge(g)) => valued(g.data_points.iter().map(|p| p.flags)),
        Some(metric::Data::Sum(s)) => valued(s.data_points.iter().map(|p| p.flags)),
        Some(metric::Data::Histogram(h)) => valued(h.data_points.iter().map(|p| p.flags)),
        Some(metric::Data::ExponentialHistogram(h)) => valued(h.data_points.iter().map(|p| p.flags)),
        Some(metric::Data::Summary(s)) => valued(s.data_points.iter().map(|p| p.flags)),
        None => 0,
    };
    metrics.filter(|m| m.name != RUN_END_METRIC).map(points).sum()
}

/// The data points of one metric that [`count_data_points`] counts, on the wire form.
fn valued_points(m: &wire::Metric) -> u64 {
    match &m.data {
        Some(wire::Data::Gauge(g)) => valued(g.data_points.iter().map(|p| p.flags)),
        Some(wire::Data::Sum(s)) => valued(s.data_points.iter().map(|p| p.flags)),
        Some(wire::Data::Histogram(h)) => valued(h.data_points.iter().map(|p| p.flags)),
        Some(wire::Data::ExponentialHistogram(h)) => valued(h.data_points.iter().map(|p| p.flags)),
        Some(wire::Data::Summary(s)) => valued(s.data_points.iter().map(|p| p.flags)),
        None => 0,
    }
}

/// How many of these data point flags do not say "no recorded value".
fn valued(flags: impl Iterator<Item = u32>) -> u64 {
    flags.filter(|f| f & NO_RECORDED_VALUE == 0).count() as u64
}

pub(crate) fn now_unix_nano() -> u64 {
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

/// OTLP `AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE`.
pub(crate) const CUMULATIVE: i32 = 2;

/// One usable data point as the shared [`parse`] reads it: the same for every exporter, before
/// any exporter's prefix, limits, non-finite policy and step state apply.
#[derive(Debug, Clone)]
pub struct ParsedPoint {
    /// The data point's own rank attribute (it beats the resource's).
    pub(crate) rank: Option<i64>,
    /// The metric name ([`TIME_ATTRIBUTE`]'s sibling [`NAME_ATTRIBUTE`] applied), bounded.
    pub(crate) metric: Arc<str>,
    /// The series name without prefix and not yet bounded: `metric[/k=v...]`. Bounding comes
    /// after the exporter's prefix, so a cut name hashes the whole name (see [`names::series_name`]).
    pub(crate) name: Arc<str>,
    pub(crate) step: Option<i64>,
    pub(crate) time_unix_nano: u64,
    /// The value, a non-finite one restored from [`NONFINITE_ATTRIBUTE`].
    pub(crate) value: PointValue,
    pub(crate) cumulative: Option<Cumulative>,
    /// A gauge's point whose time is the collection time (see [`Point::collected`]).
    pub(crate) collected: bool,
}

/// One resource of a parsed request: a run as described, its usable points and its ends.
#[derive(Debug, Clone)]
pub struct ParsedResource {
    /// The run as its resource describes it (attributes not yet bounded per run).
    pub(crate) run: RunInfo,
    pub(crate) points: Vec<ParsedPoint>,
    /// Run ends ([`RUN_END_METRIC`]), with the data point's own rank.
    pub(crate) ends: Vec<(Option<i64>, RunEnd)>,
}

/// A request read once for the whole pipeline ([`parse`]), shared by every exporter
/// (`Arc<Parsed>`): each exporter's [`super::Decoder::decode_parsed`] applies its own rules to it.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    pub(crate) resources: Vec<ParsedResource>,
    /// Drops and messages found by the parse (the same for every exporter).
    pub(crate) outcome: Decoded,
    /// Data points the request holds ([`count_data_points`]).
    pub data_points: u64,
    /// The request's protobuf size, bytes (what admission counts it for): the body given to
    /// [`parse_protobuf`], or the encoding [`parse`] reads a typed request from.
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

    /// Run keys whose points are of cumulative temporality (for [`CUMULATIVE_NOTICE`](super::CUMULATIVE_NOTICE)).
    pub fn cumulative_runs(&self) -> impl Iterator<Item = &str> {
        self.resources.iter().filter(|r| r.points.iter().any(|p| p.cumulative.is_some())).map(|r| r.run.key.as_str())
    }
}

/// Reads a request once into the point model (module docs: runs, ranks, run end, steps,
/// values, names). Only `settings.step_key` and `settings.identity` are used: they are the
/// pipeline's, while prefix, limits and the non-finite policy belong to each exporter's
/// [`super::Decoder`]. Never fails: unusable data points are counted in [`Parsed::dropped`].
///
/// The request is read in its protobuf form ([`parse_protobuf`], the one reading of both
/// routes); a receiver that has the body parses that directly.
pub fn parse(req: &ExportMetricsServiceRequest, settings: &DecodeSettings) -> Parsed {
    let body = Bytes::from(req.encode_to_vec());
    let bytes = body.len() as u64;
    parse_protobuf(body, settings).unwrap_or_else(|e| {
        // Only a request nested deeper than prost's recursion limit gets here (no receiver
        // passes one on): its data points are counted as dropped, not lost without a trace.
        let data_points = count_data_points(req);
        let mut outcome = Decoded::default();
        outcome.drop_quiet(DropReason::InvalidValue, data_points);
        outcome.messages.push((DropReason::InvalidValue, format!("the request cannot be read: {e}")));
        Parsed { resources: Vec::new(), outcome, data_points, bytes }
    })
}

/// [`parse`] of an `ExportMetricsServiceRequest` in its protobuf form, e.g. the body a receiver
/// took ([`Parsed::bytes`] is its size). Attribute keys borrow `body` while it is read (see
/// `decode/wire.rs`), so it is not copied.
///
/// Errors: `body` is not an `ExportMetricsServiceRequest` (exactly when opentelemetry-proto's
/// typed decoding fails on it).
pub fn parse_protobuf(body: Bytes, settings: &DecodeSettings) -> Result<Parsed, DecodeError> {
    let bytes = body.len() as u64;
    let req = wire::ExportMetricsServiceRequest::decode(body)?;
    let mut outcome = Decoded::default();
    let received_at = now_unix_nano();
    let mut data_points = 0;
    let mut resources = Vec::with_capacity(req.resource_metrics.len());
    for rm in &req.resource_metrics {
        let attrs = rm.resource.as_ref().map(|r| r.attributes.as_slice()).unwrap_or(&[]);
        let mut res = ParsedResource { run: run_info(attrs, &settings.identity), points: Vec::new(), ends: Vec::new() };
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                if m.name == RUN_END_METRIC {
                    run_ends(settings, m, received_at, &mut res.ends, &mut outcome);
                } else {
                    // Counted here, metric by metric, rather than in a second walk of the request.
                    data_points += valued_points(m);
                    parse_metric(settings, m, received_at, &mut res.points, &mut outcome);
                }
            }
        }
        resources.push(res);
    }
    Ok(Parsed { resources, outcome, data_points, bytes })
}

/// Splits attributes into step, name override, non-finite override, overflow and the rest.
fn split_attributes(settings: &DecodeSettings, attrs: Attributes<'_>) -> Result<Split, (DropReason, String)> {
    match attrs {
        Attributes::Typed(a) => split_pairs(settings, a.iter().map(|kv| (kv.key.as_str(), kv.value.as_ref()))),
        Attributes::Wire(a) => split_pairs(settings, a.iter().map(|kv| (kv.key(), kv.value.as_ref()))),
    }
}

/// A data point's attributes: a histogram's or a summary's (typed), a gauge's or a sum's
/// ([`wire`]).
#[derive(Clone, Copy)]
enum Attributes<'a> {
    Typed(&'a [KeyValue]),
    Wire(&'a [wire::KeyValue]),
}

/// [`split_attributes`] of (key, value) pairs.
fn split_pairs<'a>(settings: &DecodeSettings, attrs: impl Iterator<Item = (&'a str, Option<&'a AnyValue>)>) -> Result<Split, (DropReason, String)> {
    let mut split = Split { step: None, rank: None, rest: Vec::new(), nonfinite: None, overflow: false, name: None, time: None };
    for (key, value) in attrs {
        if key == settings.step_key {
            split.step = Some(parse_step(value).ok_or_else(|| {
                (DropReason::InvalidStep, format!("step attribute {:?} is not an integer", short(&any_value_text(value))))
            })?);
        } else if let Some(r) = (key == settings.identity.rank).then(|| parse_step(value)).flatten() {
            split.rank = Some(r);
        } else if key == NONFINITE_ATTRIBUTE {
            split.nonfinite = match any_value_text(value).as_str() {
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
        } else if key == OVERFLOW_ATTRIBUTE {
            split.overflow = true;
        } else if key == NAME_ATTRIBUTE {
            split.name = Some(any_value_text(value));
        } else if key == TIME_ATTRIBUTE {
            split.time = parse_step(value).and_then(|t| u64::try_from(t).ok());
        } else {
            split.rest.push((key.to_string(), any_value_text(value)));
        }
    }
    Ok(split)
}

/// Reads the data points of a [`RUN_END_METRIC`] (see the module docs' "Run end").
fn run_ends(settings: &DecodeSettings, m: &wire::Metric, received_at: u64, ends: &mut Vec<(Option<i64>, RunEnd)>, out: &mut Decoded) {
    let points = match &m.data {
        Some(wire::Data::Gauge(g)) => &g.data_points,
        Some(wire::Data::Sum(s)) => &s.data_points,
        _ => {
            out.end_errors.push(format!("{RUN_END_METRIC} must be a gauge or a sum; this one ends nothing"));
            return;
        }
    };
    for p in points {
        let find = |key: &str| p.attributes.iter().find(|kv| kv.key() == key);
        let rank = find(&settings.identity.rank).and_then(|kv| parse_step(kv.value.as_ref()));
        let status_text = find(RUN_END_STATUS_ATTRIBUTE).map(|kv| any_value_text(kv.value.as_ref()));
        let status = match &status_text {
            None => Some(EndStatus::Finished),
            Some(text) => EndStatus::parse(text),
        };
        let time = p.time_unix_nano;
        match status {
            Some(status) => ends.push((rank, RunEnd { status, time_unix_nano: if time == 0 { received_at } else { time } })),
            None if out.end_errors.is_empty() => out.end_errors.push(format!(
                "{RUN_END_METRIC} has {RUN_END_STATUS_ATTRIBUTE}={:?}, not FINISHED, FAILED or KILLED; it ends nothing",
                status_text.as_deref().map(short).unwrap_or_default()
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
    m: &wire::Metric,
    received_at: u64,
    points: &mut Vec<ParsedPoint>,
    out: &mut Decoded,
) {
    // Bounded once per metric: its name is shared by all its data points (see `names`).
    let metric_name: Arc<str> = Arc::from(bounded_name(&m.name));
    let gauge = matches!(m.data, Some(wire::Data::Gauge(_)));
    let mut last = LastName::default();
    points.reserve(match &m.data {
        Some(wire::Data::Gauge(g)) => g.data_points.len(),
        Some(wire::Data::Sum(s)) => s.data_points.len(),
        _ => 0,
    });
    let mut push = |attrs: Attributes<'_>, time: u64, flags: u32, value: PointValue, cumulative: Option<Cumulative>, out: &mut Decoded| {
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
        Some(wire::Data::Gauge(metric_data)) => numbers(m, &metric_data.data_points, None, &mut push, out),
        Some(wire::Data::Sum(metric_data)) => {
            let monotonic = (metric_data.aggregation_temporality == CUMULATIVE).then_some(metric_data.is_monotonic);
            numbers(m, &metric_data.data_points, monotonic, &mut push, out)
        }
        Some(wire::Data::Histogram(h)) => {
            let points = h.data_points.iter().filter(|dp| dp.flags & NO_RECORDED_VALUE == 0);
            let points = points.map(|dp| (dp.attributes.as_slice(), dp.time_unix_nano, dp.start_time_unix_nano, dp.flags, histogram(dp)));
            histograms(m, h.aggregation_temporality == CUMULATIVE, points, &mut push, out)
        }
        Some(wire::Data::ExponentialHistogram(h)) => {
            let points = h.data_points.iter().filter(|dp| dp.flags & NO_RECORDED_VALUE == 0);
            let points = points.map(|dp| (dp.attributes.as_slice(), dp.time_unix_nano, dp.start_time_unix_nano, dp.flags, exponential_histogram(dp)));
            histograms(m, h.aggregation_temporality == CUMULATIVE, points, &mut push, out)
        }
        Some(wire::Data::Summary(sm)) => {
            for dp in &sm.data_points {
                // Quantiles cannot be aggregated across windows; count and sum can.
                let v = Histogram { count: dp.count, sum: dp.sum, min: None, max: None, bounds: vec![], counts: vec![dp.count] };
                push(Attributes::Typed(&dp.attributes), dp.time_unix_nano, dp.flags, PointValue::Histogram(Box::new(v)), None, out);
            }
        }
        None => {}
    }
}

/// Pushes a metric's histograms (explicit or exponential, already converted): each data point's
/// attributes, time, start time, flags and histogram, or why it is not one.
fn histograms<'a>(
    m: &wire::Metric,
    cumulative: bool,
    points: impl Iterator<Item = (&'a [KeyValue], u64, u64, u32, Result<Histogram, String>)>,
    push: &mut impl FnMut(Attributes<'_>, u64, u32, PointValue, Option<Cumulative>, &mut Decoded),
    out: &mut Decoded,
) {
    for (attributes, time, start, flags, converted) in points {
        let cum = cumulative.then_some(Cumulative { start, monotonic: true });
        match converted {
            Ok(v) => push(Attributes::Typed(attributes), time, flags, PointValue::Histogram(Box::new(v)), cum, out),
            Err(msg) => out.drop(DropReason::InvalidHistogram, || format!("metric {:?}: {msg}", short(&m.name))),
        }
    }
}

fn numbers(
    m: &wire::Metric,
    points: &[wire::NumberDataPoint],
    cumulative_monotonic: Option<bool>,
    push: &mut impl FnMut(Attributes<'_>, u64, u32, PointValue, Option<Cumulative>, &mut Decoded),
    out: &mut Decoded,
) {
    for dp in points {
        let cum = cumulative_monotonic.map(|monotonic| Cumulative { start: dp.start_time_unix_nano, monotonic });
        match number(dp.value) {
            Some(v) => push(Attributes::Wire(&dp.attributes), dp.time_unix_nano, dp.flags, PointValue::Scalar(v), cum, out),
            // A point flagged "no recorded value" legitimately has none: skipped uncounted.
            None if dp.flags & NO_RECORDED_VALUE != 0 => {}
            None => out.drop(DropReason::InvalidValue, || format!("metric {:?}: data point without a value", short(&m.name))),
        }
    }
}
