//! Retry policy: jittered exponential backoff, the shape of the Collector's `retry_on_failure`
//! (`configretry.BackOffConfig`: initial interval, multiplier 1.5, randomization ±50 %, maximum
//! interval, maximum elapsed time), honouring a backend's `Retry-After`.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::problems::Problems;

/// Validated `retry_on_failure` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySettings {
    /// When false, a retryable failure drops the batch at once (`retry_exhausted`).
    pub enabled: bool,
    /// First delay (before jitter). Default 1 s.
    pub initial_interval: Duration,
    /// Largest delay computed by backoff (before jitter). Default 30 s.
    pub max_interval: Duration,
    /// How long one batch may keep failing before it is dropped. Default 300 s.
    pub max_elapsed_time: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            initial_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(30),
            max_elapsed_time: Duration::from_secs(300),
        }
    }
}

/// `retry_on_failure` (defaults in [`RetrySettings`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Default true.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Default 1s.
    #[serde(default, with = "humantime_serde")]
    pub initial_interval: Option<Duration>,
    /// Default 30s.
    #[serde(default, with = "humantime_serde")]
    pub max_interval: Option<Duration>,
    /// Default 300s.
    #[serde(default, with = "humantime_serde")]
    pub max_elapsed_time: Option<Duration>,
}

impl RetryConfig {
    /// Validates (at config path `path`, e.g. `exporters.mlflow.retry_on_failure`) into
    /// settings, defaults filled in; problems go to `p`.
    pub fn settings(&self, path: &str, p: &mut Problems) -> RetrySettings {
        for (key, d) in [
            ("initial_interval", self.initial_interval),
            ("max_interval", self.max_interval),
            ("max_elapsed_time", self.max_elapsed_time),
        ] {
            p.positive(path, key, d);
        }
        if let (Some(a), Some(b)) = (self.initial_interval, self.max_interval) {
            if a > b {
                p.add(
                    format!("{path}.initial_interval"),
                    "must not exceed max_interval",
                );
            }
        }
        let d = RetrySettings::default();
        RetrySettings {
            enabled: self.enabled.unwrap_or(d.enabled),
            initial_interval: self.initial_interval.unwrap_or(d.initial_interval),
            max_interval: self.max_interval.unwrap_or(d.max_interval),
            max_elapsed_time: self.max_elapsed_time.unwrap_or(d.max_elapsed_time),
        }
    }
}

const MULTIPLIER: f64 = 1.5;
const RANDOMIZATION: f64 = 0.5;

impl RetrySettings {
    /// Delay before retry number `attempt` (1-based), at least `retry_after` when the backend sent
    /// one: `min(initial · 1.5^(attempt-1), max_interval)` scaled by a uniform factor in
    /// [0.5, 1.5], so that many clients recovering together do not retry in lockstep.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = MULTIPLIER.powi(attempt.saturating_sub(1).min(64) as i32);
        let base = (self.initial_interval.as_secs_f64() * exp).min(self.max_interval.as_secs_f64());
        let factor = rand::rng().random_range((1.0 - RANDOMIZATION)..=(1.0 + RANDOMIZATION));
        let backoff = Duration::from_secs_f64((base * factor).max(0.0));
        // A server may ask for any delay; honour it up to max_elapsed_time, after which the
        // batch is given up anyway.
        match retry_after {
            Some(ra) => backoff.max(ra.min(self.max_elapsed_time)),
            None => backoff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_capped_and_honour_retry_after() {
        let s = RetrySettings::default();
        for _ in 0..50 {
            let d1 = s.delay(1, None).as_secs_f64();
            assert!((0.5..=1.5).contains(&d1), "{d1}");
            let d3 = s.delay(3, None).as_secs_f64();
            assert!((0.5 * 2.25..=1.5 * 2.25).contains(&d3), "{d3}");
            let d_big = s.delay(40, None).as_secs_f64();
            assert!((15.0..=45.0).contains(&d_big), "{d_big}");
            assert!(s.delay(1, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
            assert_eq!(s.delay(1, Some(Duration::MAX)), s.max_elapsed_time);
        }
    }
}
