//! Exactly once in aggregates, as collectors and SDKs really send: a request re-sent after its
//! answer was lost (case 014), the OTel Python SDK's default cumulative temporality through a
//! real collector (case 015), and a metric with an empty name next to a valid one (case 020).
//! Everything is read back from a real MLflow server and both TensorBoard loaders.

mod common;

use std::process::{Command, Stdio};

use common::{history, mlflow_uri, otlp, python, read_tb, read_tb_both, root, runs_of_experiment, unique, Collector, Loader, Service};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};

fn run_res(id: &str) -> Vec<opentelemetry_proto::tonic::common::v1::KeyValue> {
    vec![otlp::s("ml.run.name", id), otlp::s("ml.run.id", id)]
}

/// Sends each request over one gRPC connection, as a collector's exporter does.
fn export_all(endpoint: &str, requests: Vec<ExportMetricsServiceRequest>) -> Vec<ExportMetricsServiceResponse> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut client = MetricsServiceClient::connect(format!("http://{endpoint}")).await.expect("connect to serve");
        let mut answers = Vec::new();
        for req in requests {
            answers.push(client.export(req).await.expect("export").into_inner());
        }
        answers
    })
}

/// The line of `name` in a shutdown report.
fn report_line<'a>(report: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}: received");
    report.lines().find(|l| l.trim_start().starts_with(&prefix)).unwrap_or_else(|| panic!("no {name} line in:\n{report}"))
}

/// The MLflow run of an experiment (exactly one).
fn only_run(uri: &str, experiment: &str) -> String {
    let runs = runs_of_experiment(uri, experiment);
    assert_eq!(runs.len(), 1, "runs of {experiment}: {runs:?}");
    runs[0]["info"]["run_id"].as_str().expect("run id").to_string()
}

/// Case 014: `train.loss` = 1.0 at steps 1..50 in one request, 3.0 at 51..100 in another; the
/// first request is sent twice (a collector retry after a lost answer), same points and
/// timestamps. MLflow `every_steps: 100` with `mean` shows 2.0 at step 100 (not 1.667); an
/// exporter with `sum` shows 200 (not 250); the repeated points are counted `duplicate`;
/// TensorBoard holds each step once.
#[test]
fn case_014_a_retried_request_is_not_aggregated_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().join("runs");
    let uri = mlflow_uri();
    let (mean_exp, sum_exp) = (unique("case-014-mean"), unique("case-014-sum"));
    let config = dir.path().join("trainmetrics.yaml");
    std::fs::write(
        &config,
        format!(
            "exporters:\n  tensorboard:\n    logdir: {logdir}\n  mlflow/mean:\n    tracking_uri: {uri}\n    experiment: {mean_exp}\n    every_steps: 100\n    aggregation: mean\n  mlflow/sum:\n    tracking_uri: {uri}\n    experiment: {sum_exp}\n    every_steps: 100\n    aggregation: sum\n",
            logdir = logdir.display()
        ),
    )
    .expect("write config");
    // A reorder window that keeps TensorBoard's windows open across all three requests, so the
    // retry meets the points it repeats in open windows there too.
    let svc = Service::start_with(Some(&config), &logdir, &["exporters.tensorboard.reorder_window=5s".into()]);
    let first = || {
        let pts: Vec<(&str, Option<i64>, f64)> = (1..=50).map(|s| ("train.loss", Some(s), 1.0)).collect();
        otlp::request(vec![otlp::resource(run_res("case-014"), &pts)])
    };
    let second = {
        let pts: Vec<(&str, Option<i64>, f64)> = (51..=100).map(|s| ("train.loss", Some(s), 3.0)).collect();
        otlp::request(vec![otlp::resource(run_res("case-014"), &pts)])
    };
    let answers = export_all(&svc.grpc, vec![first(), second, first()]);
    assert!(answers.iter().all(|a| a.partial_success.is_none()), "{answers:?}");
    let report = svc.stop();
    for name in ["tensorboard", "mlflow/mean", "mlflow/sum"] {
        let line = report_line(&report, name);
        assert!(line.contains("received 150 delivered 100 dropped 50 (duplicate=50)"), "{line}");
    }
    for (exp, want) in [(&mean_exp, 2.0), (&sum_exp, 200.0)] {
        let id = only_run(&uri, exp);
        let got: Vec<(i64, f64)> = history(&uri, &id, "train.loss").into_iter().map(|(s, v, _)| (s, v)).collect();
        assert_eq!(got, vec![(100, want)], "{exp}");
    }
    let tb = read_tb_both(&logdir);
    let want: Vec<(i64, f64)> = (1..=100).map(|s| (s, if s <= 50 { 1.0 } else { 3.0 })).collect();
    assert_eq!(tb.scalars["case-014"]["train.loss"], want);
}

/// Case 015: the OTel Python SDK with its default (cumulative) temporality, through a real
/// collector (`collector-config/agent.yaml`) into the shipped config: a Histogram
/// `train.grad_norm` (3 records per step) and a Counter `train.tokens` (`step + 1` per step),
/// both with a `step` attribute, 300 steps, exported every second. Each TensorBoard
/// histogram's total count is 3 at every step (both loaders), counter values exact in
/// TensorBoard and MLflow, unchanged re-sends counted `duplicate`, and one log line for the
/// run names cumulative temporality and the setting that switches the SDK to delta.
#[test]
fn case_015_cumulative_temporality_is_replaced_not_added() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().join("runs");
    let uri = mlflow_uri();
    let exp = unique("case-015");
    let log_path = dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let sets = [
        format!("exporters.mlflow.tracking_uri={uri}"),
        format!("exporters.mlflow.experiment={exp}"),
        // The shipped TensorBoard reorder window (Service::start_with shortens it for speed).
        "exporters.tensorboard.reorder_window=5s".to_string(),
    ];
    let svc = Service::start_logged(Some(&root().join("collector-config/trainmetrics.yaml")), &logdir, &sets, Stdio::from(log));
    let collector = Collector::start(&svc.grpc, &dir.path().join("queue"), Stdio::null());
    let out = Command::new(python())
        .arg(root().join("tests/support/cumulative_trainer.py"))
        .args(["--endpoint", &format!("http://{}", collector.grpc), "--run-id", "case-015", "--steps", "300"])
        .env_remove("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE")
        .output()
        .expect("missing component: the venv's Python with the OTel SDK");
    assert!(out.status.success(), "trainer: {}", String::from_utf8_lossy(&out.stderr));
    collector.wait_drained();
    collector.stop();
    let report = svc.stop();

    for name in ["tensorboard", "mlflow"] {
        let line = report_line(&report, name);
        let nums: Vec<u64> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
        // received, delivered, dropped, duplicate=N: cumulative re-sends are duplicates only.
        assert!(nums.len() >= 4 && nums[0] == nums[1] + nums[2] && nums[2] == nums[3], "{line}");
        assert!(line.contains(&format!("dropped {} (duplicate={})", nums[2], nums[2])), "{line}");
        assert!(nums[0] > 600, "the SDK re-sent cumulative points: {line}");
    }
    for loader in [Loader::Python, Loader::Rust] {
        let tb = read_tb(&logdir, loader);
        let grad = &tb.histograms["case-015"]["train.grad_norm"];
        let counts: Vec<(i64, f64)> = grad.iter().map(|(s, rows)| (*s, rows.iter().map(|r| r[2]).sum())).collect();
        assert_eq!(counts, (1..=300).map(|s| (s, 3.0)).collect::<Vec<_>>(), "{loader:?}");
        let tokens = &tb.scalars["case-015"]["train.tokens"];
        assert_eq!(tokens, &(1..=300).map(|s| (s, (s + 1) as f64)).collect::<Vec<_>>(), "{loader:?}");
    }
    let id = only_run(&uri, &exp);
    let tokens: Vec<(i64, f64)> = history(&uri, &id, "train.tokens").into_iter().map(|(s, v, _)| (s, v)).collect();
    assert_eq!(tokens, vec![(100, 101.0), (200, 201.0), (300, 301.0)]);
    // MLflow logs a histogram as its mean: the last step's records are step/100 + 0, 1, 2.
    let grad: Vec<(i64, f64)> = history(&uri, &id, "train.grad_norm").into_iter().map(|(s, v, _)| (s, v)).collect();
    assert_eq!(grad, vec![(100, 2.0), (200, 3.0), (300, 4.0)]);

    let log = std::fs::read_to_string(&log_path).expect("serve log");
    let notices: Vec<&str> = log.lines().filter(|l| l.contains("cumulative temporality")).collect();
    assert_eq!(notices.len(), 1, "one line per run:\n{log}");
    assert!(notices[0].contains("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=delta") && notices[0].contains("case-015"), "{}", notices[0]);
}

/// Case 020: a metric with an empty name next to a valid one, in one request: the empty-named
/// points are refused and counted in `partial_success` with a message; the valid ones land.
#[test]
fn case_020_an_empty_name_is_refused_and_the_rest_lands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().join("runs");
    let uri = mlflow_uri();
    let exp = unique("case-020");
    let svc = Service::start(
        &logdir,
        &[format!("exporters.mlflow.tracking_uri={uri}"), format!("exporters.mlflow.experiment={exp}"), "exporters.mlflow.every_steps=1".into()],
    );
    let req = otlp::request(vec![otlp::resource(
        run_res("case-020"),
        &[("", Some(1), 9.0), ("train.loss", Some(1), 0.5), ("", Some(2), 9.0), ("/", Some(2), 9.0), ("train.loss", Some(2), 0.25)],
    )]);
    let answers = export_all(&svc.grpc, vec![req]);
    let partial = answers[0].partial_success.as_ref().expect("a partial success");
    assert_eq!(partial.rejected_data_points, 3);
    assert!(partial.error_message.contains("invalid_name") && partial.error_message.contains("empty"), "{}", partial.error_message);
    let report = svc.stop();
    for name in ["tensorboard", "mlflow"] {
        let line = report_line(&report, name);
        assert!(line.contains("received 5 delivered 2 dropped 3 (invalid_name=3)"), "{line}");
    }
    let tb = read_tb_both(&logdir);
    let tags: Vec<&String> = tb.scalars["case-020"].keys().collect();
    assert_eq!(tags, vec!["train.loss"]);
    assert_eq!(tb.scalars["case-020"]["train.loss"], vec![(1, 0.5), (2, 0.25)]);
    let id = only_run(&uri, &exp);
    let got: Vec<(i64, f64)> = history(&uri, &id, "train.loss").into_iter().map(|(s, v, _)| (s, v)).collect();
    assert_eq!(got, vec![(1, 0.5), (2, 0.25)]);
    let metrics = common::kv(&common::run(&uri, &id), "metrics");
    assert_eq!(metrics.keys().collect::<Vec<_>>(), vec!["train.loss"]);
}
