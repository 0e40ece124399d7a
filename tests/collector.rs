//! With a real OpenTelemetry Collector built from Go modules (`scripts/build-collector.sh`, path
//! in `TRAINMETRICS_OTELCOL`, set by `scripts/test.sh`): every YAML validates, and the Python
//! trainer (OTel Python SDK) → collector (agent.yaml: gzip, retry, file_storage queue) →
//! `trainmetrics serve` → TensorBoard and a real MLflow server shows exactly what was recorded.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{mlflow_uri, otelcol, python, read_csv, read_tb_both, root, runs_of_experiment, trainmetrics_bin, unique, Collector, Service};

#[test]
fn every_collector_yaml_validates_with_otelcol_and_trainmetrics() {
    for file in ["agent.yaml", "gateway.yaml"] {
        let out = Command::new(otelcol())
            .arg("validate")
            .arg(format!("--config={}", root().join("collector-config").join(file).display()))
            .output()
            .expect("run otelcol");
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = Command::new(trainmetrics_bin())
        .args(["validate", "--config"])
        .arg(root().join("collector-config/trainmetrics.yaml"))
        .output()
        .expect("run trainmetrics");
    assert!(out.status.success(), "trainmetrics.yaml: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn python_trainer_through_a_real_collector_into_tensorboard_and_mlflow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().join("runs");
    let exp = unique("collector-e2e");
    let uri = mlflow_uri();
    let svc = Service::start_example(&logdir, &uri, &[]);
    let collector = Collector::start(&svc.grpc, &dir.path().join("queue"), Stdio::null());
    let csv = dir.path().join("recorded.csv");
    let out = Command::new(python())
        .arg(root().join("examples/python/train.py"))
        .args(["--endpoint", &format!("http://{}", collector.grpc), "--steps", "1000", "--experiment", &exp])
        .args(["--run-name", "py-e2e", "--run-id", "py-e2e-1"])
        .arg("--record-csv")
        .arg(&csv)
        .output()
        .expect("run the Python trainer");
    assert!(out.status.success(), "trainer: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let recorded = read_csv(&csv);
    let total: usize = recorded.values().map(Vec::len).sum();
    // On SIGTERM the collector keeps unsent data in its file_storage queue for its next start,
    // so wait until it reports everything sent; then the service delivers what it holds.
    collector.wait_sent(total as u64);
    collector.stop();
    let report = svc.stop();
    for name in ["tensorboard", "mlflow"] {
        let want = format!("{name}: received {total} delivered {total} dropped 0");
        assert!(report.contains(&want), "{want:?} not in:\n{report}");
    }

    let tb = read_tb_both(&logdir);
    let tags = &tb.scalars["py-e2e"];
    common::assert_tb_matches(tags, &recorded, &[]);
    let runs = runs_of_experiment(&uri, &exp);
    assert_eq!(runs.len(), 1);
    let id = runs[0]["info"]["run_id"].as_str().expect("run id");
    common::assert_mlflow_windows(&uri, id, &recorded, 100, 1000);

}

#[test]
fn a_full_queue_is_retried_by_the_collector_until_everything_is_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().join("runs");
    // A slow MLflow (each log-batch takes 1 s for the first 6) keeps its exporter busy, so
    // its queue of 1 request fills and the service answers UNAVAILABLE.
    let slow = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (uri, _) = common::scripted_server(move |line, _| {
        common::fake_run_endpoints(line).unwrap_or_else(|| {
            if slow.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 6 {
                std::thread::sleep(Duration::from_millis(1000));
            }
            (200, String::new(), "{}".to_string())
        })
    });
    let svc = Service::start(
        &logdir,
        &[
            format!("exporters.mlflow.tracking_uri={uri}"),
            "exporters.mlflow.every_steps=1".into(),
            "exporters.mlflow.linger=100ms".into(),
            // MLflow writes as it goes (and so is slow while requests arrive)...
            "exporters.mlflow.reorder_window=100ms".into(),
            "exporters.mlflow.sending_queue.queue_size=1".into(),
            // ...while TensorBoard's windows wait longer than the collector's retry backoff,
            // so retried batches, seconds late, are still written in step order.
            "exporters.tensorboard.reorder_window=30s".into(),
        ],
    );
    let log = dir.path().join("collector.log");
    let collector =
        Collector::start(&svc.grpc, &dir.path().join("queue"), Stdio::from(std::fs::File::create(&log).expect("log file")));
    let csv = dir.path().join("recorded.csv");
    let out = Command::new(python())
        .arg(root().join("examples/python/train.py"))
        .args(["--endpoint", &format!("http://{}", collector.grpc), "--steps", "300", "--sleep-ms", "20"])
        .args(["--export-interval-ms", "100", "--run-name", "busy", "--run-id", "busy-1"])
        .arg("--record-csv")
        .arg(&csv)
        .output()
        .expect("run the Python trainer");
    assert!(out.status.success(), "trainer: {}", String::from_utf8_lossy(&out.stderr));
    // The collector keeps retrying while the queue is full, until it has sent everything.
    let total: usize = read_csv(&csv).values().map(Vec::len).sum();
    collector.wait_sent(total as u64);
    collector.stop();
    let report = svc.stop();
    // Every refused request came back: the service received everything, once.
    let want = format!("tensorboard: received {total} delivered {total} dropped 0");
    assert!(report.contains(&want), "{want:?} not in:\n{report}");
    // MLflow had already written later steps when some retried batches came back: those are
    // counted late (MLflow never gets a step twice), and the counts still add up.
    let line = report.lines().find(|l| l.trim_start().starts_with("mlflow:")).expect("mlflow line");
    let num = |k: &str| -> u64 {
        line.split_whitespace().skip_while(|w| *w != k).nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let late: u64 = line.split("late=").nth(1).and_then(|v| v.trim_end_matches(')').split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()).unwrap_or(0);
    assert_eq!(num("received"), total as u64, "{line}");
    assert_eq!(num("delivered") + late, total as u64, "only late drops: {line}");
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log.contains("Unavailable") || log.contains("UNAVAILABLE"), "the collector never saw UNAVAILABLE:\n{log}");
    let tb = read_tb_both(&logdir);
    assert_eq!(tb.scalars["busy"]["train.loss"].len(), 300);
}

#[test]
fn a_gateway_routes_each_run_to_one_of_two_services_and_one_mlflow_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exp = unique("gateway");
    let uri = mlflow_uri();
    let experiment = [format!("exporters.mlflow.experiment={exp}")];
    let (logdir_a, logdir_b) = (dir.path().join("a"), dir.path().join("b"));
    let a = Service::start_example(&logdir_a, &uri, &experiment);
    let b = Service::start_example(&logdir_b, &uri, &experiment);
    let gateway = Collector::start_config(
        "gateway.yaml",
        &[("TRAINMETRICS_BACKENDS", format!("{},{}", a.grpc, b.grpc))],
        Stdio::null(),
    );
    let mut total = 0;
    let mut rows = BTreeMap::new();
    for i in 0..4 {
        let csv = dir.path().join(format!("run{i}.csv"));
        let out = Command::new(python())
            .arg(root().join("examples/python/train.py"))
            .args(["--endpoint", &format!("http://{}", gateway.grpc), "--steps", "200", "--experiment", &exp])
            .args(["--run-name", &format!("gw-{i}"), "--run-id", &format!("gw-run-{i}")])
            .arg("--record-csv")
            .arg(&csv)
            .output()
            .expect("run the Python trainer");
        assert!(out.status.success(), "trainer: {}", String::from_utf8_lossy(&out.stderr));
        let n = read_csv(&csv)["train.loss"].len();
        rows.insert(format!("gw-{i}"), n);
        total += read_csv(&csv).values().map(Vec::len).sum::<usize>();
    }
    gateway.wait_sent(total as u64);
    gateway.stop();
    let (ra, rb) = (a.stop(), b.stop());
    // The ring hashes the backends' (random) ports, so one service may get no run at all.
    let read = |d: &std::path::Path| if d.exists() { read_tb_both(d) } else { common::Tb::default() };
    let (ta, tb) = (read(&logdir_a), read(&logdir_b));
    for (run, n) in &rows {
        let in_a = ta.scalars.get(run).map(|t| t["train.loss"].len());
        let in_b = tb.scalars.get(run).map(|t| t["train.loss"].len());
        assert!(matches!((in_a, in_b), (Some(x), None) | (None, Some(x)) if x == *n), "{run}: a={in_a:?} b={in_b:?}\n{ra}\n{rb}");
    }
    let runs = runs_of_experiment(&uri, &exp);
    let mut names: Vec<String> = runs.iter().map(|r| r["info"]["run_name"].as_str().unwrap_or("").to_string()).collect();
    names.sort();
    assert_eq!(names, vec!["gw-0", "gw-1", "gw-2", "gw-3"], "one MLflow run per run");
}
