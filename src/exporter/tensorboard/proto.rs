//! The protobuf messages TensorBoard reads from event files (the summaries are built in
//! [`super::encoder`]).
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

use std::collections::BTreeMap;

use prost::Message;

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
/// crate (see [`super::encoder::histogram_value`]); mirrored so old files can be decoded.
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
