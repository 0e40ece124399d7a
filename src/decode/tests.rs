//! Tests of the decoding: every rule of the module docs, read back from decoded points.

use super::*;
use super::steps::{decimal_is_whole, parse_step};
use crate::stats::DropReason;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, HistogramDataPoint};
use super::request::{now_unix_nano, CUMULATIVE};
use super::values::*;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
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
    assert_eq!(histogram(&dp(vec![], vec![1.0, 2.0], 5)), Err("no bucket counts for 2 bounds (OTLP requires none)".to_string()));
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
    assert_eq!(d.runs.states["r1"].series.len(), 3);
    assert!(d.runs.states["r1"].steps.last_by_series.len() <= 3);
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
    assert_eq!((d.runs.infos.len(), d.runs.states.len()), (2, 2));
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
    let mut kept: Vec<&String> = d.runs.states.keys().collect();
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
