//! Self-telemetry of `trainmetrics serve`: `/metrics` parsed as the Prometheus/OpenMetrics text
//! format (strictly, below) with exact counts after known points went through OTLP, and
//! `/health` answering 200 while serving and 503 during shutdown.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{otlp, read_tb, Loader, Service};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::metric;
use prost::Message;
use serde_json::Value;

/// Samples by name and sorted labels.
type Samples = BTreeMap<(String, Vec<(String, String)>), f64>;

fn metric_name_ok(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':') && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// Parses the OpenMetrics text format strictly: `# HELP`/`# TYPE`/`# UNIT` lines, samples
/// `name{label="value",…} number`, every sample's family declared by a `# TYPE` before it,
/// counter samples ending `_total`, no duplicate sample, and a final `# EOF`. Panics on any
/// other line.
fn parse_exposition(text: &str) -> Samples {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Samples::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the exposition must end with # EOF:\n{text}");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            assert!(metric_name_ok(name), "bad metric name in {line:?}");
            match kind {
                "TYPE" => {
                    let t = parts.next().unwrap_or("");
                    assert!(["counter", "gauge", "histogram", "summary", "info", "unknown", "stateset", "gaugehistogram"].contains(&t), "{line:?}");
                    assert!(types.insert(name.to_string(), t.to_string()).is_none(), "family declared twice: {line:?}");
                }
                "HELP" | "UNIT" => {}
                _ => panic!("unknown comment line {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let mut labels = Vec::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (k, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad label in {line:?}"));
                    assert!(metric_name_ok(k) && !k.contains(':'), "bad label name {k:?} in {line:?}");
                    let end = after.find('"').unwrap_or_else(|| panic!("unterminated label value in {line:?}"));
                    assert!(!after[..end].contains('\\'), "escapes not expected in {line:?}");
                    labels.push((k.to_string(), after[..end].to_string()));
                    rest = &after[end + 1..];
                    if let Some(r) = rest.strip_prefix(',') {
                        rest = r;
                    } else {
                        assert!(rest.is_empty(), "junk after a label in {line:?}");
                    }
                }
                (name, labels)
            }
        };
        assert!(metric_name_ok(name), "bad metric name in {line:?}");
        let family = types
            .keys()
            .find(|f| name == f.as_str() || (types[f.as_str()] == "counter" && name == format!("{f}_total")))
            .unwrap_or_else(|| panic!("sample of an undeclared family: {line:?}"));
        if types[family] == "counter" {
            assert!(name.ends_with("_total"), "counter sample without _total: {line:?}");
            assert!(value >= 0.0, "negative counter: {line:?}");
        }
        let mut labels = labels;
        labels.sort();
        assert!(samples.insert((name.to_string(), labels), value).is_none(), "duplicate sample {line:?}");
    }
    samples
}

fn get(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut key: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    key.sort();
    *samples.get(&(name.to_string(), key)).unwrap_or_else(|| panic!("no sample {name}{labels:?} in {samples:#?}"))
}

fn http_get(url: &str) -> Option<(u16, String)> {
    let agent = ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).build());
    let mut r = agent.get(url).call().ok()?;
    Some((r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default()))
}

fn post(url: &str, body: Vec<u8>) -> u16 {
    let agent = ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).build());
    agent.post(url).header("Content-Type", "application/x-protobuf").send(body).expect("POST").status().as_u16()
}

fn run_res(name: &str) -> Vec<KeyValue> {
    vec![otlp::s("ml.run.name", name), otlp::s("ml.run.id", name)]
}

#[test]
fn metrics_show_exact_counts_per_exporter_reason_and_receiver_outcome() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let svc = Service::start(logdir.path(), &["exporters.tensorboard.nonfinite=clamp".into()]);
    let url = format!("http://{}/v1/metrics", svc.http);
    // Four points: one with a step that is not a number (dropped as invalid_step), one +Inf
    // (clamped: delivered, and counted as the event nonfinite_clamped).
    let mut res = otlp::resource(
        run_res("scraped"),
        &[("loss", Some(1), 1.0), ("loss", Some(2), 2.0), ("loss", Some(3), 3.0), ("loss", Some(4), f64::INFINITY)],
    );
    if let Some(metric::Data::Gauge(g)) = &mut res.scope_metrics[0].metrics[2].data {
        g.data_points[0].attributes = vec![otlp::s("step", "three")];
    }
    assert_eq!(post(&url, otlp::request(vec![res]).encode_to_vec()), 200);
    assert_eq!(post(&url, b"\x0a\xff\xff\xff".to_vec()), 400);
    let scrape = || {
        let (status, text) = http_get(&format!("http://{}/metrics", svc.telemetry)).expect("scrape");
        assert_eq!(status, 200, "{text}");
        parse_exposition(&text)
    };
    // Delivery is asynchronous: wait (bounded) until nothing is pending.
    let deadline = Instant::now() + Duration::from_secs(30);
    let samples = loop {
        let s = scrape();
        if get(&s, "trainmetrics_exporter_queue_points", &[("exporter", "tensorboard")]) == 0.0 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let tb = [("exporter", "tensorboard")];
    assert_eq!(get(&samples, "trainmetrics_exporter_points_received_total", &tb), 4.0);
    assert_eq!(get(&samples, "trainmetrics_exporter_points_delivered_total", &tb), 3.0);
    assert_eq!(get(&samples, "trainmetrics_exporter_events_total", &[("exporter", "tensorboard"), ("event", "nonfinite_clamped")]), 1.0);
    assert_eq!(get(&samples, "trainmetrics_exporter_queue_points", &tb), 0.0);
    assert_eq!(get(&samples, "trainmetrics_exporter_retried_total", &tb), 0.0);
    assert_eq!(get(&samples, "trainmetrics_exporter_spooled_points", &tb), 0.0);
    assert_eq!(get(&samples, "trainmetrics_exporter_spool_bytes", &tb), 0.0);
    for reason in trainmetrics::DropReason::ALL {
        let want = if reason == trainmetrics::DropReason::InvalidStep { 1.0 } else { 0.0 };
        let got = get(&samples, "trainmetrics_exporter_points_dropped_total", &[("exporter", "tensorboard"), ("reason", reason.as_str())]);
        assert_eq!(got, want, "dropped {reason}");
    }
    for (protocol, outcome, want) in [("http", "partial", 1.0), ("http", "invalid", 1.0), ("http", "ok", 0.0), ("grpc", "ok", 0.0), ("http", "throttled", 0.0)] {
        let got = get(&samples, "trainmetrics_receiver_requests_total", &[("protocol", protocol), ("outcome", outcome)]);
        assert_eq!(got, want, "{protocol} {outcome}");
    }
    let report = svc.stop();
    assert!(report.contains("tensorboard: received 4 delivered 3 dropped 1 (invalid_step=1) nonfinite_clamped 1"), "{report}");
    let tb = read_tb(logdir.path(), Loader::Python);
    assert_eq!(tb.scalars["scraped"]["loss"], vec![(1, 1.0), (2, 2.0), (4, f64::from(f32::MAX))]);
}

#[test]
fn health_is_200_while_serving_and_503_during_shutdown() {
    let logdir = tempfile::tempdir().expect("tempdir");
    // An MLflow that accepts connections and never answers keeps shutdown busy until
    // shutdown_timeout, a window in which /health must say 503.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let svc = Service::start(
        logdir.path(),
        &[
            format!("exporters.mlflow.tracking_uri=http://{}", hang.local_addr().expect("addr")),
            "exporters.mlflow.every_steps=1".into(),
            "exporters.mlflow.linger=10ms".into(),
            "exporters.mlflow.timeout=60s".into(),
            "shutdown_timeout=4s".into(),
        ],
    );
    let health = format!("http://{}/health", svc.telemetry);
    let (status, body) = http_get(&health).expect("health");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        v,
        serde_json::json!({"status": "ok", "exporters": {
            "mlflow": {"failing": false, "last_error": null},
            "tensorboard": {"failing": false, "last_error": null}}})
    );
    let req = otlp::request(vec![otlp::resource(run_res("health"), &[("loss", Some(1), 1.0)])]);
    assert_eq!(post(&format!("http://{}/v1/metrics", svc.http), req.encode_to_vec()), 200);
    let pid = svc.pid();
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    // Poll until the answer turns 503; the listener stays up until the exporters are done.
    let mut seen = Vec::new();
    let answer = loop {
        match http_get(&health) {
            Some((503, body)) => break Some(body),
            Some((s, _)) => seen.push(s),
            None => break None,
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let body = answer.unwrap_or_else(|| panic!("the listener closed before answering 503 (saw {seen:?})"));
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["status"], "shutting_down", "{body}");
    // Answered while the shutdown still waits on the stuck export, not after it gave up (then
    // the exporter would show the timeout as its last error).
    assert_eq!(v["exporters"]["mlflow"]["last_error"], Value::Null, "answered only once the shutdown was over: {body}");
    assert!(seen.iter().all(|s| *s == 200), "{seen:?}");
    let report = svc.stop();
    assert!(report.contains("tensorboard: received 1 delivered 1 dropped 0"), "{report}");
    // Not delivered in time: kept in the spool for the next start.
    assert!(report.contains("mlflow: received 1 delivered 0 dropped 0 pending 1 (spooled 1 in"), "{report}");
}
