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
//! Each protocol's handler ends in one value, `Result<`[`Accepted`]`, `[`Refusal`]`>`: the
//! protocol turns it into its answer (an axum `IntoResponse`, a tonic `Status`), and
//! [`Admission::record`] counts it per protocol and [`Outcome`] ([`ReceiverStats`], shown by
//! [`crate::telemetry`]); refusals are logged once per cause and then at most every
//! [`security::LOG_EVERY`] ([`security::RejectionLog`]).

pub mod grpc;
pub mod http;
pub mod security;

use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsPartialSuccess, ExportMetricsServiceRequest};

use prost::bytes::Bytes;

use crate::decode::{parse, parse_protobuf, DecodeSettings, Parsed, CUMULATIVE_NOTICE};
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
    pub fn accept(&self, req: ExportMetricsServiceRequest) -> Result<Accepted, Busy> {
        // Parsed once here for the answer and for every exporter (each applies its own rules).
        let parsed = parse(&req, &self.decode);
        drop(req);
        self.admit(parsed)
    }

    /// [`Fanout::accept`] of a request in its protobuf form, the body of an OTLP/HTTP or
    /// OTLP/gRPC export: read once ([`parse_protobuf`]), without the typed request.
    ///
    /// Errors: [`Refusal::Malformed`] when `body` is not an `ExportMetricsServiceRequest`,
    /// [`Refusal::Busy`] as [`Fanout::accept`].
    pub fn accept_protobuf(&self, body: Bytes) -> Result<Accepted, Refusal> {
        let parsed = parse_protobuf(body, &self.decode).map_err(Refusal::undecodable)?;
        Ok(self.admit(parsed)?)
    }

    /// Hands a parsed request to every exporter, or to none (see [`Fanout::accept`]).
    fn admit(&self, parsed: Parsed) -> Result<Accepted, Busy> {
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
        let mut accepted = Accepted::default();
        if rejected > 0 {
            let messages = parsed.messages().iter().map(|(reason, m)| format!("{reason}: {m}")).collect::<Vec<_>>();
            accepted.add_rejected(rejected, messages.join("; "));
        }
        Ok(accepted)
    }
}

/// A request taken by every exporter: the answer's `partial_success` (`None` when every data
/// point is usable).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Accepted {
    /// Data points that cannot be used, and why (OTLP `ExportMetricsPartialSuccess`).
    pub partial_success: Option<ExportMetricsPartialSuccess>,
}

impl Accepted {
    /// Adds `points` rejected data points; `message` goes first in the error message.
    pub fn add_rejected(&mut self, points: u64, message: String) {
        let p = self.partial_success.get_or_insert_with(Default::default);
        p.rejected_data_points = p.rejected_data_points.saturating_add(i64::try_from(points).unwrap_or(i64::MAX));
        p.error_message = if p.error_message.is_empty() { message } else { format!("{message}; {}", p.error_message) };
    }

    /// [`Outcome::Partial`] with a partial success, else [`Outcome::Ok`].
    pub fn outcome(&self) -> Outcome {
        if self.partial_success.is_some() {
            Outcome::Partial
        } else {
            Outcome::Ok
        }
    }
}

/// Why a request was refused. Each protocol maps a variant to its answer: HTTP status in
/// [`http`], gRPC status in [`grpc`] (OTLP spec, "Failures" of OTLP/gRPC and OTLP/HTTP).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Missing or wrong bearer token (401 / `UNAUTHENTICATED`).
    #[error("{0}")]
    Unauthenticated(security::AuthError),
    /// Over the rate limit; retry after the delay (429 / `RESOURCE_EXHAUSTED` with `RetryInfo`).
    #[error("rate limit exceeded; retry after {0:?}")]
    Throttled(Duration),
    /// Not an `ExportMetricsServiceRequest`, or a body that cannot be read or decompressed
    /// (400 / `INVALID_ARGUMENT`); the message says why.
    #[error("{0}")]
    Malformed(String),
    /// Larger than the configured limit, as sent or decompressed (413 / `RESOURCE_EXHAUSTED`).
    #[error("{0}")]
    TooLarge(String),
    /// An encoding or content type not served (415 / `UNIMPLEMENTED`).
    #[error("{0}")]
    Unsupported(String),
    /// An exporter has no room (503 / `UNAVAILABLE`, both with a retry delay of [`RETRY_AFTER`]).
    #[error(transparent)]
    Busy(#[from] Busy),
}

impl Refusal {
    /// [`Refusal::Malformed`] for a body that is not an `ExportMetricsServiceRequest` (protobuf
    /// or JSON), with the decoder's reason.
    pub fn undecodable(reason: impl std::fmt::Display) -> Self {
        Refusal::Malformed(format!("cannot decode ExportMetricsServiceRequest: {reason}"))
    }

    /// The outcome it is counted as.
    pub fn outcome(&self) -> Outcome {
        match self {
            Refusal::Unauthenticated(_) => Outcome::Unauthenticated,
            Refusal::Throttled(_) => Outcome::Throttled,
            Refusal::Malformed(_) | Refusal::TooLarge(_) | Refusal::Unsupported(_) => Outcome::Invalid,
            Refusal::Busy(_) => Outcome::Unavailable,
        }
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

/// The admission of one protocol's requests before their payload is read (the bearer token,
/// then the rate limit: a client without the token does not use up the others' quota), and the
/// record of every answer.
#[derive(Debug, Clone)]
pub struct Admission {
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

impl Admission {
    /// A guard that admits every request (no token, no rate limit), with counters of its own:
    /// for receivers embedded without the service's security settings (tests, tools).
    pub fn open(protocol: Protocol) -> Admission {
        Admission { protocol, auth: None, limiter: None, stats: Default::default(), log: Default::default() }
    }

    /// Checks a request's `Authorization` header value and takes one request from the rate
    /// limit; a refusal is recorded ([`Admission::record`]).
    pub fn admit(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        let checked = self.check(authorization);
        if let Err(refusal) = &checked {
            self.refused(refusal);
        }
        checked
    }

    fn check(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        if let Some(token) = &self.auth {
            token.check(authorization).map_err(Refusal::Unauthenticated)?;
        }
        if let Some(l) = &self.limiter {
            l.check().map_err(Refusal::Throttled)?;
        }
        Ok(())
    }

    /// Counts the answer to a request that passed [`Admission::admit`]; a refusal is also
    /// logged (rate-limited).
    pub fn record(&self, answer: &Result<Accepted, Refusal>) {
        match answer {
            Ok(accepted) => self.stats.count(self.protocol, accepted.outcome()),
            Err(refusal) => self.refused(refusal),
        }
    }

    /// Counts a refusal and logs it (rate-limited). Refusal messages never hold client secrets.
    fn refused(&self, refusal: &Refusal) {
        let outcome = refusal.outcome();
        self.stats.count(self.protocol, outcome);
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
        self.log.reject(cause, refusal);
    }
}

/// Seconds for a `Retry-After` header: `wait` rounded up, at least 1 (RFC 9110 §10.2.3 takes
/// whole seconds).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let s = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;
    use tonic::Code;

    /// Each refusal's outcome, HTTP answer and gRPC answer, as the module documents them.
    #[test]
    fn every_refusal_has_its_outcome_and_answers() {
        let busy = Busy { exporter: "mlflow".into(), reason: NoRoom::Points };
        let table = [
            (Refusal::Unauthenticated(security::AuthError::Missing), Outcome::Unauthenticated, 401, Code::Unauthenticated, None),
            (Refusal::Throttled(Duration::from_millis(1500)), Outcome::Throttled, 429, Code::ResourceExhausted, Some("2")),
            (Refusal::Malformed("cannot decode".into()), Outcome::Invalid, 400, Code::InvalidArgument, None),
            (Refusal::TooLarge("too big".into()), Outcome::Invalid, 413, Code::ResourceExhausted, None),
            (Refusal::Unsupported("br".into()), Outcome::Invalid, 415, Code::Unimplemented, None),
            (Refusal::Busy(busy), Outcome::Unavailable, 503, Code::Unavailable, Some("1")),
        ];
        for (refusal, outcome, http_status, grpc_code, retry_after) in table {
            assert_eq!(refusal.outcome(), outcome, "{refusal:?}");
            let resp = refusal.clone().into_response();
            assert_eq!(resp.status().as_u16(), http_status, "{refusal:?}");
            let header = resp.headers().get("retry-after").map(|v| v.to_str().unwrap_or("?"));
            assert_eq!(header, retry_after, "{refusal:?}");
            let status = tonic::Status::from(refusal.clone());
            assert_eq!(status.code(), grpc_code, "{refusal:?}");
            // RetryInfo exactly where the sender should retry (OTLP spec).
            use tonic_types::StatusExt;
            let retry = status.get_details_retry_info().and_then(|r| r.retry_delay);
            assert_eq!(retry.is_some(), retry_after.is_some(), "{refusal:?}");
            assert_eq!(status.message(), refusal.to_string());
        }
    }

    #[test]
    fn accepted_rejections_add_up_and_the_newest_message_goes_first() {
        let mut accepted = Accepted::default();
        assert_eq!(accepted.outcome(), Outcome::Ok);
        accepted.add_rejected(2, "invalid step: -1".into());
        accepted.add_rejected(3, "3 data point(s) of the OTLP/JSON body could not be read".into());
        assert_eq!(accepted.outcome(), Outcome::Partial);
        let p = accepted.partial_success.expect("a partial success");
        assert_eq!(p.rejected_data_points, 5);
        assert_eq!(p.error_message, "3 data point(s) of the OTLP/JSON body could not be read; invalid step: -1");
    }

    #[test]
    fn an_admission_counts_its_refusals_and_answers() {
        let admission = Admission::open(Protocol::Grpc);
        admission.record(&Ok(Accepted::default()));
        admission.record(&Err(Refusal::Malformed("x".into())));
        admission.record(&Err(Refusal::TooLarge("y".into())));
        let counts: Vec<u64> = Outcome::ALL.iter().map(|o| admission.stats.get(Protocol::Grpc, *o)).collect();
        assert_eq!(counts, [1, 0, 0, 0, 2, 0]);
        assert_eq!(admission.stats.get(Protocol::Http, Outcome::Invalid), 0);
    }
}
