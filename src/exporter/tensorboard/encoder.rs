//! The protobuf messages TensorBoard reads from event files, and constructors
//! for the summaries this crate writes.
//!
//! The messages are hand-written `prost` derives (no `build.rs`, no `protoc`)
//! that mirror only the fields we write or may want to read back, with the field
//! numbers of TensorBoard's own copies of the protos:
//!
//! - `tensorboard/compat/proto/event.proto`: [`Event`], [`SessionLog`], [`SourceMetadata`]
//! - `tensorboard/compat/proto/summary.proto`: [`Summary`], [`summary::Value`],
//!   [`SummaryMetadata`], [`DataClass`]
//! - `tensorboard/compat/proto/histogram.proto`: [`HistogramProto`]
//! - `tensorboard/compat/proto/tensor.proto`, `tensor_shape.proto`, `types.proto`:
//!   [`TensorProto`], [`TensorShapeProto`], [`DataType`]
//! - `tensorboard/plugins/hparams/plugin_data.proto`: [`HParamsPluginData`], [`SessionStartInfo`]
//! - `google/protobuf/struct.proto`: [`google_protobuf::Value`]
//!
//! Fields we do not mirror are skipped by `prost` when decoding, so these types
//! can also read files written by other tools.
//!
//! The constructors produce the *modern* summary forms TensorBoard's own
//! writers emit (tensors plus plugin metadata), checked against both of
//! TensorBoard's loaders: the Python `EventAccumulator` and the Rust data server
//! ("RustBoard", the default). Each value takes `with_metadata`: both loaders
//! read a time series' metadata from the first value of a tag they see, so a
//! writer should pass `true` for the first value of each tag in every new event
//! file and may pass `false` afterwards to save bytes.
//!
//! Serialize any of these with [`prost::Message::encode_to_vec`] and frame the
//! bytes with `record::append_record`.

use std::collections::BTreeMap;

use prost::Message;

/// `Event.file_version` for the current event file format.
const FILE_VERSION: &str = "brain.Event:2";
/// `Event.source_metadata.writer` identifying this crate as the writer.
const SOURCE_WRITER: &str = "trainmetrics";
/// Tag under which the hparams plugin looks for a session's hyper-parameters.
const HPARAMS_SESSION_START_INFO_TAG: &str = "_hparams_/session_start_info";
/// Plugin names, as in each plugin's `metadata.py` (`PLUGIN_NAME`).
const SCALARS_PLUGIN: &str = "scalars";
const HISTOGRAMS_PLUGIN: &str = "histograms";
const TEXT_PLUGIN: &str = "text";
const HPARAMS_PLUGIN: &str = "hparams";

// ---------------------------------------------------------------------------
// event.proto
// ---------------------------------------------------------------------------

/// One record of an event file (`event.proto` `Event`).
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    /// Seconds since the Unix epoch. Must be finite: RustBoard stops reading a
    /// file at an event whose `wall_time` is NaN and drops events at ±infinity.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// Global training step the event belongs to.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// What the event carries (`oneof what`).
    #[prost(oneof = "event::What", tags = "3, 5, 7")]
    pub what: Option<event::What>,
    /// Which program wrote the file; set on the first event only.
    #[prost(message, optional, tag = "10")]
    pub source_metadata: Option<SourceMetadata>,
}

/// Nested types of [`Event`].
pub mod event {
    /// `Event.what`: the payload of an event (only the variants this crate uses).
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum What {
        /// Field 3: the file format version, `"brain.Event:2"`; first event of a file.
        #[prost(string, tag = "3")]
        FileVersion(String),
        /// Field 5: summary values (scalars, histograms, text, hparams).
        #[prost(message, tag = "5")]
        Summary(super::Summary),
        /// Field 7: session lifecycle marker (`SessionLog`).
        #[prost(message, tag = "7")]
        SessionLog(super::SessionLog),
    }
}

/// Program that wrote an event file (`event.proto` `SourceMetadata`).
#[derive(Clone, PartialEq, Message)]
pub struct SourceMetadata {
    /// Free-form writer name, e.g. `"trainmetrics"`.
    #[prost(string, tag = "1")]
    pub writer: String,
}

/// Session lifecycle marker (`event.proto` `SessionLog`).
///
/// The Python loader purges all points at steps >= the step of every `START`
/// after the first one in a run; RustBoard ignores session logs entirely.
#[derive(Clone, PartialEq, Message)]
pub struct SessionLog {
    /// A [`session_log::SessionStatus`] value.
    #[prost(enumeration = "session_log::SessionStatus", tag = "1")]
    pub status: i32,
    /// Checkpoint path, for `CHECKPOINT` entries.
    #[prost(string, tag = "2")]
    pub checkpoint_path: String,
    /// Free-form message.
    #[prost(string, tag = "3")]
    pub msg: String,
}

/// Nested types of [`SessionLog`].
pub mod session_log {
    /// `SessionLog.SessionStatus`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum SessionStatus {
        /// `STATUS_UNSPECIFIED`.
        StatusUnspecified = 0,
        /// `START`: a (re)started training session begins at this step.
        Start = 1,
        /// `STOP`.
        Stop = 2,
        /// `CHECKPOINT`.
        Checkpoint = 3,
    }
}

// ---------------------------------------------------------------------------
// summary.proto
// ---------------------------------------------------------------------------

/// A set of tagged values written at one step (`summary.proto` `Summary`).
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    /// The values.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<summary::Value>,
}

/// Nested types of [`Summary`].
pub mod summary {
    /// One tagged value (`summary.proto` `Summary.Value`).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        /// Time series name, e.g. `"loss"` or `"train/acc"`.
        #[prost(string, tag = "1")]
        pub tag: String,
        /// Plugin metadata; only the first value of a tag in a run needs it.
        #[prost(message, optional, tag = "9")]
        pub metadata: Option<super::SummaryMetadata>,
        /// The payload (`oneof value`; only the variants this crate uses).
        #[prost(oneof = "value::Value", tags = "2, 5, 8")]
        pub value: Option<value::Value>,
    }

    /// Nested types of [`Value`].
    pub mod value {
        /// `Summary.Value.value`: the payload of a summary value.
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            /// Field 2: legacy float32 scalar (`simple_value`).
            #[prost(float, tag = "2")]
            SimpleValue(f32),
            /// Field 5: legacy histogram (`histo`).
            #[prost(message, tag = "5")]
            Histo(super::super::HistogramProto),
            /// Field 8: modern tensor payload, interpreted per plugin metadata.
            #[prost(message, tag = "8")]
            Tensor(super::super::TensorProto),
        }
    }
}

/// How a plugin interprets a time series (`summary.proto` `SummaryMetadata`).
#[derive(Clone, PartialEq, Message)]
pub struct SummaryMetadata {
    /// Owning plugin and its private configuration.
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<summary_metadata::PluginData>,
    /// Optional display name shown instead of the tag.
    #[prost(string, tag = "2")]
    pub display_name: String,
    /// Optional Markdown description.
    #[prost(string, tag = "3")]
    pub summary_description: String,
    /// A [`DataClass`] value; inferred from the plugin name by the loaders when unset.
    #[prost(enumeration = "DataClass", tag = "4")]
    pub data_class: i32,
}

/// Nested types of [`SummaryMetadata`].
pub mod summary_metadata {
    /// `SummaryMetadata.PluginData`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PluginData {
        /// Plugin name, e.g. `"scalars"`, `"histograms"`, `"text"`, `"hparams"`.
        #[prost(string, tag = "1")]
        pub plugin_name: String,
        /// Serialized plugin-specific proto; empty for version-0 scalar,
        /// histogram and text plugin data.
        #[prost(bytes = "vec", tag = "2")]
        pub content: Vec<u8>,
    }
}

/// `summary.proto` `DataClass`: the storage class of a time series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DataClass {
    /// `DATA_CLASS_UNKNOWN`: let the loader infer it from the plugin name.
    Unknown = 0,
    /// `DATA_CLASS_SCALAR`: every value is a rank-0 `DT_FLOAT` tensor.
    Scalar = 1,
    /// `DATA_CLASS_TENSOR`: arbitrary tensors (histograms, text, ...).
    Tensor = 2,
    /// `DATA_CLASS_BLOB_SEQUENCE`: rank-1 `DT_STRING` tensors (images, audio).
    BlobSequence = 3,
}

// ---------------------------------------------------------------------------
// histogram.proto
// ---------------------------------------------------------------------------

/// Legacy histogram (`histogram.proto` `HistogramProto`). Not written by this
/// crate (see [`histogram_value`]); mirrored so old files can be decoded.
#[derive(Clone, PartialEq, Message)]
pub struct HistogramProto {
    /// Smallest observed value.
    #[prost(double, tag = "1")]
    pub min: f64,
    /// Largest observed value.
    #[prost(double, tag = "2")]
    pub max: f64,
    /// Number of observations.
    #[prost(double, tag = "3")]
    pub num: f64,
    /// Sum of observations.
    #[prost(double, tag = "4")]
    pub sum: f64,
    /// Sum of squared observations.
    #[prost(double, tag = "5")]
    pub sum_squares: f64,
    /// Right edge of each bucket (packed).
    #[prost(double, repeated, tag = "6")]
    pub bucket_limit: Vec<f64>,
    /// Count in each bucket (packed).
    #[prost(double, repeated, tag = "7")]
    pub bucket: Vec<f64>,
}

// ---------------------------------------------------------------------------
// tensor.proto, tensor_shape.proto, types.proto
// ---------------------------------------------------------------------------

/// `types.proto` `DataType` (only the values relevant to summaries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DataType {
    /// `DT_INVALID`.
    DtInvalid = 0,
    /// `DT_FLOAT`: float32; the only dtype RustBoard accepts for scalars.
    DtFloat = 1,
    /// `DT_DOUBLE`: float64; used for histogram tensors.
    DtDouble = 2,
    /// `DT_INT32`.
    DtInt32 = 3,
    /// `DT_STRING`: byte strings; used for text.
    DtString = 7,
    /// `DT_INT64`.
    DtInt64 = 9,
    /// `DT_BOOL`.
    DtBool = 10,
    /// `DT_HALF`: float16.
    DtHalf = 19,
}

/// A tensor value (`tensor.proto` `TensorProto`, summary-relevant fields only).
///
/// Values live either packed little-endian in `tensor_content` or in the typed
/// `*_val` field matching `dtype`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    /// A [`DataType`] value.
    #[prost(enumeration = "DataType", tag = "1")]
    pub dtype: i32,
    /// Shape; absent or without dims means rank 0.
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShapeProto>,
    /// Raw little-endian element bytes, row-major.
    #[prost(bytes = "vec", tag = "4")]
    pub tensor_content: Vec<u8>,
    /// `DT_FLOAT` elements (packed).
    #[prost(float, repeated, tag = "5")]
    pub float_val: Vec<f32>,
    /// `DT_DOUBLE` elements (packed).
    #[prost(double, repeated, tag = "6")]
    pub double_val: Vec<f64>,
    /// `DT_STRING` elements.
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// A tensor's shape (`tensor_shape.proto` `TensorShapeProto`).
#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    /// Dimensions, outermost first; empty for a scalar.
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<tensor_shape_proto::Dim>,
}

/// Nested types of [`TensorShapeProto`].
pub mod tensor_shape_proto {
    /// `TensorShapeProto.Dim`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dim {
        /// Number of elements along this dimension.
        #[prost(int64, tag = "1")]
        pub size: i64,
        /// Optional dimension name.
        #[prost(string, tag = "2")]
        pub name: String,
    }
}

// ---------------------------------------------------------------------------
// plugins/hparams/plugin_data.proto and google/protobuf/struct.proto
// ---------------------------------------------------------------------------

/// Content of `hparams` plugin metadata (`plugin_data.proto` `HParamsPluginData`).
#[derive(Clone, PartialEq, Message)]
pub struct HParamsPluginData {
    /// Plugin data version; 0 (omitted on the wire).
    #[prost(int32, tag = "1")]
    pub version: i32,
    /// Which hparams record this is (`oneof data`; only the variant this crate uses).
    #[prost(oneof = "hparams_plugin_data::Data", tags = "3")]
    pub data: Option<hparams_plugin_data::Data>,
}

/// Nested types of [`HParamsPluginData`].
pub mod hparams_plugin_data {
    /// `HParamsPluginData.data`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Data {
        /// Field 3: the hyper-parameters of one training session.
        #[prost(message, tag = "3")]
        SessionStartInfo(super::SessionStartInfo),
    }
}

/// Hyper-parameters of one session (`plugin_data.proto` `SessionStartInfo`).
#[derive(Clone, PartialEq, Message)]
pub struct SessionStartInfo {
    /// Hyper-parameter name to value. A `BTreeMap` so the encoding is
    /// deterministic (entries in name order).
    #[prost(btree_map = "string, message", tag = "1")]
    pub hparams: BTreeMap<String, google_protobuf::Value>,
    /// Optional URI of the trained model.
    #[prost(string, tag = "2")]
    pub model_uri: String,
    /// Optional URL for monitoring the session.
    #[prost(string, tag = "3")]
    pub monitor_url: String,
    /// Session group (trial) name; sessions with the same group are averaged.
    /// Empty means the plugin uses the session's run name.
    #[prost(string, tag = "4")]
    pub group_name: String,
    /// Session start time in seconds since the Unix epoch.
    #[prost(double, tag = "5")]
    pub start_time_secs: f64,
}

/// Hand-written mirror of the `google.protobuf` well-known types we need.
pub mod google_protobuf {
    /// `struct.proto` `Value` (without `struct_value` / `list_value`).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        /// The value (`oneof kind`).
        #[prost(oneof = "value::Kind", tags = "1, 2, 3, 4")]
        pub kind: Option<value::Kind>,
    }

    /// Nested types of [`Value`].
    pub mod value {
        /// `Value.kind`.
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Kind {
            /// Field 1: null (a [`super::NullValue`] value).
            #[prost(enumeration = "super::NullValue", tag = "1")]
            NullValue(i32),
            /// Field 2: a number.
            #[prost(double, tag = "2")]
            NumberValue(f64),
            /// Field 3: a string.
            #[prost(string, tag = "3")]
            StringValue(String),
            /// Field 4: a boolean.
            #[prost(bool, tag = "4")]
            BoolValue(bool),
        }
    }

    /// `struct.proto` `NullValue`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum NullValue {
        /// `NULL_VALUE`.
        NullValue = 0,
    }
}

// ---------------------------------------------------------------------------
// Constructors
// ---------------------------------------------------------------------------

/// Replaces a non-finite wall time by 0.0 (the epoch).
///
/// RustBoard marks a whole event file dead at an event whose `wall_time` is NaN
/// and drops events at ±infinity, so a bad clock reading must never reach disk.
fn finite_wall_time(wall_time: f64) -> f64 {
    if wall_time.is_finite() {
        wall_time
    } else {
        0.0
    }
}

/// The first event of every event file: `file_version = "brain.Event:2"` at
/// step 0, with `source_metadata.writer = "trainmetrics"`.
///
/// `wall_time` is seconds since the Unix epoch; a non-finite value is written
/// as 0.0 because RustBoard rejects NaN wall times.
pub fn file_version_event(wall_time: f64) -> Event {
    Event {
        wall_time: finite_wall_time(wall_time),
        step: 0,
        what: Some(event::What::FileVersion(FILE_VERSION.to_owned())),
        source_metadata: Some(SourceMetadata {
            writer: SOURCE_WRITER.to_owned(),
        }),
    }
}

/// A `SessionLog { status: START }` event marking the start (or restart) of a
/// training session at `step`.
///
/// Write it right after [`file_version_event`] in every new file. The Python
/// loader then discards points at steps >= `step` left over from an earlier
/// session of the same run when a session resumes from a checkpoint.
/// `wall_time` is seconds since the Unix epoch (non-finite is written as 0.0).
pub fn session_start_event(wall_time: f64, step: i64) -> Event {
    Event {
        wall_time: finite_wall_time(wall_time),
        step,
        what: Some(event::What::SessionLog(SessionLog {
            status: session_log::SessionStatus::Start.into(),
            ..SessionLog::default()
        })),
        source_metadata: None,
    }
}

/// An event carrying `values` (scalars, histograms, text, hparams) at `step`.
///
/// `wall_time` is seconds since the Unix epoch (non-finite is written as 0.0).
pub fn summary_event(wall_time: f64, step: i64, values: Vec<summary::Value>) -> Event {
    Event {
        wall_time: finite_wall_time(wall_time),
        step,
        what: Some(event::What::Summary(Summary { value: values })),
        source_metadata: None,
    }
}

/// Plugin metadata with empty (version 0) plugin content.
fn plugin_metadata(plugin_name: &str, data_class: Option<DataClass>) -> SummaryMetadata {
    SummaryMetadata {
        plugin_data: Some(summary_metadata::PluginData {
            plugin_name: plugin_name.to_owned(),
            content: Vec::new(),
        }),
        data_class: data_class.map_or(0, i32::from),
        ..SummaryMetadata::default()
    }
}

/// A tensor shape with the given dimension sizes (empty = rank 0).
fn shape(dims: &[i64]) -> TensorShapeProto {
    TensorShapeProto {
        dim: dims
            .iter()
            .map(|&size| tensor_shape_proto::Dim {
                size,
                name: String::new(),
            })
            .collect(),
    }
}

/// A scalar in the modern form TensorBoard's own `scalar_pb` writes: a rank-0
/// `DT_FLOAT` tensor (empty shape) with the value in `float_val`.
///
/// With `with_metadata`, adds metadata `plugin_name = "scalars"`, empty content
/// and `data_class = DATA_CLASS_SCALAR`. The value is float32 because RustBoard
/// silently drops rank-0 `DT_DOUBLE` scalars; convert `f64` metrics with `as f32`.
/// NaN and ±infinity are stored as-is and shown by both loaders.
pub fn scalar_value(tag: &str, value: f32, with_metadata: bool) -> summary::Value {
    summary::Value {
        tag: tag.to_owned(),
        metadata: with_metadata.then(|| plugin_metadata(SCALARS_PLUGIN, Some(DataClass::Scalar))),
        value: Some(summary::value::Value::Tensor(TensorProto {
            dtype: DataType::DtFloat.into(),
            tensor_shape: Some(shape(&[])),
            float_val: vec![value],
            ..TensorProto::default()
        })),
    }
}

/// Converts an OpenTelemetry explicit-bucket histogram into the rows
/// `[left_edge, right_edge, count]` of a TensorBoard histogram.
///
/// The rule is documented on [`histogram_value`].
fn histogram_rows(
    count: u64,
    sum: f64,
    min: Option<f64>,
    max: Option<f64>,
    bounds: &[f64],
    bucket_counts: &[u64],
) -> Vec<[f64; 3]> {
    let min = min.filter(|m| m.is_finite());
    let max = max.filter(|m| m.is_finite());
    match (bounds.first(), bounds.last()) {
        (Some(&first_bound), Some(&last_bound)) if !bucket_counts.is_empty() => {
            let first_left = min.map_or(first_bound, |m| m.min(first_bound));
            let last_right = max.map_or(last_bound, |m| m.max(last_bound));
            bucket_counts
                .iter()
                .take(bounds.len() + 1)
                .enumerate()
                .map(|(i, &n)| {
                    let left = i
                        .checked_sub(1)
                        .and_then(|j| bounds.get(j))
                        .copied()
                        .unwrap_or(first_left);
                    let right = bounds.get(i).copied().unwrap_or(last_right);
                    [left, right.max(left), n as f64]
                })
                .collect()
        }
        _ => {
            let mean = if count > 0 {
                sum / count as f64
            } else {
                f64::NAN
            };
            let mean = if mean.is_finite() { mean } else { 0.0 };
            let left = min.unwrap_or(mean);
            let right = max.unwrap_or(mean).max(left);
            vec![[left, right, count as f64]]
        }
    }
}

/// A histogram in the modern form TensorBoard's own `histogram_pb` writes: a
/// `DT_DOUBLE` tensor of shape `[k, 3]` whose rows are
/// `[left_edge, right_edge, count]`, stored in `tensor_content` as
/// little-endian `f64`, row-major.
///
/// Input is an OpenTelemetry explicit-bucket histogram data point: `bounds`
/// `b0..b(n-1)` (strictly increasing, finite) and `n + 1` `bucket_counts`,
/// where bucket 0 is `(-inf, b0]`, bucket `i` is `(b(i-1), b(i)]` and bucket
/// `n` is `(b(n-1), +inf)`. `min`/`max` are the data point's optional extremes.
///
/// Rule (every bucket is kept, including empty ones at either end):
/// - Bucket `i` becomes the row `[b(i-1), b(i), bucket_counts[i]]`.
/// - The open left end of bucket 0 becomes `min(min, b0)` when `min` is present
///   and finite, else `b0` (a zero-width bucket at `b0`).
/// - The open right end of bucket `n` becomes `max(max, b(n-1))` when `max` is
///   present and finite, else `b(n-1)`.
/// - Every right edge is then clamped to be at least its left edge.
/// - If `bucket_counts.len() != bounds.len() + 1`, only the first
///   `min(bucket_counts.len(), bounds.len() + 1)` buckets are written: extra
///   counts are ignored, and with fewer counts the last written bucket keeps
///   its finite right bound.
/// - With no bounds (or no bucket counts) there is a single row
///   `[lo, hi, count]`, where `lo = min` and `hi = max` when present and
///   finite, each falling back to the mean `sum / count`, or to 0.0 when
///   `count` is 0 or the mean is not finite (NaN or infinite `sum`);
///   `hi` is clamped to be at least `lo`.
///
/// `count` and `sum` are only used for that single-row case; otherwise counts
/// come from `bucket_counts` (converted to `f64`). Bounds are used as given:
/// NaN or infinite bounds (which OpenTelemetry forbids) are not repaired, but
/// never cause a panic.
///
/// With `with_metadata`, adds metadata `plugin_name = "histograms"`, empty
/// content and `data_class = DATA_CLASS_TENSOR`.
#[allow(clippy::too_many_arguments)] // mirrors the fields of an OTel data point
pub fn histogram_value(
    tag: &str,
    count: u64,
    sum: f64,
    min: Option<f64>,
    max: Option<f64>,
    bounds: &[f64],
    bucket_counts: &[u64],
    with_metadata: bool,
) -> summary::Value {
    let rows = histogram_rows(count, sum, min, max, bounds, bucket_counts);
    let tensor_content: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    // A Vec never holds more than isize::MAX elements, so this cannot saturate.
    let k = i64::try_from(rows.len()).unwrap_or(i64::MAX);
    summary::Value {
        tag: tag.to_owned(),
        metadata: with_metadata
            .then(|| plugin_metadata(HISTOGRAMS_PLUGIN, Some(DataClass::Tensor))),
        value: Some(summary::value::Value::Tensor(TensorProto {
            dtype: DataType::DtDouble.into(),
            tensor_shape: Some(shape(&[k, 3])),
            tensor_content,
            ..TensorProto::default()
        })),
    }
}

/// A hyper-parameter value for [`hparams_value`].
#[derive(Clone, Debug, PartialEq)]
pub enum HParamValue {
    /// A number (shown by the hparams plugin as `FLOAT64`).
    Number(f64),
    /// A string (`STRING`).
    Text(String),
    /// A boolean (`BOOL`).
    Bool(bool),
}

impl From<&HParamValue> for google_protobuf::Value {
    fn from(value: &HParamValue) -> Self {
        use google_protobuf::value::Kind;
        let kind = match value {
            HParamValue::Number(x) => Kind::NumberValue(*x),
            HParamValue::Text(s) => Kind::StringValue(s.clone()),
            HParamValue::Bool(b) => Kind::BoolValue(*b),
        };
        google_protobuf::Value { kind: Some(kind) }
    }
}

/// The `_hparams_/session_start_info` summary that makes the hparams plugin
/// show this run's hyper-parameters next to its scalars (the last value of every
/// scalar tag in the run becomes a metric). Write it once per run, at any step.
///
/// The tensor is TensorBoard's NULL tensor (`DT_FLOAT`, shape `[0]`); the
/// metadata is always present: `plugin_name = "hparams"`, content the serialized
/// `HParamsPluginData { version: 0, session_start_info }` holding `hparams`
/// (a later duplicate name wins), `group_name` (empty: the plugin uses the run
/// name) and `start_time_secs` (seconds since the Unix epoch). The data class is
/// left unset, as TensorBoard's own `hparams_pb` does.
pub fn hparams_value(
    hparams: &[(String, HParamValue)],
    group_name: &str,
    start_time_secs: f64,
) -> summary::Value {
    let session_start_info = SessionStartInfo {
        hparams: hparams
            .iter()
            .map(|(name, value)| (name.clone(), google_protobuf::Value::from(value)))
            .collect(),
        group_name: group_name.to_owned(),
        start_time_secs,
        ..SessionStartInfo::default()
    };
    let content = HParamsPluginData {
        version: 0,
        data: Some(hparams_plugin_data::Data::SessionStartInfo(
            session_start_info,
        )),
    }
    .encode_to_vec();
    summary::Value {
        tag: HPARAMS_SESSION_START_INFO_TAG.to_owned(),
        metadata: Some(SummaryMetadata {
            plugin_data: Some(summary_metadata::PluginData {
                plugin_name: HPARAMS_PLUGIN.to_owned(),
                content,
            }),
            ..SummaryMetadata::default()
        }),
        value: Some(summary::value::Value::Tensor(TensorProto {
            dtype: DataType::DtFloat.into(),
            tensor_shape: Some(shape(&[0])),
            ..TensorProto::default()
        })),
    }
}

/// A text summary in the form TensorBoard's own `text_pb` writes: a rank-0
/// `DT_STRING` tensor holding `text` as UTF-8, rendered as sanitized Markdown.
///
/// With `with_metadata`, adds metadata `plugin_name = "text"` with empty
/// content; the data class is left unset (both loaders infer
/// `DATA_CLASS_TENSOR`), which keeps the bytes identical to TensorBoard's.
pub fn text_value(tag: &str, text: &str, with_metadata: bool) -> summary::Value {
    summary::Value {
        tag: tag.to_owned(),
        metadata: with_metadata.then(|| plugin_metadata(TEXT_PLUGIN, None)),
        value: Some(summary::value::Value::Tensor(TensorProto {
            dtype: DataType::DtString.into(),
            tensor_shape: Some(shape(&[])),
            string_val: vec![text.as_bytes().to_vec()],
            ..TensorProto::default()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes `tensorboard.plugins.scalar.summary_v2.scalar_pb("acc", 0.99)`
    /// produces with tensorboard 2.21.0, up to the end of the tensor.
    const TB_SCALAR_ACC_TENSOR: &[u8] = &[
        0x0a, 0x03, b'a', b'c', b'c', // tag
        0x42, 0x0a, // tensor, 10 bytes
        0x08, 0x01, // dtype DT_FLOAT
        0x12, 0x00, // empty shape
        0x2a, 0x04, 0xa4, 0x70, 0x7d, 0x3f, // float_val packed [0.99f32]
    ];

    #[test]
    fn scalar_matches_tensorboard_writer_bytes_plus_data_class() {
        let mut expected = TB_SCALAR_ACC_TENSOR.to_vec();
        expected.extend_from_slice(&[0x4a, 0x0d, 0x0a, 0x09, 0x0a, 0x07]);
        expected.extend_from_slice(b"scalars");
        // The only difference from TensorBoard's writer: data_class = SCALAR.
        expected.extend_from_slice(&[0x20, 0x01]);
        assert_eq!(scalar_value("acc", 0.99, true).encode_to_vec(), expected);
    }

    #[test]
    fn scalar_without_metadata_is_just_the_tensor() {
        assert_eq!(
            scalar_value("acc", 0.99, false).encode_to_vec(),
            TB_SCALAR_ACC_TENSOR
        );
    }

    #[test]
    fn scalar_keeps_non_finite_values() {
        for x in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let v = scalar_value("x", x, false);
            let Some(summary::value::Value::Tensor(t)) = v.value else {
                panic!("scalar must be a tensor");
            };
            assert_eq!(t.float_val.len(), 1);
            assert_eq!(t.float_val[0].to_bits(), x.to_bits());
        }
    }

    /// Bytes observed from `text_pb("notes", "hello **md**")`.
    #[test]
    fn text_matches_tensorboard_writer_bytes() {
        let mut expected = vec![0x0a, 0x05];
        expected.extend_from_slice(b"notes");
        expected.extend_from_slice(&[0x42, 0x12, 0x08, 0x07, 0x12, 0x00, 0x42, 0x0c]);
        expected.extend_from_slice(b"hello **md**");
        expected.extend_from_slice(&[0x4a, 0x08, 0x0a, 0x06, 0x0a, 0x04]);
        expected.extend_from_slice(b"text");
        assert_eq!(
            text_value("notes", "hello **md**", true).encode_to_vec(),
            expected
        );
    }

    /// `hparams_pb({"lr": 0.01, "optimizer": "adam", "layers": 3, "bn": True},
    /// trial_id="run_lr0.01", start_time_secs=1.5)` from tensorboard 2.21.0,
    /// with the map entries in name order (protobuf map order is unspecified;
    /// ours is sorted).
    #[test]
    fn hparams_matches_tensorboard_writer_bytes() {
        let hparams = vec![
            ("lr".to_owned(), HParamValue::Number(0.01)),
            ("optimizer".to_owned(), HParamValue::Text("adam".to_owned())),
            ("layers".to_owned(), HParamValue::Number(3.0)),
            ("bn".to_owned(), HParamValue::Bool(true)),
        ];
        let mut expected = vec![0x0a, 0x1c];
        expected.extend_from_slice(b"_hparams_/session_start_info");
        expected.extend_from_slice(&[0x42, 0x06, 0x08, 0x01, 0x12, 0x02, 0x12, 0x00]);
        expected.extend_from_slice(&[0x4a, 0x69, 0x0a, 0x67, 0x0a, 0x07]);
        expected.extend_from_slice(b"hparams");
        expected.extend_from_slice(&[0x12, 0x5c, 0x1a, 0x5a]);
        // bn: bool_value true
        expected.extend_from_slice(&[0x0a, 0x08, 0x0a, 0x02, b'b', b'n', 0x12, 0x02, 0x20, 0x01]);
        // layers: number_value 3.0
        expected.extend_from_slice(&[0x0a, 0x13, 0x0a, 0x06]);
        expected.extend_from_slice(b"layers");
        expected.extend_from_slice(&[0x12, 0x09, 0x11]);
        expected.extend_from_slice(&3.0f64.to_le_bytes());
        // lr: number_value 0.01
        expected.extend_from_slice(&[0x0a, 0x0f, 0x0a, 0x02, b'l', b'r', 0x12, 0x09, 0x11]);
        expected.extend_from_slice(&0.01f64.to_le_bytes());
        // optimizer: string_value "adam"
        expected.extend_from_slice(&[0x0a, 0x13, 0x0a, 0x09]);
        expected.extend_from_slice(b"optimizer");
        expected.extend_from_slice(&[0x12, 0x06, 0x1a, 0x04]);
        expected.extend_from_slice(b"adam");
        // group_name, start_time_secs
        expected.extend_from_slice(&[0x22, 0x0a]);
        expected.extend_from_slice(b"run_lr0.01");
        expected.push(0x29);
        expected.extend_from_slice(&1.5f64.to_le_bytes());

        assert_eq!(
            hparams_value(&hparams, "run_lr0.01", 1.5).encode_to_vec(),
            expected
        );
    }

    /// The histogram tensor bytes `histogram_pb` writes, with our counts.
    #[test]
    fn histogram_tensor_bytes_match_tensorboard_layout() {
        // OTel: bounds [2], counts [2, 1] over values {1, 2, 3}; min 1, max 3.
        let v = histogram_value("h", 3, 6.0, Some(1.0), Some(3.0), &[2.0], &[2, 1], true);
        let mut expected = vec![0x0a, 0x01, b'h', 0x42, 0x3e, 0x08, 0x02];
        expected.extend_from_slice(&[0x12, 0x08, 0x12, 0x02, 0x08, 0x02, 0x12, 0x02, 0x08, 0x03]);
        expected.extend_from_slice(&[0x22, 0x30]);
        for x in [1.0f64, 2.0, 2.0, 2.0, 3.0, 1.0] {
            expected.extend_from_slice(&x.to_le_bytes());
        }
        expected.extend_from_slice(&[0x4a, 0x10, 0x0a, 0x0c, 0x0a, 0x0a]);
        expected.extend_from_slice(b"histograms");
        expected.extend_from_slice(&[0x20, 0x02]);
        assert_eq!(v.encode_to_vec(), expected);
    }

    fn rows(
        count: u64,
        sum: f64,
        min: Option<f64>,
        max: Option<f64>,
        bounds: &[f64],
        counts: &[u64],
    ) -> Vec<[f64; 3]> {
        let v = histogram_value("h", count, sum, min, max, bounds, counts, false);
        let Some(summary::value::Value::Tensor(t)) = v.value else {
            panic!("histogram must be a tensor");
        };
        let dims: Vec<i64> = t
            .tensor_shape
            .unwrap_or_default()
            .dim
            .iter()
            .map(|d| d.size)
            .collect();
        let flat: Vec<f64> = t
            .tensor_content
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(t.dtype, DataType::DtDouble as i32);
        assert_eq!(dims, vec![(flat.len() / 3) as i64, 3]);
        assert_eq!(flat.len() % 3, 0);
        flat.chunks_exact(3).map(|r| [r[0], r[1], r[2]]).collect()
    }

    #[test]
    fn histogram_open_ends_use_min_and_max() {
        assert_eq!(
            rows(
                6,
                30.0,
                Some(-1.0),
                Some(20.0),
                &[0.0, 5.0, 10.0],
                &[1, 2, 0, 3]
            ),
            vec![
                [-1.0, 0.0, 1.0],
                [0.0, 5.0, 2.0],
                [5.0, 10.0, 0.0],
                [10.0, 20.0, 3.0]
            ]
        );
    }

    #[test]
    fn histogram_open_ends_without_min_max_use_nearest_bound() {
        assert_eq!(
            rows(3, 10.0, None, None, &[0.0, 5.0], &[1, 1, 1]),
            vec![[0.0, 0.0, 1.0], [0.0, 5.0, 1.0], [5.0, 5.0, 1.0]]
        );
        // Non-finite extremes count as absent.
        assert_eq!(
            rows(
                3,
                10.0,
                Some(f64::NAN),
                Some(f64::INFINITY),
                &[0.0, 5.0],
                &[1, 1, 1]
            ),
            vec![[0.0, 0.0, 1.0], [0.0, 5.0, 1.0], [5.0, 5.0, 1.0]]
        );
    }

    #[test]
    fn histogram_clamps_min_and_max_inside_the_end_buckets() {
        // min above b0 and max below b(n-1) (the end buckets are empty).
        assert_eq!(
            rows(2, 6.0, Some(2.0), Some(4.0), &[1.0, 5.0], &[0, 2, 0]),
            vec![[1.0, 1.0, 0.0], [1.0, 5.0, 2.0], [5.0, 5.0, 0.0]]
        );
    }

    #[test]
    fn histogram_without_bounds_is_one_row() {
        assert_eq!(
            rows(4, 10.0, Some(1.0), Some(4.0), &[], &[4]),
            vec![[1.0, 4.0, 4.0]]
        );
        assert_eq!(rows(4, 10.0, None, None, &[], &[4]), vec![[2.5, 2.5, 4.0]]);
        assert_eq!(rows(4, 10.0, None, None, &[], &[]), vec![[2.5, 2.5, 4.0]]);
        assert_eq!(rows(0, 0.0, None, None, &[], &[]), vec![[0.0, 0.0, 0.0]]);
        assert_eq!(
            rows(2, f64::NAN, None, None, &[], &[2]),
            vec![[0.0, 0.0, 2.0]]
        );
        assert_eq!(
            rows(2, 4.0, Some(5.0), None, &[], &[2]),
            vec![[5.0, 5.0, 2.0]]
        );
        // Bounds but no counts: same single-row rule.
        assert_eq!(rows(2, 4.0, None, None, &[1.0], &[]), vec![[2.0, 2.0, 2.0]]);
    }

    #[test]
    fn histogram_with_inconsistent_lengths_uses_the_consistent_prefix() {
        // Too few counts: the last written bucket keeps its finite bound.
        assert_eq!(
            rows(3, 3.0, Some(-1.0), Some(9.0), &[0.0, 1.0, 2.0], &[1, 2]),
            vec![[-1.0, 0.0, 1.0], [0.0, 1.0, 2.0]]
        );
        // Too many counts: extras ignored.
        assert_eq!(
            rows(3, 3.0, None, Some(9.0), &[0.0], &[1, 2, 7, 7]),
            vec![[0.0, 0.0, 1.0], [0.0, 9.0, 2.0]]
        );
    }

    #[test]
    fn histogram_with_zero_count_keeps_empty_buckets() {
        assert_eq!(
            rows(0, 0.0, None, None, &[1.0, 2.0], &[0, 0, 0]),
            vec![[1.0, 1.0, 0.0], [1.0, 2.0, 0.0], [2.0, 2.0, 0.0]]
        );
    }

    #[test]
    fn histogram_survives_unsorted_and_nan_bounds() {
        let r = rows(3, 3.0, None, None, &[2.0, f64::NAN, 1.0], &[1, 1, 1, 1]);
        assert_eq!(r.len(), 4);
        for row in &r {
            assert_ne!(
                row[0].partial_cmp(&row[1]),
                Some(std::cmp::Ordering::Greater),
                "right edge below left edge: {row:?}"
            );
        }
    }

    #[test]
    fn file_version_event_bytes() {
        let bytes = file_version_event(1.5).encode_to_vec();
        let mut expected = vec![0x09];
        expected.extend_from_slice(&1.5f64.to_le_bytes());
        expected.extend_from_slice(&[0x1a, 0x0d]);
        expected.extend_from_slice(b"brain.Event:2");
        expected.extend_from_slice(&[0x52, 0x0e, 0x0a, 0x0c]);
        expected.extend_from_slice(b"trainmetrics");
        assert_eq!(bytes, expected);
    }

    #[test]
    fn session_start_event_bytes() {
        let bytes = session_start_event(2.0, 7).encode_to_vec();
        let mut expected = vec![0x09];
        expected.extend_from_slice(&2.0f64.to_le_bytes());
        expected.extend_from_slice(&[0x10, 0x07, 0x3a, 0x02, 0x08, 0x01]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn summary_event_round_trips() {
        let event = summary_event(3.25, 42, vec![scalar_value("loss", 0.5, true)]);
        let decoded = Event::decode(event.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, event);
        assert_eq!(decoded.step, 42);
    }

    #[test]
    fn non_finite_wall_times_are_written_as_zero() {
        assert_eq!(file_version_event(f64::NAN).wall_time, 0.0);
        assert_eq!(session_start_event(f64::INFINITY, 1).wall_time, 0.0);
        assert_eq!(
            summary_event(f64::NEG_INFINITY, 1, Vec::new()).wall_time,
            0.0
        );
        assert_eq!(summary_event(12.5, 1, Vec::new()).wall_time, 12.5);
    }
}
