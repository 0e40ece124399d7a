//! Restarts of `serve` mid-run through a real collector (`collector-config/agent.yaml`: persistent
//! queue, several consumers), read back from a real MLflow server and both TensorBoard loaders:
//! MLflow keys keep their names across a restart (case 017), and batches refused for their
//! credentials (MLflow's basic-auth app answering 401) wait in the spool across a restart and
//! land once the credential file is fixed, in the running process (case 019).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{history, kv, mlflow_uri, otlp, read_tb_both, root, run, runs_of_experiment, unique, Collector, MlflowServer, Service};
use serde_json::Value;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;

/// `serve` from the shipped config on a fixed gRPC port (so the collector reaches every start),
/// MLflow every step with a 1 s reorder window, TensorBoard into `logdir`, a spool in `spool`.
fn serve(logdir: &Path, uri: &str, spool: &Path, port: u16, extra: &[String]) -> Service {
    serve_env(logdir, uri, spool, port, extra, &[])
}

/// As [`serve`], with extra environment variables.
fn serve_env(logdir: &Path, uri: &str, spool: &Path, port: u16, extra: &[String], env: &[(&str, &str)]) -> Service {
    let mut sets = vec![
        format!("exporters.mlflow.tracking_uri={uri}"),
        "exporters.mlflow.every_steps=1".to_string(),
        "exporters.mlflow.reorder_window=1s".to_string(),
        "exporters.mlflow.linger=200ms".to_string(),
        format!("exporters.mlflow.sending_queue.spool.directory={}", spool.display()),
        format!("receivers.otlp.protocols.grpc.endpoint=127.0.0.1:{port}"),
    ];
    sets.extend_from_slice(extra);
    Service::start_env(Some(&root().join("collector-config/trainmetrics.yaml")), logdir, &sets, env, Stdio::inherit())
}

/// Sends each request to the collector at `endpoint`, in order.
fn send(endpoint: &str, requests: Vec<ExportMetricsServiceRequest>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut client = MetricsServiceClient::connect(format!("http://{endpoint}")).await.expect("connect to the collector");
        for r in requests {
            client.export(r).await.expect("the collector takes the request");
        }
    });
}

/// Polls until `key` of `run_id` has `n` points, at most 30 s; returns its (step, value)s by step.
fn wait_history(uri: &str, run_id: &str, key: &str, n: usize) -> Vec<(i64, f64)> {
    let started = Instant::now();
    loop {
        let mut h: Vec<(i64, f64)> = history(uri, run_id, key).into_iter().map(|(s, v, _)| (s, v)).collect();
        h.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        if h.len() >= n {
            return h;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{key} has {} of {n} points after 30 s: {h:?}", h.len());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Case 017: `a@b` (101..) and `a_b` (201..) at steps 1..3 through the collector; `serve`
/// restarts; then steps 4..6 with `a_b` sent (and written) first, and a third name `a#b` that
/// maps to the same plain key. Every name keeps the key it had before the restart: `a@b` holds
/// the plain key `a_b`, the name `a_b` its hash-suffixed key, `a#b` a key of its own; no key has
/// values of two names; the name tags say which name each renamed key holds.
#[test]
fn case_017_a_restarted_serve_keeps_every_name_on_its_mlflow_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (logdir, spool) = (dir.path().join("runs"), dir.path().join("spool"));
    let uri = mlflow_uri();
    let exp = unique("case017");
    let run_id = unique("names");
    let attrs = || vec![otlp::s("ml.experiment.name", &exp), otlp::s("ml.run.name", "names"), otlp::s("ml.run.id", &run_id)];
    let points = |name: &'static str, base: f64, steps: std::ops::RangeInclusive<i64>| -> Vec<(&'static str, Option<i64>, f64)> {
        steps.map(|s| (name, Some(s), base + s as f64)).collect()
    };
    let request = |pts: Vec<(&str, Option<i64>, f64)>| otlp::request(vec![otlp::resource(attrs(), &pts)]);
    let port = common::free_port();
    let log = Stdio::from(std::fs::File::create(dir.path().join("collector.log")).expect("log file"));

    let svc = serve(&logdir, &uri, &spool, port, &[]);
    let collector = Collector::start(&svc.grpc, &dir.path().join("queue"), log);
    let mut first = points("a@b", 100.0, 1..=3);
    first.extend(points("a_b", 200.0, 1..=3));
    send(&collector.grpc, vec![request(first)]);
    collector.wait_sent(6);
    let runs = {
        let started = Instant::now();
        loop {
            let runs = runs_of_experiment(&uri, &exp);
            if runs.len() == 1 || started.elapsed() > Duration::from_secs(30) {
                break runs;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(runs.len(), 1, "one MLflow run: {runs:?}");
    let id = runs[0]["info"]["run_id"].as_str().expect("run id").to_string();
    let suffixed = format!("a_b-{:08x}", trainmetrics::names::fnv1a32("a_b"));
    assert_eq!(wait_history(&uri, &id, "a_b", 3), vec![(1, 101.0), (2, 102.0), (3, 103.0)], "a@b claimed the plain key first");
    assert_eq!(wait_history(&uri, &id, &suffixed, 3), vec![(1, 201.0), (2, 202.0), (3, 203.0)]);
    let report = svc.stop();
    assert!(report.contains("mlflow: received 6 delivered 6 dropped 0"), "{report}");

    // The restart: now `a_b` comes first, in a batch of its own that is written before `a@b`'s.
    let svc = serve(&logdir, &uri, &spool, port, &[]);
    send(&collector.grpc, vec![request(points("a_b", 200.0, 4..=6))]);
    let plain = wait_history(&uri, &id, &suffixed, 6);
    send(&collector.grpc, vec![request(points("a@b", 100.0, 4..=6)), request(points("a#b", 300.0, 4..=6))]);
    collector.wait_sent(15);
    let other = format!("a_b-{:08x}", trainmetrics::names::fnv1a32("a#b"));
    let at = wait_history(&uri, &id, "a_b", 6);
    let hash = wait_history(&uri, &id, &other, 3);
    collector.stop();
    let report = svc.stop();
    assert!(report.contains("mlflow: received 9 delivered 9 dropped 0"), "{report}");

    assert_eq!(at, (1..=6).map(|s| (s, 100.0 + s as f64)).collect::<Vec<_>>(), "key a_b holds only a@b's values");
    assert_eq!(plain, (1..=6).map(|s| (s, 200.0 + s as f64)).collect::<Vec<_>>(), "the name a_b kept its key");
    assert_eq!(hash, (4..=6).map(|s| (s, 300.0 + s as f64)).collect::<Vec<_>>());
    let runs = runs_of_experiment(&uri, &exp);
    assert_eq!(runs.len(), 1, "the restarted serve continued the run");
    let r = run(&uri, &id);
    let tags = kv(&r, "tags");
    assert_eq!(tags.get("trainmetrics.name/a_b").map(String::as_str), Some("a@b"), "{tags:?}");
    assert_eq!(tags.get(&format!("trainmetrics.name/{suffixed}")).map(String::as_str), Some("a_b"), "{tags:?}");
    assert_eq!(tags.get(&format!("trainmetrics.name/{other}")).map(String::as_str), Some("a#b"), "{tags:?}");
    let keys: Vec<&str> = r["data"]["metrics"].as_array().expect("metrics").iter().filter_map(|m| m["key"].as_str()).collect();
    assert_eq!(keys.len(), 3, "three names, three keys: {keys:?}");

    let tb = read_tb_both(&logdir);
    let tb_run = &tb.scalars["names"];
    assert_eq!(tb_run["a@b"], (1..=6).map(|s| (s, 100.0 + s as f64)).collect::<Vec<_>>());
    assert_eq!(tb_run["a_b"], (1..=6).map(|s| (s, 200.0 + s as f64)).collect::<Vec<_>>());
    assert_eq!(tb_run["a#b"], (4..=6).map(|s| (s, 300.0 + s as f64)).collect::<Vec<_>>());
}

/// The MLflow exporter's entry of `serve`'s `/health`.
fn mlflow_health(svc: &Service) -> Value {
    let mut resp = ureq::get(format!("http://{}/health", svc.telemetry)).call().expect("GET /health");
    let v: Value = serde_json::from_str(&resp.body_mut().read_to_string().expect("body")).expect("json");
    v["exporters"]["mlflow"].clone()
}

/// Polls `/health` until the MLflow exporter is failing with a 401, at most 30 s.
fn wait_failing_401(svc: &Service) -> Value {
    let started = Instant::now();
    loop {
        let h = mlflow_health(svc);
        if h["failing"] == true && h["last_error"].as_str().is_some_and(|e| e.contains("HTTP 401")) {
            return h;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "/health does not show the 401 after 30 s: {h}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Case 019: MLflow (its basic-auth app) refuses `serve`'s password (401). Points sent through the
/// collector meanwhile are not dropped: they wait in the spool, `/health` shows the exporter
/// failing with the 401, a restart of `serve` keeps them (the spool is replayed and refused
/// again), and once the password file is fixed the running process reads it again and every
/// point lands exactly once, with its value. TensorBoard is not held up by MLflow.
#[test]
fn case_019_refused_credentials_are_an_outage_and_land_after_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (logdir, spool) = (dir.path().join("runs"), dir.path().join("spool"));
    let password = "right-password-019";
    let mlflow = MlflowServer::start_basic_auth(common::free_port(), &dir.path().join("mlflow"), password);
    let reader = mlflow.uri.replacen("http://", &format!("http://admin:{password}@"), 1);
    let file = dir.path().join("mlflow-password");
    std::fs::write(&file, "wrong-password\n").expect("password file");
    let exp = unique("case019");
    let run_id = unique("creds");
    let attrs = vec![otlp::s("ml.experiment.name", &exp), otlp::s("ml.run.name", "creds"), otlp::s("ml.run.id", &run_id)];
    let request = |steps: std::ops::RangeInclusive<i64>| {
        let pts: Vec<(&str, Option<i64>, f64)> = steps.map(|s| ("loss", Some(s), s as f64 * 1.5)).collect();
        otlp::request(vec![otlp::resource(attrs.clone(), &pts)])
    };
    let sets = [
        format!("exporters.mlflow.password_file={}", file.display()),
        "exporters.mlflow.retry_on_failure.initial_interval=200ms".to_string(),
        "exporters.mlflow.retry_on_failure.max_interval=1s".to_string(),
    ];
    let env = [("MLFLOW_TRACKING_USERNAME", "admin")];
    let port = common::free_port();
    let log = Stdio::from(std::fs::File::create(dir.path().join("collector.log")).expect("log file"));

    let svc = serve_env(&logdir, &mlflow.uri, &spool, port, &sets, &env);
    let collector = Collector::start(&svc.grpc, &dir.path().join("queue"), log);
    send(&collector.grpc, vec![request(1..=20)]);
    collector.wait_sent(20);
    let health = wait_failing_401(&svc);
    eprintln!("case 019 /health while refused: {health}");
    let report = svc.stop();
    assert!(report.contains("mlflow: received 20 delivered 0 dropped 0 pending 20 (spooled 20 in"), "nothing dropped while refused:\n{report}");
    assert!(runs_of_experiment(&reader, &exp).is_empty(), "nothing reached MLflow with the wrong password");

    // The restart: the spool is replayed, refused again, and kept; new points join it.
    let svc = serve_env(&logdir, &mlflow.uri, &spool, port, &sets, &env);
    send(&collector.grpc, vec![request(21..=40)]);
    collector.wait_sent(40);
    wait_failing_401(&svc);
    std::fs::write(&file, format!("{password}\n")).expect("fix the password file");
    let started = Instant::now();
    let runs = loop {
        let runs = runs_of_experiment(&reader, &exp);
        if runs.len() == 1 && history(&reader, runs[0]["info"]["run_id"].as_str().unwrap_or(""), "loss").len() >= 40 {
            break runs;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the points did not land within 60 s of the fix: {runs:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let id = runs[0]["info"]["run_id"].as_str().expect("run id");
    let mut got: Vec<(i64, f64)> = history(&reader, id, "loss").into_iter().map(|(s, v, _)| (s, v)).collect();
    got.sort_by_key(|p| p.0);
    assert_eq!(got, (1..=40).map(|s| (s, s as f64 * 1.5)).collect::<Vec<_>>(), "every point once, with its value");
    let health = mlflow_health(&svc);
    assert_eq!(health["failing"], false, "{health}");
    collector.stop();
    let report = svc.stop();
    let line = report.lines().find(|l| l.trim_start().starts_with("mlflow:")).unwrap_or_default().to_string();
    assert!(line.contains(" dropped 0") && !line.contains("pending"), "all delivered, nothing left:\n{report}");
    let tb = read_tb_both(&logdir);
    assert_eq!(tb.scalars["creds"]["loss"], (1..=40).map(|s| (s, s as f64 * 1.5)).collect::<Vec<_>>());
    mlflow.stop();
}
