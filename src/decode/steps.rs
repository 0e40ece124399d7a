//! Steps: the step attribute's accepted forms, and the step given to points without one
//! (module docs' "Steps"), per process.

use std::collections::HashMap;
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue};

use super::model::{Decoded, Pending, Point, PointValue};
use super::values::{per_collection, CUMULATIVE_NOTICE};

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
pub(crate) fn decimal_is_whole(s: &str) -> bool {
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

/// What one process's points have said about steps and cumulative totals so far.
#[derive(Debug, Default)]
pub(crate) struct StepState {
    pub(crate) max_step: Option<i64>,
    pub(crate) last_by_series: HashMap<Arc<str>, i64>,
    /// Per unstepped cumulative series: (start time, last cumulative value), to turn it into
    /// per-collection deltas (see the module docs' "Temporality").
    pub(crate) last_cumulative: HashMap<Arc<str>, (u64, PointValue)>,
    /// Whether cumulative temporality has been noticed for this run.
    pub(crate) cumulative_noticed: bool,
}

impl StepState {
    /// The final step of each of a process's `pending` points (module docs' "Steps"), and the
    /// per-collection value of its unstepped cumulative ones; the first cumulative point of the
    /// process adds a notice for `run_key` to `out`.
    pub(crate) fn assign(&mut self, run_key: &str, pending: Vec<Pending>, out: &mut Decoded) -> Vec<Point> {
        let state = self;
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
