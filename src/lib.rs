//! trainmetrics: an OpenTelemetry pipeline for ML training metrics.
//!
//! A trainer records loss, learning rate, accuracy… once, through the OpenTelemetry metrics API,
//! with the training step as a data point attribute. Each configured exporter gets the data on
//! its own cadence and aggregation: TensorBoard event files every step, an MLflow tracking
//! server every 100 steps with the loss averaged, say. Exporters work on their own threads
//! behind bounded queues, so the trainer never waits on disk or network.
//!
//! ```text
//!  trainer ──OTel API──▶ SdkMeterProvider ─┬─ PeriodicReader ─▶ Delivery(queue ▶ cadence ▶ retry) ─▶ TensorBoardExporter
//!  (StepRecorder)                          └─ PeriodicReader ─▶ Delivery(queue ▶ cadence ▶ retry) ─▶ MlflowExporter
//! ```
//! Both readers hand the exporters OTLP (`ExportMetricsServiceRequest`), the same model the
//! OTLP receiver uses, so there is one decoding, naming and cadence path for both routes.
//!
//! ```no_run
//! use trainmetrics::config::{DeliveryConfig, ExporterConfig, MlflowConfig, TensorBoardConfig};
//! use trainmetrics::Pipeline;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pipeline = Pipeline::builder()
//!     .experiment("iris")
//!     .run_name("mlp-1")
//!     .param("lr", 0.01)
//!     .exporter("tensorboard", ExporterConfig { backend: TensorBoardConfig { logdir: Some("runs".into()) }, delivery: DeliveryConfig::default() })
//!     .exporter("mlflow", ExporterConfig {
//!         backend: MlflowConfig { tracking_uri: Some("http://127.0.0.1:5000".into()), ..Default::default() },
//!         delivery: DeliveryConfig {
//!             every_steps: Some(100),
//!             aggregation: Some(trainmetrics::cadence::Aggregation::Mean),
//!             ..Default::default()
//!         },
//!     })
//!     .build()?;
//! let rec = pipeline.recorder();
//! for step in 1..=1000 {
//!     rec.record_all(step, &[("train.loss", 1.0 / step as f64), ("train.lr", 0.01)]);
//! }
//! println!("{}", pipeline.shutdown());
//! # Ok(()) }
//! ```
#![warn(missing_docs, missing_debug_implementations)]

pub mod cadence;
pub mod config;
pub mod decode;
pub mod delivery;
pub mod exporter;
pub mod factory;
pub mod fastmap;
pub mod jobs;
pub mod names;
pub mod problems;
pub mod receiver;
pub mod rejections;
pub mod retry;
pub mod secrets;
pub mod sdk;
pub mod serve;
pub mod spool;
pub mod stage;
pub mod stats;
pub mod sync;
pub mod telemetry;

pub use sdk::{BuildError, RunDestination, Pipeline, PipelineBuilder, ShutdownReport, StepRecorder};
pub use stats::{DropReason, ExporterReport};
