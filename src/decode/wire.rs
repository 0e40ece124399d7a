//! The protobuf form of an OTLP metrics request as [`super::parse_protobuf`] decodes it: the
//! messages of `opentelemetry-proto` (`collector/metrics/v1`, `metrics/v1`, `common/v1`) with
//! the same names, field numbers and wire types, except that a gauge's or a sum's data points
//! keep up to [`INLINE_ATTRIBUTES`] attributes in place and an attribute's key borrows the
//! request's bytes. The typed `NumberDataPoint` allocates its attribute list and every key, two
//! allocations per data point that were the largest cost of receiving a request.
//!
//! A request decodes here exactly when it decodes as `opentelemetry-proto`'s
//! `ExportMetricsServiceRequest`: every field of those messages is known here with its wire
//! type, unknown fields are skipped the same way, strings are checked for UTF-8, and nesting
//! counts against prost's recursion limit at the same depths (`tests/fuzz` sends the receivers
//! thousands of mutated requests and checks that each is taken exactly when the typed decoding
//! takes it). Histograms, summaries, resources and scopes are `opentelemetry-proto`'s own types.

use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue as TypedKeyValue};
use opentelemetry_proto::tonic::metrics::v1::{number_data_point, Exemplar, ExponentialHistogram, Histogram, Summary};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::DecodeError;
use smallvec::SmallVec;

/// Attributes a number data point holds without an allocation: a step and a record time (what
/// [`crate::StepRecorder`] attaches; an SDK's points through a collector usually carry the step
/// alone); more spill to the heap. Two, not three: the data points of a metric are moved as its
/// list grows, and a third slot made that cost more than it saved (6% of `serve`'s CPU per point
/// on `scripts/bench-ingest.sh`'s load).
pub const INLINE_ATTRIBUTES: usize = 2;

/// `ExportMetricsServiceRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportMetricsServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_metrics: Vec<ResourceMetrics>,
}

/// `ResourceMetrics`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceMetrics {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_metrics: Vec<ScopeMetrics>,
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

/// `ScopeMetrics`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeMetrics {
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

/// `Metric`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub description: String,
    #[prost(string, tag = "3")]
    pub unit: String,
    #[prost(message, repeated, tag = "12")]
    pub metadata: Vec<TypedKeyValue>,
    #[prost(oneof = "Data", tags = "5, 7, 9, 10, 11")]
    pub data: Option<Data>,
}

/// `Metric.data`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Data {
    #[prost(message, tag = "5")]
    Gauge(Gauge),
    #[prost(message, tag = "7")]
    Sum(Sum),
    #[prost(message, tag = "9")]
    Histogram(Histogram),
    #[prost(message, tag = "10")]
    ExponentialHistogram(ExponentialHistogram),
    #[prost(message, tag = "11")]
    Summary(Summary),
}

/// `Gauge`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Gauge {
    #[prost(message, repeated, tag = "1")]
    pub data_points: Vec<NumberDataPoint>,
}

/// `Sum`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sum {
    #[prost(message, repeated, tag = "1")]
    pub data_points: Vec<NumberDataPoint>,
    /// `AggregationTemporality` (an enum is an int32 on the wire).
    #[prost(int32, tag = "2")]
    pub aggregation_temporality: i32,
    #[prost(bool, tag = "3")]
    pub is_monotonic: bool,
}

/// `NumberDataPoint`, its attributes in place (see the module docs).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NumberDataPoint {
    pub attributes: SmallVec<[KeyValue; INLINE_ATTRIBUTES]>,
    pub start_time_unix_nano: u64,
    pub time_unix_nano: u64,
    pub flags: u32,
    pub value: Option<number_data_point::Value>,
    /// Decoded so that a malformed exemplar refuses the request as the typed decoding does;
    /// not used.
    pub exemplars: Vec<Exemplar>,
}

impl prost::Message for NumberDataPoint {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if self.start_time_unix_nano != 0 {
            encoding::fixed64::encode(2, &self.start_time_unix_nano, buf);
        }
        if self.time_unix_nano != 0 {
            encoding::fixed64::encode(3, &self.time_unix_nano, buf);
        }
        match &self.value {
            Some(number_data_point::Value::AsDouble(v)) => encoding::double::encode(4, v, buf),
            Some(number_data_point::Value::AsInt(v)) => encoding::sfixed64::encode(6, v, buf),
            None => {}
        }
        encoding::message::encode_repeated(5, &self.exemplars, buf);
        for kv in &self.attributes {
            encoding::message::encode(7, kv, buf);
        }
        if self.flags != 0 {
            encoding::uint32::encode(8, &self.flags, buf);
        }
    }

    fn merge_field(&mut self, tag: u32, wire_type: WireType, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), DecodeError> {
        match tag {
            2 => encoding::fixed64::merge(wire_type, &mut self.start_time_unix_nano, buf, ctx),
            3 => encoding::fixed64::merge(wire_type, &mut self.time_unix_nano, buf, ctx),
            // The value is a oneof: the last of its fields on the wire wins.
            4 => {
                let mut v = 0.0;
                encoding::double::merge(wire_type, &mut v, buf, ctx)?;
                self.value = Some(number_data_point::Value::AsDouble(v));
                Ok(())
            }
            6 => {
                let mut v = 0;
                encoding::sfixed64::merge(wire_type, &mut v, buf, ctx)?;
                self.value = Some(number_data_point::Value::AsInt(v));
                Ok(())
            }
            5 => encoding::message::merge_repeated(wire_type, &mut self.exemplars, buf, ctx),
            7 => {
                // `message::merge_repeated` without its `Vec`: the same checks, in place.
                encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
                let mut kv = KeyValue::default();
                encoding::message::merge(wire_type, &mut kv, buf, ctx)?;
                self.attributes.push(kv);
                Ok(())
            }
            8 => encoding::uint32::merge(wire_type, &mut self.flags, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let fixed = |tag: u32, v: u64| if v != 0 { encoding::fixed64::encoded_len(tag, &v) } else { 0 };
        fixed(2, self.start_time_unix_nano)
            + fixed(3, self.time_unix_nano)
            + match &self.value {
                Some(number_data_point::Value::AsDouble(v)) => encoding::double::encoded_len(4, v),
                Some(number_data_point::Value::AsInt(v)) => encoding::sfixed64::encoded_len(6, v),
                None => 0,
            }
            + encoding::message::encoded_len_repeated(5, &self.exemplars)
            + self.attributes.iter().map(|kv| encoding::message::encoded_len(7, kv)).sum::<usize>()
            + if self.flags != 0 { encoding::uint32::encoded_len(8, &self.flags) } else { 0 }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// `KeyValue` whose key borrows the request's bytes (checked to be UTF-8 as it is decoded).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KeyValue {
    key: Bytes,
    pub value: Option<AnyValue>,
    /// `key_strindex` (OTLP profiles' string table); kept as the typed message keeps it.
    pub key_strindex: i32,
}

impl KeyValue {
    /// The key.
    pub fn key(&self) -> &str {
        // Checked when decoded (`merge_field`), so this never yields the empty fallback.
        std::str::from_utf8(&self.key).unwrap_or_default()
    }
}

impl prost::Message for KeyValue {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.key.is_empty() {
            encoding::bytes::encode(1, &self.key, buf);
        }
        if let Some(v) = &self.value {
            encoding::message::encode(2, v, buf);
        }
        if self.key_strindex != 0 {
            encoding::int32::encode(3, &self.key_strindex, buf);
        }
    }

    fn merge_field(&mut self, tag: u32, wire_type: WireType, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), DecodeError> {
        match tag {
            1 => {
                encoding::bytes::merge(wire_type, &mut self.key, buf, ctx.clone())?;
                if std::str::from_utf8(&self.key).is_err() {
                    self.key = Bytes::new();
                    return Err(not_utf8(ctx));
                }
                Ok(())
            }
            2 => encoding::message::merge(wire_type, self.value.get_or_insert_with(AnyValue::default), buf, ctx),
            3 => encoding::int32::merge(wire_type, &mut self.key_strindex, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        (if self.key.is_empty() { 0 } else { encoding::bytes::encoded_len(1, &self.key) })
            + self.value.as_ref().map_or(0, |v| encoding::message::encoded_len(2, v))
            + if self.key_strindex != 0 { encoding::int32::encoded_len(3, &self.key_strindex) } else { 0 }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// prost's own error for a string field that is not UTF-8, as the typed decoding reports it
/// (`DecodeError` has no public constructor): the same check run on two bytes that fail it.
#[cold]
fn not_utf8(ctx: DecodeContext) -> DecodeError {
    let mut scratch = String::new();
    encoding::string::merge(WireType::LengthDelimited, &mut scratch, &mut &[1u8, 0xff][..], ctx).expect_err("0xff is never UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{count_data_points, parse_protobuf, DecodeSettings};
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest as Typed;
    use opentelemetry_proto::tonic::common::v1::{any_value, ArrayValue};
    use opentelemetry_proto::tonic::metrics::v1::{self as typed, exemplar, HistogramDataPoint};
    use prost::Message;

    fn kv(key: &str, v: any_value::Value) -> TypedKeyValue {
        TypedKeyValue { key: key.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
    }

    fn point(attributes: Vec<TypedKeyValue>, value: number_data_point::Value, flags: u32) -> typed::NumberDataPoint {
        typed::NumberDataPoint { attributes, start_time_unix_nano: 5, time_unix_nano: 9, value: Some(value), flags, ..Default::default() }
    }

    /// A request with every field a gauge's or a sum's data point has, attributes in place and
    /// spilled, a histogram and a run end.
    fn request() -> Typed {
        use any_value::Value::*;
        let step = |s: i64| kv("step", IntValue(s));
        let many: Vec<TypedKeyValue> = (0..5).map(|i| kv(&format!("k{i}"), StringValue(format!("v{i}")))).collect();
        let mut odd = kv("é/ü", BoolValue(true));
        odd.key_strindex = 7;
        let mut with_exemplar = point(vec![step(3)], number_data_point::Value::AsDouble(0.5), 0);
        with_exemplar.exemplars = vec![typed::Exemplar {
            time_unix_nano: 4,
            value: Some(exemplar::Value::AsInt(2)),
            filtered_attributes: vec![kv("x", DoubleValue(1.5))],
            ..Default::default()
        }];
        let gauge = typed::Metric {
            name: "loss".into(),
            description: "d".into(),
            unit: "1".into(),
            data: Some(typed::metric::Data::Gauge(typed::Gauge {
                data_points: vec![
                    point(vec![], number_data_point::Value::AsDouble(1.0), 0),
                    point(vec![step(1), odd], number_data_point::Value::AsInt(-3), 0),
                    point(many, number_data_point::Value::AsDouble(f64::INFINITY), 1),
                    with_exemplar,
                    point(vec![kv("arr", ArrayValue(opentelemetry_proto::tonic::common::v1::ArrayValue { values: vec![AnyValue { value: Some(IntValue(1)) }] }))], number_data_point::Value::AsInt(0), 0),
                ],
            })),
            ..Default::default()
        };
        let sum = typed::Metric {
            name: "tokens".into(),
            data: Some(typed::metric::Data::Sum(typed::Sum {
                data_points: vec![point(vec![step(2)], number_data_point::Value::AsInt(10), 0)],
                aggregation_temporality: 2,
                is_monotonic: true,
            })),
            ..Default::default()
        };
        let hist = typed::Metric {
            name: "lat".into(),
            data: Some(typed::metric::Data::Histogram(typed::Histogram {
                data_points: vec![HistogramDataPoint { attributes: vec![step(2)], count: 1, bucket_counts: vec![1], ..Default::default() }],
                aggregation_temporality: 1,
            })),
            ..Default::default()
        };
        let end = typed::Metric {
            name: crate::decode::RUN_END_METRIC.into(),
            data: Some(typed::metric::Data::Gauge(typed::Gauge { data_points: vec![point(vec![kv("status", StringValue("FAILED".into()))], number_data_point::Value::AsInt(1), 0)] })),
            ..Default::default()
        };
        Typed {
            resource_metrics: vec![typed::ResourceMetrics {
                resource: Some(Resource { attributes: vec![kv("ml.run.id", StringValue("r".into()))], ..Default::default() }),
                scope_metrics: vec![typed::ScopeMetrics { metrics: vec![gauge, sum, hist, end], ..Default::default() }],
                ..Default::default()
            }],
        }
    }

    /// Whether both decodings take `bytes`, and the same data points when they do.
    fn agree(bytes: &[u8]) -> Result<(), String> {
        let typed = Typed::decode(bytes);
        let wire = parse_protobuf(Bytes::copy_from_slice(bytes), &DecodeSettings::default());
        match (typed, wire) {
            (Ok(t), Ok(w)) if count_data_points(&t) == w.data_points => Ok(()),
            (Err(_), Err(_)) => Ok(()),
            (t, w) => Err(format!("typed {:?} vs wire {:?}", t.map(|t| count_data_points(&t)), w.map(|w| w.data_points))),
        }
    }

    /// Encoded from the wire form, a request decodes as the typed request it came from.
    #[test]
    fn the_wire_form_keeps_every_field_of_the_typed_request() {
        let req = request();
        let wire = ExportMetricsServiceRequest::decode(Bytes::from(req.encode_to_vec())).expect("decodes");
        let Some(Data::Gauge(g)) = &wire.resource_metrics[0].scope_metrics[0].metrics[0].data else { panic!("not a gauge") };
        assert_eq!(g.data_points[1].attributes[1].key(), "é/ü");
        assert_eq!((g.data_points[2].attributes.len(), g.data_points[2].attributes.spilled()), (5, true));
        assert!(!g.data_points[1].attributes.spilled());
        assert_eq!(wire.encoded_len(), req.encoded_len());
        assert_eq!(Typed::decode(wire.encode_to_vec().as_slice()).expect("decodes"), req);
    }

    /// Every byte of a valid request changed to a few values, and every prefix of it: the wire
    /// form and the typed decoding take the same inputs and count the same data points.
    #[test]
    fn the_wire_form_takes_exactly_what_the_typed_decoding_takes() {
        let bytes = request().encode_to_vec();
        let mut mismatches = Vec::new();
        let mut refused = 0;
        for i in 0..bytes.len() {
            for v in [0x00, 0x01, 0x02, 0x05, 0x0a, 0x7f, 0x80, 0xc0, 0xff, bytes[i] ^ 0x07] {
                let mut b = bytes.clone();
                b[i] = v;
                if let Err(e) = agree(&b) {
                    mismatches.push(format!("byte {i} = {v:#x}: {e}"));
                }
                refused += usize::from(Typed::decode(b.as_slice()).is_err());
            }
            if let Err(e) = agree(&bytes[..i]) {
                mismatches.push(format!("prefix {i}: {e}"));
            }
        }
        assert!(mismatches.is_empty(), "{} mismatches, first: {:?}", mismatches.len(), &mismatches[..mismatches.len().min(5)]);
        // Both sides of the comparison were exercised.
        assert!(refused > 100 && refused < bytes.len() * 10, "{refused}");
    }

    /// Attribute values nested around prost's recursion limit: refused at the same depth.
    #[test]
    fn nesting_counts_against_the_recursion_limit_at_the_same_depth() {
        let mut outcomes = Vec::new();
        for depth in 80..100 {
            let mut v = AnyValue { value: Some(any_value::Value::IntValue(1)) };
            for _ in 0..depth / 2 {
                v = AnyValue { value: Some(any_value::Value::ArrayValue(ArrayValue { values: vec![v] })) };
            }
            let mut req = request();
            let Some(typed::metric::Data::Gauge(g)) = &mut req.resource_metrics[0].scope_metrics[0].metrics[0].data else { panic!() };
            g.data_points[0].attributes.push(TypedKeyValue { key: "deep".into(), value: Some(v), ..Default::default() });
            let bytes = req.encode_to_vec();
            assert_eq!(agree(&bytes), Ok(()), "depth {depth}");
            let readable = Typed::decode(bytes.as_slice()).is_ok();
            if !readable {
                // A typed request too deep to read back is counted as dropped, not lost.
                let parsed = crate::decode::parse(&req, &DecodeSettings::default());
                assert_eq!(parsed.dropped(), [(crate::stats::DropReason::InvalidValue, count_data_points(&req))], "depth {depth}");
                assert_eq!(parsed.data_points, count_data_points(&req));
            }
            outcomes.push(readable);
        }
        assert!(outcomes.contains(&true) && outcomes.contains(&false), "{outcomes:?}");
    }
}
