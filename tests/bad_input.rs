//! Bad input through a real `trainmetrics serve` (tests/common `Service`), read back with
//! TensorBoard's own loaders and a real MLflow server: 100 000 distinct series against
//! `max_series_per_run`, the `nonfinite` policies, steps out of int64 range and negative, times
//! 0 and `u64::MAX`, and an oversized message and a gzip bomb over gRPC.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::{history, json_f64, mlflow_uri, python, read_tb_both, root, runs_of_experiment, unique, Service};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use serde_json::Value;

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue { key: k.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}

/// One gauge metric of `(attributes, time ns, value)` points in run `run`.
fn request(run: &str, name: &str, points: Vec<(Vec<KeyValue>, u64, f64)>) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("ml.run.name", any_value::Value::StringValue(run.into()))],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: name.into(),
                    data: Some(metric::Data::Gauge(Gauge {
                        data_points: points
                            .into_iter()
                            .map(|(attributes, time_unix_nano, v)| NumberDataPoint {
                                attributes,
                                time_unix_nano,
                                value: Some(number_data_point::Value::AsDouble(v)),
                                ..Default::default()
                            })
                            .collect(),
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn step(s: i64) -> KeyValue {
    kv("step", any_value::Value::IntValue(s))
}

/// Sends requests over gRPC, in order, each acknowledged before the next.
fn send(svc: &Service, reqs: Vec<ExportMetricsServiceRequest>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut client = MetricsServiceClient::connect(format!("http://{}", svc.grpc)).await.expect("connect");
        for req in reqs {
            client.export(req).await.expect("export");
        }
    });
}

/// The shutdown report line of one exporter.
fn report_line<'a>(report: &'a str, exporter: &str) -> &'a str {
    report
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&format!("{exporter}: received")))
        .unwrap_or_else(|| panic!("no {exporter} line in the report: {report}"))
}

/// (received, delivered, dropped) of a report line, checked to add up with nothing pending.
fn counts(line: &str) -> (u64, u64, u64) {
    let num = |after: &str| -> u64 {
        line.split(after)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {after:?} in {line:?}"))
    };
    let (r, d, x) = (num("received "), num("delivered "), num("dropped "));
    assert_eq!(r, d + x, "received = delivered + dropped: {line}");
    assert!(!line.contains("pending"), "{line}");
    (r, d, x)
}

/// The MLflow run of experiment `exp` (exactly one).
fn only_run(uri: &str, exp: &str) -> String {
    let runs = runs_of_experiment(uri, exp);
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs[0]["info"]["run_id"].as_str().expect("run id").to_string()
}

fn mlflow_sets(uri: &str, exp: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        format!("exporters.mlflow.tracking_uri={uri}"),
        format!("exporters.mlflow.experiment={exp}"),
        "exporters.mlflow.every_steps=1".to_string(),
        "exporters.mlflow.linger=200ms".to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn series_beyond_max_series_per_run_are_dropped_as_series_limit() {
    const SERIES: i64 = 100_000;
    const LIMIT: i64 = 10_000;
    let logdir = tempfile::tempdir().expect("tempdir");
    let svc = Service::start(logdir.path(), &[format!("exporters.tensorboard.max_series_per_run={LIMIT}")]);
    // One point per series, 10 requests of 10 000; the first 10 000 series claim the slots.
    let reqs = (0..10)
        .map(|chunk| {
            let points = (chunk * 10_000..(chunk + 1) * 10_000)
                .map(|i| (vec![step(1), kv("k", any_value::Value::IntValue(i))], 1_790_000_000_000_000_000, i as f64))
                .collect();
            request("many-series", "m", points)
        })
        .collect();
    send(&svc, reqs);
    let report = svc.stop();
    let line = report_line(&report, "tensorboard");
    assert_eq!(counts(line), (SERIES as u64, LIMIT as u64, (SERIES - LIMIT) as u64), "{line}");
    assert!(line.contains(&format!("(series_limit={})", SERIES - LIMIT)), "{line}");
    let tb = read_tb_both(logdir.path());
    let run = &tb.scalars["many-series"];
    let expected: BTreeMap<String, Vec<(i64, f64)>> = (0..LIMIT).map(|i| (format!("m/k={i}"), vec![(1, i as f64)])).collect();
    assert_eq!(run.len(), LIMIT as usize);
    assert!(*run == expected, "TensorBoard holds exactly the first {LIMIT} series");
}

/// Steps 1..=4 carry NaN, +Inf, -Inf, 1.5 for metric `v`.
fn nonfinite_request(run: &str) -> ExportMetricsServiceRequest {
    let t = 1_790_000_000_000_000_000;
    request(
        run,
        "v",
        vec![(vec![step(1)], t, f64::NAN), (vec![step(2)], t, f64::INFINITY), (vec![step(3)], t, f64::NEG_INFINITY), (vec![step(4)], t, 1.5)],
    )
}

/// (step, value as `{:?}`) of one series.
type Points = Vec<(i64, String)>;

/// Runs one policy through both exporters; returns (TensorBoard points, MLflow points, report).
fn with_policy(policy: &str) -> (Points, Points, String) {
    let logdir = tempfile::tempdir().expect("tempdir");
    let (uri, exp) = (mlflow_uri(), unique("nonfinite"));
    let policy_sets = [format!("exporters.tensorboard.nonfinite={policy}"), format!("exporters.mlflow.nonfinite={policy}")];
    let sets = mlflow_sets(&uri, &exp, &policy_sets.iter().map(String::as_str).collect::<Vec<_>>());
    let svc = Service::start(logdir.path(), &sets);
    send(&svc, vec![nonfinite_request("nf")]);
    let report = svc.stop();
    let tb = read_tb_both(logdir.path());
    let tb_points = tb.scalars["nf"]["v"].iter().map(|(s, v)| (*s, format!("{v:?}"))).collect();
    let id = only_run(&uri, &exp);
    let mut ml: Points = history(&uri, &id, "v").iter().map(|(s, v, _)| (*s, format!("{v:?}"))).collect();
    ml.sort();
    (tb_points, ml, report)
}

fn pts(v: &[(i64, &str)]) -> Points {
    v.iter().map(|(s, x)| (*s, x.to_string())).collect()
}

#[test]
fn nonfinite_keep_delivers_nan_and_infinities_as_they_are() {
    let (tb, ml, report) = with_policy("keep");
    assert_eq!(tb, pts(&[(1, "NaN"), (2, "inf"), (3, "-inf"), (4, "1.5")]));
    // MLflow's SQL store returns ±Inf as ±f64::MAX (README "Values").
    assert_eq!(ml, pts(&[(1, "NaN"), (2, "1.7976931348623157e308"), (3, "-1.7976931348623157e308"), (4, "1.5")]));
    for e in ["tensorboard", "mlflow"] {
        assert_eq!(counts(report_line(&report, e)), (4, 4, 0), "{report}");
    }
}

#[test]
fn nonfinite_drop_counts_non_finite() {
    let (tb, ml, report) = with_policy("drop");
    assert_eq!(tb, pts(&[(4, "1.5")]));
    assert_eq!(ml, pts(&[(4, "1.5")]));
    for e in ["tensorboard", "mlflow"] {
        let line = report_line(&report, e);
        assert_eq!(counts(line), (4, 1, 3), "{line}");
        assert!(line.contains("(non_finite=3)"), "{line}");
    }
}

#[test]
fn nonfinite_clamp_maps_infinities_to_the_largest_finite_f64_and_drops_nan() {
    let (tb, ml, report) = with_policy("clamp");
    // TensorBoard stores float32: its own largest finite value (decode::NonFinitePolicy).
    assert_eq!(tb, pts(&[(2, "3.4028234663852886e38"), (3, "-3.4028234663852886e38"), (4, "1.5")]));
    assert_eq!(ml, pts(&[(2, "1.7976931348623157e308"), (3, "-1.7976931348623157e308"), (4, "1.5")]));
    for e in ["tensorboard", "mlflow"] {
        let line = report_line(&report, e);
        assert_eq!(counts(line), (4, 3, 1), "{line}");
        assert!(line.contains("(non_finite=1)") && line.contains("nonfinite_clamped 2"), "{line}");
    }
}

/// TensorBoard scalars with wall times, per run and tag, from both loaders (they must agree).
fn tb_wall_times(logdir: &Path) -> BTreeMap<String, BTreeMap<String, Vec<(i64, f64)>>> {
    let read = |loader: &str| {
        let out = Command::new(python())
            .arg(root().join("tests/support/read_tb.py"))
            .arg("--logdir")
            .arg(logdir)
            .args(["--loader", loader])
            .output()
            .expect("missing component: could not run tests/support/read_tb.py");
        assert!(out.status.success(), "read_tb.py: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let mut m: BTreeMap<String, BTreeMap<String, Vec<(i64, f64)>>> = BTreeMap::new();
        for (run, tags) in v["scalars"].as_object().into_iter().flatten() {
            for (tag, points) in tags.as_object().into_iter().flatten() {
                let walls = points.as_array().into_iter().flatten().map(|p| (p[0].as_i64().expect("step"), json_f64(&p[2]))).collect();
                m.entry(run.clone()).or_default().insert(tag.clone(), walls);
            }
        }
        m
    };
    let py = read("python");
    assert_eq!(format!("{py:?}"), format!("{:?}", read("rust")), "the loaders disagree on wall times");
    py
}

#[test]
fn steps_out_of_range_are_invalid_and_times_0_and_u64_max_follow_the_rule() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let (uri, exp) = (mlflow_uri(), unique("steps-times"));
    let svc = Service::start(logdir.path(), &mlflow_sets(&uri, &exp, &[]));
    let t = 1_790_000_000_000_000_000u64;
    let str_step = |s: &str| kv("step", any_value::Value::StringValue(s.into()));
    let req = request(
        "st",
        "s",
        vec![
            (vec![kv("step", any_value::Value::DoubleValue(1e30))], t, 1.0),
            (vec![str_step("99999999999999999999")], t, 2.0),
            (vec![str_step("-99999999999999999999")], t, 3.0),
            (vec![step(-3)], t, 4.0),
            (vec![step(5)], 0, 5.0),
            (vec![step(6)], u64::MAX, 6.0),
            (vec![str_step("9223372036854775807")], t, 7.0),
        ],
    );
    let before_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    send(&svc, vec![req]);
    let report = svc.stop();
    let after_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    for e in ["tensorboard", "mlflow"] {
        let line = report_line(&report, e);
        assert_eq!(counts(line), (7, 4, 3), "{line}");
        assert!(line.contains("(invalid_step=3)"), "{line}");
    }
    // TensorBoard: steps as given (negative included), wall time in s.
    let walls = tb_wall_times(logdir.path());
    let s = &walls["st"]["s"];
    let steps: Vec<i64> = s.iter().map(|p| p.0).collect();
    assert_eq!(steps, vec![-3, 5, 6, i64::MAX]);
    assert_eq!(s[0].1, 1_790_000_000.0);
    let received_s = s[1].1;
    assert!(received_s * 1000.0 >= (before_ms - 1000) as f64 && received_s * 1000.0 <= (after_ms + 1000) as f64, "time 0 → receive time, got {received_s}");
    assert_eq!(s[2].1, u64::MAX as f64 / 1e9, "u64::MAX ns = 18446744073.709553 s (year 2554)");
    let tb = read_tb_both(logdir.path());
    assert_eq!(tb.scalars["st"]["s"], vec![(-3, 4.0), (5, 5.0), (6, 6.0), (i64::MAX, 7.0)]);
    // MLflow: the same steps and values, timestamps in ms.
    let id = only_run(&uri, &exp);
    let mut h = history(&uri, &id, "s");
    h.sort_by_key(|m| m.0);
    let got: Vec<(i64, f64)> = h.iter().map(|m| (m.0, m.1)).collect();
    assert_eq!(got, vec![(-3, 4.0), (5, 5.0), (6, 6.0), (i64::MAX, 7.0)]);
    assert_eq!(h[0].2, 1_790_000_000_000);
    assert!(h[1].2 >= before_ms - 1000 && h[1].2 <= after_ms + 1000, "time 0 → receive time, got {}", h[1].2);
    assert_eq!(h[2].2, (u64::MAX / 1_000_000) as i64, "u64::MAX ns = 18446744073709 ms");
}

/// Sends raw bytes as the gRPC message (what no SDK would send), optionally gzip-compressed by
/// the client; returns the status code of the answer (`Ok` when accepted).
fn grpc_raw(svc: &Service, message: Vec<u8>, gzip: bool) -> tonic::Code {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", svc.grpc)).expect("uri").connect().await.expect("connect");
        let mut grpc = tonic::client::Grpc::new(channel);
        if gzip {
            grpc = grpc.send_compressed(tonic::codec::CompressionEncoding::Gzip);
        }
        grpc.ready().await.expect("ready");
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export");
        match grpc.unary(tonic::Request::new(message), path, common::RawCodec).await {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        }
    })
}

#[test]
fn an_oversized_grpc_message_and_a_gzip_bomb_are_refused_and_the_service_keeps_serving() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let svc = Service::start(logdir.path(), &["receivers.otlp.protocols.grpc.max_recv_msg_size_mib=1".to_string()]);
    // 2 MiB of a valid request (one long attribute value) against a 1 MiB limit.
    let big = request("big", "x", vec![(vec![step(1), kv("pad", any_value::Value::StringValue("p".repeat(2 << 20)))], 1, 1.0)]);
    let oversized = grpc_raw(&svc, big.encode_to_vec(), false);
    // A bomb: 64 MiB of zeros gzip to ~64 KiB on the wire; decompression stops at the limit.
    let bomb = grpc_raw(&svc, vec![0u8; 64 << 20], true);
    // Both RESOURCE_EXHAUSTED without RetryInfo: the collector's OTLP exporter does not retry
    // them (its `shouldRetry`); tonic's own OUT_OF_RANGE for the first would be retried.
    assert_eq!(oversized, tonic::Code::ResourceExhausted);
    assert_eq!(bomb, tonic::Code::ResourceExhausted);
    let ok = request("after", "x", vec![(vec![step(1)], 1_790_000_000_000_000_000, 7.0)]);
    assert_eq!(grpc_raw(&svc, ok.encode_to_vec(), true), tonic::Code::Ok);
    let report = svc.stop();
    assert_eq!(counts(report_line(&report, "tensorboard")), (1, 1, 0), "{report}");
    let tb = read_tb_both(logdir.path());
    assert_eq!(tb.scalars.keys().collect::<Vec<_>>(), vec!["after"]);
    assert_eq!(tb.scalars["after"]["x"], vec![(1, 7.0)]);
}


/// The same name as a gauge and a histogram: the series keeps the kind of its first point, so
/// TensorBoard's loaders still read the run (a histogram under a scalar tag made them fail).
#[test]
fn a_name_used_by_a_gauge_and_a_histogram_keeps_its_first_kind() {
    use opentelemetry_proto::tonic::metrics::v1::{Histogram, HistogramDataPoint};
    let logdir = tempfile::tempdir().expect("tempdir");
    let svc = Service::start(logdir.path(), &[]);
    let t = 1_790_000_000_000_000_000;
    let mut req = request("kinds", "loss", vec![(vec![step(1)], t, 0.5), (vec![step(2)], t, 0.25)]);
    req.resource_metrics[0].scope_metrics[0].metrics.push(Metric {
        name: "loss".into(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points: vec![HistogramDataPoint {
                attributes: vec![step(3)],
                time_unix_nano: t,
                count: 2,
                sum: Some(1.0),
                bucket_counts: vec![1, 1],
                explicit_bounds: vec![0.5],
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    });
    send(&svc, vec![req]);
    let report = svc.stop();
    let line = report_line(&report, "tensorboard");
    assert_eq!(counts(line), (3, 2, 1), "{line}");
    assert!(line.contains("(invalid_value=1)"), "{line}");
    let tb = read_tb_both(logdir.path());
    assert_eq!(tb.scalars["kinds"]["loss"], vec![(1, 0.5), (2, 0.25)]);
    assert!(tb.histograms.get("kinds").is_none_or(|h| h.is_empty()), "{:?}", tb.histograms);
}

/// An OTLP/HTTP body over the limit before decompression is 413 (the bomb after decompression is
/// in tests/serve.rs), and the service keeps serving.
#[test]
fn an_oversized_http_body_is_413_and_the_service_keeps_serving() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let svc = Service::start(logdir.path(), &["receivers.otlp.protocols.http.max_request_body_size_mib=1".to_string()]);
    // A plain HTTP/1.1 client: the server answers 413 as soon as it sees the length and may
    // close before the body is sent, which a full client reports as a broken pipe.
    let post = |body: Vec<u8>| -> u16 {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&svc.http).expect("connect");
        let head = format!(
            "POST /v1/metrics HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            svc.http,
            body.len()
        );
        c.write_all(head.as_bytes()).expect("write head");
        let _ = c.write_all(&body);
        let mut answer = Vec::new();
        let _ = c.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no HTTP answer: {text:?}"))
    };
    let big = request("big", "x", vec![(vec![step(1), kv("pad", any_value::Value::StringValue("p".repeat(2 << 20)))], 1, 1.0)]);
    assert_eq!(post(big.encode_to_vec()), 413);
    let ok = request("after", "x", vec![(vec![step(1)], 1_790_000_000_000_000_000, 7.0)]);
    assert_eq!(post(ok.encode_to_vec()), 200);
    let report = svc.stop();
    assert_eq!(counts(report_line(&report, "tensorboard")), (1, 1, 0), "{report}");
    assert_eq!(read_tb_both(logdir.path()).scalars["after"]["x"], vec![(1, 7.0)]);
}
