//! `trainmetrics serve` as a process: OTLP over HTTP (JSON and protobuf, gzip) and gRPC (gzip),
//! the official OTLP JSON example, malformed payloads, a full queue answering 503/UNAVAILABLE,
//! SIGTERM delivering what was acknowledged, and a restart continuing the same MLflow run.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::{history, mlflow_uri, otlp, read_tb_both, runs_of_experiment, unique, Service};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use prost::Message;

fn post(url: &str, content_type: &str, encoding: Option<&str>, body: Vec<u8>) -> (u16, String, Option<String>) {
    let agent = ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).build());
    let mut req = agent.post(url).header("Content-Type", content_type);
    if let Some(e) = encoding {
        req = req.header("Content-Encoding", e);
    }
    let mut resp = req.send(body).expect("POST");
    let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default(), retry_after)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// `examples/metrics.json` of opentelemetry-proto, as shipped inside the pinned
/// opentelemetry-proto crate (read from cargo's registry, not copied into this repository).
fn official_example() -> std::path::PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .expect("CARGO_HOME or HOME");
    let src = home.join("registry/src");
    std::fs::read_dir(&src)
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("opentelemetry-proto-0.33.1/src/proto/opentelemetry-proto/examples/metrics.json"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("missing component: opentelemetry-proto 0.33.1's examples/metrics.json under {}", src.display()))
}

fn run_res(name: &str) -> Vec<opentelemetry_proto::tonic::common::v1::KeyValue> {
    vec![otlp::s("ml.run.name", name), otlp::s("ml.run.id", name)]
}

#[test]
fn the_official_json_example_and_protobuf_over_http_are_delivered_and_garbage_is_400() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let svc = Service::start(logdir.path(), &[]);
    let url = format!("http://{}/v1/metrics", svc.http);
    let example = std::fs::read(official_example()).expect("example");
    let (status, body, _) = post(&url, "application/json", None, example);
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("rejected"), "every data point of the example is usable: {body}");
    let req = otlp::request(vec![otlp::resource(run_res("http-run"), &[("x", Some(1), 1.0), ("x", Some(2), 2.0)])]);
    let (status, body, _) = post(&url, "application/x-protobuf", Some("gzip"), gzip(&req.encode_to_vec()));
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = post(&url, "application/x-protobuf", None, b"\x0a\xff\xff\xff".to_vec());
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("cannot decode"), "{body}");
    let report = svc.stop();
    // The example's 4 points and 2 of ours.
    assert!(report.contains("tensorboard: received 6 delivered 6 dropped 0"), "{report}");

    // A bomb: 64 MiB of zeros gzip to ~64 KiB; the limit is 1 MiB.
    let svc = Service::start(logdir.path(), &["receivers.otlp.protocols.http.max_request_body_size_mib=1".into()]);
    let url = format!("http://{}/v1/metrics", svc.http);
    let (status, body, _) = post(&url, "application/x-protobuf", Some("gzip"), gzip(&vec![0u8; 64 << 20]));
    assert_eq!(status, 413, "{body}");
    let after = otlp::request(vec![otlp::resource(run_res("after-bomb"), &[("x", Some(1), 7.0)])]);
    let (status, _, _) = post(&url, "application/x-protobuf", None, after.encode_to_vec());
    assert_eq!(status, 200, "the service keeps serving after bad input");
    let report = svc.stop();
    assert!(report.contains("tensorboard: received 1 delivered 1 dropped 0"), "{report}");

    let tb = read_tb_both(logdir.path());
    assert_eq!(tb.scalars["http-run"]["x"], vec![(1, 1.0), (2, 2.0)]);
    assert_eq!(tb.scalars["after-bomb"]["x"], vec![(1, 7.0)]);
    let example_run = &tb.scalars["my.service"];
    assert_eq!(example_run["my.counter/my.counter.attr=some value"], vec![(0, 5.0)]);
    assert_eq!(example_run["my.gauge/my.gauge.attr=some value"], vec![(0, 10.0)]);
    assert!(tb.histograms["my.service"].contains_key("my.exponential.histogram/my.exponential.histogram.attr=some value"));
}

#[test]
fn grpc_with_gzip_out_of_order_batches_and_a_restart_continue_one_run() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let exp = unique("serve");
    let uri = mlflow_uri();
    let mlflow = [
        format!("exporters.mlflow.tracking_uri={uri}"),
        format!("exporters.mlflow.experiment={exp}"),
        "exporters.mlflow.every_steps=1".to_string(),
        "exporters.mlflow.linger=200ms".to_string(),
        "exporters.mlflow.reorder_window=1s".to_string(),
    ];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    for round in 0..2 {
        let svc = Service::start(logdir.path(), &mlflow);
        rt.block_on(async {
            let mut client = MetricsServiceClient::connect(format!("http://{}", svc.grpc))
                .await
                .expect("connect")
                .send_compressed(tonic::codec::CompressionEncoding::Gzip);
            // Batches out of step order, as a collector's parallel consumers deliver them.
            let base = round * 10;
            for steps in [[5, 6], [1, 2], [3, 4], [9, 10], [7, 8]] {
                let pts: Vec<(&str, Option<i64>, f64)> =
                    steps.iter().map(|s| ("loss", Some(base + s), (base + s) as f64)).collect();
                let req = otlp::request(vec![otlp::resource(run_res("grpc-run"), &pts)]);
                let resp = client.export(req).await.expect("export").into_inner();
                assert_eq!(resp.partial_success, None);
            }
        });
        let report = svc.stop();
        assert!(report.contains("tensorboard: received 10 delivered 10 dropped 0"), "{report}");
        assert!(report.contains("mlflow: received 10 delivered 10 dropped 0"), "{report}");
    }
    let tb = read_tb_both(logdir.path());
    assert_eq!(tb.scalars["grpc-run"]["loss"], (1..=20).map(|s| (s, s as f64)).collect::<Vec<_>>());
    let runs = runs_of_experiment(&uri, &exp);
    assert_eq!(runs.len(), 1, "a restarted service continues the same MLflow run");
    let id = runs[0]["info"]["run_id"].as_str().expect("id");
    let steps: Vec<i64> = history(&uri, id, "loss").iter().map(|m| m.0).collect();
    let mut sorted = steps.clone();
    sorted.sort();
    assert_eq!(sorted, (1..=20).collect::<Vec<_>>());
    assert_eq!(runs[0]["info"]["status"], "RUNNING", "service shutdown leaves runs running");
}

/// A service whose MLflow exporter is stuck: its tracking URI accepts connections and never
/// answers (the returned listener; keep it alive), so the exporter's queue fills. `queue` is
/// the `sending_queue` override under test.
fn with_stuck_mlflow(logdir: &std::path::Path, queue: &str) -> (Service, std::net::TcpListener) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hang = format!("http://{}", listener.local_addr().expect("addr"));
    let svc = Service::start(
        logdir,
        &[
            format!("exporters.mlflow.tracking_uri={hang}"),
            "exporters.mlflow.every_steps=1".into(),
            "exporters.mlflow.linger=10ms".into(),
            "exporters.mlflow.timeout=30s".into(),
            queue.into(),
        ],
    );
    (svc, listener)
}

#[test]
fn a_full_queue_answers_503_with_retry_after_and_unavailable() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let (svc, listener) = with_stuck_mlflow(logdir.path(), "exporters.mlflow.sending_queue.queue_size=1");
    let url = format!("http://{}/v1/metrics", svc.http);
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for step in 1..=20 {
        let req = otlp::request(vec![otlp::resource(run_res("busy"), &[("x", Some(step), 1.0)])]);
        let (status, _, ra) = post(&url, "application/x-protobuf", None, req.encode_to_vec());
        statuses.push(status);
        retry_after = retry_after.or(ra);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(statuses.contains(&503), "{statuses:?}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let code = rt.block_on(async {
        let mut client = MetricsServiceClient::connect(format!("http://{}", svc.grpc)).await.expect("connect");
        let req = otlp::request(vec![otlp::resource(run_res("busy"), &[("x", Some(99), 1.0)])]);
        client.export(req).await.err().map(|s| s.code())
    });
    assert_eq!(code, Some(tonic::Code::Unavailable));
    drop(listener);
}

#[test]
fn sigterm_under_load_delivers_or_reports_every_acknowledged_point() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let svc = Service::start(logdir.path(), &[]);
    let url = format!("http://{}/v1/metrics", svc.http);
    let sender = std::thread::spawn(move || {
        let mut acked = 0u64;
        for batch in 0..100_000i64 {
            let pts: Vec<(&str, Option<i64>, f64)> = (0..10).map(|i| ("x", Some(batch * 10 + i), i as f64)).collect();
            let req = otlp::request(vec![otlp::resource(run_res("load"), &pts)]);
            let agent = ureq::Agent::new_with_config(
                ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(2))).build(),
            );
            match agent.post(&url).header("Content-Type", "application/x-protobuf").send(req.encode_to_vec()) {
                Ok(r) if r.status().as_u16() == 200 => acked += 10,
                Ok(_) => {}
                Err(_) => break, // the service stopped listening
            }
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(1500));
    let report = svc.stop();
    let acked = sender.join().expect("sender");
    assert!(acked > 0);
    let line = report.lines().find(|l| l.trim_start().starts_with("tensorboard:")).expect("report line");
    let num = |k: &str| -> u64 { line.split_whitespace().skip_while(|w| *w != k).nth(1).and_then(|v| v.parse().ok()).unwrap_or(0) };
    assert_eq!(num("received"), acked, "every acknowledged point reached the exporter: {line}");
    assert_eq!(num("delivered") + num("dropped"), acked, "{line}");
    let tb = common::read_tb(logdir.path(), common::Loader::Rust);
    assert_eq!(tb.scalars["load"]["x"].len() as u64, num("delivered"), "{line}");
}

#[test]
fn invalid_points_get_a_partial_success_and_the_rest_lands() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let svc = Service::start(logdir.path(), &[]);
    let mut bad = otlp::resource(run_res("partial"), &[("x", Some(1), 1.0), ("x", Some(2), 2.0)]);
    if let Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Gauge(g)) = &mut bad.scope_metrics[0].metrics[1].data {
        g.data_points[0].attributes = vec![otlp::s("step", "two")];
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let partial = rt.block_on(async {
        let mut client = MetricsServiceClient::connect(format!("http://{}", svc.grpc)).await.expect("connect");
        client.export(otlp::request(vec![bad])).await.expect("export").into_inner().partial_success
    });
    let partial = partial.expect("a partial success");
    assert_eq!(partial.rejected_data_points, 1);
    assert!(partial.error_message.contains("invalid_step") && partial.error_message.contains("two"), "{}", partial.error_message);
    let report = svc.stop();
    assert!(report.contains("tensorboard: received 2 delivered 1 dropped 1 (invalid_step=1)"), "{report}");
    let tb = common::read_tb(logdir.path(), common::Loader::Rust);
    assert_eq!(tb.scalars["partial"]["x"], vec![(1, 1.0)]);
}


#[test]
fn a_malformed_grpc_message_is_invalid_argument_and_the_service_keeps_serving() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let svc = Service::start(logdir.path(), &[]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (code, ok) = rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", svc.grpc))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut raw = tonic::client::Grpc::new(channel.clone());
        raw.ready().await.expect("ready");
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        );
        let bad = raw.unary(tonic::Request::new(b"\x0a\xff\xff\xff\xff".to_vec()), path, common::RawCodec).await;
        let code = bad.err().map(|s| (s.code(), s.message().to_string()));
        let mut client = MetricsServiceClient::new(channel);
        let req = otlp::request(vec![otlp::resource(run_res("after-garbage"), &[("x", Some(1), 3.0)])]);
        (code, client.export(req).await.is_ok())
    });
    let (code, message) = code.expect("an error status");
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    assert!(message.contains("cannot decode"), "{message}");
    assert!(ok, "the service keeps serving");
    let report = svc.stop();
    assert!(report.contains("tensorboard: received 1 delivered 1 dropped 0"), "{report}");
}

/// OTLP/JSON as the proto3 JSON mapping writes it: non-finite doubles are the strings "NaN",
/// "Infinity", "-Infinity" (they arrive as sent), and a malformed field inside one metric (a
/// negative `timeUnixNano`) costs that metric's data points, answered as rejected in
/// `partial_success`, never a silent 200; the other metrics and resources land.
#[test]
fn json_non_finite_strings_arrive_and_a_malformed_metric_is_rejected_not_lost() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let svc = Service::start(logdir.path(), &[]);
    let url = format!("http://{}/v1/metrics", svc.http);
    let dp = |step: i64, v: serde_json::Value| {
        serde_json::json!({"asDouble": v, "timeUnixNano": "1795981000000000000",
            "attributes": [{"key": "step", "value": {"intValue": step.to_string()}}]})
    };
    let mut bad = dp(2, serde_json::json!(2.5));
    bad["timeUnixNano"] = serde_json::json!("-5");
    let run = |name: &str| serde_json::json!({"attributes": [{"key": "ml.run.name", "value": {"stringValue": name}}]});
    let body = serde_json::json!({"resourceMetrics": [
        {"resource": run("json"), "scopeMetrics": [{"metrics": [
            {"name": "a", "gauge": {"dataPoints": [dp(1, 1.0.into()), bad, dp(3, 3.0.into())]}},
            {"name": "b", "gauge": {"dataPoints": [dp(1, "NaN".into()), dp(2, "Infinity".into()), dp(3, "-Infinity".into()), dp(4, 4.0.into())]}}]}]},
        {"resource": run("json-other"), "scopeMetrics": [{"metrics": [{"name": "c", "gauge": {"dataPoints": [dp(1, 7.0.into())]}}]}]}]});
    let (status, answer, _) = post(&url, "application/json", None, body.to_string().into_bytes());
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("JSON answer");
    let partial = &answer["partialSuccess"];
    assert_eq!(partial["rejectedDataPoints"].as_str().map(str::to_string).or(partial["rejectedDataPoints"].as_i64().map(|n| n.to_string())), Some("3".to_string()), "{answer}");
    assert!(partial["errorMessage"].as_str().is_some_and(|m| m.contains("could not be read")), "{answer}");
    let report = svc.stop();
    assert!(report.contains("tensorboard: received 5 delivered 5 dropped 0"), "{report}");
    let tb = common::read_tb(logdir.path(), common::Loader::Rust);
    let b: Vec<(i64, String)> = tb.scalars["json"]["b"].iter().map(|(s, v)| (*s, format!("{v:?}"))).collect();
    assert_eq!(b, vec![(1, "NaN".into()), (2, "inf".into()), (3, "-inf".into()), (4, "4.0".into())]);
    assert_eq!(tb.scalars["json-other"]["c"], vec![(1, 7.0)]);
    assert!(!tb.scalars["json"].contains_key("a"), "the malformed metric is rejected whole");
}

/// A client that opens OTLP/HTTP connections and never finishes its headers does not keep them:
/// the service closes each after its header read timeout (10 s), and serves others meanwhile.
#[test]
fn stalled_http_connections_are_closed_and_others_are_served() {
    use std::io::{Read, Write};
    let logdir = tempfile::tempdir().expect("tempdir");
    let svc = Service::start(logdir.path(), &[]);
    let mut stalled: Vec<std::net::TcpStream> = (0..20)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(&svc.http).expect("connect");
            c.write_all(b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\n").expect("partial headers");
            c
        })
        .collect();
    let req = otlp::request(vec![otlp::resource(run_res("beside-stalled"), &[("x", Some(1), 1.0)])]);
    let (status, body, _) = post(&format!("http://{}/v1/metrics", svc.http), "application/x-protobuf", None, req.encode_to_vec());
    assert_eq!(status, 200, "{body}");
    for c in &mut stalled {
        // A generous bound: the service closes after 10 s; a read that times out means it never did.
        c.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        let mut buf = Vec::new();
        let closed = c.read_to_end(&mut buf).is_ok();
        assert!(closed, "a stalled connection was still open after 60 s");
    }
    let report = svc.stop();
    assert!(report.contains("tensorboard: received 1 delivered 1 dropped 0"), "{report}");
}

/// The queue is bounded in bytes too (`sending_queue.max_queued_mib`): with the MLflow exporter
/// stuck, large requests fill 1 MiB long before `queue_size` (1000) requests, and the receiver
/// answers 503 so the sender retries instead of the service holding them all in memory.
#[test]
fn a_queue_over_its_byte_budget_answers_503() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let (svc, listener) = with_stuck_mlflow(logdir.path(), "exporters.mlflow.sending_queue.max_queued_mib=1");
    let url = format!("http://{}/v1/metrics", svc.http);
    let big = "x".repeat(300 << 10);
    let mut statuses = Vec::new();
    for step in 1..=12 {
        let mut res = run_res("bytes");
        res.push(otlp::s("padding", &big));
        let req = otlp::request(vec![otlp::resource(res, &[("x", Some(step), 1.0)])]);
        let (status, _, _) = post(&url, "application/x-protobuf", None, req.encode_to_vec());
        statuses.push(status);
        std::thread::sleep(Duration::from_millis(50));
    }
    let accepted = statuses.iter().filter(|s| **s == 200).count();
    assert!(statuses.contains(&503), "{statuses:?}");
    // 1 MiB holds at most three 300 KiB requests beside the one being exported.
    assert!((2..=5).contains(&accepted), "{statuses:?}");
    drop(listener);
}
