//! Receiver: OTLP in, over gRPC (`MetricsService/Export`, [`grpc`]) and HTTP (`POST /v1/metrics`,
//! protobuf or JSON, [`http`]), handed to every exporter's [`Delivery`] (the same exporters,
//! cadence and delivery as the in-process library).
//!
//! Answers follow what the OpenTelemetry Collector's OTLP exporters retry (its `otlp.go`):
//! - accepted → OK / 200, with `partial_success` counting data points that cannot be used
//!   (invalid step, value, histogram; unsupported type) and the first reason;
//! - an exporter has no room ([`Delivery::room`]: its queue, or what it holds in windows and
//!   batches, is at its limit) → `UNAVAILABLE` with `RetryInfo` / 503 with `Retry-After`, so the
//!   collector retries from its own queue instead of losing data. This is decided before the
//!   request is handed to any exporter: an acknowledged request is never dropped for room;
//! - an undecodable payload → `INVALID_ARGUMENT` / 400 with a message (the collector drops it);
//! - a missing or wrong bearer token (when `auth` is configured) → `UNAUTHENTICATED` / 401 with
//!   `WWW-Authenticate: Bearer`; nothing reaches the exporters;
//! - over the `rate_limit` → `RESOURCE_EXHAUSTED` with `RetryInfo` / 429 with `Retry-After`
//!   (OTLP spec: `RESOURCE_EXHAUSTED` is retryable only with `RetryInfo`).
//!
//! Every answer is counted per protocol and [`Outcome`] ([`ReceiverStats`], shown by
//! [`crate::telemetry`]); rejections are logged once per cause and then at most every
//! [`security::LOG_EVERY`] ([`security::RejectionLog`]).

pub mod grpc;
pub mod http;
pub mod security;

use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsPartialSuccess, ExportMetricsServiceRequest};

use crate::batch::{parse, DecodeSettings, CUMULATIVE_NOTICE};
use crate::delivery::{Delivery, NoRoom};

/// How long a sender is asked to wait when an exporter has no room. Short: held points drain
/// within a reorder window, and a retry must come back within it to be written in order.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Runs whose newest step [`Fanout`] remembers (to tell older data, see [`Fanout::accept`]);
/// past it the memory is cleared and starts again.
const NEWEST_STEPS: usize = 10_000;

/// The exporters a received request goes to.
#[derive(Debug, Clone)]
pub struct Fanout {
    deliveries: Arc<Vec<Arc<Delivery>>>,
    decode: DecodeSettings,
    /// Serialises check-and-submit, so a request that passed the room check is never dropped
    /// by a queue that another request filled in between. Holds the newest step taken per run.
    gate: Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>,
    /// Runs whose decoder notices (e.g. cumulative temporality) were logged: once per run for
    /// the whole service, not once per exporter (at most [`NOTICED_RUNS`] remembered).
    noticed: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// Most runs [`Fanout`] remembers as noticed; runs past it get no notice (the log stays bounded).
const NOTICED_RUNS: usize = 100_000;

/// A request was not taken because an exporter has no room; the sender should retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("exporter {exporter} has no room: {reason}; retry after {RETRY_AFTER:?}")]
pub struct Busy {
    /// The exporter that refused.
    pub exporter: String,
    /// Which of its limits.
    pub reason: NoRoom,
}

impl Fanout {
    /// Fans out to `deliveries`; `decode` (step key, identity keys) is used to find the data
    /// points to report as rejected.
    pub fn new(deliveries: Vec<Arc<Delivery>>, decode: DecodeSettings) -> Self {
        Self { deliveries: Arc::new(deliveries), decode, gate: Arc::default(), noticed: Arc::default() }
    }

    /// Hands `req` to every exporter. Returns the partial success to answer with (`None` when
    /// every data point is usable), or [`Busy`] when an exporter has no room (nothing is handed
    /// over then, so the sender's retry does not duplicate data).
    ///
    /// A request whose points are all at or below the newest step already taken for their run
    /// is checked with [`Delivery::room`]'s doubled limits: it is data a collector's other
    /// consumer had in flight, and refusing it while newer data is taken would make it `late`.
    pub fn accept(&self, req: ExportMetricsServiceRequest) -> Result<Option<ExportMetricsPartialSuccess>, Busy> {
        // Parsed once here for the answer and for every exporter (each applies its own rules).
        let parsed = parse(&req, &self.decode);
        drop(req);
        let rejected: u64 = parsed.dropped().iter().map(|(_, n)| n).sum();
        if parsed.cumulative_runs().next().is_some() {
            let mut noticed = self.noticed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for run in parsed.cumulative_runs() {
                if noticed.len() < NOTICED_RUNS && !noticed.contains(run) {
                    noticed.insert(run.to_string());
                    tracing::warn!(run = %run, "{CUMULATIVE_NOTICE}");
                }
            }
        }
        let (points, bytes) = (parsed.data_points, parsed.bytes);
        // Per process: the ranks of a job each have their own steps.
        let newest = parsed.newest_steps();
        let parsed = Arc::new(parsed);
        {
            let mut seen = self.gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let older = !newest.is_empty() && newest.iter().all(|(k, step)| seen.get(k.as_str()).is_some_and(|m| step <= m));
            for d in self.deliveries.iter() {
                if let Err(reason) = d.room(points, bytes, older) {
                    return Err(Busy { exporter: d.name().to_string(), reason });
                }
            }
            for d in self.deliveries.iter() {
                // Only the workers empty the queues meanwhile, so none can have lost its room.
                let _ = d.submit_admitted(parsed.clone());
            }
            if seen.len() > NEWEST_STEPS {
                seen.clear();
            }
            for (k, step) in newest {
                let m = seen.entry(k).or_insert(step);
                *m = (*m).max(step);
            }
        }
        Ok((rejected > 0).then(|| ExportMetricsPartialSuccess {
            rejected_data_points: i64::try_from(rejected).unwrap_or(i64::MAX),
            error_message: parsed
                .messages()
                .iter()
                .map(|(reason, m)| format!("{reason}: {m}"))
                .collect::<Vec<_>>()
                .join("; "),
        }))
    }
}

/// An OTLP receiver protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP.
    Http,
}

impl Protocol {
    /// Both, in report order.
    pub const ALL: [Protocol; 2] = [Protocol::Grpc, Protocol::Http];

    /// `grpc` / `http` (the config key and the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Http => "http",
        }
    }
}

/// How a request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted, every data point usable.
    Ok,
    /// Accepted with a `partial_success` (some data points unusable).
    Partial,
    /// Refused: missing or wrong bearer token.
    Unauthenticated,
    /// Refused: over the rate limit.
    Throttled,
    /// Refused: undecodable, too large, or an unsupported encoding or content type.
    Invalid,
    /// Refused: an exporter had no room (the sender retries).
    Unavailable,
}

impl Outcome {
    /// Every outcome, in report order.
    pub const ALL: [Outcome; 6] =
        [Outcome::Ok, Outcome::Partial, Outcome::Unauthenticated, Outcome::Throttled, Outcome::Invalid, Outcome::Unavailable];

    /// The snake_case name (metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Partial => "partial",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Throttled => "throttled",
            Outcome::Invalid => "invalid",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// Requests answered, by protocol and outcome.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    counts: [[AtomicU64; Outcome::ALL.len()]; Protocol::ALL.len()],
}

impl ReceiverStats {
    /// Counts one request.
    pub fn count(&self, protocol: Protocol, outcome: Outcome) {
        self.counts[protocol as usize][outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests so far with `outcome` over `protocol`.
    pub fn get(&self, protocol: Protocol, outcome: Outcome) -> u64 {
        self.counts[protocol as usize][outcome as usize].load(Ordering::Relaxed)
    }
}

/// What every request of one protocol passes before its payload is read: the bearer token,
/// then the rate limit (a client without the token does not use up the others' quota).
#[derive(Debug, Clone)]
pub struct Guard {
    /// The protocol guarded.
    pub protocol: Protocol,
    /// Required token, if authentication is on.
    pub auth: Option<Arc<security::BearerToken>>,
    /// Rate limiter, if on.
    pub limiter: Option<Arc<security::Limiter>>,
    /// Counts of answers.
    pub stats: Arc<ReceiverStats>,
    /// The rate-limited warning log.
    pub log: Arc<security::RejectionLog>,
}

/// Why the [`Guard`] refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Missing or wrong token.
    #[error("{0}")]
    Unauthenticated(security::AuthError),
    /// Over the rate limit; retry after the delay.
    #[error("rate limit exceeded; retry after {0:?}")]
    Throttled(Duration),
}

impl Guard {
    /// A guard that admits every request (no token, no rate limit), with counters of its own:
    /// for receivers embedded without the service's security settings (tests, tools).
    pub fn open(protocol: Protocol) -> Guard {
        Guard { protocol, auth: None, limiter: None, stats: Default::default(), log: Default::default() }
    }

    /// Checks a request's `Authorization` header value and takes one request from the rate
    /// limit; a refusal is counted and logged (rate-limited).
    pub fn admit(&self, authorization: Option<&[u8]>) -> Result<(), Refused> {
        if let Some(token) = &self.auth {
            if let Err(e) = token.check(authorization) {
                self.reject(Outcome::Unauthenticated, &e);
                return Err(Refused::Unauthenticated(e));
            }
        }
        if let Some(l) = &self.limiter {
            if let Err(wait) = l.check() {
                let r = Refused::Throttled(wait);
                self.reject(Outcome::Throttled, &r);
                return Err(r);
            }
        }
        Ok(())
    }

    /// Counts an answer.
    pub fn count(&self, outcome: Outcome) {
        self.stats.count(self.protocol, outcome);
    }

    /// Counts a refusal and logs it (rate-limited). `detail` must not hold client secrets.
    pub fn reject(&self, outcome: Outcome, detail: &dyn std::fmt::Display) {
        self.count(outcome);
        let cause = match (self.protocol, outcome) {
            (Protocol::Grpc, Outcome::Unauthenticated) => "OTLP/gRPC unauthenticated",
            (Protocol::Grpc, Outcome::Throttled) => "OTLP/gRPC over the rate limit",
            (Protocol::Grpc, Outcome::Unavailable) => "OTLP/gRPC exporter has no room",
            (Protocol::Grpc, _) => "OTLP/gRPC invalid request",
            (Protocol::Http, Outcome::Unauthenticated) => "OTLP/HTTP unauthenticated",
            (Protocol::Http, Outcome::Throttled) => "OTLP/HTTP over the rate limit",
            (Protocol::Http, Outcome::Unavailable) => "OTLP/HTTP exporter has no room",
            (Protocol::Http, _) => "OTLP/HTTP invalid request",
        };
        self.log.reject(cause, detail);
    }
}

/// Seconds for a `Retry-After` header: `wait` rounded up, at least 1 (RFC 9110 §10.2.3 takes
/// whole seconds).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let s = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    s.max(1)
}
