//! `trainmetrics serve`: the OTLP receivers of [`crate::receiver`] in front of the configured
//! exporters, until a shutdown signal. Then: stop accepting, let each exporter close its windows
//! and deliver within `shutdown_timeout`, and report per exporter (anything not delivered is
//! counted `shutdown_timeout`).
//!
//! Runs are not ended on shutdown by default (`RunOutcome`-less): a service restart must continue
//! the same MLflow runs, which it finds again by their run key tag. Ending runs is the trainer's
//! (or issue 4's idle policy's) business.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::PipelineSettings;
use crate::delivery::Delivery;
use crate::exporter::RunOutcome;
use crate::receiver::{grpc, http, Fanout};
use crate::stats::ExporterReport;

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
}

/// What a finished service run reports.
#[derive(Debug, Clone)]
pub struct ServeReport {
    /// Per exporter.
    pub exporters: Vec<ExporterReport>,
    /// Time from the shutdown signal to the end.
    pub shutdown_took: Duration,
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
        let (d, _) = crate::exporter::start(e).map_err(|source| ServeError::Spawn { name: e.name.clone(), source })?;
        deliveries.push(d);
    }
    let fanout = Fanout::new(deliveries.clone(), settings.decode.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut listening = Listening { grpc: None, http: None };
    let mut tasks = Vec::new();
    if let Some((endpoint, max)) = &settings.grpc {
        let l = bind(endpoint).await?;
        listening.grpc = l.local_addr().ok();
        let (f, s) = (fanout.clone(), stopped(stop_rx.clone()));
        let max = *max;
        tasks.push(tokio::spawn(async move {
            if let Err(e) = grpc::serve(l, f, max, s).await {
                tracing::error!("OTLP/gRPC receiver stopped: {e}");
            }
        }));
    }
    if let Some((endpoint, max)) = &settings.http {
        let l = bind(endpoint).await?;
        listening.http = l.local_addr().ok();
        let (f, s) = (fanout.clone(), stopped(stop_rx.clone()));
        let max = *max;
        tasks.push(tokio::spawn(async move {
            if let Err(e) = http::serve(l, f, max, s).await {
                tracing::error!("OTLP/HTTP receiver stopped: {e}");
            }
        }));
    }
    tracing::info!(grpc = ?listening.grpc, http = ?listening.http, exporters = deliveries.len(), "trainmetrics serve: listening");
    on_listening(&listening);
    shutdown.await;
    let started = Instant::now();
    tracing::info!("shutting down: no longer accepting; delivering what was acknowledged");
    let _ = stop_tx.send(true);
    // In-flight requests finish (their data is already queued); bounded so a stuck client
    // cannot hold shutdown.
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let left = settings.shutdown_timeout.saturating_sub(started.elapsed());
    let exporters = tokio::task::spawn_blocking(move || {
        std::thread::scope(|s| {
            let handles: Vec<_> = deliveries.iter().map(|d| s.spawn(move || d.shutdown(RunOutcome::Running, left))).collect();
            handles.into_iter().zip(&deliveries).map(|(h, d)| h.join().unwrap_or_else(|_| d.report())).collect::<Vec<_>>()
        })
    })
    .await
    .unwrap_or_default();
    Ok(ServeReport { exporters, shutdown_took: started.elapsed() })
}
