//! The in-process route: an `SdkMeterProvider` with one `PeriodicReader` per configured
//! exporter (its own interval, delta temporality), each reader feeding an adapter that converts
//! the SDK's `ResourceMetrics` to OTLP (opentelemetry-proto's `From` impl) and hands it to that
//! exporter's [`Delivery`] without blocking. Plus [`StepRecorder`], which records scalars at a
//! step through OTel gauges, and [`Pipeline`], which owns it all and reports on shutdown.
//!
//! Why delta: the step travels as an attribute, so every step is its own attribute set; with
//! cumulative temporality the SDK would keep and re-export every step ever recorded. With delta
//! only the steps recorded since the last collection are exported, and the SDK's cardinality
//! limit (set for every instrument by a view to `cardinality_limit`, default 20 000) bounds
//! the attribute sets of one collection. [`StepRecorder`] keeps under it by collecting early:
//! after `cardinality_limit / 4` recorded points it wakes the early-collection thread (the trainer does
//! not wait); only if that thread falls behind to `cardinality_limit / 2` does the trainer
//! collect itself (the SDK keeps a delta collection's sets until the next one, so two
//! collections share the limit).
//! Anything that still overflows (e.g. from other instruments) is counted (`cardinality_overflow`).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use opentelemetry::metrics::{Gauge, Histogram, Meter, MeterProvider as _};
use opentelemetry::{Key, KeyValue};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{Instrument, PeriodicReader, SdkMeterProvider, Stream, Temporality};
use opentelemetry_sdk::Resource;

use crate::decode::{NAME_ATTRIBUTE, NONFINITE_ATTRIBUTE, TIME_ATTRIBUTE};
use crate::config::{
    AnyExporterConfig,ConfigError, PipelineConfig, PipelineSettings, RunSettings, ScalarValue};
use crate::delivery::{Delivery, FlushError};
use crate::fastmap::FastMap;
use crate::exporter::RunOutcome;
use crate::names::run_dir_name;
use crate::factory::Destination;
use crate::stats::ExporterReport;

/// The SDK side of an exporter: converts each collection to OTLP and submits it.
#[derive(Debug)]
struct DeliveryExporter {
    delivery: Arc<Delivery>,
    /// Points recorded since this reader last collected (see [`EarlyCollection`]).
    uncollected: Arc<AtomicU64>,
}

impl PushMetricExporter for DeliveryExporter {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let req = ExportMetricsServiceRequest::from(metrics);
        uncount(&self.uncollected, crate::decode::count_data_points(&req));
        // A full queue is counted by the delivery; returning an error would only make the SDK
        // log once more, so the reader always sees success.
        let _ = self.delivery.submit(Arc::new(req));
        Ok(())
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        // The pipeline shuts the delivery down after the provider, with its own timeout.
        Ok(())
    }
    fn temporality(&self) -> Temporality {
        Temporality::Delta
    }
}

/// Why a pipeline could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The config is invalid (all problems listed).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The config names no exporter.
    #[error("no exporter configured")]
    NoExporter,
    /// An exporter's worker thread could not be started.
    #[error("starting exporter {name}: {source}")]
    Spawn {
        /// The exporter.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Where one exporter puts the run, for people to find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunDestination {
    /// A TensorBoard run directory (`tensorboard --logdir <logdir>` shows it as `run`).
    TensorBoard {
        /// Exporter name.
        exporter: String,
        /// The logdir.
        logdir: PathBuf,
        /// The run directory inside it.
        run_dir: PathBuf,
    },
    /// An MLflow run (known once the first batch was delivered).
    Mlflow {
        /// Exporter name.
        exporter: String,
        /// Tracking URI.
        tracking_uri: String,
        /// Experiment id, if known.
        experiment_id: Option<String>,
        /// MLflow run id, if the run exists yet.
        run_id: Option<String>,
    },
}

impl fmt::Display for RunDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunDestination::TensorBoard { exporter, logdir, run_dir } => write!(
                f,
                "{exporter}: {} (view: tensorboard --logdir {})",
                run_dir.display(),
                logdir.display()
            ),
            RunDestination::Mlflow { exporter, tracking_uri, experiment_id, run_id: Some(run_id) } => {
                match experiment_id.as_deref().filter(|e| !e.is_empty()) {
                    Some(e) => write!(f, "{exporter}: run {run_id} at {tracking_uri}/#/experiments/{e}/runs/{run_id}"),
                    None => write!(f, "{exporter}: run {run_id} at {tracking_uri}/#/runs/{run_id}"),
                }
            }
            RunDestination::Mlflow { exporter, tracking_uri, .. } => {
                write!(f, "{exporter}: no MLflow run yet at {tracking_uri}")
            }
        }
    }
}

/// What shutdown did, per exporter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// How the run was ended.
    pub outcome: RunOutcome,
    /// Data points recorded through this pipeline's [`StepRecorder`]s (one per scalar record
    /// call, one per histogram record call). Each exporter's `received` equals it unless the
    /// trainer also used other instruments, or recorded one series twice at the same step
    /// (the SDK keeps the last).
    pub recorded: u64,
    /// Per exporter, in config order.
    pub exporters: Vec<ExporterReport>,
    /// How long shutdown took.
    pub elapsed: Duration,
}

impl fmt::Display for ShutdownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "run ended {:?} in {:.2}s; {} data points recorded",
            self.outcome,
            self.elapsed.as_secs_f64(),
            self.recorded
        )?;
        for e in &self.exporters {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// A running in-process pipeline: the meter provider and every exporter behind it. Dropping it
/// shuts it down (FAILED if the thread is panicking or [`Pipeline::fail`] was called, else
/// FINISHED).
pub struct Pipeline {
    provider: SdkMeterProvider,
    deliveries: Vec<(Arc<Delivery>, Destination)>,
    run: RunSettings,
    step_key: String,
    shutdown_timeout: Duration,
    failed: AtomicBool,
    report: Mutex<Option<ShutdownReport>>,
    early: Arc<EarlyCollection>,
}

/// Shared by a pipeline's recorders: counts what they record and collects early enough that no
/// collection exceeds the SDK's cardinality limit.
#[derive(Debug)]
struct EarlyCollection {
    /// Wakes the thread that collects early; capacity 1, so a pending wake-up is enough.
    wake: std::sync::mpsc::SyncSender<()>,
    /// Points after which the thread is asked to collect (`cardinality_limit / 4`).
    every: u64,
    /// Points after which the trainer collects itself, because the thread fell behind
    /// (`cardinality_limit / 2 - 1`): the guarantee that no step folds into the overflow series.
    hard: u64,
    provider: SdkMeterProvider,
    /// Per reader: points recorded since it last collected, lowered by each of its exports
    /// (every reader aggregates on its own, so each has its own limit).
    uncollected: Vec<Arc<AtomicU64>>,
    recorded: AtomicU64,
}

/// Subtracts what a collection exported, never below zero (points from other instruments are
/// exported too but were never counted).
fn uncount(since: &AtomicU64, n: u64) {
    let _ = since.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(n)));
}

impl EarlyCollection {
    /// Starts the early-collection thread: the collection itself (milliseconds for thousands
    /// of points) must not run on the trainer's thread.
    fn start(provider: SdkMeterProvider, limit: usize, uncollected: Vec<Arc<AtomicU64>>) -> std::io::Result<Self> {
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let thread_provider = provider.clone();
        std::thread::Builder::new().name("trainmetrics-collect".into()).spawn(move || {
            // Ends when the pipeline and all its recorders are gone (the sender is dropped).
            while woken.recv().is_ok() {
                let _ = thread_provider.force_flush();
            }
        })?;
        // A delta collection keeps the attribute sets it exported until the next one evicts
        // them (OTel SDK 0.33 `collect_and_reset`), so sets from two collections share the
        // limit: each collection must stay under half of it.
        let limit = limit as u64;
        Ok(Self {
            wake,
            every: (limit / 4).max(1),
            hard: (limit / 2).saturating_sub(1).max(1),
            provider,
            uncollected,
            recorded: AtomicU64::new(0),
        })
    }

    fn recorded_one(&self) {
        self.recorded.fetch_add(1, Ordering::Relaxed);
        let n = self.uncollected.iter().map(|c| c.fetch_add(1, Ordering::Relaxed) + 1).max().unwrap_or(0);
        if n >= self.hard {
            // The exports of this collection lower the counters.
            let _ = self.provider.force_flush();
        } else if n == self.every {
            // Never blocks: if a collection is already requested, that one covers us.
            let _ = self.wake.try_send(());
        }
    }
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline").field("run", &self.run).finish_non_exhaustive()
    }
}

/// Builds a [`Pipeline`] in code; the same as a [`PipelineConfig`] (see [`crate::config`]).
#[derive(Debug, Clone, Default)]
pub struct PipelineBuilder {
    config: PipelineConfig,
}

impl PipelineBuilder {
    /// Sets the experiment name.
    pub fn experiment(mut self, name: impl Into<String>) -> Self {
        self.config.run.experiment = Some(name.into());
        self
    }
    /// Sets the run name.
    pub fn run_name(mut self, name: impl Into<String>) -> Self {
        self.config.run.name = Some(name.into());
        self
    }
    /// Sets the run id (the trainer's identity of the run; the same id continues the MLflow run).
    pub fn run_id(mut self, id: impl Into<String>) -> Self {
        self.config.run.id = Some(id.into());
        self
    }
    /// Adds a hyperparameter.
    pub fn param(mut self, name: impl Into<String>, value: impl fmt::Display) -> Self {
        self.config.run.params.insert(name.into(), ScalarValue::Text(value.to_string()));
        self
    }
    /// Adds a run tag.
    pub fn tag(mut self, name: impl Into<String>, value: impl fmt::Display) -> Self {
        self.config.run.tags.insert(name.into(), ScalarValue::Text(value.to_string()));
        self
    }
    /// Adds an exporter under `name` (`tensorboard`, `mlflow`, `mlflow/<any>`…); the name's
    /// type must be the config's (checked when the pipeline is built).
    pub fn exporter(mut self, name: impl Into<String>, config: impl Into<AnyExporterConfig>,) -> Self {
        self.config.exporters.insert(name.into(), config.into());
        self
    }
    /// Sets the bound of shutdown.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }
    /// Sets the step attribute key (default `step`).
    pub fn step_attribute(mut self, key: impl Into<String>) -> Self {
        self.config.step_attribute = key.into();
        self
    }
    /// Sets the SDK cardinality limit per instrument (default 20 000).
    pub fn cardinality_limit(mut self, limit: usize) -> Self {
        self.config.cardinality_limit = limit;
        self
    }
    /// The config built so far.
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }
    /// Validates and starts the pipeline.
    pub fn build(self) -> Result<Pipeline, BuildError> {
        Pipeline::from_config(&self.config)
    }
}

impl Pipeline {
    /// A builder.
    pub fn builder() -> PipelineBuilder {
        PipelineBuilder::default()
    }

    /// Validates `config` and starts the pipeline.
    pub fn from_config(config: &PipelineConfig) -> Result<Self, BuildError> {
        Self::from_settings(config.validate()?)
    }

    /// Starts a pipeline from validated settings.
    pub fn from_settings(s: PipelineSettings) -> Result<Self, BuildError> {
        if s.exporters.is_empty() {
            return Err(BuildError::NoExporter);
        }
        let keys = &s.decode.identity;
        let mut attrs = vec![
            KeyValue::new(keys.run_name.clone(), s.run.name.clone()),
            KeyValue::new(keys.run_id.clone(), s.run.id.clone()),
        ];
        if let Some(e) = &s.run.experiment {
            attrs.push(KeyValue::new(keys.experiment.clone(), e.clone()));
        }
        for (k, v) in &s.run.params {
            attrs.push(KeyValue::new(format!("{}{k}", keys.param_prefix), v.clone()));
        }
        for (k, v) in &s.run.tags {
            attrs.push(KeyValue::new(k.clone(), v.clone()));
        }
        let limit = s.cardinality_limit;
        let mut builder = SdkMeterProvider::builder()
            .with_resource(Resource::builder_empty().with_attributes(attrs).build())
            .with_view(move |_: &Instrument| Stream::builder().with_cardinality_limit(limit).build().ok());
        let mut deliveries = Vec::new();
        let mut uncollected = Vec::new();
        for e in s.exporters {
            let (delivery, destination) =
                crate::factory::start(&e).map_err(|source| BuildError::Spawn { name: e.name.clone(), source })?;
            let counter = Arc::new(AtomicU64::new(0));
            uncollected.push(counter.clone());
            let reader = PeriodicReader::builder(DeliveryExporter { delivery: delivery.clone(), uncollected: counter })
                .with_interval(e.reader_interval)
                .build();
            builder = builder.with_reader(reader);
            deliveries.push((delivery, destination));
        }
        let provider = builder.build();
        let early = Arc::new(
            EarlyCollection::start(provider.clone(), limit, uncollected)
                .map_err(|source| BuildError::Spawn { name: "collector".into(), source })?,
        );
        Ok(Self {
            early,
            provider,
            deliveries,
            run: s.run,
            step_key: s.decode.step_key,
            shutdown_timeout: s.shutdown_timeout,
            failed: AtomicBool::new(false),
            report: Mutex::new(None),
        })
    }

    /// The meter provider (clone it freely; e.g. `opentelemetry::global::set_meter_provider`).
    pub fn meter_provider(&self) -> &SdkMeterProvider {
        &self.provider
    }

    /// A meter of this pipeline's provider.
    pub fn meter(&self, name: &'static str) -> Meter {
        self.provider.meter(name)
    }

    /// A recorder that attaches the step attribute for you.
    pub fn recorder(&self) -> StepRecorder {
        let mut r = StepRecorder::new(self.meter("trainmetrics"), &self.step_key);
        r.early = Some(self.early.clone());
        r
    }

    /// The run's identity.
    pub fn run(&self) -> &RunSettings {
        &self.run
    }

    /// Where each exporter puts the run.
    pub fn run_destinations(&self) -> Vec<RunDestination> {
        self.deliveries
            .iter()
            .map(|(d, t)| match t {
                Destination::TensorBoard { logdir, run_dirs } => RunDestination::TensorBoard {
                    exporter: d.name().to_string(),
                    logdir: logdir.clone(),
                    // Before the first write the directory is not claimed yet: show the name it
                    // will most likely get.
                    run_dir: run_dirs
                        .lock()
                        .ok()
                        .and_then(|m| m.get(&self.run.id).cloned())
                        .unwrap_or_else(|| logdir.join(run_dir_name(&self.run.name))),
                },
                Destination::Mlflow { tracking_uri, run_ids } => {
                    let r = run_ids.lock().ok().and_then(|m| m.get(&self.run.id).cloned());
                    RunDestination::Mlflow {
                        exporter: d.name().to_string(),
                        tracking_uri: tracking_uri.clone(),
                        experiment_id: r.as_ref().map(|r| r.experiment_id.clone()),
                        run_id: r.map(|r| r.run_id),
                    }
                }
            })
            .collect()
    }

    /// Live per-exporter counters.
    pub fn reports(&self) -> Vec<ExporterReport> {
        self.deliveries.iter().map(|(d, _)| d.report()).collect()
    }

    /// Marks the run as failed: shutdown ends it FAILED in MLflow.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    /// Collects now and delivers what each exporter's cadence has made ready, waiting at most
    /// `timeout` per exporter. Open windows stay open.
    pub fn flush(&self, timeout: Duration) -> Result<(), FlushError> {
        // The SDK's force_flush blocks until every reader has exported, which our exporters do
        // without blocking.
        let _ = self.provider.force_flush();
        for (d, _) in &self.deliveries {
            d.flush(timeout)?;
        }
        Ok(())
    }

    /// Shuts down: a final collection, then every exporter closes its windows and delivers
    /// within the configured `shutdown_timeout` (all exporters in parallel), and runs are ended
    /// (FAILED if [`Pipeline::fail`] was called or the thread is panicking). Idempotent: later
    /// calls return the first report.
    pub fn shutdown(&self) -> ShutdownReport {
        let outcome = if self.failed.load(Ordering::Relaxed) || std::thread::panicking() {
            RunOutcome::Failed
        } else {
            RunOutcome::Finished
        };
        self.shutdown_with(outcome)
    }

    fn shutdown_with(&self, outcome: RunOutcome) -> ShutdownReport {
        let mut cached = match self.report.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(r) = cached.as_ref() {
            return r.clone();
        }
        let started = Instant::now();
        // Final collection and export by every reader; our exporters only enqueue.
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!("meter provider shutdown: {e}");
        }
        let left = self.shutdown_timeout.saturating_sub(started.elapsed());
        let exporters = std::thread::scope(|s| {
            let handles: Vec<_> =
                self.deliveries.iter().map(|(d, _)| s.spawn(move || d.shutdown(outcome, left))).collect();
            handles
                .into_iter()
                .zip(&self.deliveries)
                .map(|(h, (d, _))| h.join().unwrap_or_else(|_| d.report()))
                .collect()
        });
        let report = ShutdownReport {
            outcome,
            recorded: self.early.recorded.load(Ordering::Relaxed),
            exporters,
            elapsed: started.elapsed(),
        };
        *cached = Some(report.clone());
        report
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let report = self.shutdown();
        tracing::info!("trainmetrics pipeline shut down: {}", report.to_string().trim_end());
    }
}

/// Records scalars and histograms at a step through OTel instruments, attaching the step
/// attribute. Instruments are created on first use of a name and cached. Cheap to clone.
///
/// Non-finite scalars (which the OTel SDK discards) are recorded as `0.0` with the attribute
/// `trainmetrics.nonfinite` and restored by the exporters (see [`crate::decode`]).
#[derive(Clone)]
pub struct StepRecorder {
    meter: Meter,
    step_key: Key,
    gauges: Arc<Mutex<HashMap<String, Gauge<f64>>>>,
    /// Per metric name: its gauge and, for a name the OTel API rejects, the attribute that
    /// carries it, so a record call checks the name once per metric, not once per call. A
    /// read lock: record calls of several threads share it, and record under it (no clone).
    by_name: Arc<RwLock<FastMap<String, NamedGauge>>>,
    histograms: Arc<Mutex<HashMap<String, Histogram<f64>>>>,
    early: Option<Arc<EarlyCollection>>,
}

impl fmt::Debug for StepRecorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepRecorder").field("step_key", &self.step_key).finish_non_exhaustive()
    }
}

fn nonfinite_text(v: f64) -> Option<&'static str> {
    if v.is_nan() {
        Some("NaN")
    } else if v == f64::INFINITY {
        Some("Infinity")
    } else if v == f64::NEG_INFINITY {
        Some("-Infinity")
    } else {
        None
    }
}

/// Whether the OTel API accepts `name` as an instrument name: 1–255 bytes, an ASCII letter first,
/// then ASCII letters, digits, `_`, `.`, `-`, `/` (OTel metrics API spec, enforced by the SDK).
pub fn is_instrument_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
}

/// The record time as an attribute (see [`crate::decode`]): timestamps are fixed when the trainer
/// records, not when the SDK collects, so TensorBoard's wall time and MLflow's timestamp are the
/// real time of each step.
fn record_time() -> KeyValue {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    KeyValue::new(TIME_ATTRIBUTE, ns)
}

/// A metric's gauge and, for a name the OTel API rejects, its [`NAME_ATTRIBUTE`].
type NamedGauge = (Gauge<f64>, Option<KeyValue>);

/// Metric names a [`StepRecorder`] remembers the gauge of; further names look theirs up per call.
const MAX_NAMES: usize = 10_000;

/// Instrument that carries scalars whose names are not valid instrument names.
const NAMED_GAUGE: &str = "trainmetrics.named";
/// Instrument that carries histograms whose names are not valid instrument names.
const NAMED_HISTOGRAM: &str = "trainmetrics.named_histogram";

impl StepRecorder {
    /// A recorder on `meter` with the step attribute `step_key`. Unlike [`Pipeline::recorder`],
    /// it neither counts what it records nor collects early (it does not know the provider).
    pub fn new(meter: Meter, step_key: &str) -> Self {
        Self {
            meter,
            // Shared, so the clone each record call makes is a reference count, not a copy.
            step_key: Key::from(Arc::<str>::from(step_key)),
            gauges: Arc::default(),
            by_name: Arc::default(),
            histograms: Arc::default(),
            early: None,
        }
    }

    fn gauge(&self, name: &str) -> Option<Gauge<f64>> {
        let mut g = self.gauges.lock().ok()?;
        if let Some(x) = g.get(name) {
            return Some(x.clone());
        }
        let x = self.meter.f64_gauge(name.to_string()).build();
        g.insert(name.to_string(), x.clone());
        Some(x)
    }

    /// The gauge and extra attribute for metric `name` ([`StepRecorder::instrument_for`]),
    /// remembered for the first [`MAX_NAMES`] names.
    /// The gauge of a metric not yet in `by_name` (remembered there while it has room).
    fn gauge_for(&self, name: &str) -> Option<NamedGauge> {
        let (instrument, attr) = Self::instrument_for(name);
        let named = (self.gauge(instrument)?, attr);
        let mut by_name = self.by_name.write().ok()?;
        if by_name.len() < MAX_NAMES {
            by_name.insert(name.to_string(), named.clone());
        }
        Some(named)
    }

    /// The instrument name and extra attribute for metric `name` (see [`crate::decode`]).
    fn instrument_for(name: &str) -> (&str, Option<KeyValue>) {
        if is_instrument_name(name) {
            (name, None)
        } else {
            (NAMED_GAUGE, Some(KeyValue::new(NAME_ATTRIBUTE, name.to_string())))
        }
    }

    /// Ends the run by the run-end convention (see [`crate::decode`] "Run end"): records the
    /// gauge [`crate::decode::RUN_END_METRIC`] once, with the attribute `status`. Made for the
    /// OTLP route (a collector and `trainmetrics serve` end the run when it arrives, FINISHED,
    /// FAILED or KILLED); a [`Pipeline`] in process takes it the same way, and also ends its
    /// runs at shutdown.
    pub fn record_run_end(&self, status: crate::decode::EndStatus) {
        if let Some(g) = self.gauge(crate::decode::RUN_END_METRIC) {
            g.record(1.0, &[KeyValue::new(crate::decode::RUN_END_STATUS_ATTRIBUTE, status.as_str())]);
        }
    }

    /// Records `value` for metric `name` at `step`.
    pub fn record(&self, step: i64, name: &str, value: f64) {
        self.record_with(step, name, value, &[]);
    }

    /// Records `value` for `name` at `step` with extra attributes (they become part of the
    /// series name: `name/key=value`).
    /// Names the OTel API rejects (`acc@1`, `lossé`, …) are recorded on a shared instrument
    /// with the attribute `trainmetrics.name`, which the exporters turn back into the name.
    pub fn record_with(&self, step: i64, name: &str, value: f64, attributes: &[KeyValue]) {
        let known = match self.by_name.read() {
            Ok(by_name) => by_name.get(name).map(|named| self.record_on(named, step, value, attributes)).is_some(),
            Err(_) => false,
        };
        // Outside the read lock: counting may collect early (a flush), which must not hold up
        // a thread that registers a new name, nor through it the other recording threads.
        let recorded = known || self.gauge_for(name).map(|named| self.record_on(&named, step, value, attributes)).is_some();
        if let Some(c) = self.early.as_ref().filter(|_| recorded) {
            c.recorded_one();
        }
    }

    /// [`StepRecorder::record_with`] on a metric's gauge (without the early collection count).
    fn record_on(&self, (g, name_attr): &NamedGauge, step: i64, value: f64, attributes: &[KeyValue]) {
        if attributes.is_empty() && name_attr.is_none() && value.is_finite() {
            // The common case without a heap allocation.
            g.record(value, &[KeyValue::new(self.step_key.clone(), step), record_time()]);
            return;
        }
        let mut attrs = Vec::with_capacity(attributes.len() + 4);
        attrs.push(KeyValue::new(self.step_key.clone(), step));
        attrs.push(record_time());
        attrs.extend(name_attr.iter().cloned());
        attrs.extend_from_slice(attributes);
        match nonfinite_text(value) {
            None => g.record(value, &attrs),
            Some(t) => {
                attrs.push(KeyValue::new(NONFINITE_ATTRIBUTE, t));
                g.record(0.0, &attrs);
            }
        }
    }

    /// Records several scalars at one step.
    pub fn record_all(&self, step: i64, values: &[(&str, f64)]) {
        for (name, v) in values {
            self.record(step, name, *v);
        }
    }

    /// Records measurements into histogram `name` at `step` (non-finite measurements are
    /// discarded by the SDK). `boundaries` are used when the histogram is first created; they
    /// must be finite and strictly increasing, else the SDK's default buckets are used (the SDK
    /// would otherwise silently drop every measurement) and a warning is logged. Names that are
    /// not valid instrument names share one instrument, and so the first such histogram's
    /// buckets.
    pub fn record_histogram(&self, step: i64, name: &str, values: &[f64], boundaries: Option<Vec<f64>>) {
        let boundaries = boundaries.filter(|b| {
            let ok = b.iter().all(|x| x.is_finite()) && b.windows(2).all(|w| w[0] < w[1]);
            if !ok {
                tracing::warn!(histogram = name, "bucket boundaries must be finite and strictly increasing; using the default buckets");
            }
            ok
        });
        let (instrument, name_attr) = match Self::instrument_for(name) {
            (_, Some(a)) => (NAMED_HISTOGRAM.to_string(), Some(a)),
            (n, None) => (n.to_string(), None),
        };
        let h = {
            let Ok(mut hs) = self.histograms.lock() else { return };
            hs.entry(instrument.clone())
                .or_insert_with(|| {
                    let b = self.meter.f64_histogram(instrument);
                    match boundaries {
                        Some(bounds) => b.with_boundaries(bounds).build(),
                        None => b.build(),
                    }
                })
                .clone()
        };
        let mut attrs = vec![KeyValue::new(self.step_key.clone(), step), record_time()];
        attrs.extend(name_attr);
        for v in values {
            h.record(*v, &attrs);
        }
        if let Some(c) = &self.early {
            c.recorded_one();
        }
    }
}
