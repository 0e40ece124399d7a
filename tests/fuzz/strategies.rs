//! Inputs: mutated seeds, and generated OTLP requests: every data point type, odd names, values, steps, times and
//! attribute sets, and the settings they are decoded under.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    exponential_histogram_data_point::Buckets, metric, number_data_point, summary_data_point::ValueAtQuantile,
    ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Histogram, HistogramDataPoint, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, Summary, SummaryDataPoint,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use proptest::prelude::*;
use prost::Message;
use trainmetrics::decode::{DecodeSettings, NonFinitePolicy};
use trainmetrics::cadence::{Aggregation, CadenceSettings};
use crate::harness::*;

/// Bytes: random, or a seed (protobuf when `json` is false) with a few mutations.
pub(crate) fn input_bytes(seeds: Arc<Vec<(Vec<u8>, Vec<u8>)>>, json: bool) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..512),
        4 => (0..n, prop::collection::vec(mutation(), 0..6)).prop_map(move |(i, ms)| {
            let seed = if json { &seeds[i].0 } else { &seeds[i].1 };
            mutate(seed.clone(), &ms)
        }),
        // Generated requests, whole (JSON cannot carry NaN/±Inf as numbers: those fail to
        // serialize and are sent as protobuf anyway, which the JSON decode then refuses).
        2 => request_strategy().prop_map(move |r| if json { serde_json::to_vec(&r).unwrap_or_else(|_| r.encode_to_vec()) } else { r.encode_to_vec() }),
    ]
}

pub(crate) fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("loss".to_string()),
        2 => "[a-z]{1,3}(\\.[a-z]{1,3}){0,2}".prop_map(|s| s),
        1 => Just(String::new()),
        2 => prop::collection::vec(any::<char>(), 0..12).prop_map(|v| v.into_iter().collect()),
        1 => prop::sample::select(vec!["acc@1", "a/../b", "./x", "//", "..", "é\u{301}", "x/split=val", "%2F", "\0"]).prop_map(str::to_string),
        1 => prop::sample::select(vec![10_000usize, 300, 251, 1025]).prop_map(|n| "λ".repeat(n / 2)),
    ]
}

pub(crate) fn any_value() -> impl Strategy<Value = any_value::Value> {
    use any_value::Value as V;
    prop_oneof![
        any::<i64>().prop_map(V::IntValue),
        special_f64().prop_map(V::DoubleValue),
        text().prop_map(V::StringValue),
        any::<bool>().prop_map(V::BoolValue),
        prop::collection::vec(any::<u8>(), 0..8).prop_map(V::BytesValue),
    ]
}

pub(crate) fn special_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => -1e6..1e6f64,
        2 => any::<f64>(),
        1 => prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY, f64::MAX, f64::MIN, -0.0, 1e30, f64::MIN_POSITIVE, 3.5e38]),
    ]
}

pub(crate) fn step() -> impl Strategy<Value = Option<any_value::Value>> {
    use any_value::Value as V;
    prop_oneof![
        6 => (0..50i64).prop_map(|s| Some(V::IntValue(s))),
        1 => Just(None),
        1 => any::<i64>().prop_map(|s| Some(V::IntValue(s))),
        1 => (-5..5i64).prop_map(|s| Some(V::IntValue(s))),
        1 => prop::sample::select(vec![1e30, -1e30, 7.0, 7.5, f64::NAN, 9.3e18, -9_223_372_036_854_775_808.0]).prop_map(|d| Some(V::DoubleValue(d))),
        1 => prop::sample::select(vec!["99999999999999999999", "-99999999999999999999", " 42 ", "7.0", "1e30", "abc", "", "-3"])
            .prop_map(|s| Some(V::StringValue(s.into()))),
        1 => any::<bool>().prop_map(|b| Some(V::BoolValue(b))),
    ]
}

pub(crate) fn kv(key: impl Into<String>, v: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}

pub(crate) fn attributes() -> impl Strategy<Value = Vec<KeyValue>> {
    use any_value::Value as V;
    let special = prop_oneof![
        Just(kv("trainmetrics.nonfinite", V::StringValue("NaN".into()))),
        Just(kv("trainmetrics.nonfinite", V::StringValue("-Infinity".into()))),
        Just(kv("trainmetrics.nonfinite", V::StringValue("bogus".into()))),
        text().prop_map(|n| kv("trainmetrics.name", V::StringValue(n))),
        prop::sample::select(vec![0i64, -1, i64::MAX, 1_700_000_000_000_000_000]).prop_map(|t| kv("trainmetrics.time_unix_nano", V::IntValue(t))),
        Just(kv("otel.metric.overflow", V::BoolValue(true))),
    ];
    let extra = prop::collection::vec((text(), any_value()).prop_map(|(k, v)| kv(k, v)), 0..3);
    let huge = prop_oneof![9 => Just(0usize), 1 => Just(500usize)];
    (step(), prop::option::weighted(0.15, special), extra, huge).prop_map(|(step, special, mut extra, huge)| {
        if let Some(s) = step {
            extra.push(kv("step", s));
        }
        extra.extend(special);
        extra.extend((0..huge).map(|i| kv(format!("k{i}"), V::IntValue(i as i64))));
        extra
    })
}

pub(crate) fn time() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0..1_000_000_000u64).prop_map(|d| 1_790_000_000_000_000_000 + d),
        1 => Just(0u64),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

pub(crate) fn flags() -> impl Strategy<Value = u32> {
    prop_oneof![9 => Just(0u32), 1 => Just(1u32)]
}

pub(crate) fn number_points() -> impl Strategy<Value = Vec<NumberDataPoint>> {
    let value = prop_oneof![
        4 => special_f64().prop_map(|d| Some(number_data_point::Value::AsDouble(d))),
        1 => any::<i64>().prop_map(|i| Some(number_data_point::Value::AsInt(i))),
        1 => Just(None),
    ];
    prop::collection::vec(
        (attributes(), time(), value, flags()).prop_map(|(attributes, time_unix_nano, value, flags)| NumberDataPoint {
            attributes,
            time_unix_nano,
            value,
            flags,
            ..Default::default()
        }),
        0..4,
    )
}

pub(crate) fn count() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0..10u64, 1 => Just(u64::MAX), 1 => any::<u64>()]
}

pub(crate) fn histogram_points() -> impl Strategy<Value = Vec<HistogramDataPoint>> {
    let dp = (
        attributes(),
        time(),
        flags(),
        prop::collection::vec(count(), 0..6),
        prop::collection::vec(special_f64(), 0..6),
        any::<bool>(),
        prop::option::of(special_f64()),
        prop::option::of(special_f64()),
    )
        .prop_map(|(attributes, time_unix_nano, flags, counts, mut bounds, consistent, sum, min)| {
            let mut count = counts.iter().fold(0u64, |a, c| a.wrapping_add(*c));
            if consistent {
                // Valid shape: bounds + 1 counts, strictly increasing, count = Σ counts.
                let n = counts.len().saturating_sub(1);
                bounds = (0..n).map(|i| i as f64 * 1.5).collect();
                if counts.iter().try_fold(0u64, |a, c| a.checked_add(*c)).is_none() {
                    count = 0;
                }
            }
            HistogramDataPoint {
                attributes,
                time_unix_nano,
                flags,
                count,
                sum,
                bucket_counts: counts,
                explicit_bounds: bounds,
                min,
                max: None,
                ..Default::default()
            }
        });
    prop::collection::vec(dp, 0..3)
}

pub(crate) fn exponential_points() -> impl Strategy<Value = Vec<ExponentialHistogramDataPoint>> {
    let scale = prop_oneof![4 => -10..=20i32, 1 => any::<i32>(), 1 => prop::sample::select(vec![i32::MIN, i32::MAX, 21, -11])];
    let offset = prop_oneof![4 => -50..50i32, 1 => any::<i32>(), 1 => prop::sample::select(vec![i32::MIN, i32::MAX])];
    let buckets = (offset, prop_oneof![9 => prop::collection::vec(0..4u64, 0..6), 1 => Just(vec![0u64; 20_000])])
        .prop_map(|(offset, bucket_counts)| Buckets { offset, bucket_counts });
    let dp = (attributes(), time(), flags(), scale, prop::option::of(buckets.clone()), prop::option::of(buckets), 0..3u64, special_f64(), any::<bool>())
        .prop_map(|(attributes, time_unix_nano, flags, scale, positive, negative, zero_count, zero_threshold, consistent)| {
            let sum_of = |b: &Option<Buckets>| b.as_ref().map_or(0u64, |b| b.bucket_counts.iter().sum());
            let count = if consistent { zero_count + sum_of(&positive) + sum_of(&negative) } else { zero_count };
            ExponentialHistogramDataPoint {
                attributes,
                time_unix_nano,
                flags,
                scale,
                positive,
                negative,
                zero_count,
                zero_threshold,
                count,
                sum: Some(1.0),
                ..Default::default()
            }
        });
    prop::collection::vec(dp, 0..3)
}

pub(crate) fn summary_points() -> impl Strategy<Value = Vec<SummaryDataPoint>> {
    let dp = (attributes(), time(), flags(), count(), special_f64(), prop::collection::vec((special_f64(), special_f64()), 0..3))
        .prop_map(|(attributes, time_unix_nano, flags, count, sum, q)| SummaryDataPoint {
            attributes,
            time_unix_nano,
            flags,
            count,
            sum,
            quantile_values: q.into_iter().map(|(quantile, value)| ValueAtQuantile { quantile, value }).collect(),
            ..Default::default()
        });
    prop::collection::vec(dp, 0..3)
}

pub(crate) fn metric_strategy() -> impl Strategy<Value = Metric> {
    let data = prop_oneof![
        3 => number_points().prop_map(|data_points| metric::Data::Gauge(Gauge { data_points })),
        1 => number_points().prop_map(|data_points| metric::Data::Sum(Sum { data_points, ..Default::default() })),
        1 => histogram_points().prop_map(|data_points| metric::Data::Histogram(Histogram { data_points, ..Default::default() })),
        1 => exponential_points().prop_map(|data_points| metric::Data::ExponentialHistogram(ExponentialHistogram { data_points, ..Default::default() })),
        1 => summary_points().prop_map(|data_points| metric::Data::Summary(Summary { data_points })),
    ];
    (text(), prop::option::weighted(0.95, data)).prop_map(|(name, data)| Metric { name, data, ..Default::default() })
}

pub(crate) fn request_strategy() -> impl Strategy<Value = ExportMetricsServiceRequest> {
    use any_value::Value as V;
    let run = prop_oneof![
        3 => prop::sample::select(vec!["a", "b"]).prop_map(|n| vec![kv("ml.run.name", V::StringValue(n.into()))]),
        1 => text().prop_map(|n| vec![kv("ml.run.id", V::StringValue(n)), kv("ml.param.lr", V::DoubleValue(0.1))]),
        1 => Just(vec![]),
        1 => Just((0..300).map(|i| kv(format!("attr.{i}"), V::StringValue("x".repeat(40)))).collect()),
        1 => prop::collection::vec((text(), any_value()), 0..4).prop_map(|ps| {
            let mut attrs = vec![kv("ml.run.name", V::StringValue("p".into()))];
            attrs.extend(ps.iter().map(|(k, v)| kv(format!("ml.param.{k}"), v.clone())));
            attrs.extend(ps.into_iter().map(|(k, v)| kv(&k, v)));
            attrs
        }),
    ];
    let resource = (run, prop::collection::vec(prop::collection::vec(metric_strategy(), 0..4), 1..3)).prop_map(|(attributes, scopes)| {
        ResourceMetrics {
            resource: Some(Resource { attributes, ..Default::default() }),
            scope_metrics: scopes.into_iter().map(|metrics| ScopeMetrics { metrics, ..Default::default() }).collect(),
            ..Default::default()
        }
    });
    prop::collection::vec(resource, 0..3).prop_map(|resource_metrics| ExportMetricsServiceRequest { resource_metrics })
}

pub(crate) fn settings_strategy() -> impl Strategy<Value = (DecodeSettings, CadenceSettings)> {
    (
        prop::sample::select(vec![NonFinitePolicy::Keep, NonFinitePolicy::Drop, NonFinitePolicy::Clamp]),
        prop::sample::select(vec![2usize, 10_000]),
        prop::sample::select(vec![1usize, 1_000]),
        prop::sample::select(vec![Some(1u64), Some(100), None]),
        prop::sample::select(vec![Aggregation::Last, Aggregation::Mean, Aggregation::Min, Aggregation::Max, Aggregation::Sum]),
    )
        .prop_map(|(nonfinite, max_series_per_run, max_runs, every_steps, aggregation)| {
            let decode = DecodeSettings { nonfinite, max_series_per_run, max_runs, ..Default::default() };
            let interval = every_steps.is_none().then(|| Duration::from_secs(30));
            (decode, CadenceSettings { every_steps, interval, aggregation, ..Default::default() })
        })
}
