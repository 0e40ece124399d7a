//! MLflow exporter: delivers each run's points to an MLflow tracking server over its REST API
//! (`/api/2.0/mlflow/...`), one MLflow run per trainer run (see [`exporter`] for the run, param
//! and name rules, [`request_builder`] for `log-batch` splitting, [`client`] for HTTP and error
//! classes).

pub mod client;
pub mod config;
pub mod exporter;
pub mod request_builder;

pub use config::MlflowSettings;
pub use exporter::MlflowExporter;
