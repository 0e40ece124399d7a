//! Request builder: MLflow JSON entities and the split of a run's metrics, params and tags into
//! `runs/log-batch` bodies within the server's limits (source: `mlflow/utils/validation.py`):
//! at most 1000 metrics, 100 params, 100 tags, and 1000 entities in all per request. Bodies are
//! also kept under [`MAX_BODY_BYTES`] (the server codes a 1 MB limit; proxies may be stricter).

use serde_json::{json, Value};

/// Metrics per request (MLflow `MAX_METRICS_PER_BATCH`).
pub const MAX_METRICS: usize = 1000;
/// Params per request (MLflow `MAX_PARAMS_TAGS_PER_BATCH`).
pub const MAX_PARAMS: usize = 100;
/// Tags per request (MLflow `MAX_PARAMS_TAGS_PER_BATCH`).
pub const MAX_TAGS: usize = 100;
/// Entities of all kinds per request (MLflow `MAX_ENTITIES_PER_BATCH`).
pub const MAX_ENTITIES: usize = 1000;
/// Largest body we build, in bytes: half the server's coded 1 MB.
pub const MAX_BODY_BYTES: usize = 500_000;
/// Longest param value the server keeps (MLflow `MAX_PARAM_VAL_LENGTH`), in code points.
pub const MAX_PARAM_VALUE_CHARS: usize = 6000;
/// Longest tag value the server keeps (MLflow `MAX_TAG_VAL_LENGTH`), in code points.
pub const MAX_TAG_VALUE_CHARS: usize = 8000;

/// A metric value as MLflow's protobuf JSON parser accepts it: finite numbers as numbers, and
/// NaN/±Inf as the strings `"NaN"`, `"Infinity"`, `"-Infinity"` (anything else is silently stored
/// as 0 at step 0 by the server).
pub fn metric_value(v: f64) -> Value {
    if v.is_nan() {
        Value::from("NaN")
    } else if v == f64::INFINITY {
        Value::from("Infinity")
    } else if v == f64::NEG_INFINITY {
        Value::from("-Infinity")
    } else {
        Value::from(v)
    }
}

/// One metric entity. `timestamp_ms` is ms since the Unix epoch (negative values become 0: the
/// server rejects them).
pub fn metric(key: &str, value: f64, timestamp_ms: i64, step: i64) -> Value {
    json!({"key": key, "value": metric_value(value), "timestamp": timestamp_ms.max(0), "step": step})
}

/// One param or tag entity.
pub fn key_value(key: &str, value: &str) -> Value {
    json!({"key": key, "value": value})
}

/// Cuts `s` to at most `max` code points; returns whether it was cut.
pub fn truncate_chars(s: &str, max: usize) -> (String, bool) {
    match s.char_indices().nth(max) {
        Some((i, _)) => (s[..i].to_string(), true),
        None => (s.to_string(), false),
    }
}

/// Splits entities into `log-batch` bodies (without `run_id`), each within every limit above.
/// Order is kept within each kind. Returns no body for no entities.
pub fn split_log_batch(metrics: Vec<Value>, params: Vec<Value>, tags: Vec<Value>) -> Vec<Value> {
    let mut bodies = Vec::new();
    let (mut m, mut p, mut t) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0usize;
    let flush = |m: &mut Vec<Value>, p: &mut Vec<Value>, t: &mut Vec<Value>, bodies: &mut Vec<Value>, bytes: &mut usize| {
        if !(m.is_empty() && p.is_empty() && t.is_empty()) {
            bodies.push(json!({"metrics": std::mem::take(m), "params": std::mem::take(p), "tags": std::mem::take(t)}));
        }
        *bytes = 0;
    };
    // Params and tags first, as MLflow's own client does, so each body fills up with metrics.
    let entities = params
        .into_iter()
        .map(|v| (1u8, v))
        .chain(tags.into_iter().map(|v| (2u8, v)))
        .chain(metrics.into_iter().map(|v| (0u8, v)));
    for (kind, v) in entities {
        let size = v.to_string().len() + 1;
        let full = m.len() + p.len() + t.len() >= MAX_ENTITIES
            || bytes + size > MAX_BODY_BYTES
            || (kind == 0 && m.len() >= MAX_METRICS)
            || (kind == 1 && p.len() >= MAX_PARAMS)
            || (kind == 2 && t.len() >= MAX_TAGS);
        if full {
            flush(&mut m, &mut p, &mut t, &mut bodies, &mut bytes);
        }
        bytes += size;
        match kind {
            0 => m.push(v),
            1 => p.push(v),
            _ => t.push(v),
        }
    }
    flush(&mut m, &mut p, &mut t, &mut bodies, &mut bytes);
    bodies
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(b: &Value) -> (usize, usize, usize) {
        let n = |k: &str| b.get(k).and_then(Value::as_array).map_or(0, Vec::len);
        (n("metrics"), n("params"), n("tags"))
    }

    #[test]
    fn non_finite_values_are_protobuf_json_strings() {
        assert_eq!(metric_value(f64::NAN), json!("NaN"));
        assert_eq!(metric_value(f64::INFINITY), json!("Infinity"));
        assert_eq!(metric_value(f64::NEG_INFINITY), json!("-Infinity"));
        assert_eq!(metric_value(1.5), json!(1.5));
        assert_eq!(metric("a", 1.0, -5, 3), json!({"key": "a", "value": 1.0, "timestamp": 0, "step": 3}));
    }

    #[test]
    fn splits_at_every_limit() {
        let ms = |n: usize| (0..n).map(|i| metric(&format!("m{i}"), 1.0, 1, 1)).collect::<Vec<_>>();
        let kvs = |n: usize, p: &str| (0..n).map(|i| key_value(&format!("{p}{i}"), "v")).collect::<Vec<_>>();

        let b = split_log_batch(ms(1000), vec![], vec![]);
        assert_eq!(b.iter().map(counts).collect::<Vec<_>>(), vec![(1000, 0, 0)]);
        let b = split_log_batch(ms(1001), vec![], vec![]);
        assert_eq!(b.iter().map(counts).collect::<Vec<_>>(), vec![(1000, 0, 0), (1, 0, 0)]);
        // Case 003: 1001 metrics and 150 params; the 1000-entity limit caps the second body.
        let b = split_log_batch(ms(1001), kvs(150, "p"), vec![]);
        assert_eq!(b.iter().map(counts).collect::<Vec<_>>(), vec![(0, 100, 0), (950, 50, 0), (51, 0, 0)]);
        let b = split_log_batch(vec![], vec![], kvs(250, "t"));
        assert_eq!(b.iter().map(counts).collect::<Vec<_>>(), vec![(0, 0, 100), (0, 0, 100), (0, 0, 50)]);
        assert!(split_log_batch(vec![], vec![], vec![]).is_empty());
        for body in split_log_batch(ms(5000), kvs(300, "p"), kvs(300, "t")) {
            let (m, p, t) = counts(&body);
            assert!(m <= MAX_METRICS && p <= MAX_PARAMS && t <= MAX_TAGS && m + p + t <= MAX_ENTITIES);
        }
    }

    #[test]
    fn splits_by_size() {
        let big = "x".repeat(5000);
        let tags: Vec<Value> = (0..100).map(|i| key_value(&format!("t{i}"), &big)).collect();
        let params: Vec<Value> = (0..100).map(|i| key_value(&format!("p{i}"), &big)).collect();
        let bodies = split_log_batch(vec![], params, tags);
        assert!(bodies.len() >= 2);
        for b in &bodies {
            assert!(b.to_string().len() <= MAX_BODY_BYTES + 200, "{}", b.to_string().len());
        }
        let total: usize = bodies.iter().map(|b| counts(b).1 + counts(b).2).sum();
        assert_eq!(total, 200);
    }

    #[test]
    fn truncation_counts_code_points() {
        assert_eq!(truncate_chars("héllo", 2), ("hé".to_string(), true));
        assert_eq!(truncate_chars("hé", 2), ("hé".to_string(), false));
    }
}
