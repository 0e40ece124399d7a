//! Builders of the summaries and events this crate writes, from the protobuf mirrors of
//! [`super::proto`].
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

use prost::Message;

use super::proto::*;

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

/// One scalar of a [`ScalarEvent`]: its tag, its float32 value, and whether it carries the
/// scalars plugin metadata (the first value of its tag in a file).
pub type Scalar<'a> = (&'a str, f32, bool);

/// A summary event of scalars only, encoded straight into a buffer: the bytes equal
/// `summary_event(wall_time, step, scalars mapped with scalar_value).encode_to_vec()` (prost
/// writes fields in tag order and leaves out proto3 defaults; the test checks equality), without
/// building the messages. The scalars are most of what a trainer writes, so this is the hot path.
#[derive(Debug, Clone, Copy)]
pub struct ScalarEvent<'a> {
    /// Seconds since the Unix epoch; a non-finite value is written as 0.0 (see
    /// [`summary_event`]).
    pub wall_time: f64,
    /// The step.
    pub step: i64,
    /// The values, in order.
    pub scalars: &'a [Scalar<'a>],
}

/// `SummaryMetadata { plugin_data: { plugin_name: "scalars" }, data_class: DATA_CLASS_SCALAR }`.
const SCALAR_METADATA: &[u8] = &[0x0a, 0x09, 0x0a, 0x07, b's', b'c', b'a', b'l', b'a', b'r', b's', 0x20, 0x01];
/// `TensorProto { dtype: DT_FLOAT, tensor_shape: {}, float_val: [..] }` up to the 4 value bytes.
const SCALAR_TENSOR_HEAD: &[u8] = &[0x08, 0x01, 0x12, 0x00, 0x2a, 0x04];
/// Length of that tensor with its value.
const SCALAR_TENSOR_LEN: usize = SCALAR_TENSOR_HEAD.len() + 4;

impl ScalarEvent<'_> {
    fn value_len((tag, _, first): &Scalar<'_>) -> usize {
        // proto3 leaves an empty string out.
        let tag = if tag.is_empty() { 0 } else { 1 + prost::encoding::encoded_len_varint(tag.len() as u64) + tag.len() };
        let tensor = 2 + SCALAR_TENSOR_LEN;
        let metadata = if *first { 2 + SCALAR_METADATA.len() } else { 0 };
        tag + tensor + metadata
    }

    fn summary_len(&self) -> usize {
        self.scalars.iter().map(|v| {
            let n = Self::value_len(v);
            1 + prost::encoding::encoded_len_varint(n as u64) + n
        }).sum()
    }

    /// The encoded event's length, bytes.
    pub fn encoded_len(&self) -> usize {
        let wall = if finite_wall_time(self.wall_time) != 0.0 { 9 } else { 0 };
        let step = if self.step != 0 { 1 + prost::encoding::encoded_len_varint(self.step as u64) } else { 0 };
        let summary = self.summary_len();
        wall + step + 1 + prost::encoding::encoded_len_varint(summary as u64) + summary
    }

    /// Appends the encoded event ([`ScalarEvent::encoded_len`] bytes) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use prost::encoding::encode_varint;
        out.reserve(self.encoded_len());
        let wall = finite_wall_time(self.wall_time);
        if wall != 0.0 {
            out.push(0x09); // Event.wall_time, field 1, fixed64
            out.extend_from_slice(&wall.to_le_bytes());
        }
        if self.step != 0 {
            out.push(0x10); // Event.step, field 2, varint
            encode_varint(self.step as u64, out);
        }
        out.push(0x2a); // Event.summary, field 5
        encode_varint(self.summary_len() as u64, out);
        for v in self.scalars {
            let (tag, value, first) = *v;
            out.push(0x0a); // Summary.value, field 1
            encode_varint(Self::value_len(v) as u64, out);
            if !tag.is_empty() {
                out.push(0x0a); // Value.tag, field 1
                encode_varint(tag.len() as u64, out);
                out.extend_from_slice(tag.as_bytes());
            }
            out.push(0x42); // Value.tensor, field 8
            out.push(SCALAR_TENSOR_LEN as u8);
            out.extend_from_slice(SCALAR_TENSOR_HEAD);
            out.extend_from_slice(&value.to_le_bytes());
            if first {
                out.push(0x4a); // Value.metadata, field 9
                out.push(SCALAR_METADATA.len() as u8);
                out.extend_from_slice(SCALAR_METADATA);
            }
        }
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

    /// The direct encoding equals prost's encoding of the same messages, for steps and wall
    /// times at the edges of their encodings and tags around the one-byte length limit.
    #[test]
    fn scalar_events_encode_as_prost_encodes_their_messages() {
        let long = "t".repeat(300);
        let tags = ["", "loss", "train/loss/k=v", &long[..127], &long[..128], &long];
        let values = [0.0f32, -0.0, 1.5, f32::NAN, f32::INFINITY, f32::MIN_POSITIVE];
        let steps = [0, 1, 127, 128, -1, i64::MIN, i64::MAX];
        let walls = [0.0, -0.0, 1.7e9, f64::NAN, f64::INFINITY, 1e-300];
        let mut cases = 0;
        for (i, step) in steps.iter().enumerate() {
            for (j, wall) in walls.iter().enumerate() {
                let scalars: Vec<Scalar<'_>> = (0..(i + j) % 5)
                    .map(|k| (tags[(i + j + k) % tags.len()], values[(i * 3 + k) % values.len()], (i + k) % 2 == 0))
                    .collect();
                let event = ScalarEvent { wall_time: *wall, step: *step, scalars: &scalars };
                let mut direct = Vec::new();
                event.encode(&mut direct);
                let messages = scalars.iter().map(|(t, v, first)| scalar_value(t, *v, *first)).collect();
                let prost = summary_event(*wall, *step, messages).encode_to_vec();
                assert_eq!(direct, prost, "step {step}, wall {wall}, {} scalars", scalars.len());
                assert_eq!(event.encoded_len(), prost.len());
                cases += 1;
            }
        }
        assert_eq!(cases, steps.len() * walls.len());
    }

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
