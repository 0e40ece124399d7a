//! Admission before the answer (issue 7, item 1): `trainmetrics serve` with the shipped
//! `collector-config/trainmetrics.yaml` (5 s reorder windows) takes a collector's replay after
//! an outage and a burst straight from a client without dropping anything it acknowledged:
//! where it cannot hold more it answers `UNAVAILABLE` / 503 with a retry delay, and every point
//! lands in TensorBoard (both loaders) and MLflow in step order. Case 013.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{mlflow_uri, otlp, read_tb_both, root, runs_of_experiment, unique, Collector, Recorded, Service};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message;

const SERIES: usize = 50;
/// Steps per request (each request: 50 series x 100 steps = 5 000 data points).
const STEPS: i64 = 100;

fn names() -> Vec<String> {
    std::iter::once("train.loss".to_string()).chain((1..SERIES).map(|i| format!("metric.{i:02}"))).collect()
}

/// Exact in float32 (TensorBoard's scalars) for every step used here.
fn value(series: usize, step: i64) -> f64 {
    step as f64 + series as f64 / 64.0
}

/// Request `k` (0-based): steps `k*100+1 ..= k*100+100` of every series, one run.
fn request(run: &[(&str, &str)], k: i64) -> ExportMetricsServiceRequest {
    let names = names();
    let mut points = Vec::new();
    for step in k * STEPS + 1..=(k + 1) * STEPS {
        for (i, n) in names.iter().enumerate() {
            points.push((n.as_str(), Some(step), value(i, step)));
        }
    }
    let attrs = run.iter().map(|(k, v)| otlp::s(k, v)).collect();
    otlp::request(vec![otlp::resource(attrs, &points)])
}

fn recorded(last_step: i64) -> Recorded {
    names().into_iter().enumerate().map(|(i, n)| (n, (1..=last_step).map(|s| (s, value(i, s))).collect())).collect()
}

/// The shipped service config, with ports, logdir, MLflow and spool set for the test. The
/// harness's quick test cadence for TensorBoard is set back to the shipped values.
fn shipped(logdir: &Path, uri: &str, spool: &Path, grpc_port: Option<u16>) -> (std::path::PathBuf, Vec<String>) {
    let mut sets = vec![
        format!("exporters.mlflow.tracking_uri={uri}"),
        format!("exporters.mlflow.sending_queue.spool.directory={}", spool.display()),
        "exporters.tensorboard.reorder_window=5s".to_string(),
        "exporters.tensorboard.linger=2s".to_string(),
    ];
    if let Some(p) = grpc_port {
        sets.push(format!("receivers.otlp.protocols.grpc.endpoint=127.0.0.1:{p}"));
    }
    let _ = logdir;
    (root().join("collector-config/trainmetrics.yaml"), sets)
}

/// `(received, delivered, dropped, pending)` of one exporter's line in a shutdown report.
fn counts(report: &str, exporter: &str) -> (u64, u64, u64, u64) {
    let line = report
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{exporter}:")))
        .unwrap_or_else(|| panic!("no {exporter} line in:\n{report}"));
    let num = |k: &str| -> u64 { line.split_whitespace().skip_while(|w| *w != k).nth(1).and_then(|v| v.parse().ok()).unwrap_or(0) };
    (num("received"), num("delivered"), num("dropped"), num("pending"))
}

/// Asserts TensorBoard (both loaders) holds exactly steps 1..=last of every series of run
/// `run`, once each, in order, with their values; and MLflow every window of 100 once.
fn assert_everything_landed(logdir: &Path, uri: &str, experiment: &str, run: &str, last: i64) {
    let want = recorded(last);
    let tb = read_tb_both(logdir);
    let tags = tb.scalars.get(run).unwrap_or_else(|| panic!("no TensorBoard run {run}: {:?}", tb.scalars.keys()));
    common::assert_tb_matches(tags, &want, &[]);
    let total: usize = tags.values().map(Vec::len).sum();
    assert_eq!(total as i64, SERIES as i64 * last);
    let runs = runs_of_experiment(uri, experiment);
    assert_eq!(runs.len(), 1, "one MLflow run");
    let id = runs[0]["info"]["run_id"].as_str().expect("run id");
    common::assert_mlflow_windows(uri, id, &want, 100, last);
}

/// Case 013, collector replay: one run, 50 series, steps 1..3200 as 32 OTLP requests of 50 x 100
/// steps sent to a real collector (`collector-config/agent.yaml`: persistent queue in a temp
/// dir, the collector's default number of consumers). The first 2 requests reach `serve`
/// (shipped `collector-config/trainmetrics.yaml`); `serve` is stopped for 30 s while the other
/// 30 go to the collector, then started again on the same port. Every one of the 160 000 points
/// is in TensorBoard, each tag steps 1..3200 once in order in both loaders, none `late`;
/// MLflow has every window of 100 once (`get-history` exact); each service's report adds up
/// (received = delivered + dropped + pending) with 0 dropped.
#[test]
fn case_013_collector_replay_after_a_30_s_outage_of_serve_lands_every_point_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (logdir, spool) = (dir.path().join("runs"), dir.path().join("spool"));
    let uri = mlflow_uri();
    let exp = unique("case013-replay");
    let run_id = unique("replay");
    let run = [("ml.experiment.name", exp.as_str()), ("ml.run.name", "replay"), ("ml.run.id", run_id.as_str())];
    let port = common::free_port();
    let (config, sets) = shipped(&logdir, &uri, &spool, Some(port));
    let svc = Service::start_with(Some(&config), &logdir, &sets);
    let log_path = dir.path().join("collector.log");
    let log = Stdio::from(std::fs::File::create(&log_path).expect("log file"));
    let collector = Collector::start(&svc.grpc, &dir.path().join("queue"), log);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let send = |ks: std::ops::Range<i64>| {
        rt.block_on(async {
            let mut client = MetricsServiceClient::connect(format!("http://{}", collector.grpc)).await.expect("connect to the collector");
            for k in ks {
                client.export(request(&run, k)).await.expect("the collector takes the request");
            }
        })
    };
    send(0..2);
    collector.wait_sent(2 * 5_000);
    let first = svc.stop();
    let stopped = Instant::now();
    assert_eq!(counts(&first, "tensorboard"), (10_000, 10_000, 0, 0), "{first}");
    assert_eq!(counts(&first, "mlflow"), (10_000, 10_000, 0, 0), "{first}");
    send(2..32);
    std::thread::sleep(Duration::from_secs(30).saturating_sub(stopped.elapsed()));
    eprintln!("case 013 replay: serve was down for {:?}", stopped.elapsed());
    let svc = Service::start_with(Some(&config), &logdir, &sets);
    collector.wait_sent(32 * 5_000);
    collector.stop();
    let second = svc.stop();
    let refusals = std::fs::read_to_string(&log_path).unwrap_or_default().matches("has no room").count();
    eprintln!("case 013 replay, after the outage ({refusals} refusals in the collector's log):\n{second}");
    for exporter in ["tensorboard", "mlflow"] {
        let (received, delivered, dropped, pending) = counts(&second, exporter);
        assert_eq!(received, delivered + dropped + pending, "{second}");
        assert_eq!((received, delivered, dropped, pending), (150_000, 150_000, 0, 0), "none dropped, none late:\n{second}");
    }
    assert_everything_landed(&logdir, &uri, &exp, "replay", 3200);
}

/// Case 013, burst: 36 requests of 50 series x 100 steps (180 000 points) posted straight to
/// `serve` (shipped config) over one connection as fast as it goes; the client retries a
/// refused request after its `Retry-After`. The 5 s reorder window holds more than
/// `max_pending_points` (100 000) could take, so some requests are answered 503 (counted as
/// receiver outcome `unavailable` in `/metrics`), none is dropped, and all 180 000 points are in
/// TensorBoard exactly (and MLflow's windows). Prints serve's peak RSS (VmHWM).
#[test]
fn case_013_burst_of_180_000_points_is_paced_by_503_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (logdir, spool) = (dir.path().join("runs"), dir.path().join("spool"));
    let uri = mlflow_uri();
    let exp = unique("case013-burst");
    let run_id = unique("burst");
    let run = [("ml.experiment.name", exp.as_str()), ("ml.run.name", "burst"), ("ml.run.id", run_id.as_str())];
    let (config, sets) = shipped(&logdir, &uri, &spool, None);
    let svc = Service::start_with(Some(&config), &logdir, &sets);
    let url = format!("http://{}/v1/metrics", svc.http);
    let agent = ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).build());
    let mut refused = 0u64;
    let started = Instant::now();
    for k in 0..36 {
        let body = request(&run, k).encode_to_vec();
        loop {
            let resp = agent.post(&url).header("Content-Type", "application/x-protobuf").send(&body[..]).expect("POST");
            match resp.status().as_u16() {
                200 => break,
                503 => {
                    refused += 1;
                    let wait = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
                    let wait: u64 = wait.expect("a 503 carries Retry-After in seconds");
                    std::thread::sleep(Duration::from_secs(wait));
                }
                other => panic!("unexpected answer {other}"),
            }
        }
    }
    let took = started.elapsed();
    let metrics = ureq::get(format!("http://{}/metrics", svc.telemetry)).call().expect("/metrics").body_mut().read_to_string().expect("body");
    let unavailable: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("trainmetrics_receiver_requests") && l.contains("outcome=\"unavailable\"") && l.contains("protocol=\"http\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64;
    let status = std::fs::read_to_string(format!("/proc/{}/status", svc.pid())).expect("/proc status");
    let hwm = status.lines().find(|l| l.starts_with("VmHWM")).unwrap_or("VmHWM: ?").to_string();
    let report = svc.stop();
    eprintln!("case 013 burst: 36 requests in {took:?}, {refused} answered 503; serve peak RSS {hwm}\n{report}");
    assert!(refused > 0, "the burst outgrew the limits without a 503:\n{report}");
    assert_eq!(unavailable, refused, "every 503 counted as outcome unavailable:\n{metrics}");
    for exporter in ["tensorboard", "mlflow"] {
        assert_eq!(counts(&report, exporter), (180_000, 180_000, 0, 0), "{report}");
    }
    assert_everything_landed(&logdir, &uri, &exp, "burst", 3600);
}
