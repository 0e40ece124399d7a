//! Data point values: numbers, explicit and exponential histograms (OTLP metrics data model),
//! and the per-collection value of an unstepped cumulative series (module docs' "Temporality").

use std::collections::HashMap;
use std::sync::Arc;

use opentelemetry_proto::tonic::metrics::v1::{number_data_point, HistogramDataPoint};

use super::model::{Histogram, PointValue};

/// What is logged once per run when its first cumulative data point arrives.
pub const CUMULATIVE_NOTICE: &str = "this run's producer sends cumulative temporality (the OTel SDKs' default): \
every collection re-sends every attribute set it ever recorded, so with a step attribute the SDK keeps one \
series per step in memory until its cardinality limit (2000 by default) folds new steps into otel.metric.overflow; \
trainmetrics replaces each (series, step) with its latest cumulative value and counts unchanged re-sends \
as duplicate. Set OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=delta in the trainer's environment \
(or a delta temporality selector on its exporter) to send each value once";

/// The per-collection value of an unstepped cumulative series (see the module docs'
/// "Temporality"): this total minus the previous one of the same start time; the total itself
/// after a restart of the producer (new start time) or a total that went down (a reset).
/// Histograms subtract count, sum and buckets; their min and max cannot be subtracted and
/// are left out.
pub(crate) fn per_collection(last: &mut HashMap<Arc<str>, (u64, PointValue)>, series: &Arc<str>, start: u64, value: PointValue) -> PointValue {
    let delta = match (last.get(series), &value) {
        (Some((s, PointValue::Scalar(prev))), PointValue::Scalar(v)) if *s == start && v >= prev => PointValue::Scalar(v - prev),
        (Some((s, PointValue::Histogram(prev))), PointValue::Histogram(h))
            if *s == start
                && prev.bounds == h.bounds
                && h.count >= prev.count
                && h.counts.iter().zip(&prev.counts).all(|(a, b)| a >= b) =>
        {
            PointValue::Histogram(Box::new(Histogram {
                count: h.count - prev.count,
                sum: h.sum - prev.sum,
                min: None,
                max: None,
                bounds: h.bounds.clone(),
                counts: h.counts.iter().zip(&prev.counts).map(|(a, b)| a - b).collect(),
            }))
        }
        _ => value.clone(),
    };
    last.insert(series.clone(), (start, value));
    delta
}

pub(crate) fn number(v: Option<number_data_point::Value>) -> Option<f64> {
    match v? {
        number_data_point::Value::AsDouble(d) => Some(d),
        number_data_point::Value::AsInt(i) => Some(i as f64),
    }
}

/// Most buckets an exponential histogram may expand to (bounds memory per point).
const MAX_EXPONENTIAL_BUCKETS: usize = 16_384;

pub(crate) fn exponential_histogram(
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

pub(crate) fn histogram(dp: &HistogramDataPoint) -> Result<Histogram, String> {
    let (bounds, counts) = if dp.bucket_counts.is_empty() && !dp.explicit_bounds.is_empty() {
        // OTLP: no bucket counts requires no bounds.
        return Err(format!("no bucket counts for {} bounds (OTLP requires none)", dp.explicit_bounds.len()));
    } else if dp.bucket_counts.is_empty() {
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
