//! The rate-limited warning log of rejections, shared by the receiver (refused requests) and
//! every exporter's delivery (dropped data points): a leaf, so neither depends on the other.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a rejection cause is logged at most (after its first occurrence).
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Logs rejections (refused requests, dropped data points) once per cause, then at most once per
/// [`LOG_EVERY`] with a count, so a flood of bad input never floods the log.
#[derive(Debug, Default)]
pub struct RejectionLog {
    causes: Mutex<std::collections::HashMap<&'static str, (Option<Instant>, u64)>>,
}

impl RejectionLog {
    /// Counts one rejection for `cause` (a fixed text such as `"OTLP/HTTP unauthenticated"`)
    /// and logs a warning with `detail` if it is the cause's first, or the first after
    /// [`LOG_EVERY`]. `detail` must not hold anything a client sent that could be a secret.
    pub fn reject(&self, cause: &'static str, detail: &dyn fmt::Display) {
        let Ok(mut causes) = self.causes.lock() else { return };
        let now = Instant::now();
        let entry = causes.entry(cause).or_insert((None, 0));
        entry.1 += 1;
        let due = entry.0.is_none_or(|last| now.duration_since(last) >= LOG_EVERY);
        if due {
            let n = entry.1;
            *entry = (Some(now), 0);
            drop(causes);
            tracing::warn!("{cause}: {n} time(s) since the last report on this cause; latest: {detail}");
        }
    }

    /// Logs every cause counted since its last report (at shutdown, so the counts of a flood
    /// are never lost to the rate limit) and returns them, sorted by cause.
    pub fn flush(&self) -> Vec<(&'static str, u64)> {
        let Ok(mut causes) = self.causes.lock() else { return Vec::new() };
        let mut pending: Vec<(&'static str, u64)> = causes.iter().filter(|(_, (_, n))| *n > 0).map(|(c, (_, n))| (*c, *n)).collect();
        pending.sort();
        for (cause, (_, n)) in causes.iter_mut() {
            if *n > 0 {
                tracing::warn!("{cause}: {n} more time(s) since the last report on this cause");
                *n = 0;
            }
        }
        pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_reports_what_the_rate_limit_held_back_once() {
        let log = RejectionLog::default();
        for _ in 0..5 {
            log.reject("OTLP/HTTP exporter has no room", &"busy");
        }
        log.reject("OTLP/gRPC invalid request", &"bad");
        // The first of each cause was logged at once; the other 4 were held back.
        assert_eq!(log.flush(), vec![("OTLP/HTTP exporter has no room", 4)]);
        assert_eq!(log.flush(), vec![]);
    }
}
