//! TensorBoard exporter: writes each run's points as TensorBoard event files under
//! `<logdir>/<run>/` (see [`exporter`] for the file rules, [`proto`] for the protobuf messages,
//! [`encoder`] for the summaries built from them, [`record`] for the TFRecord framing).

pub mod config;
pub mod encoder;
pub mod exporter;
pub mod proto;
pub mod record;

pub use config::TensorBoardSettings;
pub use exporter::TensorBoardExporter;
