//! `trainmetrics serve`: the OTLP receivers of [`crate::receiver`] in front of the configured
//! exporters, until a shutdown signal. Then: stop accepting, let each exporter close its windows
//! and deliver within `shutdown_timeout`, and report per exporter (anything not delivered is
//! counted `shutdown_timeout`).
//!
//! Runs are not ended on shutdown by default (`RunOutcome`-less): a service restart must continue
//! the same MLflow runs, which it finds again by their run key tag. Ending runs is the trainer's
//! (or issue 4's idle policy's) business.
//!
//! At startup it logs the effective configuration (exporters and where they write, with their
//! cadence, `reorder_window` and limits; each
//! receiver's endpoint with TLS, rate limit and authentication on or off, the telemetry
//! endpoint); never a secret (MLflow URIs are logged without credentials, tokens only by where
//! they come from). The self-telemetry listener ([`crate::telemetry`]) stays up until the
//! exporters have shut down, answering `/health` 503 meanwhile.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{ PipelineSettings, ProtocolSecurity};
use crate::delivery::Delivery;
use crate::exporter::RunOutcome;
use crate::receiver::security::{Limiter, RejectionLog};
use crate::receiver::{grpc, http, Admission, Fanout, Protocol, ReceiverStats};
use crate::stats::ExporterReport;
use crate::telemetry::Telemetry;

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The config enables no receiver.
    #[error("no receiver enabled (receivers.otlp.protocols needs grpc and/or http)")]
    NoReceiver,
    /// The config names no exporter.
    #[error("no exporter configured")]
    NoExporter,
    /// A listen address could not be bound.
    #[error("listening on {endpoint}: {source}")]
    Bind {
        /// The configured `host:port`.
        endpoint: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// An exporter's worker thread could not be started.
    #[error("starting exporter {name}: {source}")]
    Spawn {
        /// The exporter.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Where the service listens (the bound addresses, e.g. when port 0 was configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listening {
    /// OTLP/gRPC address, if enabled.
    pub grpc: Option<std::net::SocketAddr>,
    /// OTLP/HTTP address, if enabled.
    pub http: Option<std::net::SocketAddr>,
    /// Self-telemetry (`/metrics`, `/health`) address, if enabled.
    pub telemetry: Option<std::net::SocketAddr>,
}

/// What a finished service run reports.
#[derive(Debug, Clone)]
pub struct ServeReport {
    /// Per exporter.
    pub exporters: Vec<ExporterReport>,
    /// Time from the shutdown signal to the end.
    pub shutdown_took: Duration,
}

/// One line on what a receiver protocol runs with (no secrets).
fn describe(endpoint: &str, sec: &ProtocolSecurity, auth: &str) -> String {
    let tls = match &sec.tls {
        None => "tls off".to_string(),
        Some(t) if t.client_ca_pem.is_some() => format!("tls on (mutual, cert {})", t.cert_file.display()),
        Some(t) => format!("tls on (cert {})", t.cert_file.display()),
    };
    let rate = sec
        .rate_limit
        .map_or("rate limit off".to_string(), |r| format!("rate limit {}/s burst {}", r.requests_per_second, r.burst));
    format!("{endpoint}, {tls}, auth {auth}, {rate}")
}

/// Logs the effective configuration (see the module docs).
fn log_summary(settings: &PipelineSettings) {
    let auth = settings.security.auth.as_ref().map_or("off".to_string(), |t| format!("bearer token from {}", t.source));
    for (name, l, sec) in [("OTLP/gRPC", &settings.grpc, &settings.security.grpc), ("OTLP/HTTP", &settings.http, &settings.security.http)] {
        match l {
            Some((endpoint, max)) => {
                tracing::info!("receiver {name}: {}, max request {} MiB", describe(endpoint, sec, &auth), max >> 20)
            }
            None => tracing::info!("receiver {name}: off"),
        }
    }
    tracing::info!("telemetry: {}", settings.telemetry.as_deref().map_or("off".to_string(), |e| format!("{e} (/metrics, /health)")));
    for e in &settings.exporters {
        let c = &e.delivery.cadence;
        let target = crate::factory::describe(&e.backend);
        let d = &e.delivery;
        let every = c.every_steps.map_or("-".to_string(), |n| n.to_string());
        let interval = c.interval.map_or("-".to_string(), |i| humantime::format_duration(i).to_string());
        tracing::info!(
            "exporter {}: {target}; every_steps {every}, interval {interval}, aggregation {:?}, reorder_window {}, linger {}; holds at most {} data points and {} MiB (queue {} requests){}",
            e.name,
            c.aggregation,
            humantime::format_duration(c.reorder_window),
            humantime::format_duration(c.linger),
            d.max_pending_points,
            d.max_queued_bytes >> 20,
            d.queue_size,
            d.spool.as_ref().map_or(String::new(), |s| format!(", spool {} ({} MiB)", s.directory.display(), s.max_bytes >> 20)),
        );
    }
}

async fn bind(endpoint: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(endpoint).await.map_err(|source| ServeError::Bind { endpoint: endpoint.to_string(), source })
}

/// Runs the service until `shutdown` resolves. `on_listening` is told the bound addresses once
/// both listeners are up (the binary prints them; tests read the ports).
pub async fn run(
    settings: PipelineSettings,
    on_listening: impl FnOnce(&Listening),
    shutdown: impl Future<Output = ()>,
) -> Result<ServeReport, ServeError> {
    if settings.grpc.is_none() && settings.http.is_none() {
        return Err(ServeError::NoReceiver);
    }
    if settings.exporters.is_empty() {
        return Err(ServeError::NoExporter);
    }
    let mut deliveries: Vec<Arc<Delivery>> = Vec::new();
    for e in &settings.exporters {
        let (d, _) = crate::factory::start(e).map_err(|source| ServeError::Spawn { name: e.name.clone(), source })?;
        deliveries.push(d);
    }
    log_summary(&settings);
    let fanout = Fanout::new(deliveries.clone(), settings.decode.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let receiver_stats = Arc::new(ReceiverStats::default());
    let log = Arc::new(RejectionLog::default());
    let auth = settings.security.auth.clone().map(Arc::new);
    let admission = |protocol, sec: &ProtocolSecurity| Admission {
        protocol,
        auth: auth.clone(),
        limiter: sec.rate_limit.map(|r| Arc::new(Limiter::new(r))),
        stats: receiver_stats.clone(),
        log: log.clone(),
    };
    let mut listening = Listening { grpc: None, http: None, telemetry: None };
    let mut tasks = Vec::new();
    if let Some((endpoint, max)) = &settings.grpc {
        let l = bind(endpoint).await?;
        listening.grpc = l.local_addr().ok();
        let (f, s) = (fanout.clone(), stopped(stop_rx.clone()));
        let (max, g, tls) = (*max, admission(Protocol::Grpc, &settings.security.grpc), settings.security.grpc.tls.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = grpc::serve(l, f, max, tls.as_ref(), g, s).await {
                tracing::error!("OTLP/gRPC receiver stopped: {e}");
            }
        }));
    }
    if let Some((endpoint, max)) = &settings.http {
        let l = bind(endpoint).await?;
        listening.http = l.local_addr().ok();
        let (f, s) = (fanout.clone(), stopped(stop_rx.clone()));
        let (max, g) = (*max, admission(Protocol::Http, &settings.security.http));
        let tls = settings.security.http.tls.as_ref().map(|t| t.server_config.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = http::serve(l, f, max, tls, g, s).await {
                tracing::error!("OTLP/HTTP receiver stopped: {e}");
            }
        }));
    }
    let telemetry = Arc::new(Telemetry::new(deliveries.clone(), receiver_stats.clone()));
    let (telemetry_stop, telemetry_rx) = watch::channel(false);
    let mut telemetry_task = None;
    if let Some(endpoint) = &settings.telemetry {
        let l = bind(endpoint).await?;
        listening.telemetry = l.local_addr().ok();
        let (t, s) = (telemetry.clone(), stopped(telemetry_rx));
        telemetry_task = Some(tokio::spawn(async move {
            if let Err(e) = crate::telemetry::serve(l, t, s).await {
                tracing::error!("telemetry listener stopped: {e}");
            }
        }));
    }
    tracing::info!(grpc = ?listening.grpc, http = ?listening.http, telemetry = ?listening.telemetry, exporters = deliveries.len(), "trainmetrics serve: listening");
    on_listening(&listening);
    shutdown.await;
    let started = Instant::now();
    tracing::info!("shutting down: no longer accepting; delivering what was acknowledged");
    telemetry.begin_shutdown();
    let _ = stop_tx.send(true);
    // In-flight requests finish (their data is already queued); bounded so a stuck client
    // cannot hold shutdown.
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    log.flush();
    let left = settings.shutdown_timeout.saturating_sub(started.elapsed());
    let exporters = tokio::task::spawn_blocking(move || {
        std::thread::scope(|s| {
            let handles: Vec<_> = deliveries.iter().map(|d| s.spawn(move || d.shutdown(RunOutcome::Running, left))).collect();
            handles.into_iter().zip(&deliveries).map(|(h, d)| h.join().unwrap_or_else(|_| d.report())).collect::<Vec<_>>()
        })
    })
    .await
    .unwrap_or_default();
    let _ = telemetry_stop.send(true);
    if let Some(t) = telemetry_task {
        let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
    }
    Ok(ServeReport { exporters, shutdown_took: started.elapsed() })
}
