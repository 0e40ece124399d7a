//! The `trainmetrics` command:
//! - `serve [--config FILE] [--set key.path=value]…`: receive OTLP (from OpenTelemetry
//!   Collectors or SDKs) and deliver to the configured exporters until SIGTERM/SIGINT;
//! - `validate --config FILE [--set …]`: check a config, list every problem at once;
//! - `sync [--dir DIR] [--tracking-uri URI | --all] [--dry-run] [--timeout D]`: deliver what
//!   processes that have ended left in a spool ([`trainmetrics::sync`]); exits 1 if anything
//!   stays;
//! - `spool [--dir DIR]`: list what waits in a spool, per exporter directory, destination and run.
//!
//! Without `--config`, `serve` runs a default config: OTLP on 127.0.0.1:14317 (gRPC) and
//! 127.0.0.1:14318 (HTTP), self-telemetry on 127.0.0.1:14319, TensorBoard into `./runs` every
//! step, and MLflow at `MLFLOW_TRACKING_URI` when that is set, every 100 steps; both with
//! `reorder_window: 5s` (as `collector-config/trainmetrics.yaml`), so the batches of a
//! collector's parallel consumers and its retries are still written in step order.
//!
//! Neither command prints a secret: tokens and passwords are shown only by where they come
//! from, MLflow URIs without their credentials.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use trainmetrics::config::PipelineConfig;

#[derive(Parser)]
#[command(name = "trainmetrics", version, about = "OpenTelemetry pipeline for ML training metrics")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Receive OTLP and deliver to TensorBoard and MLflow until SIGTERM/SIGINT.
    Serve {
        /// YAML config file (default: the built-in config: TensorBoard into ./runs every step,
        /// MLflow at MLFLOW_TRACKING_URI if set every 100 steps, both with reorder_window 5s).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a key, e.g. --set exporters.tensorboard.logdir=/tmp/x (repeatable).
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        set: Vec<String>,
    },
    /// Check a config file; prints every problem and exits non-zero if there is one.
    Validate {
        /// YAML config file.
        #[arg(long)]
        config: PathBuf,
        /// Override a key, as for serve (repeatable).
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        set: Vec<String>,
    },
    /// Deliver what processes that have ended left in a spool (as `wandb sync` does for offline
    /// runs); exits 1 if anything stays in the spool.
    Sync {
        /// Spool root, or one exporter's spool directory (default: the library's default spool
        /// root: $TRAINMETRICS_SPOOL_DIR, else $XDG_STATE_HOME/trainmetrics/spool, else
        /// ~/.local/state/trainmetrics/spool).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Deliver what waits for this MLflow server (default: MLFLOW_TRACKING_URI). Credentials
        /// in it (user:password@) are used and never printed.
        #[arg(long, value_name = "URI", conflicts_with = "all")]
        tracking_uri: Option<String>,
        /// Deliver what waits for every destination found (MLflow servers and TensorBoard logdirs).
        #[arg(long)]
        all: bool,
        /// List what would be delivered; deliver nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long to deliver per destination before leaving the rest in the spool.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "60s")]
        timeout: std::time::Duration,
    },
    /// List what waits in a spool: per exporter directory and destination, per run: batches, points,
    /// bytes, oldest point time; segments held by live processes are listed as skipped.
    Spool {
        /// Spool root, or one exporter's spool directory (default: as for sync).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

fn spool_root(dir: Option<&Path>) -> PathBuf {
    dir.map_or_else(trainmetrics::config::default_spool_root, Path::to_path_buf)
}

fn spool(dir: Option<&Path>) -> anyhow::Result<bool> {
    print!("{}", trainmetrics::sync::list(&spool_root(dir), None)?);
    Ok(true)
}

fn sync(dir: Option<&Path>, tracking_uri: Option<&str>, all: bool, dry_run: bool, timeout: std::time::Duration) -> anyhow::Result<bool> {
    use trainmetrics::sync::Selection;
    let root = spool_root(dir);
    let env_uri = std::env::var("MLFLOW_TRACKING_URI").ok().filter(|v| !v.is_empty());
    let selection = match (tracking_uri, all) {
        (_, true) => Selection::All,
        (Some(u), false) => Selection::TrackingUri(u.to_string()),
        (None, false) => match env_uri {
            Some(u) => Selection::TrackingUri(u),
            None => {
                let found = trainmetrics::sync::list(&root, None)?;
                let destinations: Vec<&str> = found.destinations.iter().map(|t| t.destination.as_str()).collect();
                anyhow::bail!(
                    "say which destination to deliver to: --tracking-uri URI (or MLFLOW_TRACKING_URI) or --all; {} waits for: {}",
                    root.display(),
                    if destinations.is_empty() { "nothing".to_string() } else { destinations.join(", ") }
                );
            }
        },
    };
    if dry_run {
        let only = match &selection {
            Selection::TrackingUri(u) => Some(trainmetrics::sync::mlflow_destination(u)?),
            Selection::All => None,
        };
        print!("{}", trainmetrics::sync::list(&root, only.as_deref())?);
        return Ok(true);
    }
    let report = trainmetrics::sync::sync(&root, &selection, timeout)?;
    print!("{report}");
    Ok(!report.anything_left())
}

/// The config used when `serve` gets no file.
fn default_config_text() -> String {
    let mut text = String::from("exporters:\n  tensorboard:\n    logdir: runs\n    reorder_window: 5s\n");
    if std::env::var("MLFLOW_TRACKING_URI").is_ok_and(|v| !v.is_empty()) {
        text.push_str("  mlflow:\n    every_steps: 100\n    reorder_window: 5s\n");
    }
    text
}

fn load(config: Option<&Path>, set: &[String]) -> anyhow::Result<PipelineConfig> {
    match config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Ok(PipelineConfig::from_yaml_with_overrides(&text, path, set)?)
        }
        None => Ok(PipelineConfig::from_yaml_with_overrides(&default_config_text(), Path::new("<default config>"), set)?),
    }
}

fn validate(path: &Path, set: &[String]) -> anyhow::Result<()> {
    let settings = load(Some(path), set)?.validate()?;
    println!("{}: valid, {} exporter(s)", path.display(), settings.exporters.len());
    for e in &settings.exporters {
        let c = &e.delivery.cadence;
        let every = c.every_steps.map_or("-".to_string(), |n| n.to_string());
        let interval = c.interval.map_or("-".to_string(), |d| humantime::format_duration(d).to_string());
        println!("  {}: every_steps {every}, interval {interval}, aggregation {:?}", e.name, c.aggregation);
    }
    let auth = settings.security.auth.as_ref().map_or("off".to_string(), |t| format!("bearer token from {}", t.source));
    for (name, l, sec) in [("grpc", &settings.grpc, &settings.security.grpc), ("http", &settings.http, &settings.security.http)] {
        let tls = match &sec.tls {
            None => "off",
            Some(t) if t.client_ca_pem.is_some() => "on (mutual)",
            Some(_) => "on",
        };
        match l {
            Some((endpoint, _)) => println!("  receiver {name}: {endpoint} tls {tls} auth {auth}"),
            None => println!("  receiver {name}: off"),
        }
    }
    println!("  telemetry: {}", settings.telemetry.as_deref().unwrap_or("off"));
    Ok(())
}

/// Installs the SIGTERM/SIGINT handlers now and returns the future that resolves on the first
/// of them. Installing before the listeners are up matters: a supervisor (or a test) may send
/// SIGTERM the moment it reads "listening", and a signal that arrives before the handler exists
/// kills the process without the drain and the report.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                (term, int) => {
                    for e in [term.err(), int.err()].into_iter().flatten() {
                        tracing::warn!("cannot listen for a shutdown signal: {e}");
                    }
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn serve(config: Option<&Path>, set: &[String]) -> anyhow::Result<()> {
    let settings = load(config, set)?.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // The handlers register with the runtime's signal driver, so they need its context.
    let stop = {
        let _context = rt.enter();
        shutdown_signal()
    };
    let report = rt.block_on(trainmetrics::serve::run(
        settings,
        |l| {
            let show = |a: Option<std::net::SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
            println!("listening grpc={} http={} telemetry={}", show(l.grpc), show(l.http), show(l.telemetry));
        },
        stop,
    ))?;
    println!("shut down in {:.2}s", report.shutdown_took.as_secs_f64());
    for e in &report.exporters {
        println!("  {e}");
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs piped to a file or a collector stay plain.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Serve { config, set } => serve(config.as_deref(), set).map(|()| true),
        Command::Validate { config, set } => validate(config, set).map(|()| true),
        Command::Sync { dir, tracking_uri, all, dry_run, timeout } => sync(dir.as_deref(), tracking_uri.as_deref(), *all, *dry_run, *timeout),
        Command::Spool { dir } => spool(dir.as_deref()),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        // The command ran and said what is wrong (e.g. batches stay in the spool).
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
