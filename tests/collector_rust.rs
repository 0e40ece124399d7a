//! The Rust trainer (`examples/train.rs --otlp-endpoint`: its own `SdkMeterProvider`, the
//! `opentelemetry-otlp` tonic exporter with gzip and delta temporality) → a real OpenTelemetry
//! Collector (`collector-config/agent.yaml`; built by `scripts/build-collector.sh`, path in
//! `TRAINMETRICS_OTELCOL`) → `trainmetrics serve` (`collector-config/trainmetrics.yaml`) →
//! TensorBoard and a real MLflow server shows exactly what the trainer recorded (`--record-csv`).
//! The same end-to-end check as `tests/collector.rs` does for the Python trainer, plus the
//! histogram `train.logits`, which only the Rust trainer records.

mod common;

use std::process::{Command, Stdio};

use common::{kv, mlflow_uri, read_csv, read_tb_both, runs_of_experiment, trainer, unique, Collector, Service};

#[test]
fn rust_trainer_through_a_real_collector_into_tensorboard_and_mlflow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().join("runs");
    let exp = unique("collector-rust-e2e");
    let uri = mlflow_uri();
    let svc = Service::start_example(&logdir, &uri, &[]);
    let collector = Collector::start(&svc.grpc, &dir.path().join("queue"), Stdio::null());
    let csv = dir.path().join("recorded.csv");
    let endpoint = format!("http://{}", collector.grpc);
    let out = Command::new(trainer())
        .args(["--otlp-endpoint", &endpoint, "--steps", "1000", "--experiment", &exp])
        .args(["--run-name", "rust-e2e", "--run-id", "rust-e2e-1"])
        .arg("--record-csv")
        .arg(&csv)
        .env_remove("MLFLOW_TRACKING_URI")
        .output()
        .expect("run the Rust trainer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "trainer: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let recorded = read_csv(&csv);
    let total: usize = recorded.values().map(Vec::len).sum();
    // Everything through the collector before it stops (see `Collector`); then the service
    // delivers what it acknowledged.
    collector.wait_sent(total as u64);
    collector.stop();
    let report = svc.stop();

    // Every step: 4 scalars; every 50th step: eval.loss, eval.accuracy and one train.logits row.
    assert_eq!(recorded["train.loss"].len(), 1000);
    assert_eq!(recorded["eval.accuracy"].len(), 20);
    assert_eq!(recorded["train.logits"].len(), 20);
    // One CSV row is one OTLP data point, histograms included: a histogram record puts all of
    // the batch's logits under one attribute set (its step and record time), so the SDK exports
    // it as one histogram data point, and the service counts a data point as one whatever its
    // kind (TensorBoard writes it as a histogram, MLflow as its mean).
    assert_eq!(total, 4 * 1000 + 3 * 20);
    assert!(stdout.contains("run: rust-e2e (id rust-e2e-1)"), "{stdout}");
    assert!(stdout.contains("step_time_ms mean="), "{stdout}");
    // The trainer also exports the run-end gauge: one more data point, which `serve` takes as
    // the run's end and does not count as received.
    let exported = format!("otlp: exported to {endpoint} ({} of {} recorded data points in ", total + 1, total + 1);
    assert!(stdout.contains(&exported) && stdout.contains(" 0 failed;"), "{exported:?} not in:\n{stdout}");
    for name in ["tensorboard", "mlflow"] {
        let want = format!("{name}: received {total} delivered {total} dropped 0");
        assert!(report.contains(&want), "{want:?} not in:\n{report}");
    }

    // TensorBoard, both loaders: every scalar as recorded (as float32), the histogram at its steps.
    let tb = read_tb_both(&logdir);
    assert_eq!(tb.scalars.keys().collect::<Vec<_>>(), vec!["rust-e2e"]);
    let tags = &tb.scalars["rust-e2e"];
    common::assert_tb_matches(tags, &recorded, &["train.logits"]);
    let logits = &tb.histograms["rust-e2e"]["train.logits"];
    assert_eq!(logits.iter().map(|h| h.0).collect::<Vec<_>>(), recorded["train.logits"].iter().map(|r| r.0).collect::<Vec<_>>());
    let hp = &tb.hparams["rust-e2e"];
    assert!(hp.contains_key("lr") && hp.contains_key("batch_size"), "{hp:?}");

    // MLflow: points exactly at 100, 200, …, 1000; train.loss = the window mean, the rest
    // (train.logits: its histogram's mean) = the window's last value.
    let runs = runs_of_experiment(&uri, &exp);
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run["info"]["run_name"], "rust-e2e");
    let id = run["info"]["run_id"].as_str().expect("run id");
    common::assert_mlflow_windows(&uri, id, &recorded, 100, 1000);

    // The resource's ml.param.* are the run's params, as in process.
    let params = kv(run, "params");
    for p in ["lr", "batch_size", "hidden", "steps", "warmup", "weight_decay", "seed", "dataset"] {
        assert!(params.contains_key(p), "param {p} missing: {params:?}");
    }
}
