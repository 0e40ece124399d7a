//! Named regressions: inputs the targets are built around, replayed on every run.


use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::{
    exponential_histogram_data_point::Buckets, metric, number_data_point,
    ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics,
};
use prost::Message;
use trainmetrics::decode::DecodeSettings;
use crate::harness::*;
use crate::strategies::*;


/// A histogram whose packed `bucket_counts` declare 2^60 bytes that are not there: refused
/// without allocating for the declared length.
#[test]
fn regression_histogram_declaring_2_pow_60_bucket_bytes() {
    // HistogramDataPoint field 6 (bucket_counts, packed) with length 2^60 and 3 bytes present.
    let mut dp = vec![0x32u8];
    dp.extend([0x80u8, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10, 1, 2, 3]);
    // Histogram.data_points (1) ← Metric.histogram (9) ← ScopeMetrics.metrics (2) ←
    // ResourceMetrics.scope_metrics (2) ← ExportMetricsServiceRequest.resource_metrics (1).
    let wrap = |tag: u8, inner: Vec<u8>| {
        let mut v = vec![tag, inner.len() as u8];
        v.extend(inner);
        v
    };
    let bytes = wrap(0x0a, wrap(0x12, wrap(0x12, wrap(0x4a, wrap(0x0a, dp)))));
    let (res, peak) = peak_allocation(|| ExportMetricsServiceRequest::decode(bytes.as_slice()));
    assert!(res.is_err(), "{res:?}");
    assert!(peak <= allocation_bound(bytes.len()), "allocated {peak}");
}

/// Exponential histograms with extreme scales and offsets are refused (`invalid_histogram`) or
/// converted to finite, increasing bounds; never a panic or a huge allocation.
#[test]
fn regression_exponential_histogram_extremes() {
    for (scale, offset, n) in [(20, i32::MAX, 3usize), (20, i32::MIN, 3), (-10, i32::MAX, 2), (i32::MIN, 0, 1), (i32::MAX, 0, 1), (0, -1100, 2), (0, 1020, 8)] {
        let dp = ExponentialHistogramDataPoint {
            count: n as u64,
            scale,
            positive: Some(Buckets { offset, bucket_counts: vec![1; n] }),
            attributes: vec![kv("step", any_value::Value::IntValue(1))],
            time_unix_nano: 1,
            ..Default::default()
        };
        let req = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric {
                        name: "e".into(),
                        data: Some(metric::Data::ExponentialHistogram(ExponentialHistogram { data_points: vec![dp], ..Default::default() })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let outs = check_decoder(&req, DecodeSettings::default());
        for rp in &outs[0].runs {
            for p in &rp.points {
                if let trainmetrics::decode::PointValue::Histogram(h) = &p.value {
                    assert!(h.bounds.iter().all(|b| b.is_finite()) && h.bounds.windows(2).all(|w| w[0] < w[1]), "{scale} {offset}: {:?}", h.bounds);
                }
            }
        }
    }
}

/// One 64 KiB metric name shared by 10 000 data points (about 200 kB on the wire): each point's
/// series and metric name are bounded (1 KiB), so the decode allocates a bounded multiple of the
/// input instead of 10 000 copies of the name (1.3 GB before the bound).
#[test]
fn regression_long_metric_name_is_not_copied_per_data_point() {
    let name = "n".repeat(64 << 10);
    let points = (0..10_000)
        .map(|i| NumberDataPoint {
            attributes: vec![kv("step", any_value::Value::IntValue(i))],
            value: Some(number_data_point::Value::AsDouble(1.0)),
            ..Default::default()
        })
        .collect();
    let req = ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric { name, data: Some(metric::Data::Gauge(Gauge { data_points: points })), ..Default::default() }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let bytes = req.encode_to_vec();
    let (outs, peak) = peak_allocation(|| check_decoder(&req, DecodeSettings::default()));
    assert_eq!(outs[0].runs[0].points.len(), 10_000);
    assert!(peak <= allocation_bound(bytes.len()), "{} bytes in, {peak} allocated", bytes.len());
}
