//! Receiver: OTLP in, over gRPC (`MetricsService/Export`, [`grpc`]) and HTTP (`POST /v1/metrics`,
//! protobuf or JSON, [`http`]), handed to every exporter's [`Delivery`] (the same exporters,
//! cadence and delivery as the in-process library).
//!
//! Answers follow what the OpenTelemetry Collector's OTLP exporters retry (its `otlp.go`):
//! - accepted → OK / 200, with `partial_success` counting data points that cannot be used
//!   (invalid step, value, histogram; unsupported type) and the first reason;
//! - an exporter's queue is full → `UNAVAILABLE` with `RetryInfo` / 503 with `Retry-After`, so the
//!   collector retries from its own queue instead of losing data;
//! - an undecodable payload → `INVALID_ARGUMENT` / 400 with a message (the collector drops it).

pub mod grpc;
pub mod http;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsPartialSuccess, ExportMetricsServiceRequest};

use crate::batch::{DecodeSettings, Decoder};
use crate::delivery::Delivery;

/// How long a sender is asked to wait when a queue is full.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The exporters a received request goes to.
#[derive(Debug, Clone)]
pub struct Fanout {
    deliveries: Arc<Vec<Arc<Delivery>>>,
    decode: DecodeSettings,
    /// Serialises check-and-submit, so a request that passed the "not full" check is never
    /// dropped by a queue that another request filled in between.
    gate: Arc<std::sync::Mutex<()>>,
}

/// A request was not taken because an exporter's queue is full; the sender should retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an exporter's queue is full; retry after {RETRY_AFTER:?}")]
pub struct Busy;

impl Fanout {
    /// Fans out to `deliveries`; `decode` (step key, identity keys) is used to find the data
    /// points to report as rejected.
    pub fn new(deliveries: Vec<Arc<Delivery>>, decode: DecodeSettings) -> Self {
        Self { deliveries: Arc::new(deliveries), decode, gate: Arc::default() }
    }

    /// Hands `req` to every exporter. Returns the partial success to answer with (`None` when
    /// every data point is usable), or [`Busy`] when a queue is full (nothing is handed over
    /// then, so the sender's retry does not duplicate data).
    pub fn accept(&self, req: ExportMetricsServiceRequest) -> Result<Option<ExportMetricsPartialSuccess>, Busy> {
        // The exporters decode again (with their own state); this pass only counts for the answer.
        let decoded = Decoder::new(self.decode.clone()).decode(&req);
        let rejected: u64 = decoded.dropped.iter().map(|(_, n)| n).sum();
        let req = Arc::new(req);
        {
            let _gate = self.gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if self.deliveries.iter().any(|d| d.is_full()) {
                return Err(Busy);
            }
            for d in self.deliveries.iter() {
                // Only the workers empty the queues meanwhile, so this cannot find one full.
                let _ = d.submit(req.clone());
            }
        }
        Ok((rejected > 0).then(|| ExportMetricsPartialSuccess {
            rejected_data_points: i64::try_from(rejected).unwrap_or(i64::MAX),
            error_message: decoded
                .messages
                .iter()
                .map(|(reason, m)| format!("{reason}: {m}"))
                .collect::<Vec<_>>()
                .join("; "),
        }))
    }
}
