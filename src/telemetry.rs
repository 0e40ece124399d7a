//! Self-telemetry of `trainmetrics serve`: one small HTTP listener (`service.telemetry.endpoint`,
//! default `127.0.0.1:14319`, beside the receivers' 14317/14318) with
//!
//! - `GET /metrics`: the Prometheus/OpenMetrics text exposition (`prometheus-client`), read at
//!   scrape time from each exporter's [`Delivery::report`] and the receivers'
//!   [`ReceiverStats`], so it always shows what the shutdown report would (no second set of
//!   counters):
//!   - `trainmetrics_exporter_points_received_total{exporter}`, `…_delivered_total{exporter}`,
//!     `…_dropped_total{exporter,reason}` (every [`DropReason`], zeros included),
//!     `trainmetrics_exporter_retried_total{exporter}` (export attempts retried),
//!     `trainmetrics_exporter_events_total{exporter,event}` (the report's named events that are
//!     not drops: `param_conflict`, `replayed_from_spool`, `nonfinite_clamped`, …);
//!   - gauges `trainmetrics_exporter_queue_points{exporter}` (data points pending: queued or
//!     held in windows and retries), `trainmetrics_exporter_spooled_points{exporter}` and
//!     `trainmetrics_exporter_spool_bytes{exporter}` (bytes);
//!   - `trainmetrics_receiver_requests_total{protocol,outcome}` ([`Protocol`], [`Outcome`]).
//!
//!   Counted in data points as in [`crate::stats`]: `received = delivered + dropped + pending`.
//! - `GET /health`: `200 {"status":"ok","exporters":{name:{"failing":bool,"last_error":…}}}`
//!   while serving, `503` with `"status":"shutting_down"` once shutdown began. An exporter is
//!   `failing` when it has an error and data points waiting (its last attempt did not clear
//!   them).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::delivery::Delivery;
use crate::receiver::{Outcome, Protocol, ReceiverStats};
use crate::stats::{DropReason, ExporterReport};

/// What the telemetry listener reads from: the exporters, the receivers' counts and whether
/// shutdown began.
#[derive(Debug)]
pub struct Telemetry {
    deliveries: Vec<Arc<Delivery>>,
    receivers: Arc<ReceiverStats>,
    shutting_down: AtomicBool,
}

/// `/health`'s view of one exporter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExporterHealth {
    /// It has an error and data points waiting.
    pub failing: bool,
    /// Its last error, if any (free of secrets, as in its report).
    pub last_error: Option<String>,
}

/// `/health`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    /// `ok` or `shutting_down`.
    pub status: &'static str,
    /// Per exporter name.
    pub exporters: std::collections::BTreeMap<String, ExporterHealth>,
}

impl Telemetry {
    /// Over `deliveries` and `receivers`.
    pub fn new(deliveries: Vec<Arc<Delivery>>, receivers: Arc<ReceiverStats>) -> Self {
        Self { deliveries, receivers, shutting_down: AtomicBool::new(false) }
    }

    /// Marks shutdown as begun: `/health` answers 503 from now on.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// The health state and the HTTP status it is answered with (200, or 503 once shutdown
    /// began).
    pub fn health(&self) -> (u16, Health) {
        let down = self.shutting_down.load(Ordering::Relaxed);
        let exporters = self
            .deliveries
            .iter()
            .map(|d| {
                let r = d.report();
                (r.name.clone(), ExporterHealth { failing: r.last_error.is_some() && r.pending > 0, last_error: r.last_error })
            })
            .collect();
        let health = Health { status: if down { "shutting_down" } else { "ok" }, exporters };
        (if down { 503 } else { 200 }, health)
    }

    /// The exposition text of `/metrics` (OpenMetrics text format 1.0, ending `# EOF`).
    ///
    /// Errors: formatting failed (only if a writer fails; a `String` does not).
    pub fn metrics_text(self: &Arc<Self>) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(self.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

/// The collector that reads everything at scrape time.
#[derive(Debug)]
struct Scrape(Arc<Telemetry>);

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&'static str, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&'static str, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(i64::try_from(*v).unwrap_or(i64::MAX)).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let reports: Vec<ExporterReport> = self.0.deliveries.iter().map(|d| d.report()).collect();
        let per = |f: &dyn Fn(&ExporterReport) -> u64| -> Vec<(Vec<(&'static str, String)>, u64)> {
            reports.iter().map(|r| (vec![("exporter", r.name.clone())], f(r))).collect()
        };
        counter(&mut encoder, "trainmetrics_exporter_points_received", "Data points handed to the exporter.", &per(&|r| r.received))?;
        counter(&mut encoder, "trainmetrics_exporter_points_delivered", "Data points delivered to the backend.", &per(&|r| r.delivered))?;
        let dropped: Vec<_> = reports
            .iter()
            .flat_map(|r| {
                DropReason::ALL.iter().map(move |reason| {
                    let n = r.dropped.get(reason.as_str()).copied().unwrap_or(0);
                    (vec![("exporter", r.name.clone()), ("reason", reason.as_str().to_string())], n)
                })
            })
            .collect();
        counter(&mut encoder, "trainmetrics_exporter_points_dropped", "Data points dropped, by reason.", &dropped)?;
        counter(&mut encoder, "trainmetrics_exporter_retried", "Export attempts that were retried.", &per(&|r| r.retried))?;
        // Named events that are not drops (param_conflict, replayed_from_spool, nonfinite_clamped…).
        let events: Vec<_> = reports
            .iter()
            .flat_map(|r| r.events.iter().map(move |(k, v)| (vec![("exporter", r.name.clone()), ("event", k.clone())], *v)))
            .collect();
        counter(&mut encoder, "trainmetrics_exporter_events", "Events that are not point drops, by name.", &events)?;
        gauge(&mut encoder, "trainmetrics_exporter_queue_points", "Data points pending (queued or held).", &per(&|r| r.pending))?;
        gauge(&mut encoder, "trainmetrics_exporter_spooled_points", "Data points in the on-disk spool.", &per(&|r| r.spooled))?;
        gauge(&mut encoder, "trainmetrics_exporter_spool_bytes", "Size of the on-disk spool, bytes.", &per(&|r| r.spool_bytes))?;
        let requests: Vec<_> = Protocol::ALL
            .iter()
            .flat_map(|p| {
                Outcome::ALL.iter().map(move |o| {
                    (vec![("protocol", p.as_str().to_string()), ("outcome", o.as_str().to_string())], self.0.receivers.get(*p, *o))
                })
            })
            .collect();
        counter(&mut encoder, "trainmetrics_receiver_requests", "OTLP requests answered, by protocol and outcome.", &requests)
    }
}

async fn metrics(State(t): State<Arc<Telemetry>>) -> Response {
    match t.metrics_text() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics").into_response(),
    }
}

async fn health(State(t): State<Arc<Telemetry>>) -> Response {
    let (status, h) = t.health();
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let body = serde_json::to_vec(&h).unwrap_or_else(|_| b"{}".to_vec());
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Serves `/metrics` and `/health` on `listener` until `shutdown` resolves.
///
/// Errors: accepting connections failed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    telemetry: Arc<Telemetry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(metrics)).route("/health", get(health)).with_state(telemetry);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
