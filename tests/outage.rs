//! MLflow outages and restarts (issue 4: durable delivery). Each test runs its own real MLflow
//! server on a fixed port and data directory, stops it and starts it again: the same tracking
//! URI, the same data. Points that cannot be delivered go to the exporter's spool and reach
//! MLflow once it is back, exactly once, including after the process itself was restarted.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{history, MlflowServer, Service};
use trainmetrics::config::{ExporterConfig, MlflowConfig, RetryConfig};
use trainmetrics::Pipeline;

/// An MLflow exporter that writes every step, spools into `spool`, and retries quickly (so the
/// tests see the recovery soon after the server is back).
fn mlflow_exporter(uri: &str, spool: &Path, max_pending_points: Option<usize>) -> ExporterConfig<MlflowConfig> {
    let retry = RetryConfig {
        initial_interval: Some(Duration::from_millis(200)),
        max_interval: Some(Duration::from_secs(2)),
        max_elapsed_time: Some(Duration::from_secs(600)),
        ..Default::default()
    };
    common::spooling_mlflow(uri, spool, retry, max_pending_points)
}

fn value(step: i64) -> f64 {
    1.0 / (step as f64 + 1.0) + 0.001 * (step % 7) as f64
}

/// The MLflow run a pipeline's exporter named `mlflow` uses.
fn run_id_of(experiment: &str, uri: &str) -> String {
    let runs = common::runs_of_experiment(uri, experiment);
    assert_eq!(runs.len(), 1, "one MLflow run for the trainer's run: {runs:?}");
    runs[0]["info"]["run_id"].as_str().expect("run id").to_string()
}

/// Asserts the history of `key` holds exactly `steps`, once each, with their values, in step
/// order (by the timestamps MLflow stored: the record times).
fn assert_exactly_once(uri: &str, run_id: &str, key: &str, steps: std::ops::RangeInclusive<i64>) {
    let mut h = history(uri, run_id, key);
    h.sort_by_key(|(step, _, ts)| (*ts, *step));
    let got: Vec<i64> = h.iter().map(|(s, _, _)| *s).collect();
    let want: Vec<i64> = steps.collect();
    assert_eq!(got, want, "every step exactly once, in step order by timestamp");
    for (step, v, _) in &h {
        assert!((v - value(*step)).abs() < 1e-12, "step {step}: {v} != {}", value(*step));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Case 009: steps 1..600, one every 100 ms; the MLflow server is stopped at step 200 and started
/// again (same URI) 60 s later. Every MLflow point arrives exactly once, in step order; the
/// trainer's step time during the outage is printed beside the normal one (a measurement, not an
/// assertion: tests do not time things).
#[test]
fn case_009_mlflow_down_for_60_s_mid_run_every_point_arrives_exactly_once() {
    let data = tempfile::tempdir().expect("tempdir");
    let spool = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let server = MlflowServer::start(port, data.path());
    let uri = server.uri.clone();
    let experiment = common::unique("case009");
    let p = Pipeline::builder()
        .experiment(&experiment)
        .exporter("mlflow", mlflow_exporter(&uri, spool.path(), None))
        .shutdown_timeout(Duration::from_secs(60))
        .build()
        .expect("pipeline");
    let rec = p.recorder();
    let mut server = Some(server);
    let mut restarted = None;
    let mut step_times = Vec::new();
    let mut spooled_during_outage = 0;
    for step in 1..=600i64 {
        if step == 200 {
            if let Some(s) = server.take() {
                s.stop();
            }
            let dir = data.path().to_path_buf();
            restarted = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(60));
                MlflowServer::start(port, &dir)
            }));
        }
        let t = Instant::now();
        rec.record_all(step, &[("loss", value(step)), ("lr", value(step) / 10.0)]);
        step_times.push((step, t.elapsed()));
        if step == 550 {
            let r = &p.reports()[0];
            spooled_during_outage = r.spooled;
            assert!(r.spool_bytes > 0 && r.spooled > 0, "an outage of 35 s has spooled batches: {r}");
            assert_eq!(r.delivered + r.dropped_total() + r.pending, r.received, "{r}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let server = restarted.expect("restart thread").join().expect("MLflow restarted");
    let report = p.shutdown();
    let ml = &report.exporters[0];
    assert_eq!(ml.received, 1200, "{ml}");
    assert_eq!((ml.delivered, ml.dropped_total(), ml.pending, ml.spooled), (1200, 0, 0, 0), "{ml}");
    let run_id = run_id_of(&experiment, &uri);
    assert_exactly_once(&uri, &run_id, "loss", 1..=600);
    let lr = history(&uri, &run_id, "lr");
    assert_eq!(lr.len(), 600);
    assert_eq!(common::run(&uri, &run_id)["info"]["status"], "FINISHED");
    assert_eq!(trainmetrics::spool::directory_bytes(spool.path()), 0, "the spool is empty again");
    let mut normal: Vec<Duration> = step_times.iter().filter(|(s, _)| *s < 200).map(|(_, d)| *d).collect();
    let mut outage: Vec<Duration> = step_times.iter().filter(|(s, _)| *s >= 200).map(|(_, d)| *d).collect();
    normal.sort();
    outage.sort();
    eprintln!(
        "case 009 step time (record of 2 metrics): normal median {:?} p99 {:?}; during the outage median {:?} p99 {:?}; spooled at step 550: {spooled_during_outage} points",
        percentile(&normal, 0.5),
        percentile(&normal, 0.99),
        percentile(&outage, 0.5),
        percentile(&outage, 0.99),
    );
    server.stop();
}

/// Restart during an outage: the process ends with points still spooled (MLflow was never up),
/// a new process on the same spool directory starts once MLflow is up, and the spooled points
/// reach the first run's MLflow run, exactly once. A small `max_pending_points` makes batches
/// leave memory for disk on the way.
#[test]
fn spooled_points_survive_a_restart_of_the_library_and_reach_mlflow() {
    let data = tempfile::tempdir().expect("tempdir");
    let spool = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let uri = format!("http://127.0.0.1:{port}");
    let experiment = common::unique("restart");
    let first = Pipeline::builder()
        .experiment(&experiment)
        .run_name("first")
        .exporter("mlflow", mlflow_exporter(&uri, spool.path(), Some(5)))
        .shutdown_timeout(Duration::from_secs(2))
        .build()
        .expect("pipeline");
    let rec = first.recorder();
    for step in 1..=30 {
        rec.record(step, "loss", value(step));
    }
    let r = first.shutdown();
    let ml = &r.exporters[0];
    assert_eq!((ml.received, ml.delivered, ml.dropped_total(), ml.spooled), (30, 0, 0, 30), "{ml}");
    assert_eq!(ml.spool_bytes, trainmetrics::spool::directory_bytes(spool.path()), "{ml}");
    // Kept to replay the same batches a second time below.
    let copy = tempfile::tempdir().expect("tempdir");
    copy_spool(spool.path(), copy.path());

    let server = MlflowServer::start(port, data.path());
    let second = Pipeline::builder()
        .experiment(&experiment)
        .run_name("second")
        .exporter("mlflow", mlflow_exporter(&uri, spool.path(), Some(5)))
        .shutdown_timeout(Duration::from_secs(30))
        .build()
        .expect("pipeline");
    second.recorder().record(1, "acc", 0.5);
    let r = second.shutdown();
    let ml = &r.exporters[0];
    assert_eq!((ml.received, ml.delivered, ml.dropped_total(), ml.pending), (31, 31, 0, 0), "{ml}");
    assert_eq!(ml.events.get("replayed_from_spool"), Some(&30), "{ml}");
    let runs = common::runs_of_experiment(&uri, &experiment);
    let first_run = runs.iter().find(|r| r["info"]["run_name"] == "first").expect("the first run exists in MLflow");
    let id = first_run["info"]["run_id"].as_str().expect("id");
    assert_exactly_once(&uri, id, "loss", 1..=30);
    assert_eq!(trainmetrics::spool::directory_bytes(spool.path()), 0);

    // A crash right after delivery leaves delivered batches in the spool: replaying them again
    // keeps the original timestamps, and MLflow stores each row once.
    copy_spool(copy.path(), spool.path());
    let third = Pipeline::builder()
        .experiment(&experiment)
        .run_name("third")
        .exporter("mlflow", mlflow_exporter(&uri, spool.path(), None))
        .shutdown_timeout(Duration::from_secs(30))
        .build()
        .expect("pipeline");
    let r = third.shutdown();
    assert_eq!(r.exporters[0].events.get("replayed_from_spool"), Some(&30), "{}", r.exporters[0]);
    assert_eq!(r.exporters[0].delivered, 30, "{}", r.exporters[0]);
    assert_exactly_once(&uri, id, "loss", 1..=30);
    server.stop();
}

fn copy_spool(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).expect("spool dir") {
        let p = e.expect("entry").path();
        std::fs::copy(&p, to.join(p.file_name().expect("name"))).expect("copy segment");
    }
}

/// The same through `trainmetrics serve`: points received over OTLP while MLflow is down are
/// spooled at SIGTERM and delivered by the next service on the same spool.
#[test]
fn a_restarted_service_delivers_what_the_previous_one_spooled() {
    served_points_survive(End::Sigterm);
}

/// A service killed with SIGKILL during the outage: the batches it had written ahead to the
/// spool (every batch of a failing run is) reach MLflow through the next service.
#[test]
fn a_service_killed_during_an_outage_loses_nothing_it_had_spooled() {
    served_points_survive(End::Sigkill);
}

enum End {
    Sigterm,
    Sigkill,
}

fn served_points_survive(end: End) {
    let data = tempfile::tempdir().expect("tempdir");
    let spool = tempfile::tempdir().expect("tempdir");
    let logdir = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let uri = format!("http://127.0.0.1:{port}");
    let experiment = common::unique("serve-restart");
    let sets = [
        format!("exporters.mlflow.tracking_uri={uri}"),
        "exporters.mlflow.every_steps=1".into(),
        "exporters.mlflow.retry_on_failure.initial_interval=200ms".into(),
        "exporters.mlflow.retry_on_failure.max_interval=1s".into(),
        format!("exporters.mlflow.sending_queue.spool.directory={}", spool.path().display()),
        "shutdown_timeout=3s".into(),
    ];
    let svc = Service::start(logdir.path(), &sets);
    let run = vec![common::otlp::s("ml.experiment.name", &experiment), common::otlp::s("ml.run.name", "served")];
    let points: Vec<(&str, Option<i64>, f64)> = (1..=20).map(|s| ("loss", Some(s), value(s))).collect();
    let body = prost::Message::encode_to_vec(&common::otlp::request(vec![common::otlp::resource(run, &points)]));
    let resp = ureq::post(format!("http://{}/v1/metrics", svc.http)).header("Content-Type", "application/x-protobuf").send(&body[..]);
    assert_eq!(resp.expect("POST /v1/metrics").status(), 200);
    match end {
        End::Sigterm => {
            std::thread::sleep(Duration::from_millis(1500));
            let report = svc.stop();
            let line = report.lines().find(|l| l.trim_start().starts_with("mlflow:")).unwrap_or_else(|| panic!("{report}"));
            assert!(line.contains("received 20 delivered 0 dropped 0 pending 20 (spooled 20"), "{report}");
        }
        End::Sigkill => {
            // The last window closes after `linger` (2 s) of quiet; then every batch is on disk.
            let deadline = Instant::now() + Duration::from_secs(30);
            while spooled_points(spool.path()) < 20 {
                assert!(Instant::now() < deadline, "the failing run's batches were never written ahead");
                std::thread::sleep(Duration::from_millis(200));
            }
            svc.kill();
        }
    }

    let server = MlflowServer::start(port, data.path());
    let svc = Service::start(logdir.path(), &sets);
    let run_id = wait_for_run(&uri, &experiment);
    let deadline = Instant::now() + Duration::from_secs(60);
    while history(&uri, &run_id, "loss").len() < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = svc.stop();
    assert!(report.contains("mlflow: received 20 delivered 20 dropped 0"), "{report}");
    assert!(report.contains("replayed_from_spool 20"), "{report}");
    assert_exactly_once(&uri, &run_id, "loss", 1..=20);
    server.stop();
}

/// Data points in the batches of a spool directory, read with the crate's own reader.
fn spooled_points(dir: &Path) -> u64 {
    trainmetrics::spool::inspect(dir).iter().map(|b| b.inputs()).sum()
}

fn wait_for_run(uri: &str, experiment: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let runs = common::runs_of_experiment(uri, experiment);
        if let Some(id) = runs.first().and_then(|r| r["info"]["run_id"].as_str()) {
            assert_eq!(runs.len(), 1);
            return id.to_string();
        }
        assert!(Instant::now() < deadline, "the replayed run never appeared in MLflow");
        std::thread::sleep(Duration::from_millis(200));
    }
}
